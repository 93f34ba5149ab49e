#!/bin/bash
# Lets the app role stream WAL for the replica (compose setup only).
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
ALTER ROLE app REPLICATION;
SQL
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
