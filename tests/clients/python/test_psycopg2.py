"""psycopg2 (libpq, simple query protocol): server-side named cursors,
execute_values batches, errors with pgcode."""

import psycopg2
import psycopg2.errorcodes
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest

PORT = "SELECT inet_server_port()"


def connect(env, autocommit):
    conn = psycopg2.connect(env.url, connect_timeout=10)
    conn.autocommit = autocommit
    return conn


def one(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def test_named_cursor(env):
    conn = connect(env, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS pg2_named")
            cur.execute(
                "CREATE TABLE pg2_named AS SELECT g AS id, md5(g::text) AS h "
                "FROM generate_series(1, 1000) g"
            )
        assert one(conn, "SELECT inet_server_port(), count(*) FROM pg2_named") == (
            env.replica,
            1000,
        )

        # A named cursor needs a transaction block: psycopg2 opens one.
        conn.autocommit = False
        with conn:
            cur = conn.cursor(name="pg2_named_cur")
            cur.itersize = 64
            cur.execute("SELECT id, h, inet_server_port() FROM pg2_named ORDER BY id")
            seen = 0
            for i, (id_, h, port) in enumerate(cur, start=1):
                assert id_ == i
                assert len(h) == 32
                assert port == env.primary
                seen += 1
            assert seen == 1000
            # fetchmany/scroll work on the server-side cursor too.
            cur.scroll(0, mode="absolute")
            assert [r[0] for r in cur.fetchmany(3)] == [1, 2, 3]
            cur.close()
            assert one(conn, PORT)[0] == env.primary

        # A cursor WITH HOLD outlives its transaction.
        with conn:
            held = conn.cursor(name="pg2_held_cur", withhold=True)
            held.execute("SELECT id FROM pg2_named WHERE id <= 100 ORDER BY id")
        conn.autocommit = True
        assert [r[0] for r in held.fetchmany(50)] == list(range(1, 51))
        assert [r[0] for r in held.fetchall()] == list(range(51, 101))
        held.close()
    finally:
        conn.close()


def test_execute_values(env):
    conn = connect(env, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS pg2_batch")
            cur.execute("CREATE TABLE pg2_batch (id int PRIMARY KEY, t text NOT NULL)")
            rows = [(i, f"v{i}") for i in range(1, 1001)]
            ports = psycopg2.extras.execute_values(
                cur,
                "INSERT INTO pg2_batch (id, t) VALUES %s RETURNING inet_server_port()",
                rows,
                page_size=100,
                fetch=True,
            )
            assert len(ports) == 1000
            assert {p for (p,) in ports} == {env.primary}
            cur.execute("SELECT inet_server_port(), count(*), sum(id) FROM pg2_batch")
            assert cur.fetchone() == (env.replica, 1000, 500500)

            # execute_values for an UPDATE … FROM (VALUES …).
            psycopg2.extras.execute_values(
                cur,
                "UPDATE pg2_batch b SET t = v.t FROM (VALUES %s) AS v (id, t) "
                "WHERE b.id = v.id",
                [(i, f"new{i}") for i in range(1, 11)],
            )
            cur.execute("SELECT inet_server_port(), count(*) FROM pg2_batch WHERE t LIKE 'new%'")
            assert cur.fetchone() == (env.replica, 10)

            # executemany and execute_batch (many statements per round trip).
            cur.executemany(
                "INSERT INTO pg2_batch VALUES (%s, %s)", [(i, "m") for i in range(2001, 2011)]
            )
            psycopg2.extras.execute_batch(
                cur,
                "INSERT INTO pg2_batch VALUES (%s, %s)",
                [(i, "b") for i in range(3001, 3101)],
                page_size=25,
            )
            cur.execute(
                "SELECT inet_server_port(), count(*) FILTER (WHERE t = 'm'), "
                "count(*) FILTER (WHERE t = 'b') FROM pg2_batch"
            )
            assert cur.fetchone() == (env.replica, 10, 100)
    finally:
        conn.close()


def test_errors_with_pgcode(env):
    conn = connect(env, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS pg2_err")
            cur.execute("CREATE TABLE pg2_err (id int PRIMARY KEY)")
            cur.execute("INSERT INTO pg2_err VALUES (1)")

            cases = [
                ("SELECT 1 / 0", psycopg2.errors.DivisionByZero, "22012"),
                ("SELECT * FROM pg2_err_missing", psycopg2.errors.UndefinedTable, "42P01"),
                ("SELEC 1", psycopg2.errors.SyntaxError, "42601"),
                ("INSERT INTO pg2_err VALUES (1)", psycopg2.errors.UniqueViolation, "23505"),
                ("INSERT INTO pg2_err VALUES (NULL)", psycopg2.errors.NotNullViolation, "23502"),
            ]
            for sql, exc, code in cases:
                with pytest.raises(exc) as e:
                    cur.execute(sql)
                assert e.value.pgcode == code, sql
                assert e.value.diag.sqlstate == code, sql
                # The session is usable straight away, and reads stay on the replica.
                cur.execute(PORT)
                assert cur.fetchone()[0] == env.replica, f"after {sql}"

        # Inside a transaction: the error, then 25P02 until rollback.
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("INSERT INTO pg2_err VALUES (2) RETURNING inet_server_port()")
            assert cur.fetchone()[0] == env.primary
            with pytest.raises(psycopg2.errors.UniqueViolation) as e:
                cur.execute("INSERT INTO pg2_err VALUES (1)")
            assert e.value.pgcode == psycopg2.errorcodes.UNIQUE_VIOLATION
            assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INERROR
            with pytest.raises(psycopg2.errors.InFailedSqlTransaction) as e:
                cur.execute(PORT)
            assert e.value.pgcode == "25P02"
            conn.rollback()
            cur.execute("SELECT inet_server_port(), array_agg(id) FROM pg2_err")
            assert cur.fetchone() == (env.primary, [1])
            conn.commit()
        conn.autocommit = True
        assert one(conn, "SELECT inet_server_port(), count(*) FROM pg2_err") == (env.replica, 1)
    finally:
        conn.close()
