#!/usr/bin/env bash
# Several diskport nodes on one machine, without Docker: a PostgreSQL of
# Debian's `postgresql` package, N nodes (default 3) sharing it and one data
# directory, and nginx in front of them, round-robin with no session
# affinity, as a load balancer over real hosts would be. Runs in the
# foreground; Ctrl-C (or SIGTERM) stops everything it started. The metadata
# and the data directory stay in CLUSTER_DIR for the next start.
#
#   apt-get install -y postgresql nginx && npm ci
#   scripts/cluster.sh                       # http://127.0.0.1:8080, nodes on 8081-8083
#   CLUSTER_NODES=2 CLUSTER_PORT=9000 scripts/cluster.sh
#
# Settings: CLUSTER_DIR (/tmp/diskport-cluster: PostgreSQL's files, the
# shared data directory, nginx's config and every log), CLUSTER_NODES (3),
# CLUSTER_PORT (8080: the balancer; nodes take the next ports),
# CLUSTER_PG_PORT (54340), CLUSTER_SHARED_DIR (the data directory the nodes
# share: a mount of NFS or CephFS when the nodes are on several machines;
# default CLUSTER_DIR/data). Other diskport settings pass through the
# environment (DISKPORT_TOKEN, DISKPORT_SRS, LOG_LEVEL...).
#
# As root (the usual CI and container case) PostgreSQL runs as the
# package's `postgres` user, since initdb refuses root.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${CLUSTER_DIR:-/tmp/diskport-cluster}
nodes=${CLUSTER_NODES:-3}
port=${CLUSTER_PORT:-8080}
pg_port=${CLUSTER_PG_PORT:-54340}
shared=${CLUSTER_SHARED_DIR:-$dir/data}

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] || { echo "cluster: no PostgreSQL server here; install it: apt-get install -y postgresql" >&2; exit 1; }
nginx=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$nginx" ] || { echo "cluster: no nginx here; install it: apt-get install -y nginx" >&2; exit 1; }
[ -f dist/main.js ] || npm run build

mkdir -p "$dir" "$shared" "$dir/nginx" "$dir/logs"
chmod 755 "$dir"
as_owner() {
  # from the cluster's directory: the postgres user may not enter the checkout
  if [ "$(id -u)" = 0 ]; then (cd "$dir" && runuser -u postgres -- "$@"); else "$@"; fi
}
if [ ! -d "$dir/postgres" ]; then
  mkdir -p "$dir/postgres"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/postgres"
  as_owner "$bin/initdb" -D "$dir/postgres" -U postgres -A trust >/dev/null
  fresh=1
fi

pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$nginx" -p "$dir/nginx" -c "$dir/nginx/nginx.conf" -s stop 2>/dev/null || true
  as_owner "$bin/pg_ctl" -D "$dir/postgres" -m fast stop >/dev/null 2>&1 || true
}
trap stop EXIT INT TERM

as_owner "$bin/pg_ctl" -D "$dir/postgres" -l "$dir/postgres/server.log" -w \
  -o "-p $pg_port -k $dir/postgres -c listen_addresses=127.0.0.1" start >/dev/null
if [ "${fresh:-0}" = 1 ]; then
  psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres \
    -c "CREATE ROLE diskport LOGIN PASSWORD 'diskport'" -c "CREATE DATABASE diskport OWNER diskport"
fi
export DISKPORT_DATABASE_URL="postgres://diskport:diskport@127.0.0.1:$pg_port/diskport"

upstreams=""
for i in $(seq 1 "$nodes"); do
  node_port=$((port + i))
  node dist/main.js --port "$node_port" --data-dir "$shared" >"$dir/logs/node$i.log" 2>&1 &
  pids+=($!)
  upstreams+="    server 127.0.0.1:$node_port;"$'\n'
done

# No buffering either way: a PUT streams to its node as it arrives, a GET
# to its client, and a body has no size limit (a disk is any size).
cat >"$dir/nginx/nginx.conf" <<EOF
daemon on;
pid $dir/nginx/nginx.pid;
error_log $dir/logs/nginx-error.log;
worker_processes auto;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/nginx/body;
  proxy_temp_path $dir/nginx/proxy;
  upstream diskport {
$upstreams    keepalive 32;
  }
  server {
    listen 127.0.0.1:$port;
    client_max_body_size 0;
    location / {
      proxy_pass http://diskport;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_request_buffering off;
      proxy_buffering off;
      # Big reads and writes: with the default 4-16 KiB buffers nginx spent as much CPU per GiB as a node (bench/cluster).
      proxy_buffer_size 1m;
      proxy_buffers 4 1m;
      client_body_buffer_size 1m;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF
"$nginx" -p "$dir/nginx" -c "$dir/nginx/nginx.conf"

for i in $(seq 1 "$nodes"); do
  node_port=$((port + i))
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$node_port/healthz" >/dev/null && break
    kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { echo "cluster: node $i exited; see $dir/logs/node$i.log" >&2; exit 1; }
    sleep 0.1
  done
done
echo "cluster: $nodes nodes on http://127.0.0.1:$port (nodes on $((port + 1))-$((port + nodes)), metadata $DISKPORT_DATABASE_URL, data $shared, logs $dir/logs); Ctrl-C stops it"
wait -n "${pids[@]}" || true
echo "cluster: a node exited; stopping (see $dir/logs)" >&2
