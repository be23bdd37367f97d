"""Alembic migrations (PostgreSQL): for every service, an empty database upgraded to head has exactly
the schema of the service's models, the way down works, and a service starting on PostgreSQL migrates
its database once (and again is a no-op).

When a model changes, `python scripts/make_migration.py SERVICE "what changed"` writes the revision
that makes these tests pass again.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from cancelflow import migrations
from cancelflow_tools.services import SERVICES
from tests.conftest import pg_database_url

pytestmark = pytest.mark.pg

ALL = sorted(SERVICES)


def _head(service: str) -> str:
    """The newest revision id of a service (files are NNNN_<message>.py, NNNN the revision id)."""
    return sorted((migrations.directory(f"{service}.migrations") / "versions").glob("*.py"))[-1].name[:4]


def _tables(connection: Any) -> set[str]:
    return set(inspect(connection).get_table_names())


@pytest.mark.parametrize("service", ALL)
def test_every_service_has_a_migration_environment(service: str) -> None:
    package = migrations.package_for(service)
    assert package == f"{service}.migrations"
    folder = migrations.directory(package)
    assert (folder / "env.py").is_file() and (folder / "script.py.mako").is_file()
    revisions = sorted((folder / "versions").glob("*.py"))
    assert revisions, f"{service} has no revision: python scripts/make_migration.py {service} 'initial schema'"
    assert all(re.match(r"\d{4}_\w+\.py$", r.name) for r in revisions), revisions


@pytest.mark.parametrize("service", ALL)
async def test_head_matches_the_models(service: str, pg_server: Any) -> None:
    orm = importlib.import_module(f"{service}.orm")
    package = f"{service}.migrations"
    engine = create_async_engine(pg_database_url(pg_server, f"mig_{service}"), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(migrations.upgrade_sync, package)
            differences = await conn.run_sync(migrations.differences_sync, orm.metadata)
            tables = await conn.run_sync(_tables)
        assert differences == [], (
            f"the {service} models differ from its migrations' head; run "
            f"`python scripts/make_migration.py {service} \"what changed\"`: {differences}")
        assert tables == set(orm.metadata.tables) | {"alembic_version"}

        # And back down: every revision's downgrade undoes its upgrade.
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade_to_base, package)
            assert await conn.run_sync(_tables) <= {"alembic_version"}
    finally:
        await engine.dispose()


def _downgrade_to_base(connection: Any, package: str) -> None:
    from alembic import command

    command.downgrade(migrations.alembic_config(package, connection=connection), "base")


async def test_a_service_migrates_its_database_on_start(pg_server: Any, services: Any) -> None:
    url = pg_database_url(pg_server, "mig_start")
    first = await services.start_service("status_tracker", url)
    assert first.runtime.migrations == "status_tracker.migrations"
    await services.stop(first)
    # A second start (a restart, or another replica) finds head and changes nothing.
    second = await services.start_service("status_tracker", url)
    await services.stop(second)
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            revision = await conn.run_sync(migrations.current_sync)
            differences = await conn.run_sync(
                migrations.differences_sync, importlib.import_module("status_tracker.orm").metadata)
    finally:
        await engine.dispose()
    assert revision == _head("status_tracker") and differences == []


async def test_sqlite_keeps_create_all(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_alembic(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("SQLite stores are made by create_all, not by migrations")

    monkeypatch.setattr(migrations, "upgrade_to_head", no_alembic)
    monkeypatch.setenv("STATUS_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'status.db'}")
    runtime = importlib.import_module("status_tracker.bootstrap").build()
    try:
        await runtime.prepare_schema()
        async with runtime.engine.connect() as conn:
            tables = await conn.run_sync(_tables)
    finally:
        await runtime.engine.dispose()
    assert tables == set(importlib.import_module("status_tracker.orm").metadata.tables)


def test_upgrade_sql_for_dbas() -> None:
    sql = migrations.upgrade_sql("billing.migrations")
    assert "CREATE TABLE subscriptions" in sql and "CREATE TABLE alembic_version" in sql


def test_migrate_command_upgrades_the_configured_databases(pg_server: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from cancelflow_tools.cli import app

    url = pg_database_url(pg_server, "mig_cli")
    monkeypatch.setenv("PROVISIONING_DATABASE_URL", url)
    for _ in range(2):  # the second run finds head
        result = CliRunner().invoke(app, ["migrate", "--service", "provisioning"])
        assert result.exit_code == 0, result.output
        assert "provisioning" in result.output and _head("provisioning") in result.output
    assert CliRunner().invoke(app, ["migrate", "--service", "nope"]).exit_code == 2
    sql = CliRunner().invoke(app, ["migrate", "--sql", "--service", "dispute"])
    assert sql.exit_code == 0 and "CREATE TABLE" in sql.output
