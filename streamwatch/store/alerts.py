"""Alert rule state and the outbox.

The alert hook reads and changes the rule state (cooldowns, open conditions, grouping
windows, streaks) and writes outbox rows through a `RuleStateTx`, inside the operation that
records what raises the alerts. The delivery worker reads due rows and settles them; a
re-posting sink's active set is written with the delivery that changes it.

The SQL is the portable subset both backends run (`streamwatch.store.sql`); the hook runs
in the writer's thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from streamwatch.store.reader import ReadSide, Row
from streamwatch.store.sql import Connection
from streamwatch.store.types import JSONObject, NewAlert, OutboxRow
from streamwatch.store.writer import Context, WriteSide

if TYPE_CHECKING:
    from streamwatch.store.interface import AlertTx

__all__ = ["CLAIM_SECONDS", "OutboxReads", "OutboxWrites", "RuleStateTx", "insert_alerts"]


class RuleStateTx:
    """The `AlertTx` of the SQLite store: valid only inside the operation it was made for
    (the writer's thread); `now` is when the recorded thing happened."""

    def __init__(self, ctx: Context, now: float) -> None:
        self._ctx = ctx
        self._conn = ctx.conn
        self.now = now
        self.wrote = False  # outbox rows written through this view

    def conditions(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[float | None, bool]]:
        """(last_sent, open) per (rule, subject) that has a row."""
        out = {}
        for rule, subject in keys:
            row = self._conn.execute(
                "SELECT last_sent, open FROM alert_conditions WHERE rule = ? AND subject = ?",
                (rule, subject),
            ).fetchone()
            if row is not None:
                out[(rule, subject)] = (row[0], bool(row[1]))
        return out

    def windows(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, float]]:
        """(group, until) per (rule, sink) that has a window."""
        out = {}
        for rule, sink in keys:
            row = self._conn.execute(
                "SELECT grp, until FROM alert_windows WHERE rule = ? AND sink = ?", (rule, sink)
            ).fetchone()
            if row is not None:
                out[(rule, sink)] = (row[0], row[1])
        return out

    def save(
        self,
        *,
        conditions: Mapping[tuple[str, str], tuple[float | None, bool]],
        windows: Mapping[tuple[str, str], tuple[str, float]],
        alerts: list[NewAlert],
    ) -> None:
        """Write changed rule state and new outbox rows."""
        self._conn.executemany(
            "INSERT INTO alert_conditions (rule, subject, last_sent, open) VALUES (?,?,?,?)"
            " ON CONFLICT(rule, subject) DO UPDATE SET last_sent = excluded.last_sent,"
            " open = excluded.open",
            [(r, s, last, is_open) for (r, s), (last, is_open) in conditions.items()],
        )
        self._conn.executemany(
            "INSERT INTO alert_windows (rule, sink, grp, until) VALUES (?,?,?,?)"
            " ON CONFLICT(rule, sink) DO UPDATE SET grp = excluded.grp, until = excluded.until",
            [(r, k, grp, until) for (r, k), (grp, until) in windows.items()],
        )
        if alerts:
            insert_alerts(self._conn, alerts, self.now)
            self.wrote = self._ctx.alerts_written = True

    def streaks(self, stream: str) -> tuple[int, int]:
        """The stream's (unsafe, logo) segments in a row."""
        row = self._conn.execute(
            "SELECT unsafe, logo FROM alert_streaks WHERE stream = ?", (stream,)
        ).fetchone()
        return (row[0], row[1]) if row is not None else (0, 0)

    def set_streaks(self, stream: str, unsafe: int, logo: int) -> None:
        """Keep the stream's streaks (a row only while one is not zero)."""
        if unsafe or logo:
            self._conn.execute(
                "INSERT INTO alert_streaks (stream, unsafe, logo) VALUES (?,?,?)"
                " ON CONFLICT(stream) DO UPDATE SET unsafe = excluded.unsafe,"
                " logo = excluded.logo",
                (stream, unsafe, logo),
            )
        else:
            self._conn.execute("DELETE FROM alert_streaks WHERE stream = ?", (stream,))

    def is_latest_task(self, stream: str, task_id: str) -> bool:
        """Is `task_id` the stream's most recently started task?"""
        row = self._conn.execute(
            "SELECT task_id FROM tasks WHERE stream = ? ORDER BY started_at DESC, rowid DESC"
            " LIMIT 1",
            (stream,),
        ).fetchone()
        return row is not None and row[0] == task_id


def insert_alerts(conn: Connection, alerts: list[NewAlert], now: float) -> None:
    conn.executemany(
        "INSERT INTO alert_outbox (alert_id, sink, rule, grp, event, next_at, created_at)"
        " VALUES (?,?,?,?,?,?,?)",
        [
            (a.alert_id, a.sink, a.rule, a.group, json.dumps(a.event), a.send_after, now)
            for a in alerts
        ],
    )


class OutboxReads(ReadSide):
    async def next_alert_at(self) -> float | None:
        """When the next pending alert falls due, if any is pending."""
        return await self._read(
            lambda c: c.execute(
                "SELECT min(next_at) FROM alert_outbox WHERE state = 'pending'"
            ).fetchone()[0]
        )

    async def active_alerts(self, sink: str) -> dict[str, JSONObject]:
        """The lasting conditions a re-posting sink (Alertmanager) keeps active, by subject,
        as it posted them."""
        return await self._read(
            lambda c: {
                subject: json.loads(posted)
                for subject, posted in c.execute(
                    "SELECT subject, posted FROM alert_active WHERE sink = ? ORDER BY subject",
                    (sink,),
                )
            }
        )

    async def alert_counts(self) -> dict[str, int]:
        """Outbox rows by state: pending, delivered, dead."""
        counts = {"pending": 0, "delivered": 0, "dead": 0}
        rows = await self._read(
            lambda c: c.execute(
                "SELECT state, count(*) FROM alert_outbox GROUP BY state"
            ).fetchall()
        )
        counts.update(dict(rows))
        return counts

    async def recent_alerts(self, *, limit: int = 50) -> list[OutboxRow]:
        """The newest outbox rows, newest last."""
        return await self._read(
            lambda c: [
                _outbox_row(r)
                for r in c.execute(f"{_OUTBOX_SELECT} ORDER BY id DESC LIMIT ?", (limit,))
            ][::-1]
        )


class OutboxWrites(WriteSide):
    async def due_alerts(self, now: float, *, limit: int = 500) -> list[OutboxRow]:
        """Pending alerts whose time has come, oldest first. Read by the writer, in order with
        the writes settling them: a delivery that has just been settled is never due again.

        [cluster]: claimed as they are read, so that each is delivered by one replica: rows
        locked by another replica's claim are skipped (`FOR UPDATE SKIP LOCKED`), and those
        returned are not due again for `CLAIM_SECONDS` (their settling sets the next time; a
        replica that dies before settling leaves them to the others after that)."""

        def op(ctx: Context) -> list[OutboxRow]:
            if ctx.fence is None:
                rows = ctx.conn.execute(
                    f"{_OUTBOX_SELECT} WHERE state = 'pending' AND next_at <= ?"
                    " ORDER BY id LIMIT ?",
                    (now, limit),
                )
                return [_outbox_row(r) for r in rows]
            claimed = ctx.conn.execute(
                f"UPDATE alert_outbox SET next_at = ? WHERE id IN (SELECT id FROM alert_outbox"
                " WHERE state = 'pending' AND next_at <= ? ORDER BY id LIMIT ?"
                " FOR UPDATE SKIP LOCKED) RETURNING"
                f" {_OUTBOX_COLUMNS}",
                (now + CLAIM_SECONDS, now, limit),
            ).fetchall()
            return sorted((_outbox_row(r) for r in claimed), key=_by_id)

        return await self._write(op)

    async def enqueue_alerts(self, alerts: list[NewAlert]) -> None:
        """Add these alerts to the outbox, committed on return."""
        now = self._clock()
        await self._write(lambda ctx: insert_alerts(ctx.conn, alerts, now))

    async def settle_alerts(
        self,
        ids: list[int],
        *,
        state: str,
        next_at: float | None = None,
        error: str | None = None,
        active: tuple[str, Mapping[str, Mapping[str, object] | None]] | None = None,
    ) -> None:
        """Record a delivery attempt for these rows: delivered, to retry at `next_at`, or dead.
        `active` (a sink and, per subject, the alert it keeps active or None) is written in
        the same commit (see `active_alerts`)."""
        now = self._clock()

        def op(ctx: Context) -> None:
            conn = ctx.conn
            for row_id in ids:
                conn.execute(
                    "UPDATE alert_outbox SET state = ?, attempts = attempts + 1,"
                    " next_at = coalesce(?, next_at), last_error = ?,"
                    " delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END"
                    " WHERE id = ?",
                    (state, next_at, error, state, now, row_id),
                )
            sink, changes = active or ("", {})
            for subject, posted in changes.items():
                if posted is None:
                    conn.execute(
                        "DELETE FROM alert_active WHERE sink = ? AND subject = ?", (sink, subject)
                    )
                else:
                    conn.execute(
                        "INSERT INTO alert_active (sink, subject, posted) VALUES (?,?,?)"
                        " ON CONFLICT(sink, subject) DO UPDATE SET posted = excluded.posted",
                        (sink, subject, json.dumps(posted)),
                    )

        await self._write(op)

    async def with_alert_tx(
        self, fn: Callable[[AlertTx], None], *, now: float | None = None
    ) -> bool:
        """Run `fn` in an operation of its own (to route an event no record raised). True if
        it wrote outbox rows."""
        when = self._clock() if now is None else now

        def op(ctx: Context) -> bool:
            tx = RuleStateTx(ctx, when)
            fn(tx)
            return tx.wrote

        return await self._write(op)


_OUTBOX_COLUMNS = (
    "id, alert_id, sink, rule, grp, event, state, attempts, next_at, last_error,"
    " created_at, delivered_at"
)
_OUTBOX_SELECT = f"SELECT {_OUTBOX_COLUMNS} FROM alert_outbox"
# [cluster]: how long a replica's claim on due alerts keeps them from the others (longer than
# a delivery can take: a sink's timeout is at most 120 s).
CLAIM_SECONDS = 300.0


def _by_id(row: OutboxRow) -> int:
    return row.id


def _outbox_row(r: Row) -> OutboxRow:
    return OutboxRow(
        id=r[0],
        alert_id=r[1],
        sink=r[2],
        rule=r[3],
        group=r[4],
        event=json.loads(r[5]),
        state=r[6],
        attempts=r[7],
        next_at=r[8],
        last_error=r[9],
        created_at=r[10],
        delivered_at=r[11],
    )
