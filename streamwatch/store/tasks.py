"""Tasks this daemon started, and the callbacks they send.

MAVI has no list endpoint, so the `tasks` table is the registry of what this daemon started.
A callback of a recorded task is stored once per `(task_id, segment_index)` with its charge
(a redelivery, even of a pruned segment, is a duplicate); one of an unknown task is parked
as an orphan (`streamwatch.store.orphans`) until a start or an adoption claims it.

The SQL is the portable subset both backends run (`streamwatch.store.sql`).
"""

from __future__ import annotations

import dataclasses
import json

from streamwatch.mavi.callbacks import (
    Callback,
    CallbackError,
    SegmentFailed,
    SegmentReport,
    StreamEnded,
    decode_body,
    parse_callback,
)
from streamwatch.store import orphans
from streamwatch.store.alerts import RuleStateTx
from streamwatch.store.budget import spend
from streamwatch.store.leases import fence, publish
from streamwatch.store.reader import ReadSide, Row
from streamwatch.store.sql import Connection
from streamwatch.store.types import CallbackOutcome, StreamTotals, TaskRow
from streamwatch.store.writer import Context, WriteSide

__all__ = ["TaskReads", "TaskWrites", "apply", "claim", "store_known"]


def apply(ctx: Context, cb: Callback, body: str, at: float) -> CallbackOutcome:
    """Store a callback (and the alerts it raises); one of an unknown task is parked."""
    outcome = store_known(ctx.conn, cb, at, first_free=ctx.first_free)
    if outcome is None:
        return orphans.park(ctx, cb, body, at)
    hook = ctx.hook
    if hook is not None and outcome.kind == "stored":
        hook.callback(RuleStateTx(ctx, at), outcome)
    if ctx.fence is not None and outcome.kind == "stored":
        publish(ctx, outcome)  # [cluster]: for the stream's owner, whichever replica it is
        if outcome.ticks and ctx.budget is not None:
            assert outcome.stream is not None
            fleet = spend(ctx, outcome.stream, cb.task_id, outcome.ticks, at)
            outcome = dataclasses.replace(outcome, spend=fleet)
    return outcome


def claim(ctx: Context, task_id: str) -> tuple[list[tuple[int, float, int]], list[CallbackOutcome]]:
    """Take a just-recorded task's orphan past: drop its estimated charges (returned as
    (segment_index, at, ticks)) and store its parked callbacks as its own, in order."""
    conn = ctx.conn
    removed = conn.execute(
        "DELETE FROM orphan_charges WHERE task_id = ? RETURNING segment_index, at, ticks",
        (task_id,),
    ).fetchall()
    rows = conn.execute(
        "SELECT body, received_at FROM orphan_callbacks WHERE task_id = ? ORDER BY id",
        (task_id,),
    ).fetchall()
    conn.execute("DELETE FROM orphan_callbacks WHERE task_id = ?", (task_id,))
    conn.execute("DELETE FROM orphan_tasks WHERE task_id = ?", (task_id,))
    claimed = []
    for body, received_at in rows:
        try:
            early = parse_callback(body)
        except CallbackError:
            continue  # kept by an older version that checked less: not claimable
        claimed.append(apply(ctx, early, body, received_at))
    return sorted(removed), claimed


def store_known(
    conn: Connection, cb: Callback, at: float, *, first_free: bool
) -> CallbackOutcome | None:
    """Store a callback of a recorded task; None if its task is not recorded."""
    row = conn.execute(
        "SELECT stream, stop_requested, segment_ticks, segments, pruned_through FROM tasks"
        " WHERE task_id = ?",
        (cb.task_id,),
    ).fetchone()
    if row is None:
        return None
    stream, stop_requested, segment_ticks, stored_before = row[0], bool(row[1]), row[2], row[3]
    if isinstance(cb, SegmentReport):
        if row[4] is not None and cb.segment_index <= row[4]:
            return CallbackOutcome("duplicate", stream, cb)  # stored once, pruned since
        cur = conn.execute(
            "INSERT OR IGNORE INTO segments (task_id, segment_index, stream, received_at,"
            " start_time, end_time, unsafe, has_logo, logos, frames, processing_ms, tokens,"
            " video_url) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                cb.task_id,
                cb.segment_index,
                stream,
                at,
                cb.start_time,
                cb.end_time,
                cb.unsafe,
                cb.has_logo,
                json.dumps([logo.raw for logo in cb.logos]) if cb.logos else None,
                cb.frames_processed,
                cb.processing_ms,
                _tokens_json(cb) if cb.tokens else None,
                cb.video_url,
            ),
        )
        if cur.rowcount == 0:
            return CallbackOutcome("duplicate", stream, cb)
        conn.execute(
            "UPDATE tasks SET segments = segments + 1, unsafe_segments = unsafe_segments + ?,"
            " logo_segments = logo_segments + ?,"
            " last_callback_at = max(coalesce(last_callback_at, 0), ?) WHERE task_id = ?",
            (bool(cb.unsafe), bool(cb.has_logo), at, cb.task_id),
        )
        ticks = 0 if first_free and stored_before == 0 else segment_ticks
        conn.execute(
            "INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)"
            " VALUES (?, ?, ?, 'segment', ?, ?)",
            (at, stream, cb.task_id, cb.segment_index, ticks),
        )
        return CallbackOutcome("stored", stream, cb, ticks=ticks, at=at)
    if isinstance(cb, SegmentFailed):
        conn.execute(
            "INSERT INTO segment_failures (task_id, stream, status, message, received_at)"
            " VALUES (?,?,?,?,?)",
            (cb.task_id, stream, cb.status, cb.message[:500], at),
        )
        conn.execute(
            "UPDATE tasks SET failed_segments = failed_segments + 1,"
            " last_callback_at = max(coalesce(last_callback_at, 0), ?) WHERE task_id = ?",
            (at, cb.task_id),
        )
        return CallbackOutcome("stored", stream, cb)
    assert isinstance(cb, StreamEnded)
    cur = conn.execute(
        "UPDATE tasks SET end_status = ?, ended_at = coalesce(ended_at, ?),"
        " end_reason = coalesce(end_reason, 'callback') WHERE task_id = ? AND end_status IS NULL",
        (cb.status, at, cb.task_id),
    )
    if cur.rowcount == 0:
        return CallbackOutcome("duplicate", stream, cb, stop_requested)
    conn.execute(
        "INSERT INTO events (at, stream, task_id, kind, status, detail) VALUES (?,?,?,?,?,?)",
        (at, stream, cb.task_id, "task_ended", cb.status, cb.message[:500]),
    )
    return CallbackOutcome("stored", stream, cb, stop_requested)


def _tokens_json(cb: SegmentReport) -> str:
    """The segment's tokens as JSON, the text json.dumps made of this dict (formatted here:
    it was a twentieth of the writer's time)."""
    t = cb.tokens
    assert t is not None
    return (
        f'{{"input": {t.input:d}, "output": {t.output:d}, "total": {t.total:d},'
        f' "video": {t.video:d}, "text": {t.text:d}}}'
    )


class TaskReads(ReadSide):
    async def running_tasks(self) -> list[TaskRow]:
        """Tasks recorded as started and not ended: the ones to adopt after a restart."""
        return await self._read(
            lambda c: [
                _task_row(r)
                for r in c.execute(f"{_TASK_SELECT} WHERE ended_at IS NULL ORDER BY started_at")
            ]
        )

    async def task(self, task_id: str) -> TaskRow | None:
        def op(conn: Connection) -> TaskRow | None:
            row = conn.execute(f"{_TASK_SELECT} WHERE task_id = ?", (task_id,)).fetchone()
            return _task_row(row) if row else None

        return await self._read(op)

    async def tasks(self, stream: str | None = None) -> list[TaskRow]:
        where, args = ("WHERE stream = ?", (stream,)) if stream else ("", ())
        return await self._read(
            lambda c: [
                _task_row(r) for r in c.execute(f"{_TASK_SELECT} {where} ORDER BY started_at", args)
            ]
        )

    async def stream_totals(self) -> dict[str, StreamTotals]:
        """Per-stream counts, summed over tasks (cheap: no scan of the segments table)."""

        def op(conn: Connection) -> dict[str, StreamTotals]:
            rows = conn.execute(
                "SELECT stream, count(*), sum(segments), sum(unsafe_segments),"
                " sum(logo_segments), sum(failed_segments), max(last_callback_at)"
                " FROM tasks GROUP BY stream"
            )
            return {r[0]: StreamTotals(r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows}

        return await self._read(op)

    async def segment_count(self, *, task_id: str | None = None) -> int:
        where, args = ("WHERE task_id = ?", (task_id,)) if task_id else ("", ())
        return await self._read(
            lambda c: int(c.execute(f"SELECT count(*) FROM segments {where}", args).fetchone()[0])
        )

    async def segment_indexes(self, task_id: str) -> list[int]:
        return await self._read(
            lambda c: [
                r[0]
                for r in c.execute(
                    "SELECT segment_index FROM segments WHERE task_id = ? ORDER BY segment_index",
                    (task_id,),
                )
            ]
        )


class TaskWrites(WriteSide):
    async def apply_callback(
        self, callback: Callback, *, body: bytes | str, received_at: float | None = None
    ) -> CallbackOutcome:
        """Store one parsed callback (and the alerts it raises); returns once committed.
        `body` is what was parsed (kept only for orphans)."""
        at = self._clock() if received_at is None else received_at
        text = body if isinstance(body, str) else decode_body(body)
        return await self._write(lambda ctx: apply(ctx, callback, text, at))

    async def mark_stop_requested(self, task_id: str) -> None:
        """Note that this daemon asked MAVI to stop the task, before asking (with [cluster]:
        refused, `Fenced`, unless this replica holds the task's stream's lease)."""

        def op(ctx: Context) -> None:
            if ctx.fence is not None:
                row = ctx.conn.execute(
                    "SELECT stream FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                if row is not None:
                    fence(ctx, row[0])
            ctx.conn.execute("UPDATE tasks SET stop_requested = 1 WHERE task_id = ?", (task_id,))

        await self._write(op)

    async def record_task_ended(
        self, task_id: str, *, status: int | None, reason: str, at: float | None = None
    ) -> bool:
        """Mark a task ended unless it already is. True if this call ended it."""
        when = self._clock() if at is None else at

        def op(ctx: Context) -> bool:
            cur = ctx.conn.execute(
                "UPDATE tasks SET ended_at = ?, end_status = ?, end_reason = ?"
                " WHERE task_id = ? AND ended_at IS NULL",
                (when, status, reason, task_id),
            )
            return cur.rowcount == 1

        return await self._write(op)


_TASK_SELECT = (
    "SELECT task_id, stream, spec_hash, fps, content_moderation, logo_detection, max_logos,"
    " started_at, stop_requested, ended_at, end_status, end_reason, last_callback_at, segments,"
    " failed_segments, segment_ticks FROM tasks"
)


def _task_row(r: Row) -> TaskRow:
    return TaskRow(
        task_id=r[0],
        stream=r[1],
        spec_hash=r[2],
        fps=r[3],
        content_moderation=bool(r[4]),
        logo_detection=bool(r[5]),
        max_logos=r[6],
        started_at=r[7],
        stop_requested=bool(r[8]),
        ended_at=r[9],
        end_status=r[10],
        end_reason=r[11],
        last_callback_at=r[12],
        segments=r[13],
        failed_segments=r[14],
        segment_ticks=r[15],
    )
