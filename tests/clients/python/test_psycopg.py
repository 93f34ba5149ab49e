"""psycopg 3: extended protocol for every statement, server-side prepared
statements, pipeline mode, COPY, transactions and autocommit."""

import psycopg
import pytest
from psycopg import errors

PORT = "SELECT inet_server_port()"


def connect(env, **kw):
    kw.setdefault("autocommit", True)
    return psycopg.connect(env.url, connect_timeout=10, **kw)


def port(conn):
    return conn.execute(PORT).fetchone()[0]


def test_plain_queries(env):
    with connect(env) as c:
        c.execute("DROP TABLE IF EXISTS pg3_plain")
        c.execute("CREATE TABLE pg3_plain (id int PRIMARY KEY, t text NOT NULL)")
        assert port(c) == env.replica
        for i in range(10):
            row = c.execute(
                "INSERT INTO pg3_plain VALUES (%s, %s) RETURNING inet_server_port(), id",
                (i, f"row {i}"),
            ).fetchone()
            assert row == (env.primary, i)
        rows = c.execute(
            "SELECT inet_server_port(), count(*), sum(id) FROM pg3_plain"
        ).fetchall()
        assert rows == [(env.replica, 10, 45)]
        row = c.execute(
            "UPDATE pg3_plain SET t = upper(t) WHERE id < 5 RETURNING inet_server_port()"
        ).fetchall()
        assert row == [(env.primary,)] * 5
        row = c.execute(
            "SELECT inet_server_port(), t FROM pg3_plain WHERE id = %s", (3,)
        ).fetchone()
        assert row == (env.replica, "ROW 3")
        # A read calling a writing function runs on the primary.
        c.execute("DROP SEQUENCE IF EXISTS pg3_plain_seq")
        c.execute("CREATE SEQUENCE pg3_plain_seq")
        assert c.execute(
            "SELECT inet_server_port(), nextval('pg3_plain_seq')"
        ).fetchone() == (env.primary, 1)
        assert port(c) == env.replica


def numbered(query):
    """The text psycopg sends for `query`: %s placeholders become $1, $2, …"""
    parts = query.split("%s")
    return "".join(p + (f"${i}" if i < len(parts) else "") for i, p in enumerate(parts, 1))


def test_server_side_prepared_statements(env):
    with connect(env, prepare_threshold=0) as c:
        c.execute("DROP TABLE IF EXISTS pg3_prep")
        c.execute("CREATE TABLE pg3_prep (id int PRIMARY KEY, v int NOT NULL)")
        read = "SELECT inet_server_port(), count(*), coalesce(sum(v), 0) FROM pg3_prep WHERE id < %s"
        write = "INSERT INTO pg3_prep VALUES (%s, %s) RETURNING inet_server_port(), v"
        total = 0
        for i in range(100):
            assert c.execute(write, (i, i * 2)).fetchone() == (env.primary, i * 2)
            total += i * 2
            assert c.execute(read, (i + 1,)).fetchone() == (env.replica, i + 1, total)
        # The same statements inside a transaction block run on the primary.
        with c.transaction():
            assert c.execute(read, (1000,)).fetchone() == (env.primary, 100, total)
            assert c.execute(write, (1000, 1)).fetchone() == (env.primary, 1)
        assert c.execute(read, (10**6,)).fetchone() == (env.replica, 101, total + 1)
        # psycopg really prepared them (protocol-level, named; once per
        # parameter type) on the connection that ran them. Connections are
        # pooled, so a block keeps one connection for both statements.
        find = (
            "SELECT inet_server_port(), count(*) > 0 FROM pg_prepared_statements "
            "WHERE statement = %s AND NOT from_sql AND name <> ''"
        )
        with c.transaction():
            c.execute(read, (1,))
            assert c.execute(find, (numbered(read),)).fetchone() == (env.primary, True)
        with c.transaction():
            c.execute(write, (2000, 2))
            assert c.execute(find, (numbered(write),)).fetchone() == (
                env.primary,
                True,
            )


def test_prepare_after_threshold(env):
    """The default: psycopg prepares a statement on its fifth execution."""
    with connect(env) as c:
        for _ in range(20):
            assert port(c) == env.replica
            assert c.execute(
                "SELECT inet_server_port(), %s::int + 1", (41,)
            ).fetchone() == (env.replica, 42)


def test_pipeline_mode(env):
    with connect(env) as c:
        c.execute("DROP TABLE IF EXISTS pg3_pipe")
        c.execute("CREATE TABLE pg3_pipe (id int PRIMARY KEY, t text)")
        with c.pipeline() as p:
            reads = [c.execute(PORT) for _ in range(3)]
            p.sync()
            writes = [
                c.execute(
                    "INSERT INTO pg3_pipe VALUES (%s, %s) RETURNING inet_server_port()",
                    (i, str(i)),
                )
                for i in range(5)
            ]
            p.sync()
            count = c.execute("SELECT inet_server_port(), count(*) FROM pg3_pipe")
            p.sync()
            # Reads and writes in one batch: the batch needs the primary.
            mixed = [
                c.execute("SELECT count(*) FROM pg3_pipe"),
                c.execute(
                    "INSERT INTO pg3_pipe VALUES (99, 'x') RETURNING inet_server_port()"
                ),
                c.execute("SELECT count(*) FROM pg3_pipe"),
            ]
        assert [r.fetchone()[0] for r in reads] == [env.replica] * 3
        assert [w.fetchone()[0] for w in writes] == [env.primary] * 5
        assert count.fetchone() == (env.replica, 5)
        assert [m.fetchone()[0] for m in mixed] == [5, env.primary, 6]
        assert c.execute("SELECT count(*) FROM pg3_pipe").fetchone()[0] == 6

        # A pipeline inside a transaction block stays on the primary.
        with c.transaction(), c.pipeline():
            inside = [c.execute(PORT) for _ in range(3)]
            c.execute("INSERT INTO pg3_pipe VALUES (100, 'y')")
        assert [r.fetchone()[0] for r in inside] == [env.primary] * 3
        assert c.execute("SELECT count(*) FROM pg3_pipe").fetchone()[0] == 7

        # An error inside a pipeline aborts the rest of its batch only.
        with pytest.raises(errors.UniqueViolation):
            with c.pipeline() as p:
                c.execute("INSERT INTO pg3_pipe VALUES (1, 'dup')")
                c.execute("INSERT INTO pg3_pipe VALUES (101, 'skipped')")
                p.sync()
        assert c.execute("SELECT count(*) FROM pg3_pipe").fetchone()[0] == 7


def test_read_after_pipeline_runs_on_replica(env):
    """Leaving pipeline mode, psycopg sends Sync then Flush; the statements
    after it are outside any block."""
    with connect(env) as c:
        with c.pipeline():
            inside = c.execute(PORT)
        assert inside.fetchone()[0] == env.replica
        after = [port(c) for _ in range(3)]
        assert after == [env.replica] * 3, (
            "reads after a pipeline ran on "
            + ", ".join("primary" if p == env.primary else "replica" for p in after)
        )


def test_copy(env):
    with connect(env) as c:
        c.execute("DROP TABLE IF EXISTS pg3_copy")
        c.execute("CREATE TABLE pg3_copy (id int PRIMARY KEY, t text NOT NULL)")
        with c.cursor() as cur:
            with cur.copy("COPY pg3_copy (id, t) FROM STDIN") as copy:
                for i in range(1000):
                    copy.write_row((i, f"line {i}"))
            assert cur.rowcount == 1000
            assert port(c) == env.replica
            assert c.execute(
                "SELECT inet_server_port(), count(*), sum(id) FROM pg3_copy"
            ).fetchone() == (env.replica, 1000, 499500)

            with cur.copy("COPY pg3_copy TO STDOUT") as copy:
                rows = list(copy.rows())
            assert len(rows) == 1000
            assert sorted((int(i), t) for i, t in rows) == [
                (i, f"line {i}") for i in range(1000)
            ]
            with cur.copy(
                "COPY (SELECT inet_server_port(), count(*) FROM pg3_copy) TO STDOUT"
            ) as copy:
                assert [(int(p), n) for p, n in copy.rows()] == [(env.replica, "1000")]

            # COPY FROM with a bad row fails with the server's SQLSTATE.
            with pytest.raises(errors.UniqueViolation) as e:
                with cur.copy("COPY pg3_copy (id, t) FROM STDIN") as copy:
                    copy.write_row((5000, "new"))
                    copy.write_row((1, "duplicate"))
            assert e.value.sqlstate == "23505"
        assert c.execute("SELECT count(*) FROM pg3_copy").fetchone()[0] == 1000

        # COPY inside a transaction: both directions on the primary.
        with c.transaction():
            with c.cursor().copy("COPY pg3_copy (id, t) FROM STDIN") as copy:
                copy.write_row((2000, "in tx"))
            with c.cursor().copy(
                "COPY (SELECT inet_server_port(), count(*) FROM pg3_copy) TO STDOUT"
            ) as copy:
                assert list(copy.rows()) == [(str(env.primary), "1001")]


def test_transaction_and_error(env):
    with connect(env) as c:
        c.execute("DROP TABLE IF EXISTS pg3_tx")
        c.execute("CREATE TABLE pg3_tx (id int PRIMARY KEY, v int NOT NULL)")
        with c.transaction():
            assert port(c) == env.primary
            assert c.execute(
                "INSERT INTO pg3_tx VALUES (1, 10) RETURNING inet_server_port()"
            ).fetchone()[0] == env.primary
            assert c.execute(
                "SELECT inet_server_port(), v FROM pg3_tx WHERE id = 1"
            ).fetchone() == (env.primary, 10)
        assert c.execute(
            "SELECT inet_server_port(), v FROM pg3_tx WHERE id = 1"
        ).fetchone() == (env.replica, 10)

        # An error inside the block: the right SQLSTATE, the block rolled back.
        with pytest.raises(errors.UniqueViolation) as e:
            with c.transaction():
                c.execute("INSERT INTO pg3_tx VALUES (2, 20)")
                c.execute("INSERT INTO pg3_tx VALUES (1, 30)")
        assert e.value.sqlstate == "23505"
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c.execute(
            "SELECT inet_server_port(), count(*) FROM pg3_tx"
        ).fetchone() == (env.replica, 1)

        # After an error, the block refuses statements until it ends.
        with pytest.raises(errors.InFailedSqlTransaction) as e:
            with c.transaction():
                with pytest.raises(errors.DivisionByZero) as e0:
                    c.execute("SELECT 1 / 0")
                assert e0.value.sqlstate == "22012"
                c.execute(PORT)
        assert e.value.sqlstate == "25P02"

        # A savepoint (nested transaction) recovers from the error.
        with c.transaction():
            c.execute("INSERT INTO pg3_tx VALUES (3, 30)")
            with pytest.raises(errors.UniqueViolation):
                with c.transaction():
                    c.execute("INSERT INTO pg3_tx VALUES (1, 0)")
            assert port(c) == env.primary
        assert c.execute(
            "SELECT inet_server_port(), array_agg(id ORDER BY id) FROM pg3_tx"
        ).fetchone() == (env.replica, [1, 3])

        # An explicit rollback discards the block's writes.
        with c.transaction() as tx:
            c.execute("INSERT INTO pg3_tx VALUES (4, 40)")
            raise psycopg.Rollback(tx)
        assert c.execute("SELECT count(*) FROM pg3_tx").fetchone()[0] == 2

        # A read-only block may run on the replica.
        c.execute("BEGIN READ ONLY")
        assert port(c) == env.replica
        c.execute("COMMIT")


def test_session_settings_follow_the_session(env):
    """A setting made once holds for every later statement, whichever
    server runs it."""
    q = (
        "SELECT inet_server_port(), current_setting('application_name'), "
        "current_setting('statement_timeout')"
    )
    with connect(env) as c:
        c.execute("SET application_name = 'pg3_set'")
        c.execute("SET statement_timeout = '42s'")
        assert c.execute(q).fetchone() == (env.replica, "pg3_set", "42s")
        with c.transaction():
            assert c.execute(q).fetchone() == (env.primary, "pg3_set", "42s")
        assert c.execute(q).fetchone() == (env.replica, "pg3_set", "42s")

        # set_config(…, false) is a SET too (Django sends one for TimeZone
        # on every connection).
        c.execute("SELECT set_config('application_name', 'pg3_set_config', false)")
        for where in ("right after", "after a block", "after a write"):
            if where == "after a block":
                with c.transaction():
                    c.execute("SELECT 1")
            elif where == "after a write":
                c.execute("DROP TABLE IF EXISTS pg3_set_nothing")
            port, name, _ = c.execute(q).fetchone()
            assert port in (env.primary, env.replica)
            assert name == "pg3_set_config", (
                f"{where}: application_name is {name!r} on the "
                + ("primary" if port == env.primary else "replica")
            )


def test_autocommit_on_and_off(env):
    with connect(env, autocommit=False) as c:
        c.execute("DROP TABLE IF EXISTS pg3_ac")
        c.execute("CREATE TABLE pg3_ac (id int PRIMARY KEY)")
        c.commit()
        # Without autocommit psycopg opens a block before the first statement.
        assert port(c) == env.primary
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        c.execute("INSERT INTO pg3_ac VALUES (1)")
        c.rollback()
        assert port(c) == env.primary
        c.execute("INSERT INTO pg3_ac VALUES (2)")
        c.commit()
        assert c.execute("SELECT array_agg(id) FROM pg3_ac").fetchone()[0] == [2]
        c.commit()

        c.autocommit = True
        assert port(c) == env.replica
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert c.execute(
            "INSERT INTO pg3_ac VALUES (3) RETURNING inet_server_port()"
        ).fetchone()[0] == env.primary
        assert c.execute(
            "SELECT inet_server_port(), array_agg(id ORDER BY id) FROM pg3_ac"
        ).fetchone() == (env.replica, [2, 3])

        c.autocommit = False
        assert port(c) == env.primary
        c.rollback()
        c.autocommit = True
        assert port(c) == env.replica
