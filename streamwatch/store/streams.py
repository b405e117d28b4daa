"""Stream records, events, and the account state kept between processes (the halt, the
budget thresholds already fired), each read back typed.

An event is recorded with the alerts it raises (the alert hook runs in the same operation),
and account state that says the event happened is written in the same commit.

Account state is JSON in the `settings` table; the SQL is the portable subset both backends
run (`streamwatch.store.sql`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable

from streamwatch.store.alerts import RuleStateTx
from streamwatch.store.reader import ReadSide
from streamwatch.store.sql import Connection
from streamwatch.store.types import EventRow, Halt, StreamRecord
from streamwatch.store.writer import Context, WriteSide

__all__ = ["StreamReads", "StreamWrites", "record_event"]

# The `settings` keys, one per piece of account state.
_HALT = "account_halt"
_BUDGET_FIRED = "budget_fired"


def record_event(ctx: Context, row: EventRow) -> None:
    """Insert an event, with the alerts it raises."""
    ctx.conn.execute(
        "INSERT INTO events (at, stream, task_id, kind, status, detail) VALUES (?,?,?,?,?,?)",
        (row.at, row.stream, row.task_id, row.kind, row.status, row.detail),
    )
    if ctx.hook is not None:
        ctx.hook.record(RuleStateTx(ctx, row.at), row)


def claim_fired(ctx: Context, key: str, at: float) -> bool:
    """[cluster]: take the row of a budget event's key in `budget_fired`; True if this
    operation took it (the event fires here), False if a replica fired it already."""
    row = ctx.conn.execute(
        "INSERT INTO budget_fired (key, at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
        " RETURNING key",
        (key, at),
    ).fetchone()
    return row is not None


class StreamReads(ReadSide):
    async def streams(self) -> dict[str, StreamRecord]:
        """What the supervisor kept of each stream (see `save_streams`)."""
        return await self._read(
            lambda c: {
                r[0]: StreamRecord(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    r[5],
                    tuple(json.loads(r[6])),
                    r[7],
                    tuple(sorted((str(k), int(v)) for k, v in json.loads(r[8]).items())),
                    r[9],
                    r[10],
                )
                for r in c.execute(
                    "SELECT name, held_reason, failures, retry_at, last_end_status, last_error,"
                    " restart_times, offline_since, probes, precharges_avoided, ticks_saved"
                    " FROM streams ORDER BY name"
                )
            }
        )

    async def flagged_tasks(self, kind: str) -> set[str]:
        """Tasks not ended that have an event of `kind` (a flag raised once per task)."""
        return await self._read(
            lambda c: {
                r[0]
                for r in c.execute(
                    "SELECT DISTINCT e.task_id FROM events e JOIN tasks t USING (task_id)"
                    " WHERE e.kind = ? AND t.ended_at IS NULL",
                    (kind,),
                )
            }
        )

    async def events(self, *, stream: str | None = None, limit: int = 1000) -> list[EventRow]:
        """The last `limit` events (of `stream`), oldest first."""
        where, args = ("WHERE stream = ?", (stream,)) if stream else ("", ())

        def op(conn: Connection) -> list[EventRow]:
            rows = conn.execute(
                f"SELECT at, stream, task_id, kind, status, detail FROM events {where}"
                " ORDER BY id DESC LIMIT ?",
                (*args, limit),
            )
            return [EventRow(*r) for r in rows][::-1]

        return await self._read(op)

    async def load_halt(self) -> Halt | None:
        """The account halt in force when it was last saved, if any."""
        doc = await self._read(lambda c: _setting(c, _HALT))
        if not isinstance(doc, dict):
            return None
        return Halt(
            reason=doc["reason"],
            since=float(doc["since"]),
            until=float(doc["until"]),
            detail=str(doc.get("detail", "")),
        )

    async def load_budget_fired(self) -> frozenset[str]:
        """The budget thresholds already fired (in their periods), as last saved."""
        doc = await self._read(lambda c: _setting(c, _BUDGET_FIRED))
        return frozenset(str(key) for key in doc) if isinstance(doc, list) else frozenset()


class StreamWrites(WriteSide):
    async def save_streams(self, records: Iterable[StreamRecord]) -> None:
        """Write what the supervisor keeps of these streams between processes. A hold keeps
        the time it began."""
        when = self._clock()
        rows = [
            (
                r.name,
                r.held_reason,
                when if r.held_reason else None,
                r.failures,
                r.retry_at,
                r.last_end_status,
                r.last_error,
                json.dumps(list(r.restart_times)),
                r.offline_since,
                json.dumps(dict(r.probes)),
                r.precharges_avoided,
                r.ticks_saved,
            )
            for r in records
        ]

        def op(ctx: Context) -> None:
            book = ctx.fence  # [cluster]: only the records of streams this replica holds
            mine = rows if book is None else [r for r in rows if book.holds(ctx.conn, r[0])]
            ctx.conn.executemany(
                "INSERT INTO streams (name, held_reason, held_at, failures, retry_at,"
                " last_end_status, last_error, restart_times, offline_since, probes,"
                " precharges_avoided, ticks_saved) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT(name) DO UPDATE SET held_reason = excluded.held_reason,"
                " held_at = CASE WHEN excluded.held_reason IS NULL THEN NULL"
                " ELSE coalesce(streams.held_at, excluded.held_at) END,"
                " failures = excluded.failures, retry_at = excluded.retry_at,"
                " last_end_status = excluded.last_end_status, last_error = excluded.last_error,"
                " restart_times = excluded.restart_times, offline_since = excluded.offline_since,"
                " probes = excluded.probes, precharges_avoided = excluded.precharges_avoided,"
                " ticks_saved = excluded.ticks_saved",
                mine,
            )

        await self._write(op)

    async def add_event(
        self,
        kind: str,
        *,
        stream: str | None = None,
        task_id: str | None = None,
        status: int | None = None,
        detail: str = "",
        at: float | None = None,
        budget_fired: Collection[str] | None = None,
        fires: str | None = None,
    ) -> None:
        """Record an event (and, with an alert hook, the alerts it raises, in one commit).
        `budget_fired` (as `save_budget_fired` takes it) is written in the same commit: what
        says the event happened cannot be apart from it. `fires`: the key of the budget event
        this is; [cluster] it is recorded only if no replica fired it yet (`budget_fired`)."""
        row = EventRow(self._clock() if at is None else at, stream, task_id, kind, status, detail)
        fired = None if budget_fired is None else sorted(budget_fired)  # as it is now

        def op(ctx: Context) -> None:
            if fires is not None and ctx.budget is not None and not claim_fired(ctx, fires, row.at):
                return  # another replica fired it
            record_event(ctx, row)
            if fired is not None:
                _set_setting(ctx.conn, _BUDGET_FIRED, fired)

        await self._write(op)

    async def save_halt(self, halt: Halt | None) -> None:
        """Keep the account halt (None: there is none) for the next process."""
        doc = (
            None
            if halt is None
            else {
                "reason": halt.reason,
                "since": halt.since,
                "until": halt.until,
                "detail": halt.detail,
            }
        )
        await self._write(lambda ctx: _set_setting(ctx.conn, _HALT, doc))

    async def save_budget_fired(self, fired: Collection[str]) -> None:
        """Keep the budget thresholds already fired for the next process."""
        value = sorted(fired)  # as it is now, not when the writer gets to it
        await self._write(lambda ctx: _set_setting(ctx.conn, _BUDGET_FIRED, value))


def _setting(conn: Connection, key: str) -> object:
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return json.loads(row[0]) if row else None


def _set_setting(conn: Connection, key: str, value: object) -> None:
    """Store `value` as JSON under `key`; None deletes it."""
    if value is None:
        conn.execute("DELETE FROM settings WHERE key = ?", (key,))
    else:
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )
