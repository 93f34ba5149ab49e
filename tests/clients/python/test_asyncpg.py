"""asyncpg: every statement is prepared (named) and cached per connection.
A statement's first run is Parse/Describe/Flush, then Bind/Execute/Sync once
the description is back; later runs are Bind/Execute/Sync only. Statements
prepared on one server are later run on the other."""

import asyncio

import asyncpg
import pytest

PORT = "SELECT inet_server_port()"


# Every call gives up after this long, so a stuck statement fails its case
# instead of hanging the suite.
COMMAND_TIMEOUT = 30


def run(coro):
    return asyncio.run(coro)


async def connect(env, **kw):
    return await asyncpg.connect(env.url, timeout=10, command_timeout=COMMAND_TIMEOUT, **kw)


async def done(c):
    """Closes `c`; drops it if the server does not answer (after a failure)."""
    try:
        await c.close(timeout=5)
    except (asyncio.TimeoutError, OSError, asyncpg.PostgresError):
        c.terminate()


class Reads:
    """Labels a read by whether its connection runs the statement for the
    first time (prepares it) or from asyncpg's statement cache."""

    def __init__(self):
        self.seen = set()

    def label(self, conn, sql):
        key = (conn.get_server_pid(), sql)
        first = key not in self.seen
        self.seen.add(key)
        return "read, first run of the statement" if first else "read, cached statement"


def test_first_run_of_a_read(env, route):
    async def main():
        c = await connect(env)
        try:
            route.replica(await c.fetchval(PORT), "first run of SELECT inet_server_port()")
            route.replica(await c.fetchval(PORT), "second run (cached)")
            route.replica(
                await c.fetchval("SELECT inet_server_port() + $1", 0),
                "first run of a parameterised read",
            )
        finally:
            await done(c)

    run(main())
    route.verify()


def test_statement_cache_off(env, route):
    """statement_cache_size=0 (usual behind a transaction-mode pooler): every
    statement is prepared again, unnamed, before it runs."""

    async def main():
        c = await connect(env, statement_cache_size=0)
        try:
            for i in range(5):
                route.replica(await c.fetchval(PORT), "read")
                assert await c.fetchval("SELECT $1::int * 2", i) == i * 2
            async with c.transaction():
                route.primary(await c.fetchval(PORT), "read in a block")
        finally:
            await done(c)

    run(main())
    route.verify()


def test_mixed_statements(env, route):
    async def main():
        c = await connect(env)
        reads = Reads()
        try:
            await c.execute("DROP TABLE IF EXISTS apg_mix")
            await c.execute("CREATE TABLE apg_mix (id int PRIMARY KEY, v int NOT NULL)")
            read = "SELECT inet_server_port(), count(*), coalesce(sum(v), 0) FROM apg_mix"
            insert = "INSERT INTO apg_mix VALUES ($1, $2) RETURNING inet_server_port()"
            scan = (
                "SELECT id, v, inet_server_port() AS port FROM apg_mix "
                "WHERE id <= $1 ORDER BY id"
            )
            count = total = 0
            for i in range(300):
                kind = i % 4
                if kind == 0:
                    route.primary(await c.fetchval(insert, i, i), "insert")
                    count, total = count + 1, total + i
                elif kind == 1:
                    label = reads.label(c, read)
                    port, n, s = await c.fetchrow(read)
                    route.replica(port, label)
                    assert (n, s) == (count, total)
                elif kind == 2:
                    async with c.transaction():
                        # The cached statements, now inside a block.
                        port, n, s = await c.fetchrow(read)
                        route.primary(port, "read in a block")
                        assert (n, s) == (count, total)
                        route.primary(await c.fetchval(insert, i, 1), "insert in a block")
                        route.primary(await c.fetchval(PORT), "read in a block")
                    count, total = count + 1, total + 1
                else:
                    label = reads.label(c, scan)
                    rows = await c.fetch(scan, i)
                    assert len(rows) == count
                    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
                    for r in rows:
                        route.replica(r["port"], label)
                    route.replica(await c.fetchval(PORT), reads.label(c, PORT))
            port, n, s = await c.fetchrow(read)
            route.replica(port, "read, cached statement")
            assert (n, s, count) == (150, total, 150)
        finally:
            await done(c)

    run(main())
    route.verify()


def test_transaction_error_and_rollback(env, route):
    async def main():
        c = await connect(env)
        try:
            await c.execute("DROP TABLE IF EXISTS apg_tx")
            await c.execute("CREATE TABLE apg_tx (id int PRIMARY KEY)")
            await c.execute("INSERT INTO apg_tx VALUES (1)")
            with pytest.raises(asyncpg.UniqueViolationError) as e:
                async with c.transaction():
                    await c.execute("INSERT INTO apg_tx VALUES (2)")
                    await c.execute("INSERT INTO apg_tx VALUES ($1)", 1)
            assert e.value.sqlstate == "23505"
            assert not c.is_in_transaction()
            port, ids = await c.fetchrow("SELECT inet_server_port(), array_agg(id) FROM apg_tx")
            route.replica(port, "read after the rollback")
            assert ids == [1]

            # A savepoint inside the block.
            async with c.transaction():
                await c.execute("INSERT INTO apg_tx VALUES (3)")
                with pytest.raises(asyncpg.UniqueViolationError):
                    async with c.transaction():
                        await c.execute("INSERT INTO apg_tx VALUES (1)")
                route.primary(await c.fetchval(PORT), "read in a block")
            assert await c.fetchval("SELECT array_agg(id ORDER BY id) FROM apg_tx") == [1, 3]

            # After an error in a block, 25P02 until it ends.
            with pytest.raises(asyncpg.InFailedSQLTransactionError) as e:
                async with c.transaction():
                    with pytest.raises(asyncpg.DivisionByZeroError) as e0:
                        await c.fetchval("SELECT 1 / $1::int", 0)
                    assert e0.value.sqlstate == "22012"
                    await c.fetchval(PORT)
            assert e.value.sqlstate == "25P02"
            route.replica(await c.fetchval(PORT), "read, cached statement")

            # A read-only transaction may run on the replica.
            async with c.transaction(readonly=True):
                route.replica(await c.fetchval(PORT), "read in a read-only block")
                assert await c.fetchval("SELECT count(*) FROM apg_tx") == 2
        finally:
            await done(c)

    run(main())
    route.verify()


def test_executemany_and_copy(env, route):
    async def main():
        c = await connect(env)
        try:
            await c.execute("DROP TABLE IF EXISTS apg_bulk")
            await c.execute(
                "CREATE TABLE apg_bulk (id int PRIMARY KEY, t text NOT NULL, f float8)"
            )
            await c.executemany(
                "INSERT INTO apg_bulk (id, t, f) VALUES ($1, $2, $3)",
                [(i, f"e{i}", i / 2) for i in range(500)],
            )
            stats = "SELECT inet_server_port(), count(*), sum(id), count(f) FROM apg_bulk"
            port, n, s, f = await c.fetchrow(stats)
            route.replica(port, "read, first run of the statement")
            assert (n, s, f) == (500, 124750, 500)

            # executemany is atomic: one bad row and none is inserted.
            with pytest.raises(asyncpg.UniqueViolationError) as e:
                await c.executemany(
                    "INSERT INTO apg_bulk (id, t) VALUES ($1, $2)",
                    [(1000, "new"), (1001, "new"), (0, "duplicate")],
                )
            assert e.value.sqlstate == "23505"
            port, n, s, f = await c.fetchrow(stats)
            route.replica(port, "read, cached statement")
            assert n == 500

            result = await c.copy_records_to_table(
                "apg_bulk",
                records=[(i, f"c{i}", None) for i in range(1000, 3000)],
                columns=["id", "t", "f"],
            )
            assert result == "COPY 2000"
            port, n, s, f = await c.fetchrow(stats)
            route.replica(port, "read, cached statement")
            assert (n, f) == (2500, 500)

            # COPY out.
            out = []

            async def sink(chunk):
                out.append(chunk)

            await c.copy_from_query(
                "SELECT inet_server_port(), count(*) FROM apg_bulk", output=sink
            )
            port, n = b"".join(out).decode().split()
            route.replica(int(port), "COPY (SELECT …) TO STDOUT")
            assert n == "2500"
            # copy_from_table writes everything.
            out.clear()
            await c.copy_from_table("apg_bulk", columns=["id"], output=sink)
            assert sorted(int(x) for x in b"".join(out).split()) == list(range(500)) + list(
                range(1000, 3000)
            )
        finally:
            await done(c)

    run(main())
    route.verify()


def test_copy_as_the_first_statement(env):
    """asyncpg sends its COPY data right behind the COPY statement, without
    waiting for the server's CopyInResponse (the protocol allows it)."""

    async def main():
        c = await connect(env)
        try:
            await c.execute("DROP TABLE IF EXISTS apg_copy1")
            await c.execute("CREATE TABLE apg_copy1 (id int PRIMARY KEY, t text NOT NULL)")
        finally:
            await done(c)
        for attempt in range(5):
            c = await connect(env)
            try:
                base = attempt * 1000
                result = None
                try:
                    result = await c.copy_records_to_table(
                        "apg_copy1", records=[(base + i, "x") for i in range(1000)], timeout=10
                    )
                except asyncio.TimeoutError:
                    pass
                if result is None:
                    pytest.fail(
                        f"attempt {attempt + 1}: COPY apg_copy1 FROM STDIN got no answer "
                        "within 10 s (its data was sent before the CopyInResponse arrived)",
                        pytrace=False,
                    )
                assert result == "COPY 1000"
                assert await c.fetchval("SELECT count(*) FROM apg_copy1") == base + 1000
            finally:
                await done(c)

    run(main())


def test_pool(env, route):
    async def main():
        reads = Reads()
        async with asyncpg.create_pool(
            env.url, min_size=4, max_size=4, timeout=10, command_timeout=COMMAND_TIMEOUT
        ) as pool:
            async with pool.acquire() as c:
                await c.execute("DROP TABLE IF EXISTS apg_pool")
                await c.execute("CREATE TABLE apg_pool (id int PRIMARY KEY, w int NOT NULL)")

            count = "SELECT inet_server_port(), count(*) FROM apg_pool WHERE w = $1"

            async def work(w):
                async with pool.acquire() as c:
                    for j in range(20):
                        id_ = w * 100 + j
                        route.primary(
                            await c.fetchval(
                                "INSERT INTO apg_pool VALUES ($1, $2) "
                                "RETURNING inet_server_port()",
                                id_,
                                w,
                            ),
                            "insert",
                        )
                        label = reads.label(c, count)
                        port, n = await c.fetchrow(count, w)
                        route.replica(port, label)
                        assert n == j + 1
                        if j % 5 == 0:
                            async with c.transaction():
                                route.primary(
                                    await c.fetchval(
                                        "SELECT inet_server_port() FROM apg_pool "
                                        "WHERE id = $1 FOR UPDATE",
                                        id_,
                                    ),
                                    "SELECT … FOR UPDATE in a block",
                                )
                                await c.execute("UPDATE apg_pool SET w = w WHERE id = $1", id_)

            await asyncio.gather(*(work(w) for w in range(12)))
            async with pool.acquire() as c:
                total = "SELECT inet_server_port(), count(*), count(DISTINCT w) FROM apg_pool"
                label = reads.label(c, total)
                port, n, workers = await c.fetchrow(total)
                route.replica(port, label)
                assert (n, workers) == (240, 12)

            # Released connections were reset (asyncpg sends RESET ALL and
            # friends); reads still go to the replica afterwards.
            async def read():
                async with pool.acquire() as c:
                    label = reads.label(c, PORT)
                    route.replica(await c.fetchval(PORT), label)

            await asyncio.gather(*(read() for _ in range(20)))

    run(main())
    route.verify()
