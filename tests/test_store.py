"""The SQLite store: migrations, dedupe, orphans, batching, persistence."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from streamwatch.mavi.callbacks import SegmentFailed, SegmentReport, StreamEnded, parse_callback
from streamwatch.store import (
    MIGRATIONS,
    CallbackOutcome,
    Halt,
    Location,
    SchemaError,
    Store,
    StoreError,
    StreamRecord,
)
from tests import pg


def segment(task_id: str, index: int, *, unsafe: bool = False) -> tuple[SegmentReport, bytes]:
    body = json.dumps(
        {
            "task_id": task_id,
            "data": {
                "status": 0,
                "data": {
                    "segment_index": index,
                    "content_moderation": {"has_unsafe_content": unsafe},
                },
            },
        }
    ).encode()
    report = parse_callback(body)
    assert isinstance(report, SegmentReport)
    return report, body


async def register(store: Store, task_id: str, stream: str = "cam") -> list[CallbackOutcome]:
    registered = await store.record_task_started(
        task_id=task_id,
        stream=stream,
        spec_hash="h",
        fps=1,
        content_moderation=True,
        logo_detection=False,
        max_logos=5,
        started_at=1.0,
    )
    return registered.claimed


async def test_fresh_file_is_migrated_to_the_latest_schema(tmp_path: Path):
    """A new state file gets every migration, in WAL mode."""
    async with Store(tmp_path / "s.db"):
        pass
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_newer_schema_is_refused(tmp_path: Path):
    """A state file written by a newer streamwatch is not touched."""
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        await Store(tmp_path / "s.db").open()


async def test_missing_directory_is_a_clear_error(tmp_path: Path):
    """A state path in a directory that does not exist says so."""
    with pytest.raises(StoreError, match="does not exist"):
        await Store(tmp_path / "nope" / "s.db").open()


async def test_duplicates_are_stored_once(location: Location):
    """The same (task_id, segment_index) twice is one row and one count."""
    async with Store(location) as store:
        await register(store, "t")
        cb, body = segment("t", 0, unsafe=True)
        first = await store.apply_callback(cb, body=body)
        second = await store.apply_callback(cb, body=body)
        assert (first.kind, second.kind) == ("stored", "duplicate")
        assert first.stream == "cam"
        row = await store.task("t")
        assert row is not None
        assert row.segments == 1
        assert (await store.stream_totals())["cam"].unsafe_segments == 1


async def test_callbacks_before_registration_are_claimed(location: Location):
    """A callback that beats the start answer is parked as an orphan, then claimed."""
    async with Store(location) as store:
        cb, body = segment("early", 0)
        outcome = await store.apply_callback(cb, body=body)
        assert outcome.kind == "orphan"
        assert (await store.apply_callback(cb, body=body)).kind == "duplicate"
        assert await store.orphan_summary() == {"early": 1}
        claimed = await register(store, "early")
        assert [c.kind for c in claimed] == ["stored"]
        assert await store.orphan_summary() == {}
        assert await store.segment_indexes("early") == [0]


async def test_end_callback_is_recorded_once_and_knows_who_asked(location: Location):
    """A 14 after the daemon's own stop is stored once and flagged as requested."""
    async with Store(location) as store:
        await register(store, "t")
        await store.mark_stop_requested("t")
        assert await store.record_task_ended("t", status=None, reason="stopped by streamwatch")
        end = StreamEnded("t", 14, "stopped")
        first = await store.apply_callback(end, body=b"{}")
        again = await store.apply_callback(end, body=b"{}")
        assert (first.kind, again.kind) == ("stored", "duplicate")
        assert first.stop_requested
        row = await store.task("t")
        assert row is not None
        assert (row.end_status, row.end_reason) == (14, "stopped by streamwatch")
        assert await store.running_tasks() == []


async def test_failed_segments_are_counted(location: Location):
    """-1 callbacks are kept and counted on their task."""
    async with Store(location) as store:
        await register(store, "t")
        for _ in range(3):
            await store.apply_callback(SegmentFailed("t", -1, "x"), body=b"{}")
        assert (await store.stream_totals())["cam"].failed_segments == 3


async def test_concurrent_callbacks_share_commits(location: Location):
    """Callbacks arriving together are committed together: far fewer commits than callbacks."""
    async with Store(location) as store:
        await register(store, "t")
        base = store.commits
        cbs = [segment("t", i) for i in range(500)]
        outcomes = await asyncio.gather(*(store.apply_callback(c, body=b) for c, b in cbs))
        assert {o.kind for o in outcomes} == {"stored"}
        assert store.commits - base < 50
        assert await store.segment_count(task_id="t") == 500


async def test_one_failing_operation_does_not_fail_its_batch(location: Location):
    """A bad operation raises for its caller alone; its batch-mates commit."""
    async with Store(location) as store:
        await register(store, "t")
        cb, body = segment("t", 1)
        results = await asyncio.gather(
            register(store, "t"),  # duplicate primary key
            store.apply_callback(cb, body=body),
            return_exceptions=True,
        )
        assert isinstance(results[0], (sqlite3.IntegrityError, asyncpg.UniqueViolationError))
        assert await store.segment_indexes("t") == [1]


async def test_state_survives_reopening(location: Location):
    """Settings, holds, tasks and events are on disk, not in memory."""
    async with Store(location) as store:
        await register(store, "t")
        halt = Halt("balance", 10.0, 70.0, "task ended with status 402")
        await store.save_halt(halt)
        held = StreamRecord(
            "cam",
            held_reason="stopped outside streamwatch",
            failures=3,
            retry_at=1234.5,
            last_end_status=14,
            last_error="boom",
            restart_times=(1.0, 2.0),
        )
        await store.save_streams([held])
        await store.add_event("task_started", stream="cam", task_id="t")
    async with Store(location) as store:
        assert await store.load_halt() == halt
        assert (await store.streams())["cam"] == held
        assert [t.task_id for t in await store.running_tasks()] == ["t"]
        assert [e.kind for e in await store.events(stream="cam")] == ["task_started"]
        await store.save_streams([StreamRecord("cam")])
        assert (await store.streams())["cam"] == StreamRecord("cam")


async def test_closed_store_refuses_work(location: Location):
    """Using a store that is not open is an error, not a hang."""
    store = Store(location)
    with pytest.raises(StoreError, match="not open"):
        await store.load_halt()


async def test_upgrade_from_schema_1_backfills_the_ledger(tmp_path: Path):
    """A state file from schema 1 gains the ledger, with the charges its tasks already made."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO tasks (task_id, stream, spec_hash, fps, content_moderation, logo_detection,"
        " max_logos, started_at, segments) VALUES ('t', 'cam', 'h', 2, 1, 1, 5, 100.0, 3)"
    )
    for i in range(3):
        conn.execute(
            "INSERT INTO segments (task_id, segment_index, stream, received_at)"
            " VALUES ('t', ?, 'cam', ?)",
            (i, 105.0 + 5 * i),
        )
    conn.commit()
    conn.close()
    async with Store(path) as store:
        totals = await store.charge_totals(since=0, until=1_000)
        row = await store.task("t")
    assert row is not None
    assert row.segment_ticks == 12
    assert [(t.stream, t.precharges, t.segments, t.ticks) for t in totals] == [("cam", 1, 3, 48)]


async def test_upgrade_to_schema_8_keeps_each_streams_last_end(tmp_path: Path):
    """A state file from schema 7 gains the streams' durable state: a held stream keeps its
    hold and takes the end status of its last task, so it does not show a null one."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for migration in MIGRATIONS[:7]:
        for statement in migration.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 7")
    tasks = [("t1", "cam", 100.0, 15), ("t2", "cam", 200.0, 14), ("t3", "live", 300.0, None)]
    for task_id, stream, started, status in tasks:
        conn.execute(
            "INSERT INTO tasks (task_id, stream, spec_hash, fps, content_moderation,"
            " logo_detection, max_logos, started_at, end_status, ended_at)"
            " VALUES (?, ?, 'h', 1, 1, 0, 5, ?, ?, ?)",
            (task_id, stream, started, status, None if status is None else started + 50),
        )
    conn.execute("INSERT INTO streams (name, held_reason, held_at) VALUES ('cam', 'by hand', 250)")
    conn.commit()
    conn.close()
    async with Store(path) as store:
        records = await store.streams()
    assert records["cam"] == StreamRecord("cam", held_reason="by hand", last_end_status=14)
    assert records["live"] == StreamRecord("live")


async def test_prune_deletes_old_segments_and_keeps_counts_costs_and_dedupe(location: Location):
    """Segments received before the cutoff go (in chunks, across streams); task totals and
    charges stay; a pruned segment redelivered later is a duplicate, not a second charge; newer
    segments and later callbacks are unaffected."""
    async with Store(location) as store:
        await register(store, "t1", "cam")
        await register(store, "t2", "door")
        for i in range(25):
            for task in ("t1", "t2"):
                cb, body = segment(task, i, unsafe=i % 5 == 0)
                await store.apply_callback(cb, body=body, received_at=1000.0 + i)
        failed = parse_callback(
            json.dumps(
                {"task_id": "t1", "data": {"status": -1, "message": "decode error"}}
            ).encode()
        )
        assert isinstance(failed, SegmentFailed)
        await store.apply_callback(failed, body=b"{}", received_at=1001.0)
        totals_before = await store.stream_totals()
        charges_before = await store.charge_totals(since=0, until=10**12)

        pruned = await store.prune(1010.0, chunk=3)  # segments 0..9 of both tasks

        assert (pruned.segments, pruned.failures) == (20, 1)
        assert await store.segment_indexes("t1") == list(range(10, 25))
        assert await store.segment_indexes("t2") == list(range(10, 25))
        assert await store.stream_totals() == totals_before
        assert await store.charge_totals(since=0, until=10**12) == charges_before
        cb, body = segment("t1", 4)
        assert (await store.apply_callback(cb, body=body)).kind == "duplicate"
        assert await store.charge_totals(since=0, until=10**12) == charges_before
        cb, body = segment("t1", 25)
        assert (await store.apply_callback(cb, body=body)).kind == "stored"
        assert (await store.prune(1010.0)).segments == 0


async def test_prune_stops_between_chunks_when_asked(location: Location):
    async with Store(location) as store:
        await register(store, "t1")
        for i in range(10):
            cb, body = segment("t1", i)
            await store.apply_callback(cb, body=body, received_at=float(i))
        pruned = await store.prune(100.0, chunk=4, stop=lambda: True)
        assert pruned.segments == 4
        assert await store.segment_count() == 6


async def test_text_with_a_nul_character_is_stored(location: Location):
    """A callback whose text holds a NUL character (PostgreSQL's text cannot) is stored, not
    refused forever: on PostgreSQL the NUL becomes U+FFFD."""
    async with Store(location) as store:
        await register(store, "t")
        outcome = await store.apply_callback(SegmentFailed("t", -1, "bad\x00frame"), body=b"{}")
        assert outcome.kind == "stored"
        await store.add_event("stream_problem", stream="cam", detail="nul\x00here")
    (message,) = pg.rows(location, "SELECT message FROM segment_failures")[0]
    assert message in ("bad\x00frame", "bad\ufffdframe")


async def test_an_operation_that_must_run_alone_gets_a_transaction_of_its_own(tmp_path: Path):
    """An operation queued with `alone` (the lease round, release and leave) is never batched
    with others, even when it is queued among them: the operations before it commit in one
    transaction, it in the next, those after it in a third."""
    async with Store(tmp_path / "state.db") as store:

        def batch_of(ctx: object) -> int:
            return store.commits  # counts commits before this op's own

        before = [store._write(batch_of) for _ in range(5)]
        lone = store._write(batch_of, alone=True)
        after = [store._write(batch_of) for _ in range(5)]
        got = await asyncio.gather(*before, lone, *after)
    assert len(set(got[:5])) == 1
    assert len(set(got[6:])) == 1
    assert got[0] < got[5] < got[6]
