"""`streamwatch store copy`: the state from SQLite to PostgreSQL and back, verified, into an
empty target only; and `backup` on PostgreSQL says to use pg_dump."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from streamwatch.store import PgTarget, Store
from streamwatch.store.copy import COPY_TABLES
from streamwatch.store.schema import SCHEMA_VERSION
from tests import pg
from tests.conftest import cli
from tests.test_alerts_store import hooked, orphan_body, rule
from tests.test_cost_cli import NOV, OCT, seed, write_config
from tests.test_store import register, segment


async def fill(db: Path) -> None:
    """Something in every kind of table: tasks, segments, charges, failures, events and
    their alerts, orphans, intents, streams, account state, videos and evidence."""
    await seed(db)
    async with Store(db, clock=lambda: NOV) as store:
        hooked(store, [rule(events=["unsafe_content", "orphan_task", "stream_stalled"])])
        await register(store, "t9", "a")
        for index in range(3):
            cb, body = segment("t9", index, unsafe=index > 0)
            await store.apply_callback(cb, body=body, received_at=NOV + index)
        stranger = orphan_body("stranger", 0)
        from streamwatch.mavi.callbacks import parse_callback

        await store.apply_callback(parse_callback(stranger), body=stranger)
        await store.add_event("stream_stalled", stream="a", at=OCT)
        await store.record_library_video("v1", "PARSE", "c1")
        await store.record_evidence(
            stream="a", task_id="t9", segment_index=1, path="/x/1.mp4", size=10
        )


def copy(*args: str, env: dict[str, str] | None = None):
    return cli("store", "copy", "-c", "/nonexistent.toml", *args, env=env)


def cost_json(config: Path) -> dict[str, object]:
    out = cli("cost", "-c", str(config), "--since", "2026-01", "--until", "2027-01", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


async def test_copy_round_trip_sqlite_postgresql_sqlite_keeps_the_costs(
    tmp_path: Path, pg_target: PgTarget
):
    """A state file copied into PostgreSQL and back holds the same rows, and `cost --json`
    reads the same from all three."""
    config = write_config(tmp_path)
    await fill(tmp_path / "state.db")
    out = copy("--from", f"sqlite://{tmp_path / 'state.db'}", "--to", pg_target.url)
    assert out.returncode == 0, out.stderr
    assert "verified" in out.stdout
    back = tmp_path / "back" / "state.db"
    back.parent.mkdir()
    out = copy("--from", pg_target.url, "--to", f"sqlite://{back}")
    assert out.returncode == 0, out.stderr
    on_pg = tmp_path / "pg.toml"
    on_pg.write_text(
        config.read_text().replace(f'path = "{tmp_path / "state.db"}"', f'url = "{pg_target.url}"')
    )
    on_back = tmp_path / "back.toml"
    on_back.write_text(config.read_text().replace(str(tmp_path / "state.db"), str(back)))
    first = cost_json(config)
    assert first["total_usd"] != "0.000000"
    assert cost_json(on_pg) == first
    assert cost_json(on_back) == first
    for table, (columns, order) in COPY_TABLES.items():
        sql = f"SELECT {columns} FROM {table} ORDER BY {order}"
        original = pg.rows(tmp_path / "state.db", sql)
        assert pg.rows(back, sql) == original, table
        assert len(pg.rows(pg_target, sql)) == len(original), table
    async with Store(pg_target) as store:  # the daemon goes on from the copy
        await register(store, "t10", "b")
        cb, body = segment("t9", 3)
        assert (await store.apply_callback(cb, body=body)).kind == "stored"
        assert (await store.apply_callback(*segment("t9", 0)[:1], body=b"{}")).kind == "duplicate"


async def test_copy_refuses_a_target_that_is_not_empty(tmp_path: Path, pg_target: PgTarget):
    """A target holding any row is refused and left as it was."""
    await fill(tmp_path / "state.db")
    async with Store(pg_target) as store:
        await register(store, "mine")
    out = copy("--from", str(tmp_path / "state.db"), "--to", pg_target.url)
    assert out.returncode == 1
    assert "must be empty" in out.stderr
    assert pg.rows(pg_target, "SELECT task_id FROM tasks") == [("mine",)]
    out = copy("--from", pg_target.url, "--to", str(tmp_path / "state.db"))
    assert out.returncode == 1
    assert "must be empty" in out.stderr


def test_the_copy_covers_every_table_and_column_of_the_schema(tmp_path: Path):
    """Every table and column of the current schema is copied (a migration that adds one
    must add it to COPY_TABLES)."""
    db = tmp_path / "s.db"
    from streamwatch.store.connection import connect_writer

    connect_writer(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {
        name: {c[1] for c in conn.execute(f"PRAGMA table_info({name})")}
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    conn.close()
    copied = {t: {c.strip() for c in cols.split(",")} for t, (cols, _) in COPY_TABLES.items()}
    assert copied == tables


def test_backup_on_postgresql_points_to_pg_dump(tmp_path: Path):
    """`streamwatch backup` with the state in PostgreSQL says what to use instead."""
    config = tmp_path / "c.toml"
    config.write_text('[storage]\nurl = "postgresql://sw@127.0.0.1:9/sw"\n')
    out = cli("backup", "-c", str(config), str(tmp_path / "b.db"))
    assert out.returncode == 1
    assert "pg_dump" in out.stderr
