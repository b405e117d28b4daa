"""The store on PostgreSQL: its migrations (versioned, under an advisory lock, a newer database
refused), the password as a secret, and the SQL rewritten for it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamwatch.store import (
    SCHEMA_VERSION,
    PgTarget,
    ReadOnlyStore,
    SchemaError,
    Store,
    StoreError,
)
from streamwatch.store.sql import to_postgres
from tests import pg
from tests.conftest import cli, free_port
from tests.test_store import register, segment


def test_statements_are_rewritten_for_postgresql():
    """Placeholders are numbered outside quotes, INSERT OR IGNORE becomes ON CONFLICT DO
    NOTHING, and only scalar max/min become greatest/least."""
    assert to_postgres("SELECT '?', x FROM t WHERE a = ? AND b = ?") == (
        "SELECT '?', x FROM t WHERE a = $1 AND b = $2"
    )
    assert to_postgres("INSERT OR IGNORE INTO t (a) VALUES (?)") == (
        "INSERT INTO t (a) VALUES ($1) ON CONFLICT DO NOTHING"
    )
    assert to_postgres(
        "UPDATE t SET a = max(coalesce(a, 0), ?), b = max(b) WHERE c = min(d, e)"
    ) == ("UPDATE t SET a = greatest(coalesce(a, 0), $1), b = max(b) WHERE c = least(d, e)")
    assert to_postgres("BEGIN IMMEDIATE") == "BEGIN"


async def test_a_fresh_database_is_migrated_and_a_newer_one_refused(pg_target: PgTarget):
    """A new database gets the schema at this streamwatch's version; one written by a newer
    streamwatch is refused with a clear message, not touched."""
    async with Store(pg_target) as store:
        await register(store, "t")
    assert pg.rows(pg_target, "SELECT version FROM schema_version") == [(SCHEMA_VERSION,)]
    pg.rows(pg_target, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer than this streamwatch"):
        await Store(pg_target).open()
    with pytest.raises(SchemaError, match="newer than this streamwatch"):
        await ReadOnlyStore(pg_target).__aenter__()
    assert pg.rows(pg_target, "SELECT count(*) FROM tasks") == [(1,)]


async def test_daemons_starting_at_once_migrate_once(pg_target: PgTarget):
    """Two stores opening the same empty database at once both start: the advisory lock lets
    one migrate while the other waits, then finds the schema current."""
    stores = [Store(pg_target), Store(pg_target)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await register(stores[0], "t")
        cb, body = segment("t", 0)
        outcomes = await asyncio.gather(*(s.apply_callback(cb, body=body) for s in stores))
        assert sorted(o.kind for o in outcomes) == ["duplicate", "stored"]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_read_only_open_of_an_empty_database_is_refused(pg_target: PgTarget):
    """A command that only reads never creates the schema: an empty database says so."""
    with pytest.raises(StoreError, match="no streamwatch state yet"):
        await ReadOnlyStore(pg_target).__aenter__()
    assert pg.rows(pg_target, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]


async def test_the_password_is_a_secret_apart_from_the_url(pg_cluster: pg.Cluster):
    """A server that requires a password accepts the one given apart from the URL; without
    it the error says authentication failed, and no error ever shows the password."""
    pg_cluster.add_password_user()
    name = pg_cluster.new_database()
    pg_cluster.admin(f"ALTER DATABASE {name} OWNER TO {pg.PASSWORD_USER}")
    url = pg_cluster.url(name, user=pg.PASSWORD_USER)
    async with Store(PgTarget(url, password=SecretStr(pg.PASSWORD), pool_size=1)) as store:
        await register(store, "t")
    wrong = PgTarget(url, password=SecretStr(pg.PASSWORD + "x"), pool_size=1)
    with pytest.raises(StoreError, match="authentication failed") as failed:
        await Store(wrong).open()
    assert pg.PASSWORD not in str(failed.value)
    in_url = PgTarget(url.replace("@", f":{pg.PASSWORD}@"))
    assert str(in_url) == url
    assert pg.PASSWORD not in repr(in_url)


def check_config(tmp_path: Path, storage: str, env: dict[str, str] | None = None):
    config = tmp_path / "c.toml"
    config.write_text(f"[storage]\n{storage}\n")
    return cli("check-config", "-c", str(config), env=env)


async def test_check_config_says_what_is_wrong_with_the_database(
    tmp_path: Path, pg_cluster: pg.Cluster, pg_target: PgTarget
):
    """check-config connects and names the problem: unreachable, authentication, missing
    database, a schema that needs migrating or is too new; an empty database is fine."""
    assert check_config(tmp_path, f'url = "{pg_target.url}"').returncode == 0
    out = check_config(tmp_path, f'url = "postgresql://sw@127.0.0.1:{free_port()}/sw"')
    assert out.returncode == 1
    assert "storage.url" in out.stderr
    assert "the server is unreachable" in out.stderr
    out = check_config(tmp_path, f'url = "{pg_cluster.url("nosuchdb")}"')
    assert "the database does not exist" in out.stderr
    pg_cluster.add_password_user()
    wrong = f'url = "{pg_cluster.url("postgres", user=pg.PASSWORD_USER)}"\n'
    wrong += 'password = { env = "SW_DB_PASSWORD" }'
    out = check_config(tmp_path, wrong, env={"SW_DB_PASSWORD": "not-it"})
    assert "authentication failed" in out.stderr
    assert check_config(tmp_path, wrong, env={"SW_DB_PASSWORD": pg.PASSWORD}).returncode == 0
    async with Store(pg_target):
        pass
    pg.rows(pg_target, f"UPDATE schema_version SET version = {SCHEMA_VERSION - 1}")
    out = check_config(tmp_path, f'url = "{pg_target.url}"')
    assert (out.returncode, "needs migration" in out.stderr) == (1, True), out.stderr
    pg.rows(pg_target, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    assert (
        "newer than this streamwatch" in check_config(tmp_path, f'url = "{pg_target.url}"').stderr
    )


async def test_waiting_for_another_daemons_migration_outlasts_the_statement_timeout(
    pg_target: PgTarget,
):
    """A daemon starting while another holds the migration lock waits for it, however long,
    and starts once it is released: the statement timeout does not cut the wait short."""
    from dataclasses import replace

    import asyncpg

    from streamwatch.store.pg_schema import MIGRATION_LOCK

    holder = await asyncpg.connect(pg_target.url)
    try:
        await holder.execute(f"SELECT pg_advisory_lock({MIGRATION_LOCK})")
        store = Store(replace(pg_target, statement_timeout_seconds=0.2))
        opening = asyncio.create_task(store.open())
        async with asyncio.timeout(30):
            while not await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND now() - waitstart > interval '0.5 seconds'"
            ):
                assert not opening.done(), opening.exception()
                await asyncio.sleep(0.05)
        await holder.execute(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
        await opening
        await register(store, "t")
        await store.close()
    finally:
        await holder.close()
