"""Alerts decided inside the store's transactions: what raises an alert commits with its
outbox rows and the rule state, which therefore survives restarts; orphans are bounded."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import streamwatch.store as store_module
import streamwatch.store.orphans as orphans_module
from streamwatch.alerts import AlertEvent, Router
from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.config import AlertRule, EvidenceConfig, StreamConfig
from streamwatch.evidence import Evidence
from streamwatch.mavi.callbacks import StreamEnded, parse_callback
from streamwatch.store import MIGRATIONS, AlertTx, Location, OutboxRow, Store
from tests import pg
from tests.test_store import register, segment

CAM = StreamConfig.model_validate(
    {
        "name": "cam",
        "url": "rtmp://cams.test/cam",
        "fps": 1,
        "content_moderation": True,
        "logo_detection": False,
        "max_logos": 5,
        "labels": {"site": "paris"},
        "evidence": True,
    }
)


def rule(**kw: object) -> AlertRule:
    fields: dict[str, object] = {"name": "r", "sinks": ["s"], "cooldown_seconds": 0}
    fields.update({"group_seconds": 0, **kw})
    return AlertRule.model_validate(fields)


def hooked(
    store: Store,
    rules: list[AlertRule],
    *,
    evidence: Evidence | None = None,
    specs: Mapping[str, StreamConfig] | None = None,
    cls: type[Alerts] = Alerts,
) -> Alerts:
    """An Alerts hook on `store`, as the daemon wires it (no sinks: rows stay pending)."""
    outbox = Outbox(store=store, sinks={}, retry_initial=1, retry_max=1, poll_seconds=1)
    alerts = cls(
        router=Router(rules),
        outbox=outbox,
        store=store,
        specs=lambda: specs if specs is not None else {"cam": CAM},
        evidence=evidence,
    )
    store.set_alert_hook(alerts)
    return alerts


def sent(rows: list[OutboxRow]) -> list[tuple[str, bool]]:
    return [(r.event["kind"], r.event["resolved"]) for r in rows]


async def test_an_unsafe_segment_and_its_alert_commit_together(tmp_path: Path, location: Location):
    """When apply_callback returns, the alert is already an outbox row of the same commit,
    with the stream's labels and the clip's archive path known before any download."""
    async with Store(location) as store:
        archive = EvidenceConfig(path=tmp_path / "archive")
        evidence = Evidence(config=archive, store=store)
        hooked(store, [rule(events=["unsafe_content"])], evidence=evidence)
        await register(store, "t1")
        _, body = segment("t1", 4, unsafe=True)
        body = body.replace(b'"segment_index"', b'"video_url": "http://x/4.mp4", "segment_index"')
        cb = parse_callback(body)
        commits = store.commits
        outcome = await store.apply_callback(cb, body=body)
        assert store.commits == commits + 1
        rows = await store.recent_alerts()
    assert outcome.kind == "stored"
    assert sent(rows) == [("unsafe_content", False)]
    assert rows[0].event["labels"] == {"site": "paris"}
    assert rows[0].event["segment_index"] == 4
    assert rows[0].event["evidence"] == str(tmp_path / "archive" / "cam" / "t1" / "segment_4.mp4")


class Broken(Alerts):
    """A hook whose decision fails (a bug): nothing of what raised it may be kept."""

    def _route(self, tx: AlertTx, event: AlertEvent) -> None:
        raise RuntimeError("routing bug")


async def test_a_failing_alert_decision_stores_nothing(location: Location):
    """If deciding the alert fails, the segment (and its charge) or the event is not stored
    either: the caller gets the error (503 for MAVI, which retries), never a silent loss."""
    async with Store(location) as store:
        hooked(store, [rule()], cls=Broken)
        await register(store, "t1")
        cb, body = segment("t1", 1, unsafe=True)
        with pytest.raises(RuntimeError):
            await store.apply_callback(cb, body=body)
        with pytest.raises(RuntimeError):
            await store.add_event("stream_stalled", stream="cam")
        safe, body = segment("t1", 2)
        assert (await store.apply_callback(safe, body=body)).kind == "stored"
        assert await store.segment_indexes("t1") == [2]
        totals = await store.charge_totals(since=0, until=4e9)
        assert [e.kind for e in await store.events()] == []
    assert totals[0].segments == 1


async def test_recorded_events_and_their_alerts_commit_together(location: Location):
    """A supervisor event and its outbox row are one operation; non-alerting events add
    none."""
    async with Store(location) as store:
        hooked(store, [rule()])
        await store.add_event("stream_stalled", stream="cam", task_id="t1")
        await store.add_event("task_adopted", stream="cam", task_id="t1")
        rows = await store.recent_alerts()
        events = await store.events()
    assert [e.kind for e in events] == ["stream_stalled", "task_adopted"]
    assert sent(rows) == [("stream_stalled", False)]
    assert rows[0].event["labels"] == {"site": "paris"}


async def test_rule_state_survives_a_restart(location: Location):
    """Cooldowns, open conditions, grouping windows and streaks are in the state file: after
    a restart a repeat is still held back, an open condition is resolved, a grouping window
    goes on and a streak keeps counting."""
    path = location
    rules = [
        rule(name="stall", events=["stream_stalled"], cooldown_seconds=3600, group_seconds=60),
        rule(name="unsafe", events=["unsafe_content"], min_consecutive=2),
    ]
    async with Store(path, clock=lambda: 1000.0) as store:
        hooked(store, rules)
        await register(store, "t1")
        await store.add_event("stream_stalled", stream="cam")
        cb, body = segment("t1", 1, unsafe=True)
        await store.apply_callback(cb, body=body)  # one in a row: below min_consecutive
        before = await store.recent_alerts()
    async with Store(path, clock=lambda: 1010.0) as store:  # the next process
        hooked(store, rules)
        await store.add_event("stream_stalled", stream="cam")  # within the cooldown
        await store.add_event("stream_recovered", stream="cam")
        cb, body = segment("t1", 2, unsafe=True)
        await store.apply_callback(cb, body=body)  # two in a row
        after = (await store.recent_alerts())[len(before) :]
    assert sent(before) == [("stream_stalled", False)]
    assert sent(after) == [("stream_stalled", True), ("unsafe_content", False)]
    assert after[0].group == before[0].group, "the grouping window opened before goes on"
    assert after[0].next_at == before[0].next_at == 1060.0
    assert after[1].event["consecutive"] == 2


async def test_a_safe_segment_ends_a_streak_and_leaves_no_row(location: Location):
    """Streak rows exist only while a streak does: a clean stream costs no rule-state row."""
    async with Store(location) as store:
        hooked(store, [rule(events=["unsafe_content"], min_consecutive=3)])
        await register(store, "t1")
        for index, unsafe in enumerate([True, True, False, True]):
            cb, body = segment("t1", index, unsafe=unsafe)
            await store.apply_callback(cb, body=body)
        rows = await store.recent_alerts()
    streaks = pg.rows(location, "SELECT stream, unsafe, logo FROM alert_streaks")
    assert rows == []
    assert streaks == [("cam", 1, 0)]


async def test_task_ends_alert_only_for_the_current_task_and_not_when_asked(
    location: Location,
):
    """A task that ends by itself alerts; an older task's end, or a stop this daemon asked
    for, does not."""
    async with Store(location) as store:
        hooked(store, [rule(events=["stream_stopped"])])
        await register(store, "t1")
        await register(store, "t2")
        await store.apply_callback(StreamEnded("t1", 15, "old task"), body=b"{}")
        await store.mark_stop_requested("t2")
        await store.apply_callback(StreamEnded("t2", 14, "asked"), body=b"{}")
        await register(store, "t3")
        await store.apply_callback(StreamEnded("t3", 15, "no video"), body=b"{}")
        rows = await store.recent_alerts()
    assert [(r.event["task_id"], r.event["kind"]) for r in rows] == [("t3", "stream_stopped")]


def orphan_body(task_id: str, index: int, pad: int = 0) -> bytes:
    doc: dict[str, Any] = {
        "task_id": task_id,
        "data": {"status": 0, "message": "m" * pad, "data": {"segment_index": index}},
    }
    return json.dumps(doc).encode()


def kept_bodies(location: Location) -> dict[str, int]:
    return dict(
        pg.rows(location, "SELECT task_id, count(*) FROM orphan_callbacks GROUP BY task_id")
    )


async def test_orphans_are_counted_and_only_a_few_small_bodies_kept(location: Location):
    """Every callback from an unknown task is counted, its first few small bodies are kept
    (and claimed if the task turns out to be ours), one orphan_task alert is raised, and a
    flood of orphan callbacks does not grow the state file body by body."""
    path = location
    async with Store(path) as store:
        hooked(store, [rule(events=["orphan_task"])])
        big = orphan_body("stranger", 0, pad=20_000)
        await store.apply_callback(parse_callback(big), body=big)
        for index in range(1, 40):
            body = orphan_body("stranger", index)
            assert (await store.apply_callback(parse_callback(body), body=body)).kind == "orphan"
        again = orphan_body("stranger", 1)
        assert (await store.apply_callback(parse_callback(again), body=again)).kind == ("duplicate")
        for index in range(3):
            body = orphan_body("early", index)
            await store.apply_callback(parse_callback(body), body=body)
        assert await store.orphan_summary() == {"stranger": 40, "early": 3}
        totals = await store.orphan_totals()
        kept = kept_bodies(path)
        claimed = await register(store, "early")
        rows = await store.recent_alerts()
        assert await store.orphan_summary() == {"stranger": 40}
    assert (totals.tasks, totals.callbacks) == (2, 43)
    assert kept == {"stranger": store_module.ORPHAN_BODIES_PER_TASK - 1, "early": 3}
    assert [o.kind for o in claimed] == ["stored"] * 3
    assert [(r.event["kind"], r.event["task_id"]) for r in rows] == [
        ("orphan_task", "stranger"),
        ("orphan_task", "early"),
    ], "one alert per unknown task, on its first callback"


async def test_orphan_bodies_kept_in_all_are_capped(location: Location, monkeypatch):
    """Across many unknown tasks, at most ORPHAN_BODIES_MAX bodies are kept; all are counted."""
    monkeypatch.setattr(orphans_module, "ORPHAN_BODIES_MAX", 3)
    path = location
    async with Store(path) as store:
        for n in range(10):
            body = orphan_body(f"task-{n}", 0)
            await store.apply_callback(parse_callback(body), body=body)
        totals = await store.orphan_totals()
    assert (totals.tasks, totals.callbacks) == (10, 10)
    assert sum(kept_bodies(path).values()) == 3


async def test_upgrade_to_schema_7_counts_orphans_and_trims_their_bodies(tmp_path: Path):
    """A state file bloated by orphan bodies keeps its counts and only the first few small
    bodies of each task."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:6]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 6")
    for index in range(12):
        body = orphan_body("stranger", index, pad=20_000 if index == 2 else 0).decode()
        conn.execute(
            "INSERT INTO orphan_callbacks (task_id, segment_index, status, received_at, body)"
            " VALUES ('stranger', ?, 0, ?, ?)",
            (index, 100.0 + index, body),
        )
    conn.commit()
    conn.close()
    async with Store(path) as store:
        summary = await store.orphan_summary()
    assert summary == {"stranger": 12}
    conn = sqlite3.connect(path)
    kept = [r[0] for r in conn.execute("SELECT segment_index FROM orphan_callbacks ORDER BY id")]
    conn.close()
    assert kept == [0, 1, 3, 4]


async def test_an_orphan_body_with_a_byte_order_mark_is_kept_clean_and_claimable(
    location: Location,
):
    """A UTF-8 byte-order mark is not stored with an orphan body, so the body is claimed as
    a segment when its task is registered (it used to be stored garbled and unparseable)."""
    body = b"\xef\xbb\xbf" + orphan_body("early", 0)
    async with Store(location) as store:
        assert (await store.apply_callback(parse_callback(body), body=body)).kind == "orphan"
        claimed = await register(store, "early")
    assert [(o.kind, o.stream) for o in claimed] == [("stored", "cam")]


async def test_a_source_offline_alert_opens_once_and_resolves_when_the_source_is_back(
    location: Location,
):
    """Preflight's events make alerts: `source_offline` opens the condition, `source_online`
    resolves it (a resolution only for a condition that was open), `fps_above_source` warns."""
    async with Store(location) as store:
        hooked(store, [rule(events=["source_offline", "fps_above_source"])])
        await store.add_event("source_online", stream="cam")  # nothing open: no resolution
        await store.add_event("source_offline", stream="cam", detail="connection refused")
        await store.add_event("source_online", stream="cam")
        await store.add_event("fps_above_source", stream="cam", detail="fps = 30 but 25")
        rows = await store.recent_alerts()
    got = sorted((r.event["kind"], r.event["resolved"], r.event["severity"]) for r in rows)
    assert got == [
        ("fps_above_source", False, "warning"),
        ("source_offline", False, "warning"),
        ("source_offline", True, "info"),
    ]


async def test_a_batch_with_a_failing_operation_is_applied_again_with_its_alerts_once(
    tmp_path: Path,
):
    """A batch commits without a savepoint per operation; when one operation fails, the
    batch is rolled back and applied again a savepoint per operation: the failing one alone is
    refused, and its batch-mates' segments, streaks and alerts are stored once, not twice."""
    async with Store(tmp_path / "state.db") as store:
        hooked(store, [rule(events=["unsafe_content"], min_consecutive=2)])
        await register(store, "t1")
        statements: list[str] = []
        conn = store._writer.context.conn
        assert isinstance(conn, sqlite3.Connection)
        conn.set_trace_callback(statements.append)
        clean = [segment("t1", index, unsafe=True) for index in (1, 2)]
        await asyncio.gather(*(store.apply_callback(cb, body=body) for cb, body in clean))
        assert not [s for s in statements if s.startswith("SAVEPOINT")]
        statements.clear()
        commits = store.commits
        cb3, body3 = segment("t1", 3, unsafe=True)
        cb4, body4 = segment("t1", 4, unsafe=True)
        results = await asyncio.gather(
            store.apply_callback(cb3, body=body3),
            register(store, "t1"),  # duplicate primary key
            store.apply_callback(cb4, body=body4),
            return_exceptions=True,
        )
        conn.set_trace_callback(None)
        rows = await store.recent_alerts()
    assert store.commits == commits + 1, "one batch"
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert [s for s in statements if s.startswith("SAVEPOINT")] == ["SAVEPOINT op"] * 3
    assert [getattr(r, "kind", None) for r in (results[0], results[2])] == ["stored", "stored"]
    assert [r.event["consecutive"] for r in rows if r.event["kind"] == "unsafe_content"] == [
        2,
        3,
        4,
    ]
    assert pg.rows(tmp_path / "state.db", "SELECT stream, unsafe, logo FROM alert_streaks") == [
        ("cam", 4, 0)
    ]
    assert pg.rows(tmp_path / "state.db", "SELECT count(*) FROM segments") == [(4,)]
