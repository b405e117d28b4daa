"""Retention: deleting what is older than a cut-off, a chunk per write, so that callbacks are
stored in between.

Task totals, charges and events stay: counters, costs and history do not change. The
highest segment index pruned from each task is kept (`tasks.pruned_through`): a redelivery
of a pruned segment is a duplicate, never stored or charged again.

The SQL is the portable subset both backends run (`streamwatch.store.sql`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from streamwatch.store.types import Pruned
from streamwatch.store.writer import Context, WriteSide

__all__ = ["PruneWrites"]


class PruneWrites(WriteSide):
    async def prune(
        self, before: float, *, chunk: int = 2000, stop: Callable[[], bool] = lambda: False
    ) -> Pruned:
        """Delete what is older than `before`: segment records, segment failures, orphan
        callbacks, and alerts already delivered or dead. Segments go a chunk per write, by
        stream (its index), so callbacks are stored in between, and `stop()` is asked between
        chunks (the rest waits for the next run)."""
        streams = await self._read(
            lambda c: [r[0] for r in c.execute("SELECT DISTINCT stream FROM tasks")]
        )
        pruned = 0
        for stream in streams:
            while True:
                op = functools.partial(_segments, stream=stream, before=before, chunk=chunk)
                count = await self._write(op)
                pruned += count
                if count < chunk:
                    break
                if stop():
                    return Pruned(pruned, 0, 0, 0)
        failures, orphans, alerts = await self._write(functools.partial(_rest, before=before))
        return Pruned(pruned, failures, orphans, alerts)


def _segments(ctx: Context, *, stream: str, before: float, chunk: int) -> int:
    conn = ctx.conn
    rows = conn.execute(
        "SELECT task_id, segment_index FROM segments WHERE stream = ? AND received_at < ? LIMIT ?",
        (stream, before, chunk),
    ).fetchall()
    conn.executemany("DELETE FROM segments WHERE task_id = ? AND segment_index = ?", rows)
    highest: dict[str, int] = {}
    for task_id, index in rows:
        highest[task_id] = max(index, highest.get(task_id, index))
    conn.executemany(
        "UPDATE tasks SET pruned_through = max(coalesce(pruned_through, -1), ?) WHERE task_id = ?",
        [(index, task_id) for task_id, index in highest.items()],
    )
    return len(rows)


def _rest(ctx: Context, *, before: float) -> tuple[int, int, int]:
    conn = ctx.conn
    failures = conn.execute(
        "DELETE FROM segment_failures WHERE received_at < ?", (before,)
    ).rowcount
    orphans = conn.execute("DELETE FROM orphan_callbacks WHERE received_at < ?", (before,)).rowcount
    conn.execute("DELETE FROM orphan_tasks WHERE last_at < ?", (before,))
    alerts = conn.execute(
        "DELETE FROM alert_outbox WHERE state IN ('delivered', 'dead') AND created_at < ?",
        (before,),
    ).rowcount
    return failures, orphans, alerts
