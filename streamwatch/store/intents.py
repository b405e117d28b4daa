"""Start intents: every start is written as an intent before MAVI is called, and closed by
what follows.

The answer's task closes it in the transaction that records the task (claiming the task's
callbacks that arrived first, parked as orphans). An intent left open may be closed by
adopting the unknown task whose callbacks match it (`adopt`): the task is recorded with the
intent's parameters, its parked callbacks are claimed like live ones, and its estimated
orphan charges are replaced by the exact ones, in one transaction. An intent is also closed
as failed (MAVI refused the start) or unmatched (no task showed up; its stream is gone).

The SQL is the portable subset both backends run (`streamwatch.store.sql`).
"""

from __future__ import annotations

import bisect

from streamwatch.intent import Intent, assign
from streamwatch.pricing import segment_cost_ticks
from streamwatch.store import orphans, tasks
from streamwatch.store.budget import merge, spend, start_gate
from streamwatch.store.leases import fence
from streamwatch.store.reader import ReadSide
from streamwatch.store.streams import record_event
from streamwatch.store.types import Adopted, EventRow, FleetSpend, Registered
from streamwatch.store.writer import Context, WriteSide

__all__ = ["IntentReads", "IntentWrites"]


class IntentReads(ReadSide):
    async def open_intents(self) -> list[Intent]:
        """Intents still open, oldest first: starts whose answer was never recorded."""
        return await self._read(orphans.read_open_intents)

    async def intent_states(self) -> dict[str, int]:
        """How many intents are in each state (open, started, failed, adopted, unmatched)."""
        return await self._read(
            lambda c: dict(c.execute("SELECT state, count(*) FROM start_intents GROUP BY state"))
        )


class IntentWrites(WriteSide):
    async def record_task_started(
        self,
        *,
        task_id: str,
        stream: str,
        spec_hash: str,
        fps: int,
        content_moderation: bool,
        logo_detection: bool,
        max_logos: int,
        started_at: float,
        attempt_id: str | None = None,
    ) -> Registered:
        """Register a task MAVI just started with its pre-charge, close the start's intent
        (`attempt_id`), and claim callbacks that arrived before it was registered (they were
        parked as orphans; their estimated charges give way to exact ones)."""
        ticks = segment_cost_ticks(
            fps=fps, content_moderation=content_moderation, logo_detection=logo_detection
        )

        def op(ctx: Context) -> Registered:
            fence(ctx, stream)
            conn = ctx.conn
            conn.execute(
                "INSERT INTO tasks (task_id, stream, spec_hash, fps, content_moderation,"
                " logo_detection, max_logos, started_at, segment_ticks)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    task_id,
                    stream,
                    spec_hash,
                    fps,
                    content_moderation,
                    logo_detection,
                    max_logos,
                    started_at,
                    ticks,
                ),
            )
            conn.execute(
                "INSERT INTO charges (at, stream, task_id, kind, ticks)"
                " VALUES (?, ?, ?, 'precharge', ?)",
                (started_at, stream, task_id, ticks),
            )
            fleet = spend(ctx, stream, task_id, ticks, started_at)
            removed, claimed = tasks.claim(ctx, task_id)
            if attempt_id is not None:
                _close(ctx, attempt_id, "started", started_at, task_id=task_id)
                orphans.report(ctx, started_at)
            return Registered(ticks, claimed, [(at, t) for _, at, t in removed], spend=fleet)

        return await self._write(op)

    async def begin_start(self, intent: Intent) -> Adopted | None:
        """Write `intent` before its start call. An intent of the stream still open is
        settled first, in the same transaction: if an unknown task matches it, that task is
        adopted and returned (and no new intent is written: there is nothing to start);
        otherwise it is closed as unmatched."""

        def op(ctx: Context) -> Adopted | None:
            fence(ctx, intent.stream)
            at = intent.created_at
            for old in [i for i in orphans.intents(ctx) if i.stream == intent.stream]:
                adopted = _try_adopt(ctx, old, at)
                if adopted is not None:
                    return adopted
                _close(ctx, old.attempt_id, "unmatched", at)
                record_event(
                    ctx,
                    EventRow(
                        at,
                        old.stream,
                        None,
                        "intent_unmatched",
                        None,
                        "no task showed up for the start whose answer was lost: starting again",
                    ),
                )
            start_gate(ctx, intent.stream, at)  # [cluster]: the fleet's exact spend
            ctx.conn.execute(
                "INSERT INTO start_intents (attempt_id, stream, url_hash, spec_hash, fps,"
                " content_moderation, logo_detection, max_logos, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    intent.attempt_id,
                    intent.stream,
                    intent.url_hash,
                    intent.spec_hash,
                    intent.fps,
                    intent.content_moderation,
                    intent.logo_detection,
                    intent.max_logos,
                    intent.created_at,
                ),
            )
            # The cache follows the insert instead of being read again: a fleet's first start
            # has thousands of intents open at once, and a read per start was quadratic.
            if ctx.open_intents is not None:
                bisect.insort(ctx.open_intents, intent, key=lambda i: (i.created_at, i.attempt_id))
            orphans.report(ctx, at)
            return None

        return await self._write(op)

    async def close_intent(
        self, attempt_id: str, *, state: str, detail: str = "", at: float | None = None
    ) -> bool:
        """Close an open intent (`failed`: MAVI refused the start; `unmatched`: its stream
        is gone). True if it was open."""
        when = self._clock() if at is None else at

        def op(ctx: Context) -> bool:
            closed = _close(ctx, attempt_id, state, when, detail=detail)
            if closed:
                orphans.report(ctx, when)
            return closed

        return await self._write(op)

    async def adopt(self, attempt_id: str, *, at: float | None = None) -> Adopted | None:
        """Adopt the unknown task that matches the open intent `attempt_id` (see
        `streamwatch.intent.assign`), if there is one; None otherwise, or if it is closed."""
        when = self._clock() if at is None else at

        def op(ctx: Context) -> Adopted | None:
            found = next((i for i in orphans.intents(ctx) if i.attempt_id == attempt_id), None)
            if found is None:
                return None
            fence(ctx, found.stream)
            return _try_adopt(ctx, found, when)

        return await self._write(op)


def _close(
    ctx: Context,
    attempt_id: str,
    state: str,
    at: float,
    *,
    task_id: str | None = None,
    detail: str = "",
) -> bool:
    cur = ctx.conn.execute(
        "UPDATE start_intents SET state = ?, closed_at = ?, task_id = ?, detail = ?"
        " WHERE attempt_id = ? AND state = 'open'",
        (state, at, task_id, detail[:500] or None, attempt_id),
    )
    if cur.rowcount == 1 and ctx.open_intents is not None:
        ctx.open_intents = [i for i in ctx.open_intents if i.attempt_id != attempt_id]
    return cur.rowcount == 1


def _try_adopt(ctx: Context, intent: Intent, at: float) -> Adopted | None:
    conn = ctx.conn
    rows = conn.execute(
        "SELECT task_id FROM orphan_tasks WHERE first_at >= ?", (intent.created_at,)
    ).fetchall()
    candidates = [c for r in rows if (c := orphans.candidate(conn, r[0])) is not None]
    task_id = assign(orphans.intents(ctx), candidates).get(intent.attempt_id)
    if task_id is None:
        return None
    return _adopt(ctx, intent, task_id, at)


def _adopt(ctx: Context, intent: Intent, task_id: str, at: float) -> Adopted:
    conn = ctx.conn
    ticks = segment_cost_ticks(
        fps=intent.fps,
        content_moderation=intent.content_moderation,
        logo_detection=intent.logo_detection,
    )
    conn.execute(
        "INSERT INTO tasks (task_id, stream, spec_hash, fps, content_moderation,"
        " logo_detection, max_logos, started_at, segment_ticks) VALUES (?,?,?,?,?,?,?,?,?)",
        (
            task_id,
            intent.stream,
            intent.spec_hash,
            intent.fps,
            intent.content_moderation,
            intent.logo_detection,
            intent.max_logos,
            intent.created_at,
            ticks,
        ),
    )
    first_at = conn.execute(
        "SELECT first_at FROM orphan_tasks WHERE task_id = ?", (task_id,)
    ).fetchone()[0]
    removed, claimed = tasks.claim(ctx, task_id)
    precharge_at = next((when for index, when, _ in removed if index == -1), first_at)
    conn.execute(
        "INSERT INTO charges (at, stream, task_id, kind, ticks) VALUES (?,?,?,'precharge',?)",
        (precharge_at, intent.stream, task_id, ticks),
    )
    fleet = spend(ctx, intent.stream, task_id, ticks, precharge_at)
    backfilled, more = _backfill(ctx, intent, task_id, removed, ticks)
    _close(ctx, intent.attempt_id, "adopted", at, task_id=task_id)
    record_event(
        ctx,
        EventRow(
            at,
            intent.stream,
            task_id,
            "intent_adopted",
            None,
            f"the task MAVI started for the start whose answer was lost called back: adopted"
            f" with {len(removed) - 1} segment(s) so far",
        ),
    )
    orphans.report(ctx, at)
    return Adopted(
        task_id=task_id,
        stream=intent.stream,
        spec_hash=intent.spec_hash,
        started_at=intent.created_at,
        precharge_ticks=ticks,
        precharge_at=precharge_at,
        claimed=claimed,
        backfilled=backfilled,
        orphan_removed=[(when, t) for _, when, t in removed],
        spend=merge(fleet, more),
    )


def _backfill(
    ctx: Context,
    intent: Intent,
    task_id: str,
    removed: list[tuple[int, float, int]],
    ticks: int,
) -> tuple[list[tuple[float, int]], FleetSpend | None]:
    """Segments counted while the task was unknown whose bodies were not kept: stored as
    known to have been processed (nothing else is known of them) and charged exactly.
    Returns their (at, ticks), and [cluster] the fleet's spend after them."""
    conn = ctx.conn
    backfilled = []
    fleet = None
    for index, when, _ in removed:
        if index < 0:
            continue
        cur = conn.execute(
            "INSERT OR IGNORE INTO segments (task_id, segment_index, stream, received_at)"
            " VALUES (?,?,?,?)",
            (task_id, index, intent.stream, when),
        )
        if cur.rowcount == 0:
            continue  # claimed with its body
        (before,) = conn.execute(
            "UPDATE tasks SET segments = segments + 1,"
            " last_callback_at = max(coalesce(last_callback_at, 0), ?) WHERE task_id = ?"
            " RETURNING segments - 1",
            (when, task_id),
        ).fetchone()
        charge = 0 if ctx.first_free and before == 0 else ticks
        conn.execute(
            "INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)"
            " VALUES (?,?,?,'segment',?,?)",
            (when, intent.stream, task_id, index, charge),
        )
        fleet = merge(fleet, spend(ctx, intent.stream, task_id, charge, when))
        backfilled.append((when, charge))
    return backfilled, fleet
