"""Shared fixtures. Postgres fixtures (pg_url, pg_admin_url) live in tests/pg.py."""

pytest_plugins = ["tests.pg"]
