# shellcheck shell=bash disable=SC2034 # PSQL and PGBENCH are for the sourcing script
# Sourced by setup and run: sets PSQL and PGBENCH to PostgreSQL's client
# binaries (pg_config --bindir, else the newest /usr/lib/postgresql/*/bin,
# else PATH), or fails with a message.
pgbin_locate() {
    local dir candidates=()
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null)")
    fi
    while IFS= read -r dir; do
        candidates+=("$dir")
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -t/ -k4,4 -rn)
    for dir in "${candidates[@]}"; do
        if [ -x "$dir/psql" ] && [ -x "$dir/pgbench" ]; then
            PSQL=$dir/psql
            PGBENCH=$dir/pgbench
            return 0
        fi
    done
    if command -v psql >/dev/null 2>&1 && command -v pgbench >/dev/null 2>&1; then
        PSQL=$(command -v psql)
        PGBENCH=$(command -v pgbench)
        return 0
    fi
    echo "cli: psql and pgbench not found (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH); install postgresql-client and postgresql-contrib or postgresql" >&2
    return 1
}
