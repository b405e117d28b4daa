"""Stream leases and replica heartbeats (`[cluster]`, PostgreSQL only): the lease round, the
release, and the fence the stream-acting operations check in their own transaction.

The design is `streamwatch.cluster`'s docstring. Every time here is the database's clock
(`clock_timestamp()`, epoch seconds), read once per transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg

from streamwatch.mavi.callbacks import Callback, SegmentFailed, SegmentReport, StreamEnded
from streamwatch.store.postgres import PgTarget
from streamwatch.store.reader import ReadSide
from streamwatch.store.sql import Connection
from streamwatch.store.types import CallbackOutcome, StoreError
from streamwatch.store.writer import Context, WriteSide

if TYPE_CHECKING:
    from streamwatch.store.budget import BudgetRules

__all__ = [
    "FEED_CHANNEL",
    "FLEET_STOP_KEY",
    "LEADER_LOCK",
    "FeedEntry",
    "Fenced",
    "FleetReads",
    "FleetState",
    "FleetView",
    "LeaseBook",
    "LeaseRound",
    "LeaseWrites",
    "ReplicaRow",
    "fence",
    "mark_fleet_stop",
    "preferred_owner",
    "publish",
    "rendezvous_owners",
]

_NOW = "SELECT extract(epoch FROM clock_timestamp())::double precision"
# The advisory lock the leader holds on its writer connection ("swleader" in ASCII).
LEADER_LOCK = 0x73776C6561646572
_FORGET_REPLICAS_AFTER = 86_400.0  # a replica not seen for a day leaves the table
_FEED_KEPT = 600.0  # seconds a callback stays in the feed (owners read it every tick)
FEED_CHANNEL = "streamwatch_feed"  # NOTIFYed in each transaction that adds to the feed
FLEET_STOP_KEY = "fleet_stop"  # the `settings` row `streamwatch fleet stop` writes


def _weight(replica_id: str, stream: str) -> bytes:
    return hashlib.sha256(f"{replica_id}/{stream}".encode()).digest()


def preferred_owner(stream: str, replicas: Iterable[str]) -> str | None:
    """The replica that should own `stream` (rendezvous hashing), or None if there is none."""
    best: tuple[bytes, str] | None = None
    for replica in replicas:
        key = (_weight(replica, stream), replica)
        if best is None or key > best:
            best = key
    return None if best is None else best[1]


def rendezvous_owners(streams: Iterable[str], replicas: Iterable[str]) -> dict[str, str]:
    """Each stream's preferred owner among `replicas` (no replicas: an empty answer)."""
    live = sorted(set(replicas))
    if not live:
        return {}
    return {s: owner for s in streams if (owner := preferred_owner(s, live)) is not None}


class Fenced(StoreError):
    """This replica does not hold the stream's lease (it expired, or another replica holds
    it now): the operation acting on the stream is refused."""


class LeaseBook:
    """The leases this replica holds: each stream's epoch and its local deadline (monotonic
    clock). Updated by the lease rounds (in the event loop), read by the fence (in the
    writer's thread)."""

    def __init__(self, replica_id: str, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.replica_id = replica_id
        self.epochs: dict[str, int] = {}
        self.deadlines: dict[str, float] = {}
        self._monotonic = monotonic

    def update(self, held: dict[str, int], *, deadline: float) -> None:
        """Take a committed round's answer: `held` (stream → epoch), valid locally until
        `deadline` (monotonic, taken before the round began)."""
        self.epochs = dict(held)
        self.deadlines = dict.fromkeys(held, deadline)

    def drop(self, streams: Iterable[str]) -> None:
        """Stop holding these (released, or about to be)."""
        for stream in streams:
            self.epochs.pop(stream, None)
            self.deadlines.pop(stream, None)

    def valid(self, stream: str) -> bool:
        """Held, and its local deadline not passed (the database's may still be later)."""
        deadline = self.deadlines.get(stream)
        return deadline is not None and self._monotonic() < deadline

    def owned(self) -> frozenset[str]:
        """The streams held whose local deadline has not passed."""
        now = self._monotonic()
        return frozenset(s for s, d in self.deadlines.items() if now < d)

    def holds(self, conn: Connection, stream: str) -> bool:
        """In the caller's transaction: is the lease this replica's, at the epoch it claimed,
        unexpired by the database's clock? The row stays share-locked until the transaction
        ends, so no claim can come between this check and the commit. A lease found lost is
        dropped from the book (in the writer's thread: single dict operations)."""
        epoch = self.epochs.get(stream)
        if epoch is None or not self.valid(stream):
            return False
        row = conn.execute(
            "SELECT epoch FROM stream_leases WHERE stream = ? AND owner = ? AND epoch = ?"
            f" AND expires_at > ({_NOW}) FOR SHARE",
            (stream, self.replica_id, epoch),
        ).fetchone()
        if row is None:
            # Not ours at this epoch any more: stop acting on it now (the planner asks the
            # book), not at the next round, which claims it again if it is still free.
            self.drop([stream])
            return False
        return True


def fence(ctx: Context, stream: str) -> None:
    """Refuse (`Fenced`) an operation acting on `stream` unless this replica holds its lease
    (no fence: a single daemon, which owns every stream)."""
    book = ctx.fence
    if book is not None and not book.holds(ctx.conn, stream):
        raise Fenced(f"this replica does not hold the lease of stream {stream!r}")


def publish(ctx: Context, outcome: CallbackOutcome) -> None:
    """Add a stored callback to the feed the stream's owner follows (in the transaction that
    stored it), and wake the owners listening."""
    cb, stream = outcome.callback, outcome.stream
    book = ctx.fence
    assert book is not None
    assert stream is not None
    index = status = message = None
    if isinstance(cb, SegmentReport):
        kind, index = "segment", cb.segment_index
    elif isinstance(cb, SegmentFailed):
        kind, status, message = "failed", cb.status, cb.message[:500]
    else:
        kind, status, message = "ended", cb.status, cb.message[:500]
    ctx.conn.execute(
        "INSERT INTO callback_feed (stream, task_id, replica, kind, segment_index, status,"
        " message, stop_requested) VALUES (?,?,?,?,?,?,?,?)",
        (
            stream,
            cb.task_id,
            book.replica_id,
            kind,
            index,
            status,
            message,
            outcome.stop_requested,
        ),
    )
    ctx.conn.execute("SELECT pg_notify(?, '')", (FEED_CHANNEL,))


@dataclass(frozen=True)
class FeedEntry:
    """A callback stored by `replica`, as the stream's owner sees it: enough for the policy
    (which segment, how a failure or an end reads), not the whole report."""

    stream: str
    callback: Callback
    replica: str
    stop_requested: bool
    at: float  # stored at, by the database's clock


def _feed_callback(
    kind: str, task_id: str, index: int | None, status: int | None, message: str | None
) -> Callback:
    if kind == "segment":
        return SegmentReport(
            task_id, index or 0, None, None, None, None, None, (), None, None, None
        )
    if kind == "failed":
        return SegmentFailed(task_id, status or 0, message or "")
    return StreamEnded(task_id, status or 0, message or "")


@dataclass(frozen=True)
class FleetView:
    """The fleet as one replica last saw it (each lease round): itself, whether it leads, the
    live replicas, each stream's owner (valid leases) and each stream's running task."""

    replica_id: str
    leader: bool
    replicas: tuple[str, ...]
    owners: dict[str, str]
    running: dict[str, str]


@dataclass(frozen=True)
class LeaseRound:
    """What a lease round found and did. `held`: every lease held after it (stream → epoch);
    `claimed`: those newly claimed; `lost`: those the book held that are no longer held;
    `misplaced`: held streams whose preferred owner is another live replica (to hand back
    when the supervisor can let them go); `replicas`: the live replicas."""

    replicas: list[str]
    held: dict[str, int]
    claimed: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    misplaced: list[str] = field(default_factory=list)
    at: float = 0.0  # the database's time of the round
    leader: bool = False  # this replica holds the leader lock
    owners: dict[str, str] = field(default_factory=dict)  # every valid lease: stream → owner
    running: dict[str, str] = field(default_factory=dict)  # stream → its running task
    fleet_stop: bool = False  # `streamwatch fleet stop` marked the fleet as stopping


@dataclass(frozen=True)
class ReplicaRow:
    """A replica as the `replicas` table has it, with the valid leases it holds."""

    replica_id: str
    started_at: float
    seen_at: float
    expires_at: float
    leaving: bool
    leases: int

    def live(self, now: float) -> bool:
        return self.expires_at > now and not self.leaving


@dataclass(frozen=True)
class FleetState:
    """The fleet as the store holds it (`streamwatch fleet status`), by the database's clock:
    the replicas, the running tasks (stream → task id) and each one's owner (None: no valid
    lease), and the stop mark (`streamwatch fleet stop`) if there is one."""

    now: float
    replicas: list[ReplicaRow]
    running: dict[str, str]
    owners: dict[str, str | None]
    stop: dict[str, object] | None


class LeaseWrites(WriteSide):
    def set_fence(self, book: LeaseBook | None) -> None:
        """Check `book`'s leases in every operation acting on a stream (starts, task records,
        adoptions, stop marks, stream records)."""
        self._writer.context.fence = book

    def set_budget_rules(self, rules: BudgetRules | None) -> None:
        """Count each charge in the fleet's spend, fire budget thresholds once across the
        fleet, and gate starts on the fleet's totals, by `rules` (`streamwatch.store.budget`)."""
        self._writer.context.budget = rules

    async def lease_round(
        self,
        book: LeaseBook,
        streams: Collection[str],
        *,
        lease_seconds: float,
        claim: bool = True,
    ) -> LeaseRound:
        """Heartbeat, renew what `book` holds, and claim the configured `streams` (and any
        stream with a running task) whose preferred owner is this replica and whose lease is
        free or expired (one transaction). Without `claim` (a replica shutting down), only the
        heartbeat and the renewals.
        `book` is not changed: the caller applies the answer once it committed."""
        me = book.replica_id
        known = dict(book.epochs)

        def op(ctx: Context) -> LeaseRound:
            conn = ctx.conn
            now = float(conn.execute(_NOW).fetchone()[0])
            until = now + lease_seconds
            conn.execute(
                "INSERT INTO replicas (replica_id, started_at, seen_at, expires_at, leaving)"
                " VALUES (?, ?, ?, ?, 0) ON CONFLICT (replica_id) DO UPDATE SET"
                " seen_at = excluded.seen_at, expires_at = excluded.expires_at, leaving = 0",
                (me, now, now, until),
            )
            conn.execute(
                "DELETE FROM replicas WHERE expires_at < ?", (now - _FORGET_REPLICAS_AFTER,)
            )
            held: dict[str, int] = {}
            if known:
                rows = conn.execute(
                    "UPDATE stream_leases SET expires_at = ? WHERE owner = ? AND expires_at > ?"
                    " AND stream = ANY(?) RETURNING stream, epoch",
                    (until, me, now, sorted(known)),
                ).fetchall()
                held = {s: e for s, e in rows if known.get(s) == e}
            replicas = sorted(
                r
                for (r,) in conn.execute(
                    "SELECT replica_id FROM replicas WHERE expires_at > ? AND leaving = 0", (now,)
                )
            )
            running = dict(
                conn.execute(
                    "SELECT stream, task_id FROM tasks WHERE ended_at IS NULL ORDER BY rowid"
                ).fetchall()
            )
            # A stream with a running task is claimed even if no longer configured: its owner
            # stops it (as removed), whoever started it.
            preferred = rendezvous_owners(set(streams) | set(running), replicas)
            claimed = []
            mine = [s for s, owner in preferred.items() if owner == me] if claim else []
            for stream in sorted(mine):
                if stream in held:
                    continue
                row = conn.execute(
                    "INSERT INTO stream_leases (stream, owner, epoch, expires_at, changed_at)"
                    " VALUES (?, ?, 1, ?, ?) ON CONFLICT (stream) DO UPDATE SET"
                    " owner = excluded.owner, epoch = stream_leases.epoch + 1,"
                    " expires_at = excluded.expires_at, changed_at = excluded.changed_at"
                    " WHERE stream_leases.owner IS NULL OR stream_leases.expires_at <= ?"
                    " OR stream_leases.owner = excluded.owner RETURNING epoch",
                    (stream, me, until, now, now),
                ).fetchone()
                if row is not None:
                    held[stream] = int(row[0])
                    claimed.append(stream)
            # The leader: whoever holds the advisory lock, a session lock on this (the
            # writer's) connection; it goes with the connection if that breaks. Taken only when
            # not held already (the lock counts each taking).
            leader = bool(
                conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                    " AND pid = pg_backend_pid() AND granted"
                    " AND ((classid::bigint << 32) | objid::bigint) = ?)",
                    (LEADER_LOCK,),
                ).fetchone()[0]
            ) or bool(conn.execute("SELECT pg_try_advisory_lock(?)", (LEADER_LOCK,)).fetchone()[0])
            owners = dict(
                conn.execute(
                    "SELECT stream, owner FROM stream_leases WHERE owner IS NOT NULL"
                    " AND expires_at > ?",
                    (now,),
                ).fetchall()
            )
            stop = conn.execute(
                "SELECT 1 FROM settings WHERE key = ?", (FLEET_STOP_KEY,)
            ).fetchone()
            return LeaseRound(
                fleet_stop=stop is not None,
                owners=owners,
                running=running,
                leader=leader,
                replicas=replicas,
                held=held,
                claimed=claimed,
                lost=sorted(set(known) - set(held)),
                misplaced=sorted(s for s in held if preferred.get(s, me) != me),
                at=now,
            )

        return await self._write(op, alone=True)

    async def release_leases(self, book: LeaseBook, streams: Iterable[str]) -> list[str]:
        """Hand back these leases at once (the next claimer bumps the epoch). Returns those
        released."""
        me = book.replica_id
        names = sorted(set(streams))

        def op(ctx: Context) -> list[str]:
            now = float(ctx.conn.execute(_NOW).fetchone()[0])
            rows = ctx.conn.execute(
                "UPDATE stream_leases SET owner = NULL, expires_at = ?, changed_at = ?"
                " WHERE owner = ? AND stream = ANY(?) RETURNING stream",
                (now, now, me, names),
            ).fetchall()
            return sorted(r[0] for r in rows)

        return await self._write(op, alone=True) if names else []

    async def leave(self, book: LeaseBook) -> list[str]:
        """This replica stops: marked leaving (no longer live) and every lease it holds
        released, in one transaction. Returns the streams released."""
        me = book.replica_id

        def op(ctx: Context) -> list[str]:
            conn = ctx.conn
            now = float(conn.execute(_NOW).fetchone()[0])
            conn.execute(
                "UPDATE replicas SET leaving = 1, expires_at = ? WHERE replica_id = ?", (now, me)
            )
            conn.execute("SELECT pg_advisory_unlock_all()")
            rows = conn.execute(
                "UPDATE stream_leases SET owner = NULL, expires_at = ?, changed_at = ?"
                " WHERE owner = ? RETURNING stream",
                (now, now, me),
            ).fetchall()
            return sorted(r[0] for r in rows)

        return await self._write(op, alone=True)

    async def feed(
        self, after: int | None, streams: Collection[str]
    ) -> tuple[list[FeedEntry], int]:
        """The callbacks of `streams` stored since the cursor `after` (None: from now on, no
        entry), in the order stored, and the next cursor. The cursor is a transaction id
        horizon, not a row id: rows come only from transactions that all ended (ids commit
        out of order; transaction ids below the snapshot's xmin do not), so none is skipped."""
        names = sorted(streams)

        def op(conn: Connection) -> tuple[list[FeedEntry], int]:
            horizon = int(
                conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()[0]
            )
            if after is None or not names:
                return [], horizon if after is None else after
            rows = conn.execute(
                "SELECT stream, task_id, replica, kind, segment_index, status, message,"
                " stop_requested, at FROM callback_feed"
                " WHERE xid >= ?::text::xid8 AND xid < ?::text::xid8 AND stream = ANY(?)"
                " ORDER BY xid, id",
                (str(after), str(horizon), names),
            ).fetchall()
            entries = [
                FeedEntry(s, _feed_callback(k, t, i, st, m), r, bool(sr), float(at))
                for s, t, r, k, i, st, m, sr, at in rows
            ]
            return entries, horizon

        return await self._read(op)

    async def prune_feed(self) -> int:
        """Drop what the feed holds beyond its keeping time (any replica may). Returns the
        rows deleted."""

        def op(ctx: Context) -> int:
            now = float(ctx.conn.execute(_NOW).fetchone()[0])
            cur = ctx.conn.execute("DELETE FROM callback_feed WHERE at < ?", (now - _FEED_KEPT,))
            return cur.rowcount

        return await self._write(op)

    async def live_replicas(self) -> list[str]:
        """The replicas whose heartbeat has not expired and that are not leaving."""

        def op(conn: Connection) -> list[str]:
            now = float(conn.execute(_NOW).fetchone()[0])
            rows = conn.execute(
                "SELECT replica_id FROM replicas WHERE expires_at > ? AND leaving = 0"
                " ORDER BY replica_id",
                (now,),
            )
            return [r[0] for r in rows]

        return await self._read(op)

    async def lease_owners(self) -> dict[str, tuple[str | None, int, float]]:
        """Every lease row: stream → (owner, epoch, expires_at), the owner None if released."""

        def op(conn: Connection) -> dict[str, tuple[str | None, int, float]]:
            rows = conn.execute(
                "SELECT stream, owner, epoch, expires_at FROM stream_leases ORDER BY stream"
            )
            return {s: (o, int(e), float(x)) for s, o, e, x in rows}

        return await self._read(op)


class FleetReads(ReadSide):
    """What `streamwatch fleet status` reads (a read-only open serves it too)."""

    async def fleet_state(self) -> FleetState:
        """The replicas, the running tasks and their owners, and the stop mark."""

        def op(conn: Connection) -> FleetState:
            now = float(conn.execute(_NOW).fetchone()[0])
            held = dict(
                conn.execute(
                    "SELECT owner, count(*) FROM stream_leases WHERE owner IS NOT NULL"
                    " AND expires_at > ? GROUP BY owner",
                    (now,),
                ).fetchall()
            )
            replicas = [
                ReplicaRow(r, float(st), float(se), float(ex), bool(lv), int(held.get(r, 0)))
                for r, st, se, ex, lv in conn.execute(
                    "SELECT replica_id, started_at, seen_at, expires_at, leaving FROM replicas"
                    " ORDER BY replica_id"
                )
            ]
            running = dict(
                conn.execute(
                    "SELECT stream, task_id FROM tasks WHERE ended_at IS NULL ORDER BY stream"
                ).fetchall()
            )
            valid = dict(
                conn.execute(
                    "SELECT stream, owner FROM stream_leases WHERE owner IS NOT NULL"
                    " AND expires_at > ?",
                    (now,),
                ).fetchall()
            )
            row = conn.execute(
                "SELECT value FROM settings WHERE key = ?", (FLEET_STOP_KEY,)
            ).fetchone()
            return FleetState(
                now=now,
                replicas=replicas,
                running=running,
                owners={s: valid.get(s) for s in running},
                stop=json.loads(row[0]) if row else None,
            )

        return await self._read(op)


async def mark_fleet_stop(target: PgTarget, mark: dict[str, object] | None) -> bool:
    """`streamwatch fleet stop`: mark the fleet as stopping (each replica stops the tasks it
    owns at its next lease round, then exits); None clears the mark (`fleet start`). One
    connection of its own and one transaction, never a migration (the command may be another
    version than the fleet: open a `ReadOnlyStore` first, which checks the schema). Returns
    whether a mark was there before."""
    conn = await target.connect()
    try:
        async with conn.transaction():
            had = await conn.fetchval(
                "DELETE FROM settings WHERE key = $1 RETURNING key", FLEET_STOP_KEY
            )
            if mark is not None:
                now = float(await conn.fetchval(_NOW))
                await conn.execute(
                    "INSERT INTO settings (key, value) VALUES ($1, $2)",
                    FLEET_STOP_KEY,
                    json.dumps({**mark, "at": now}),
                )
        return had is not None
    except asyncpg.PostgresError as exc:
        raise StoreError(f"could not write the fleet's stop mark to {target}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):  # closing: nothing left to save
            await conn.close(timeout=5)
