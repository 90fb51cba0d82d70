#!/usr/bin/env bash
# A throwaway PostgreSQL cluster of Debian's postgresql package, for the
# tests (scripts/test-postgres.sh, and test/pg-restart.test.ts, which stops
# and starts one of its own under a running diskport):
#
#   pg-cluster.sh init DIR PORT      a cluster in DIR/data on 127.0.0.1:PORT (its socket in DIR),
#                                    started, with a superuser `postgres` trusted from 127.0.0.1
#   pg-cluster.sh start DIR          started again, as init configured it
#   pg-cluster.sh stop DIR [MODE]    pg_ctl's stop (MODE fast by default: clients are disconnected)
#   pg-cluster.sh remove DIR         stopped at once, and DIR removed
#
# As root (CI) the cluster runs as the package's `postgres` user, since
# initdb refuses root; as anyone else, as that user. fsync is off: the
# tests are about diskport, not about PostgreSQL surviving a power cut.
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ]; then
  echo "pg-cluster: no PostgreSQL server here; install it: apt-get install -y postgresql" >&2
  exit 1
fi
cmd=${1:?usage: pg-cluster.sh init DIR PORT | start DIR | stop DIR [MODE] | remove DIR}
dir=${2:?the directory of the cluster}
as_owner() {
  # from the cluster's directory: the postgres user may not enter the checkout
  if [ "$(id -u)" = 0 ]; then (cd "$dir" && runuser -u postgres -- "$@"); else (cd "$dir" && "$@"); fi
}
start() {
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start >/dev/null
}

case "$cmd" in
  init)
    port=${3:?the port}
    mkdir -p "$dir"
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
    # in the cluster's own configuration, so that `start` after a `stop` needs no options
    cat >>"$dir/data/postgresql.conf" <<EOF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
max_connections = 300
EOF
    start
    ;;
  start) start ;;
  stop) as_owner "$bin/pg_ctl" -D "$dir/data" -m "${3:-fast}" -w stop >/dev/null ;;
  remove)
    as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *)
    echo "pg-cluster: unknown command $cmd" >&2
    exit 2
    ;;
esac
