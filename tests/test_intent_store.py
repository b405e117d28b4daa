"""Start intents and orphan tasks in the store: estimates apart from the ledger, adoption that
moves them to the stream with nothing counted twice, and orphans reported once no intent may
claim them."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import streamwatch.store as store_module
from streamwatch.intent import Intent, OrphanPricer, Shape
from streamwatch.mavi.callbacks import parse_callback
from streamwatch.pricing import segment_cost_ticks
from streamwatch.store import MIGRATIONS, Location, Store
from streamwatch.store.schema import split_sql
from tests import pg
from tests.test_alerts_store import hooked, rule

TICKS = segment_cost_ticks(fps=2, content_moderation=True, logo_detection=False)  # 9


def intent(attempt: str, at: float, *, stream: str = "cam", fps: int = 2) -> Intent:
    return Intent(attempt, stream, "urlhash", f"spec-{fps}", fps, True, False, 5, at)


def body(task: str, index: int, *, frames: int | None = 10, unsafe: bool = False) -> bytes:
    block: dict[str, Any] = {"has_unsafe_content": unsafe}
    if frames is not None:
        block["frames_processed"] = frames
    doc = {
        "task_id": task,
        "data": {
            "status": 0,
            "data": {"segment_index": index, "content_moderation": block},
        },
    }
    return json.dumps(doc).encode()


async def send(store: Store, task: str, index: int, at: float, **kw: Any) -> Any:
    raw = body(task, index, **kw)
    return await store.apply_callback(parse_callback(raw), body=raw, received_at=at)


def rows(path: Location, sql: str) -> list[tuple[Any, ...]]:
    return pg.rows(path, sql)


async def test_adoption_moves_an_orphans_charges_to_the_stream_once(location: Location):
    """An unknown task matching an open intent is estimated as an orphan (its pre-charge once
    and each segment, a redelivery not twice); adopting it moves every tick to the stream,
    exactly priced, including segments whose bodies were not kept, and a redelivery of one of
    those later is a duplicate."""
    path = location
    async with Store(path) as store:
        assert await store.begin_start(intent("a1", 100.0)) is None
        outcomes = [await send(store, "T", i, 101.0 + i) for i in range(8)]
        again = await send(store, "T", 6, 120.0)  # its body was not kept: still a duplicate
        assert [o.kind for o in outcomes] == ["orphan"] * 8
        assert again.kind == "duplicate"
        assert [o.candidate_for for o in outcomes] == ["a1"] * 8
        assert sum(o.ticks for o in outcomes) == 9 * TICKS  # pre-charge + 8 segments
        estimated = await store.orphan_charge_totals(since=0, until=1e12)
        assert (estimated.tasks, estimated.precharges, estimated.segments) == (1, 1, 8)
        assert estimated.ticks == 9 * TICKS
        assert await store.charge_totals(since=0, until=1e12) == []

        adopted = await store.adopt("a1", at=130.0)
        assert adopted is not None
        assert (adopted.task_id, adopted.stream, adopted.spec_hash) == ("T", "cam", "spec-2")
        assert (adopted.started_at, adopted.precharge_ticks, adopted.precharge_at) == (
            100.0,
            TICKS,
            101.0,
        )
        kept = store_module.ORPHAN_BODIES_PER_TASK
        assert [o.kind for o in adopted.claimed] == ["stored"] * kept
        assert len(adopted.backfilled) == 8 - kept
        assert sum(t for _, t in adopted.orphan_removed) == 9 * TICKS
        moved = adopted.precharge_ticks + sum(t for _, t in adopted.backfilled)
        assert moved + sum(o.ticks for o in adopted.claimed) == 9 * TICKS

        (ledger,) = await store.charge_totals(since=0, until=1e12)
        assert (ledger.stream, ledger.precharges, ledger.segments, ledger.ticks) == (
            "cam",
            1,
            8,
            9 * TICKS,
        )
        assert (await store.orphan_charge_totals(since=0, until=1e12)).ticks == 0
        assert await store.segment_indexes("T") == list(range(8))
        task = await store.task("T")
        assert task is not None
        assert (task.stream, task.fps, task.segments, task.ended_at) == ("cam", 2, 8, None)
        assert (await send(store, "T", 7, 140.0)).kind == "duplicate"
        assert (await send(store, "T", 8, 141.0)).kind == "stored"
        assert await store.open_intents() == []
        assert await store.intent_states() == {"adopted": 1}
        assert await store.orphan_summary() == {}
        kinds = [e.kind for e in await store.events()]
        assert kinds == ["intent_adopted"], "an adopted task is never reported as an orphan"


async def test_two_candidates_the_earliest_is_adopted_and_the_other_reported(location: Location):
    """Of two unknown tasks that match one intent, the one that called back first is adopted;
    the other stays an orphan and is reported (with its alert) only then, once no open intent
    may claim it."""
    path = location
    async with Store(path) as store:
        hooked(store, [rule(events=["orphan_task"])])
        await store.begin_start(intent("a1", 100.0))
        await send(store, "late", 0, 102.0)
        await send(store, "early", 0, 101.0)
        await send(store, "stranger", 0, 101.5, frames=5)  # fps 1: not this intent's
        assert [(e.kind, e.task_id) for e in await store.events()] == [("orphan_task", "stranger")]
        adopted = await store.adopt("a1", at=103.0)
        assert adopted is not None
        assert adopted.task_id == "early"
        events = [(e.kind, e.task_id) for e in await store.events()]
        assert events == [
            ("orphan_task", "stranger"),
            ("intent_adopted", "early"),
            ("orphan_task", "late"),
        ]
        alerts = [(r.event["kind"], r.event["task_id"]) for r in await store.recent_alerts()]
        assert alerts == [("orphan_task", "stranger"), ("orphan_task", "late")]
        assert set(await store.orphan_summary()) == {"late", "stranger"}
        assert await store.adopt("a1", at=104.0) is None, "closed: adopts nothing more"


async def test_an_intent_closed_by_the_answer_claims_its_early_callbacks(location: Location):
    """Callbacks that beat the start answer are estimated but not reported; the answer's
    record closes the intent, claims them and replaces the estimates with exact charges."""
    path = location
    async with Store(path) as store:
        await store.begin_start(intent("a1", 100.0))
        early = await send(store, "T", 0, 100.5, unsafe=True)
        assert (early.kind, early.candidate_for, early.ticks) == ("orphan", "a1", 2 * TICKS)
        registered = await store.record_task_started(
            task_id="T",
            stream="cam",
            spec_hash="spec-2",
            fps=2,
            content_moderation=True,
            logo_detection=False,
            max_logos=5,
            started_at=101.0,
            attempt_id="a1",
        )
        assert [o.kind for o in registered.claimed] == ["stored"]
        assert sorted(registered.orphan_removed) == [(100.5, TICKS), (100.5, TICKS)]
        (ledger,) = await store.charge_totals(since=0, until=1e12)
        assert ledger.ticks == 2 * TICKS
        assert (await store.orphan_charge_totals(since=0, until=1e12)).ticks == 0
        assert await store.intent_states() == {"started": 1}
        assert await store.events() == [], "the daemon's own early callbacks are no orphan"


async def test_a_new_start_closes_an_unmatched_intent_and_reports_its_candidates(
    location: Location,
):
    """A stream's next start closes its old open intent as unmatched (an event) unless an
    unknown task matches it, in which case that task is adopted and nothing is started."""
    path = location
    async with Store(path) as store:
        await store.begin_start(intent("a1", 100.0))
        assert await store.begin_start(intent("a2", 110.0)) is None
        assert await store.intent_states() == {"open": 1, "unmatched": 1}
        await send(store, "T", 0, 111.0)
        adopted = await store.begin_start(intent("a3", 120.0))
        assert adopted is not None
        assert adopted.task_id == "T"
        assert await store.intent_states() == {"adopted": 1, "unmatched": 1}
        assert [e.kind for e in await store.events()] == ["intent_unmatched", "intent_adopted"]
        # Closed as failed (a refusal), an intent's candidates are reported at once.
        await store.begin_start(intent("b1", 200.0, stream="other", fps=3))
        await send(store, "U", 0, 201.0, frames=15)
        assert await store.close_intent("b1", state="failed", detail="HTTP 409")
        assert not await store.close_intent("b1", state="failed")
        assert [e.kind for e in await store.events()][-1] == "orphan_task"


async def test_orphan_segments_are_priced_by_the_pricer_and_count_toward_a_stop(location: Location):
    """Each orphan segment is priced from what it shows (fps from frames_processed), its
    pre-charge once; the outcome counts its segment callbacks; an orphan an open intent may
    adopt cannot be claimed for a stop, one nobody may claim can, once."""
    path = location
    configured = [Shape(True, False, 4)]
    async with Store(path, orphan_pricer=OrphanPricer(configured)) as store:
        sure = [await send(store, "X", i, 10.0 + i, frames=15) for i in range(3)]
        guessed = await send(store, "Y", 0, 10.0, frames=None)
        three = segment_cost_ticks(fps=3, content_moderation=True, logo_detection=False)
        four = segment_cost_ticks(fps=4, content_moderation=True, logo_detection=False)
        assert [o.ticks for o in sure] == [2 * three, three, three]
        assert [o.orphan_segments for o in sure] == [1, 2, 3]
        assert guessed.ticks == 2 * four, "unknown fps: the one configured with these features"
        totals = await store.orphan_totals()
        assert (totals.tasks, totals.callbacks, totals.uncertain) == (2, 4, 0)
        assert await store.claim_orphan_stop("X")
        await store.record_orphan_stopped("X", detail="stopped")
        assert not await store.claim_orphan_stop("X")
        assert (await store.orphan_totals()).stopped == 1
        await store.begin_start(intent("a1", 100.0, fps=3))
        await send(store, "Z", 0, 101.0, frames=15)
        assert not await store.claim_orphan_stop("Z"), "an open intent may still adopt it"
        assert [(e.kind, e.task_id) for e in await store.events()] == [
            ("orphan_task", "X"),
            ("orphan_task", "Y"),
            ("orphan_stopped", "X"),
        ]


async def test_upgrade_to_schema_9_keeps_known_orphans_reported(tmp_path: Path):
    """Orphans counted by schema 7 are taken as reported (their alert was sent then): their
    next callback raises none again."""
    path = tmp_path / "s.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:7]:
        for statement in split_sql(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 7")
    conn.execute(
        "INSERT INTO orphan_tasks (task_id, first_at, last_at, callbacks) VALUES ('old', 1, 1, 4)"
    )
    conn.commit()
    conn.close()
    async with Store(path) as store:
        outcome = await send(store, "old", 9, 5.0)
        assert outcome.kind == "orphan"
        assert await store.events() == []
        assert await store.orphan_summary() == {"old": 5}
    assert rows(path, "SELECT reported FROM orphan_tasks") == [(1,)]


async def test_orphans_read_the_precharge_as_the_ledger_does(location: Location):
    """With precharge = "first_segment" an orphan's first segment is estimated free, as a
    recorded task's is, and its adoption keeps the same total."""
    async with Store(location, precharge_covers_first_segment=True) as store:
        await store.begin_start(intent("a1", 100.0))
        outcomes = [await send(store, "T", i, 101.0 + i) for i in range(3)]
        assert [o.ticks for o in outcomes] == [TICKS, TICKS, TICKS]  # pre-charge, free, paid
        assert await store.adopt("a1", at=110.0) is not None
        (ledger,) = await store.charge_totals(since=0, until=1e12)
        assert ledger.ticks == 3 * TICKS
