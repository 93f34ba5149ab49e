#!/bin/bash
# Runs once, when the primary's data directory is initialised (compose setup
# only): lets the app role stream WAL for the replica and creates the
# replica's physical replication slot, so the primary keeps the WAL the
# replica has not received yet (also across a replica restart). The slot
# reserves WAL from now on: the replica's base backup streams through it.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
ALTER ROLE app REPLICATION;
SELECT pg_create_physical_replication_slot('replica1', true);
SQL
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
