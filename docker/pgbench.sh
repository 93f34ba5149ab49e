#!/bin/bash
# The compose file's pgbench service (profile "bench"): initialises the
# pgbench tables through pgsplit, then runs pgbench's TPC-B-like script
# (every transaction is a block: the primary) and its select-only script
# (the replica) for PGBENCH_TIME seconds each. PGHOST etc. name pgsplit.
set -euo pipefail
scale=${PGBENCH_SCALE:-10}
clients=${PGBENCH_CLIENTS:-8}
seconds=${PGBENCH_TIME:-30}
threads=$(( clients < 2 ? clients : 2 ))

echo "waiting for pgsplit on $PGHOST:$PGPORT..."
tries=0
until psql -qAtc 'SELECT 1' >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    echo "pgsplit does not answer on $PGHOST:$PGPORT; see: docker compose logs pgsplit" >&2
    exit 1
  fi
  sleep 1
done

echo "== pgbench -i -s $scale (through pgsplit; its writes go to the primary)"
pgbench -i -s "$scale"

# pgbench's first query on a new connection (the table's scale) is a read
# and goes to the replica: wait until the replica has replayed the
# initialisation, read straight from both servers.
lsn=$(psql -h primary -p 5432 -qAtc 'SELECT pg_current_wal_lsn()')
tries=0
until [ "$(psql -h replica -p 5432 -qAtc "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ]; do
  tries=$((tries + 1))
  if [ "$tries" -ge 300 ]; then
    echo "the replica has not replayed $lsn after 60s; going on (reads go to the primary while it lags)" >&2
    break
  fi
  sleep 0.2
done

echo "== TPC-B-like, $clients clients, ${seconds}s (writes: the primary)"
pgbench -c "$clients" -j "$threads" -T "$seconds" -P 5
echo "== select-only, $clients clients, ${seconds}s (reads: the replica)"
pgbench -S -c "$clients" -j "$threads" -T "$seconds" -P 5
