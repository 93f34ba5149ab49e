"""Run by Django's own test runner (from test_django.py), on the test
database it creates through pgsplit."""

import os

from django.db import IntegrityError, connection, transaction
from django.test import TestCase, TransactionTestCase

from djapp.models import Item

PRIMARY = int(os.environ["PGSPLIT_PRIMARY_PORT"])
REPLICA = int(os.environ["PGSPLIT_REPLICA_PORT"])
if os.environ.get("PGSPLIT_CLIENTS_LAG_MS"):
    # Under lag a read may rightly run on the primary (read-your-writes):
    # only what it returns is checked (as conftest.ReadPort does).
    class _ReadPort(int):
        def __eq__(self, other):
            return other in (int(self), PRIMARY)

        def __ne__(self, other):
            return not self.__eq__(other)

        __hash__ = int.__hash__

    REPLICA = _ReadPort(REPLICA)


def port():
    with connection.cursor() as c:
        c.execute("SELECT inet_server_port()")
        return c.fetchone()[0]


class ItemTests(TestCase):
    """Each test runs inside a transaction block, rolled back afterwards."""

    @classmethod
    def setUpTestData(cls):
        Item.objects.create(name="fixture", qty=1)

    def test_runs_on_the_test_database_in_a_block(self):
        self.assertEqual(connection.settings_dict["NAME"], "test_dj_pgsplit")
        self.assertEqual(port(), PRIMARY)
        Item.objects.create(name="a", qty=2)
        self.assertEqual(list(Item.objects.order_by("name").values_list("name", "qty")),
                         [("a", 2), ("fixture", 1)])

    def test_each_test_starts_from_the_fixture(self):
        self.assertEqual(list(Item.objects.values_list("name", flat=True)), ["fixture"])
        Item.objects.filter(name="fixture").update(qty=5)
        self.assertEqual(Item.objects.get(name="fixture").qty, 5)

    def test_integrity_error_in_a_savepoint(self):
        with self.assertRaises(IntegrityError) as e:
            with transaction.atomic():
                Item.objects.create(name="fixture")
        self.assertEqual(e.exception.__cause__.sqlstate, "23505")
        self.assertEqual(Item.objects.count(), 1)
        self.assertEqual(port(), PRIMARY)


class ItemTransactionTests(TransactionTestCase):
    """Autocommit, as in production; the tables are emptied after each test."""

    def test_reads_go_to_the_replica(self):
        self.assertEqual(port(), REPLICA)
        Item.objects.bulk_create([Item(name=f"t{i}", qty=i) for i in range(5)])
        self.assertEqual(Item.objects.count(), 5)
        self.assertEqual(port(), REPLICA)
        with transaction.atomic():
            self.assertEqual(port(), PRIMARY)
            Item.objects.filter(qty__gte=3).delete()
        self.assertEqual(sorted(Item.objects.values_list("qty", flat=True)), [0, 1, 2])
