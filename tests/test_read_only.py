"""Commands that only read open the state file read-only (no migration, no write, no file
created), and the daemon's queries run on a read connection beside the writer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from streamwatch.store import (
    MIGRATIONS,
    AlertTx,
    CallbackOutcome,
    EventRow,
    ReadOnlyStore,
    SchemaError,
    Store,
    StoreError,
)
from streamwatch.store.schema import split_sql
from tests.conftest import cli
from tests.test_cost_cli import NOV, seed, write_config
from tests.test_store import register


def files(folder: Path) -> dict[str, str]:
    """Every file in `folder` with a digest of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def schema_file(path: Path, version: int) -> None:
    """A state file as the streamwatch of schema `version` left it: WAL mode, closed."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        for script in MIGRATIONS[:version]:
            for statement in split_sql(script):
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version}")


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    return line


def test_reading_commands_leave_a_schema_5_state_file_untouched(tmp_path: Path):
    """`cost` and `alerts list` refuse a file an older streamwatch wrote, in one line that says
    how to upgrade it, and leave it byte for byte as it was, with nothing created beside it;
    `check-config` accepts it (the daemon migrates at start) and leaves it as it was too."""
    config = write_config(tmp_path)
    schema_file(tmp_path / "state.db", 5)
    before = files(tmp_path)
    assert "state.db-wal" not in before

    for args in (["cost"], ["alerts", "list"]):
        out = cli(*args, "-c", str(config))
        assert out.returncode == 1, out.stderr
        line = one_line(out)
        assert "written by an older streamwatch (schema 5;" in line
        assert "start the daemon once to upgrade it" in line
        assert files(tmp_path) == before, args
    out = cli("check-config", "-c", str(config))
    assert out.returncode == 0, out.stderr
    assert files(tmp_path) == before


async def test_a_read_only_open_refuses_other_schemas_and_writes_nothing(tmp_path: Path):
    """A newer file is refused as the writer refuses it, an older one with the upgrade hint,
    a missing one by name; none is created, migrated or written."""
    newer, older = tmp_path / "newer.db", tmp_path / "older.db"
    schema_file(newer, len(MIGRATIONS))
    with contextlib.closing(sqlite3.connect(newer)) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    schema_file(older, 5)
    before = files(tmp_path)
    with pytest.raises(SchemaError, match="newer than this streamwatch understands"):
        await ReadOnlyStore(newer).__aenter__()
    with pytest.raises(SchemaError, match=r"older streamwatch \(schema 5;"):
        await ReadOnlyStore(older).__aenter__()
    with pytest.raises(StoreError, match="no state file at"):
        await ReadOnlyStore(tmp_path / "missing.db").__aenter__()
    assert files(tmp_path) == before


async def test_reading_commands_create_nothing_beside_an_idle_state_file(tmp_path: Path):
    """With no daemon running, `cost`, `alerts list`, `check-config` and `backup` read the
    state file without writing it or creating its -wal and -shm beside it."""
    config = write_config(tmp_path)
    await seed(tmp_path / "state.db")
    before = files(tmp_path)
    assert set(before) == {"state.db", "streams.toml"}
    dest = tmp_path / "backups"
    dest.mkdir()

    cost = cli("cost", "-c", str(config), "--since", "2026-10-01", "--json")
    assert cost.returncode == 0, cost.stderr
    assert json.loads(cost.stdout)["total_usd"] == "0.008333"
    listed = cli("alerts", "list", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    assert "(no alerts yet)" in listed.stdout
    assert cli("check-config", "-c", str(config)).returncode == 0
    copied = cli("backup", "-c", str(config), str(dest / "copy.db"))
    assert copied.returncode == 0, copied.stderr

    assert files(tmp_path) == before
    async with ReadOnlyStore(dest / "copy.db") as copy:
        assert [t.task_id for t in await copy.tasks()] == ["t0", "t1", "t2"]


async def test_what_a_crashed_daemon_left_in_its_wal_is_read_and_kept(tmp_path: Path):
    """A state file whose daemon was killed keeps its last commits in the -wal: `cost` and
    `backup` read them, and leave the file and its -wal as they were (a read-write open
    would have checkpointed the -wal into the file)."""
    config = write_config(tmp_path)
    db = tmp_path / "state.db"
    await seed(db)
    killed = (
        "import os, sqlite3\n"
        f"conn = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        'conn.execute("INSERT INTO charges (at, stream, task_id, kind, ticks)'
        f" VALUES ({NOV}, 'a', 't1', 'segment', 2880)\")\n"
        "os._exit(0)\n"
    )
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", killed], check=True)
    before = files(tmp_path)
    assert "state.db-wal" in before
    dest = tmp_path / "copy.db"

    cost = cli("cost", "-c", str(config), "--since", "2026-11", "--json")
    assert cost.returncode == 0, cost.stderr
    assert json.loads(cost.stdout)["total_usd"] == "1.006250"  # 18 ticks, and the lost 2880
    copied = cli("backup", "-c", str(config), str(dest))
    assert copied.returncode == 0, copied.stderr

    after = files(tmp_path)
    # The -shm is the WAL's index in shared memory, which every reader keeps: not state.
    assert {k: after[k] for k in ("state.db", "state.db-wal", "streams.toml")} == {
        k: before[k] for k in ("state.db", "state.db-wal", "streams.toml")
    }
    assert set(after) == {*before, "copy.db"}
    async with ReadOnlyStore(dest) as copy:
        totals = await copy.charge_totals(since=NOV - 1, until=NOV + 1)
    assert sum(t.ticks for t in totals) == 18 + 2880


async def test_a_read_only_store_follows_a_writer_that_opens_the_file_later(tmp_path: Path):
    """A read-only store opened on an idle file sees what a daemon started afterwards
    commits."""
    db = tmp_path / "state.db"
    async with Store(db) as store:
        await register(store, "t1")
    async with ReadOnlyStore(db) as reader:
        assert [t.task_id for t in await reader.tasks()] == ["t1"]
        async with Store(db) as store:
            await register(store, "t2")
            assert [t.task_id for t in await reader.tasks()] == ["t1", "t2"]
            await register(store, "t3")
            assert [t.task_id for t in await reader.tasks()] == ["t1", "t2", "t3"]


class Held:
    """An alert hook that holds the writer inside the operation recording an event until it
    is released: the writer's transaction (BEGIN IMMEDIATE) stays open meanwhile."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.release = threading.Event()

    def callback(self, tx: AlertTx, outcome: CallbackOutcome) -> None:
        pass

    def record(self, tx: AlertTx, event: EventRow) -> None:
        self.inside.set()
        self.release.wait()

    def committed(self) -> None:
        pass


async def test_reads_do_not_wait_for_a_write_batch_in_progress(tmp_path: Path):
    """While the writer is held inside an operation, queries return at once with what was
    committed before (not the write under way), and later writes queue behind it."""
    hook = Held()
    async with Store(tmp_path / "s.db") as store:
        await register(store, "t1")
        store.set_alert_hook(hook)
        writing = asyncio.create_task(store.add_event("stream_stalled", stream="cam"))
        queued = asyncio.create_task(store.mark_stop_requested("t1"))
        try:
            await asyncio.to_thread(hook.inside.wait)
            async with asyncio.timeout(10):  # a guard: waiting for the writer would hang
                task = await store.task("t1")
                totals = await store.stream_totals()
                events = await store.events()
                running = await store.running_tasks()
            assert task is not None
            assert not task.stop_requested
            assert totals["cam"].tasks == 1
            assert events == []
            assert [t.task_id for t in running] == ["t1"]
            assert not writing.done()
            assert not queued.done()
        finally:
            hook.release.set()
        await writing
        await queued
        assert [e.kind for e in await store.events()] == ["stream_stalled"]
        task = await store.task("t1")
        assert task is not None
        assert task.stop_requested
