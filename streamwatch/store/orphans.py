"""Callbacks from tasks this daemon has not recorded (orphans): counted, priced, parked.

Every callback of an unknown task is counted per task in `orphan_tasks`; only the first
`ORPHAN_BODIES_PER_TASK` bodies of each, of at most `ORPHAN_BODY_MAX_BYTES`, and at most
`ORPHAN_BODIES_MAX` in all, are kept (to be claimed if the task turns out to be ours). What
they cost is estimated from what they show (`streamwatch.intent.price_orphan`) into
`orphan_charges`, apart from the confirmed `charges`. An orphan is reported (an
`orphan_task` event) once no open start intent may claim it.

The SQL is the portable subset both backends run (`streamwatch.store.sql`).
"""

from __future__ import annotations

from streamwatch.intent import Candidate, Intent, Shape, owner, shape_of
from streamwatch.mavi.callbacks import Callback, SegmentReport, StreamEnded
from streamwatch.store.reader import Row
from streamwatch.store.sql import Connection
from streamwatch.store.streams import record_event
from streamwatch.store.types import CallbackOutcome, EventRow
from streamwatch.store.writer import Context, WriteSide

__all__ = [
    "ORPHAN_BODIES_MAX",
    "ORPHAN_BODIES_PER_TASK",
    "ORPHAN_BODY_MAX_BYTES",
    "OrphanWrites",
    "candidate",
    "intents",
    "park",
    "read_open_intents",
    "report",
]

# What is kept of callbacks from tasks this daemon did not start: every one is counted, the
# first few bodies (small ones) are kept to claim early callbacks of a task being registered
# and to show what the stranger sends.
ORPHAN_BODIES_PER_TASK = 5
ORPHAN_BODY_MAX_BYTES = 8 * 1024
ORPHAN_BODIES_MAX = 10_000


def park(ctx: Context, cb: Callback, body: str, at: float) -> CallbackOutcome:
    """Count a callback from an unknown task, estimate what it costs, keep its body if it is
    among the first few, and report the task once no open intent may claim it."""
    conn = ctx.conn
    index = cb.segment_index if isinstance(cb, SegmentReport) else None
    seen = shape_of(cb) if isinstance(cb, SegmentReport) else None
    price = ctx.pricer(seen)
    if index is not None and (
        # Its estimate doubles as the dedupe record of an orphan segment (the kept bodies
        # are one too, for orphans counted before estimates were).
        conn.execute(
            "INSERT OR IGNORE INTO orphan_charges (task_id, segment_index, at, ticks,"
            " uncertain) VALUES (?,?,?,?,?)",
            (cb.task_id, index, at, price.ticks, price.uncertain),
        ).rowcount
        == 0
        or conn.execute(
            "SELECT 1 FROM orphan_callbacks WHERE task_id = ? AND segment_index = ?",
            (cb.task_id, index),
        ).fetchone()
    ):
        return CallbackOutcome("duplicate", None, cb)
    ended = cb.status if isinstance(cb, StreamEnded) else None
    # One statement counts the callback, notes what it shows (the shape, from the first
    # segment that shows one) and returns what the rest needs.
    row = conn.execute(
        "UPDATE orphan_tasks SET callbacks = callbacks + 1, last_at = max(last_at, ?),"
        " segments = segments + ?, uncertain = max(uncertain, ?),"
        " end_status = coalesce(end_status, ?),"
        " logo_detection = CASE WHEN content_moderation IS NULL THEN ? ELSE logo_detection END,"
        " fps = CASE WHEN content_moderation IS NULL THEN ? ELSE fps END,"
        " content_moderation = coalesce(content_moderation, ?)"
        " WHERE task_id = ? RETURNING callbacks, segments, first_at, content_moderation,"
        " logo_detection, fps, end_status, stopped_at",
        (
            at,
            int(ended is None),
            price.uncertain,
            ended,
            None if seen is None else seen.logo_detection,
            None if seen is None else seen.fps,
            None if seen is None else seen.content_moderation,
            cb.task_id,
        ),
    ).fetchone()
    first = row is None
    ticks = 0
    if first:
        shape = (
            (None, None, None)
            if seen is None
            else (seen.content_moderation, seen.logo_detection, seen.fps)
        )
        row = conn.execute(
            "INSERT INTO orphan_tasks (task_id, first_at, last_at, callbacks, segments,"
            " uncertain, end_status, content_moderation, logo_detection, fps, reported)"
            " VALUES (?,?,?,1,?,?,?,?,?,?,0) RETURNING callbacks, segments, first_at,"
            " content_moderation, logo_detection, fps, end_status, stopped_at",
            (cb.task_id, at, at, int(ended is None), price.uncertain, ended, *shape),
        ).fetchone()
        # MAVI pre-charged the task when it started: estimated once, at its first sign.
        conn.execute(
            "INSERT INTO orphan_charges (task_id, segment_index, at, ticks, uncertain)"
            " VALUES (?,-1,?,?,?)",
            (cb.task_id, at, price.ticks, price.uncertain),
        )
        ticks += price.ticks
    seen_before, segments = row[0], row[1]
    if isinstance(cb, SegmentReport):
        ticks += price.ticks
        if ctx.first_free and segments == 1:  # the pre-charge paid for it
            conn.execute(
                "UPDATE orphan_charges SET ticks = 0 WHERE task_id = ? AND segment_index = ?",
                (cb.task_id, index),
            )
            ticks -= price.ticks
    if (
        seen_before <= ORPHAN_BODIES_PER_TASK
        and len(body) <= ORPHAN_BODY_MAX_BYTES
        and len(body.encode()) <= ORPHAN_BODY_MAX_BYTES
        and conn.execute("SELECT count(*) FROM orphan_callbacks").fetchone()[0] < ORPHAN_BODIES_MAX
    ):
        status = 0 if isinstance(cb, SegmentReport) else cb.status
        conn.execute(
            "INSERT INTO orphan_callbacks (task_id, segment_index, status, received_at, body)"
            " VALUES (?,?,?,?,?)",
            (cb.task_id, index, status, at, body),
        )
    found = as_candidate(cb.task_id, row[2:])
    claimant = owner(intents(ctx), found) if found is not None else None
    if first and claimant is None:
        report(ctx, at, only=cb.task_id)
    return CallbackOutcome(
        "orphan",
        None,
        cb,
        ticks=ticks,
        at=at,
        first_from_task=first,
        orphan_segments=segments,
        segment_ticks=price.ticks,
        candidate_for=claimant.attempt_id if claimant is not None else None,
    )


def candidate(conn: Connection, task_id: str) -> Candidate | None:
    """The orphan as a candidate for adoption: None until a segment has shown its shape,
    and once it has ended or been stopped."""
    row = conn.execute(
        "SELECT first_at, content_moderation, logo_detection, fps, end_status, stopped_at"
        " FROM orphan_tasks WHERE task_id = ?",
        (task_id,),
    ).fetchone()
    return None if row is None else as_candidate(task_id, row)


def as_candidate(task_id: str, row: Row) -> Candidate | None:
    """(first_at, content_moderation, logo_detection, fps, end_status, stopped_at) as a
    candidate for adoption: None until a segment has shown its shape, once it has ended or
    been stopped."""
    first_at, moderation, logos, fps, end_status, stopped_at = row
    if moderation is None or end_status is not None or stopped_at is not None:
        return None
    return Candidate(task_id, first_at, Shape(bool(moderation), bool(logos), fps))


def intents(ctx: Context) -> list[Intent]:
    """The open intents, cached in the context between the operations that change them."""
    if ctx.open_intents is None:
        ctx.open_intents = read_open_intents(ctx.conn)
    return ctx.open_intents


def read_open_intents(conn: Connection) -> list[Intent]:
    """Intents still open, oldest first."""
    rows = conn.execute(
        "SELECT attempt_id, stream, url_hash, spec_hash, fps, content_moderation,"
        " logo_detection, max_logos, created_at FROM start_intents WHERE state = 'open'"
        " ORDER BY created_at, attempt_id"
    )
    return [Intent(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7], r[8]) for r in rows]


def report(ctx: Context, at: float, *, only: str | None = None) -> None:
    """Record `orphan_task` (and its alert) for each orphan not yet reported that no open
    intent may claim any more."""
    conn = ctx.conn
    where, args = ("AND task_id = ?", (only,)) if only else ("", ())
    pending = [
        r[0]
        for r in conn.execute(
            f"SELECT task_id FROM orphan_tasks WHERE reported = 0 {where}", args
        ).fetchall()
    ]
    if not pending:
        return
    open_now = intents(ctx)
    for task_id in pending:
        found = candidate(conn, task_id)
        if found is not None and owner(open_now, found) is not None:
            continue
        conn.execute("UPDATE orphan_tasks SET reported = 1 WHERE task_id = ?", (task_id,))
        record_event(
            ctx,
            EventRow(
                at,
                None,
                task_id,
                "orphan_task",
                None,
                f"task {task_id} sends callbacks but was not started by this daemon",
            ),
        )


class OrphanWrites(WriteSide):
    async def claim_orphan_stop(self, task_id: str) -> bool:
        """May this daemon stop the orphan `task_id` now? Not once it has ended or been
        stopped, nor while an open intent may still adopt it."""

        def op(ctx: Context) -> bool:
            row = ctx.conn.execute(
                "SELECT 1 FROM orphan_tasks WHERE task_id = ? AND end_status IS NULL"
                " AND stopped_at IS NULL",
                (task_id,),
            ).fetchone()
            if row is None:
                return False
            found = candidate(ctx.conn, task_id)
            return found is None or owner(intents(ctx), found) is None

        return await self._write(op)

    async def record_orphan_stopped(
        self, task_id: str, *, detail: str, at: float | None = None
    ) -> None:
        """Note that this daemon stopped the orphan, with its `orphan_stopped` event."""
        when = self._clock() if at is None else at

        def op(ctx: Context) -> None:
            ctx.conn.execute(
                "UPDATE orphan_tasks SET stopped_at = ? WHERE task_id = ?", (when, task_id)
            )
            record_event(ctx, EventRow(when, None, task_id, "orphan_stopped", None, detail))

        await self._write(op)
