"""What every case needs: where pgsplit listens and which server is which.

Reads outside a transaction block must report the replica's port from
`SELECT inet_server_port()`; writes and anything inside a block the
primary's. With `PGSPLIT_CLIENTS_LAG_MS` set, replication is asynchronous
and the replica replays late: a read may then rightly run on the primary
(read-your-writes), so only its result is checked.
"""

import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
import pytest


class ReadPort(int):
    """The replica's port, for a run under lag (`PGSPLIT_CLIENTS_LAG_MS`):
    equal to the replica's port and to the primary's, since read-your-writes
    may rightly keep a read on the primary while the replica catches up.
    Every comparison of a read's port with `env.replica` (alone, or in a
    tuple or list with the read's results) then checks only the results."""

    def __new__(cls, replica, primary):
        obj = super().__new__(cls, replica)
        obj.primary = primary
        return obj

    def __eq__(self, other):
        return other in (int(self), self.primary)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = int.__hash__


@dataclass(frozen=True)
class Env:
    url: str
    primary: int
    replica: int
    direct_primary_url: str
    lag_ms: int

    @property
    def parts(self):
        """host, port, user, password, database of the proxy URL."""
        u = urlsplit(self.url)
        return u.hostname, u.port, u.username, u.password, u.path.lstrip("/")


def _need(name):
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set (see tests/clients/README.md)", returncode=2)
    return value


@pytest.fixture(scope="session")
def env():
    primary = int(_need("PGSPLIT_PRIMARY_PORT"))
    replica = int(_need("PGSPLIT_REPLICA_PORT"))
    lag_ms = int(os.environ.get("PGSPLIT_CLIENTS_LAG_MS") or 0)
    e = Env(
        url=_need("PGSPLIT_URL"),
        primary=primary,
        replica=ReadPort(replica, primary) if lag_ms else replica,
        direct_primary_url=_need("PGSPLIT_DIRECT_PRIMARY_URL"),
        lag_ms=lag_ms,
    )
    assert e.primary != int(e.replica), "primary and replica ports must differ"
    return e


@pytest.fixture(scope="session", autouse=True)
def synchronous_replication(env):
    """The cases read their own writes from the replica: that holds only
    when every commit waits until the replica applied it (unless the run
    is about lag, where pgsplit must keep the reads fresh itself)."""
    if env.lag_ms:
        return
    with psycopg.connect(env.direct_primary_url, autocommit=True) as c:
        commit = c.execute("SHOW synchronous_commit").fetchone()[0]
        names = c.execute("SHOW synchronous_standby_names").fetchone()[0]
        # The walsender takes the reloaded setting a moment after the reload.
        deadline = time.monotonic() + 10
        while True:
            sync = c.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            ).fetchone()[0]
            if sync >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    if commit != "remote_apply" or not names or sync < 1:
        pytest.exit(
            "replication is not synchronous: run ALTER SYSTEM SET "
            "synchronous_standby_names = '*'; ALTER SYSTEM SET synchronous_commit "
            "= 'remote_apply'; SELECT pg_reload_conf(); on the primary "
            f"(synchronous_commit={commit!r}, synchronous_standby_names={names!r}, "
            f"sync standbys={sync})",
            returncode=2,
        )


@pytest.fixture
def direct(env):
    """A superuser connection straight to the primary, for inspection."""
    with psycopg.connect(env.direct_primary_url, autocommit=True) as c:
        yield c


class Route:
    """Checks where statements ran without stopping at the first surprise,
    so one test reports every misrouted statement (grouped) along with any
    wrong result."""

    def __init__(self, env):
        self.env = env
        self.checked = 0
        self.wrong = {}

    def replica(self, port, what):
        if self.env.lag_ms and port == self.env.primary:
            # Under lag, read-your-writes may keep a read on the primary.
            self.checked += 1
            return
        self._check(port, self.env.replica, what)

    def primary(self, port, what):
        self._check(port, self.env.primary, what)

    def _check(self, port, want, what):
        names = {self.env.primary: "primary", self.env.replica: "replica"}
        assert port in names, f"{what}: inet_server_port() = {port} is neither server"
        self.checked += 1
        if port != want:
            key = f"{what}: ran on the {names[port]}, expected the {names[want]}"
            self.wrong[key] = self.wrong.get(key, 0) + 1

    def verify(self):
        if self.wrong:
            lines = "\n".join(f"  {n} x {k}" for k, n in self.wrong.items())
            total = sum(self.wrong.values())
            self.wrong = {}
            pytest.fail(
                f"{total} of {self.checked} statements ran on the wrong server:\n{lines}",
                pytrace=False,
            )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed
    return report


@pytest.fixture
def route(env, request):
    """Call `route.verify()` at the end of the test; anything left unverified
    fails the test at teardown (or, when the test already failed, is
    printed with its output)."""
    r = Route(env)
    yield r
    if getattr(request.node, "call_failed", False):
        if r.wrong:
            print("statements on the wrong server before the failure:")
            for k, n in r.wrong.items():
                print(f"  {n} x {k}")
    else:
        r.verify()
