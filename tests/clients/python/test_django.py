"""Django 5 with psycopg 3: migrate, the ORM, atomic blocks,
select_for_update, and a TestCase run by Django's test runner on a test
database it creates through pgsplit."""

import os

import pytest


@pytest.fixture(scope="module")
def django_ready(env):
    os.environ["DJANGO_SETTINGS_MODULE"] = "djapp.settings"
    import django
    from django.core.management import call_command
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    django.setup()
    assert is_psycopg3, "Django must use psycopg 3"
    # From scratch each time, so the case also runs against a reused lab.
    call_command("migrate", "djapp", "zero", verbosity=0, interactive=False)
    call_command("migrate", "djapp", verbosity=0, interactive=False)
    yield
    from django.db import connections

    connections.close_all()


def port():
    """Where a statement runs; also checks that the session still has the
    TimeZone Django set when it connected (with USE_TZ it needs UTC)."""
    from django.db import connection

    with connection.cursor() as c:
        c.execute("SELECT inet_server_port(), current_setting('TimeZone')")
        port, tz = c.fetchone()
    assert tz == "UTC", f"the session's TimeZone is {tz!r} on port {port}"
    return port


def with_port(qs):
    from django.db.models.expressions import RawSQL

    return qs.annotate(port=RawSQL("inet_server_port()", ()))


def test_migrate_and_orm(env, route, django_ready):
    from django.db import IntegrityError, connection, transaction
    from django.db.models import F

    from djapp.models import Item

    assert "dj_item" in connection.introspection.table_names()
    with connection.cursor() as c:
        c.execute("SELECT count(*) FROM django_migrations WHERE app = 'djapp'")
        assert c.fetchone()[0] == 1
    assert Item.objects.count() == 0
    route.replica(port(), "read")

    for i in range(10):
        Item.objects.create(name=f"i{i}", qty=i)
    Item.objects.bulk_create([Item(name=f"b{i}", qty=100 + i) for i in range(5)])
    assert Item.objects.count() == 15
    assert Item.objects.filter(qty__gte=5, qty__lt=100).count() == 5
    rows = list(with_port(Item.objects.filter(name__startswith="b")).values_list("qty", "port"))
    assert sorted(q for q, _ in rows) == [100, 101, 102, 103, 104]
    for _, p in rows:
        route.replica(p, "ORM read")

    assert Item.objects.filter(qty__lt=3).update(qty=F("qty") + 1000) == 3
    assert sorted(Item.objects.filter(qty__gte=1000).values_list("qty", flat=True)) == [
        1000,
        1001,
        1002,
    ]
    assert Item.objects.filter(name="i9").delete() == (1, {"djapp.Item": 1})
    it = Item.objects.get(name="i8")
    it.qty = -8
    it.save()
    assert Item.objects.get(pk=it.pk).qty == -8
    assert Item.objects.count() == 14
    route.replica(port(), "read after writes")

    # atomic: everything inside runs on the primary and commits together.
    with transaction.atomic():
        Item.objects.create(name="tx1", qty=1)
        route.primary(port(), "read in atomic")
        rows = list(with_port(Item.objects.filter(name="tx1")).values_list("qty", "port"))
        assert len(rows) == 1
        route.primary(rows[0][1], "ORM read in atomic")
    assert Item.objects.filter(name="tx1").exists()

    # An error inside atomic rolls the whole block back.
    with pytest.raises(IntegrityError) as e:
        with transaction.atomic():
            Item.objects.create(name="tx2", qty=2)
            Item.objects.create(name="i0", qty=0)
    assert e.value.__cause__.sqlstate == "23505"
    assert not Item.objects.filter(name="tx2").exists()
    assert Item.objects.count() == 15

    # A nested atomic (savepoint) keeps the outer block.
    with transaction.atomic():
        Item.objects.create(name="tx3", qty=3)
        with pytest.raises(IntegrityError):
            with transaction.atomic():
                Item.objects.create(name="i0", qty=0)
        assert Item.objects.filter(name="tx3").count() == 1
    assert Item.objects.count() == 16

    # select_for_update inside atomic.
    with transaction.atomic():
        locked = with_port(Item.objects.select_for_update()).get(name="i1")
        route.primary(locked.port, "select_for_update")
        locked.qty += 1
        locked.save()
    row = with_port(Item.objects.filter(name="i1")).values_list("qty", "port").get()
    assert row[0] == 1002
    route.replica(row[1], "read after the atomic block")
    route.verify()


def test_testcase_with_django_runner(env, django_ready):
    from django.db import connection
    from django.test.runner import DiscoverRunner

    runner = DiscoverRunner(verbosity=2, interactive=False)
    failures = runner.run_tests(["djapp.tests"])
    assert failures == 0, f"{failures} Django test(s) failed (output above)"
    # The runner removed its test database and put the real one back.
    assert connection.settings_dict["NAME"] == env.parts[4]
    with connection.cursor() as c:
        c.execute("SELECT count(*) FROM pg_database WHERE datname = 'test_dj_pgsplit'")
        assert c.fetchone()[0] == 0
