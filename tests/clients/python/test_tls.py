"""TLS between the client and pgsplit (run with PGSPLIT_TLS_CA set: the
suite's URL then asks for sslmode=verify-full against the test CA, so every
other case of the run goes over TLS too)."""

import os

import psycopg
import pytest

CA = os.environ.get("PGSPLIT_TLS_CA")
pytestmark = pytest.mark.skipif(not CA, reason="not a TLS run")


def test_psycopg_verify_full_uses_tls_for_reads_and_writes(env):
    assert "sslmode=verify-full" in env.url
    with psycopg.connect(env.url, autocommit=True) as c:
        assert c.pgconn.ssl_in_use
        c.execute("DROP TABLE IF EXISTS tls_cases")
        c.execute("CREATE TABLE tls_cases (x int)")
        c.execute("INSERT INTO tls_cases VALUES (1)")
        n, port = c.execute(
            "SELECT count(*), inet_server_port() FROM tls_cases"
        ).fetchone()
        assert (n, port) == (1, env.replica)
        c.execute("DROP TABLE tls_cases")


def test_psycopg_refuses_a_server_certificate_from_another_ca(env):
    other = os.environ["PGSPLIT_TLS_OTHER_CA"]
    base = env.url.split("?")[0]
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(f"{base}?sslmode=verify-full&sslrootcert={other}")
    # require: encrypted without verification, as libpq defines it.
    with psycopg.connect(f"{base}?sslmode=require") as c:
        assert c.pgconn.ssl_in_use
