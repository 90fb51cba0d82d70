#!/usr/bin/env bash
# The suite on PostgreSQL: starts a throwaway cluster of Debian's postgresql
# package (scripts/pg-cluster.sh) on 127.0.0.1, gives it a user that may
# create databases, and runs the test files of `npm test` (or the ones
# given) with DISKPORT_TEST_DATABASE_URL set, so every test server keeps its
# metadata in a database of its own (test/helpers/pg.ts). A test about SQLite
# itself is skipped there, saying why. Three files at a time, as `npm test`
# runs them. The cluster is stopped and removed at the end, whatever happened.
set -euo pipefail
cd "$(dirname "$0")/.."

# Files that never open a metadata store (codecs, image writers, pure
# functions, checks of the source tree and of openapi.yaml): they run the
# same on either backend, so the SQLite pass (`npm test`) is where they run.
# Any other file runs here, a new one too.
STORE_FREE=(
  test/direct-writer.test.ts test/error-coverage.test.ts test/errors.test.ts test/image-contract.test.ts
  test/layers.test.ts test/openapi.test.ts test/qcow2-codec.test.ts test/qcow2-malformed.test.ts
  test/qcow2-patch-crash.test.ts test/sparse-writer.test.ts test/vhd-codec.test.ts test/vhd-malformed.test.ts
  test/unit/*.test.ts
)
# Files whose subject is the bytes of images (at rest, on the wire, through
# conversions, deltas and merges of chains), the CLI's flows or reads: they
# open a store only to hold the VDIs they write, and what they judge
# (qemu-img check and compare, bytes, costs, syscalls) does not depend on
# which store that is; the SQLite pass runs them. What the store keeps
# (sessions, tasks, tickets, snapshots, sets, leases and the cluster) and
# what a kill -9 must leave of it runs here (a set's migration through its
# kills: set-migration-crash). Keeps CI under 30 minutes.
IMAGE_BYTES=(
  test/chains.test.ts test/chains-qcow2.test.ts test/chains-vhd.test.ts test/clean-at-rest.test.ts
  test/corrupt-at-rest.test.ts test/interop.test.ts test/delta-import-cost.test.ts
  test/imageio-write-cost.test.ts test/cli.test.ts test/incremental-backup.test.ts test/commands.test.ts
  test/streaming-import.test.ts test/ranged-reads-100k.test.ts test/sendfile-formats.test.ts
  test/sendfile-export.test.ts test/full-disk.test.ts test/delta-export.test.ts test/delta-import.test.ts
  test/merges.test.ts test/merges-history.test.ts test/merges-crash-layers.test.ts
  test/delta-streamed-crash.test.ts test/vdi-copy.test.ts test/malformed-uploads.test.ts
  test/image-fidelity.test.ts test/export-formats.test.ts test/export-headers.test.ts
  test/raw-delta-session.test.ts test/raw-transfer.test.ts test/storage-at-rest.test.ts
  test/set-migration.test.ts
)

tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  for f in test/*.test.ts; do
    [[ " ${STORE_FREE[*]} ${IMAGE_BYTES[*]} " == *" $f "* ]] || tests+=("$f")
  done
fi

port=${DISKPORT_TEST_PG_PORT:-54329}
dir=$(mktemp -d /tmp/diskport-pg.XXXXXX)
trap 'bash scripts/pg-cluster.sh remove "$dir"' EXIT
bash scripts/pg-cluster.sh init "$dir" "$port"
psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
  -c "CREATE ROLE diskport LOGIN CREATEDB PASSWORD 'diskport'" -c "CREATE DATABASE diskport OWNER diskport"

export DISKPORT_TEST_DATABASE_URL="postgres://diskport:diskport@127.0.0.1:$port/diskport"
node --import tsx --import ./test/helpers/register-test-timeout.ts --test --test-concurrency=3 \
  --test-timeout=600000 "${tests[@]}"
