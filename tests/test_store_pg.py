"""The store on PostgreSQL: its migrations (versioned, under an advisory lock, a newer database
refused), the password as a secret, and the SQL rewritten for it."""

from __future__ import annotations

import asyncio

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
    assert str(PgTarget(url.replace("@", f":{pg.PASSWORD}@"))) == url
