"""A one-model Django app for the Django case."""
