"""Several replicas on one PostgreSQL database: each stream's MAVI task owned by one replica at
a time, through a lease row with a fencing epoch (`[cluster]`, PostgreSQL only).

Design (issue 17). What is built is marked [built]; the rest is the plan. Deploy examples:
deploy/kubernetes/cluster/; under fire: bench/cluster.py.

Tables (`streamwatch.store.pg_schema`, version 11, with `callback_feed`, and version 12's
`budget_spend` and `budget_fired`; SQLite's 11 and 12 add nothing):
- `replicas(replica_id, started_at, seen_at, expires_at, leaving)`: one heartbeat row per
  replica, renewed with its leases. Live = `expires_at` in the future and not `leaving`.
  [built]
- `stream_leases(stream, owner, epoch, expires_at, changed_at)`: one row per stream ever
  owned. `owner` NULL = released. `epoch` grows by one on every claim (every change of
  owner, and a re-claim of one's own expired lease), never on a renewal. [built]
Every time is the database's (`clock_timestamp()` as epoch seconds), never a replica's: the
replicas' clocks may disagree, the database's is the one they share. A replica keeps, beside
each lease, a local deadline taken *before* the round that renewed it (monotonic clock +
`lease_seconds`): it stops acting on a stream at that deadline even if it cannot reach the
database, so its local view never outlives the database's. [built]

Config `[cluster]` [built]: `replica_id` (default `<host name>-<pid>`), `lease_seconds`
(15), `renew_seconds` (default lease_seconds / 3; must be below lease_seconds / 2, so that one
failed round does not lose a lease). Only valid with a PostgreSQL store: with SQLite it is a
config error naming `[storage] url`.

The lease round (every `renew_seconds`, one write transaction, `Leases.round`) [built]:
1. heartbeat: upsert this replica's `replicas` row (expires = now + lease_seconds);
2. renew every lease this replica holds that is still valid (`expires_at > now`);
3. read the live replicas; for each configured stream, its preferred owner is the live
   replica with the highest rendezvous hash `sha256(replica_id / stream)` (every replica
   computes the same answer from the same table, without talking to the others; a joining
   or leaving replica moves only ~1/n of the streams);
4. claim, in stream order (no deadlock between two claiming replicas), every stream whose
   preferred owner is this replica and whose lease is unowned, released or expired:
   `INSERT … ON CONFLICT DO UPDATE … WHERE owner IS NULL OR expires_at <= now`, epoch + 1;
5. hand back (`release`) what the supervisor says it can let go of: streams whose preferred
   owner is now another live replica (one joined) and that are not in the middle of a start,
   stop or adoption. The supervisor forgets the stream first, then the lease is released,
   and the preferred owner claims it at its next round.
A dead replica's heartbeat expires with its leases (both `lease_seconds` after its last
round), so the survivors' rendezvous set no longer holds it exactly when its leases become
claimable: its streams are adopted within lease_seconds + renew_seconds (+ one planning tick).

Fencing [built]: the store operations that act on a stream's MAVI task check the lease in
their own transaction (`SELECT … FOR SHARE` of the lease row: held by this replica, at the
epoch this replica claimed, not expired by the database's clock): the start intent
(`begin_start`), the task record (`record_task_started`), the adoption of an open intent's
task (`adopt`), the stop mark (`mark_stop_requested`), and the stream records
(`save_streams`: records of streams not held are skipped). A claimer's `UPDATE` of the row
waits for that lock, so no claim can come between the check and the commit. A replica that
stalled past its lease (GC pause, SIGSTOP) therefore cannot write an intent, record a task or
mark a stop, and it never calls MAVI's start without a committed intent nor MAVI's stop
without a committed stop mark. The one window left: a replica frozen between its committed
intent and MAVI's start call; the new owner finds the open intent and waits `adopt_wait` for
its task's callbacks (adopting it if it shows up), and a start answered after the lease moved
is refused by the fenced task record, so its task is an orphan that `on_orphan` handles.

Supervisor [built]: plans only the streams it holds; a stream gained is loaded from the store
(its record, its running task adopted as it is — never restarted —, its open intents); a
stream lost is forgotten without any call to MAVI. The planner also stops acting on a lease
whose local deadline passed.

Shutdown [built]: a replica stopping gracefully marks itself `leaving`, forgets its streams
and releases all its leases in one transaction, so the others claim them at their next round.
`on_shutdown = "stop"` stops tasks only when the replica is the last live one (the fleet
stops); otherwise the tasks are left to the replicas that remain. While a replica drains,
its lease rounds go on renewing what it holds (claiming and handing back nothing), so its
stops are not refused by a lapsed lease. To stop a fleet and its tasks: `streamwatch fleet
stop` (below).

Callbacks on any replica [built]: any replica stores and acknowledges any callback (the store
is shared). In the transaction that stores it, a callback goes into `callback_feed` with a
`pg_notify('streamwatch_feed')`; every replica LISTENs on a connection of its own and reads
the feed when notified and at least every planning tick (the bound when the connection is
down), and feeds the callbacks of the streams it owns to `Supervisor.observe` as live ones
(their money was counted where they were stored). The feed's cursor is a transaction-id
horizon (`pg_snapshot_xmin`), not a row id: ids commit out of order, finished transactions
below the horizon do not, so no row is skipped.

Fleet-wide account state [built]: each lease round reads the ledger's totals (every replica's
charges), the budget events fired and the halt from the store (`Supervisor.share_account`;
a halt this replica saved that the store no longer holds was resumed elsewhere);
`max_running` counts the tasks running on the other replicas as of the last round; orphan
detection needs nothing (intents live in the shared store). A stream with a running task is
claimed even once removed from the config, so an owner stops it.

Budgets on the fleet's exact spend [built] (`streamwatch.store.budget`, schema 12): for each
capped scope (the account, a stream) and period, `budget_spend` holds the fleet's confirmed
spend; every charge adds itself to it in its own transaction (`UPDATE … RETURNING ticks`,
the account's rows first), so charges serialize on the row and each learns the fleet's
total right after it (`FleetSpend`, on the outcome the supervisor takes). The charge that
reaches a cap is known in its own commit on whichever replica stored it; the owners take the
totals at their next feed pass (a charge within one pre-charge of a cap NOTIFYs the feed's
channel; the tick is the bound) and stop at the next plan. Overshoot: at most the segments
in flight when the cap is crossed, on any replica (billed by MAVI and not yet stored, or
processed before the stop reaches MAVI), as on a single daemon plus the owner's hearing of
it. The start gate reads the fleet's totals in the start intent's transaction (`OverBudget`:
MAVI not asked); two starts racing for the last room are each one pre-charge in flight. A
threshold (or forecast) fires once: the operation that crosses it inserts its row in
`budget_fired` (`INSERT … ON CONFLICT DO NOTHING`) and only the one that took it records the
event and its alert, in the same commit (`claim_fired`). A replica counts only the scopes it
caps and drops the rows of scopes it no longer caps at start and reload (`budgets_configured`):
the replicas share one `[budgets]`.

Readiness [built]: `/readyz` is ready once a lease round committed (the first runs before the
server listens) and 503 while none has for `lease_seconds` (`lease_problem`).

Fleet stop [built] (`streamwatch fleet stop`, `streamwatch.fleetcmd`): a `settings` row
(`FLEET_STOP_KEY`) read in every lease round; a replica finding it plans nothing more, stops
the tasks it owns (fenced), follows the feed until it leaves (final callbacks stored
elsewhere), releases its leases and exits 0; one started while the row is there does the same
at once. `fleet start` deletes the row.

Alerts once [built]: due alerts are claimed as they are read (`UPDATE … WHERE id IN (SELECT …
FOR UPDATE SKIP LOCKED)`, not due again for `CLAIM_SECONDS`). The leader [built] is the
replica holding the advisory lock `LEADER_LOCK` on its writer's session (taken in the lease
round); it runs pruning and the Alertmanager re-posts (of the active set the store holds,
which every delivery reads first), and exports the fleet's figures (and
`streamwatch_cluster_replicas`, `streamwatch_cluster_streams_unowned`); per-stream series
come only from each stream's owner; `streamwatch_stream_lease_changes_total` counts this
replica's claims, losses, hand-backs and releases; the status API shows each stream's owner.

Deploy [built]: compose.cluster.yaml (two replicas behind nginx, deploy/nginx/), the systemd
drop-in deploy/systemd/streamwatch.service.d/, alert rules (group `streamwatch-cluster`) and a
dashboard row for the fleet's series.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import structlog

from streamwatch.ledger import FleetBudget
from streamwatch.store import CallbackOutcome, PgTarget, Store, StoreError
from streamwatch.store.leases import FEED_CHANNEL, FleetView, LeaseBook
from streamwatch.supervisor import Supervisor

__all__ = ["Cluster", "default_replica_id"]

log = structlog.get_logger("streamwatch.cluster")


def default_replica_id() -> str:
    """`<host name>-<pid>`: unique per process on a host, and names the host it runs on."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Cluster:
    """This replica's part in the fleet: runs the lease rounds and tells the supervisor which
    streams it holds (`owned`), which it gained (`Supervisor.take`) and which it lost or hands
    back (`Supervisor.drop`)."""

    def __init__(
        self,
        *,
        store: Store,
        supervisor: Supervisor,
        replica_id: str,
        lease_seconds: float,
        streams: Callable[[], Collection[str]],
        monotonic: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
        on_fleet_stop: Callable[[], None] | None = None,
    ) -> None:
        """`streams()`: the configured streams (whose leases are claimed); `on_change(change,
        n)`: n leases claimed, lost, handed back or released (metrics); `on_fleet_stop()`: a
        lease round found the fleet marked as stopping (`streamwatch fleet stop`)."""
        self._store = store
        self._supervisor = supervisor
        self._lease = lease_seconds
        self._streams = streams
        self._monotonic = monotonic
        self.book = LeaseBook(replica_id, monotonic=monotonic)
        self.replicas: list[str] = []
        self.rounds = 0  # lease rounds committed (readiness: at least one)
        self._good: float | None = None  # when the last committed round began (monotonic)
        self.leader = False  # this replica runs the fleet's periodic jobs
        self._changes = on_change or (lambda change, n: None)
        self._ready: set[str] = set()  # held, and loaded by the supervisor
        self._left = False
        self._round = asyncio.Lock()  # one round at a time (the loop's, or a test's)
        self._cursor: int | None = None  # where in the callback feed this replica is
        self.followed = 0  # callbacks learnt from the feed (stored by another replica)
        self.notified = 0  # feed notifications received (LISTEN)
        self._fed = asyncio.Event()
        self._budget = FleetBudget(supervisor.spending)
        self._on_fleet_stop = on_fleet_stop or (lambda: None)
        self.fleet_stopping = False  # `streamwatch fleet stop` seen: stop what it owns, exit

    @property
    def left(self) -> bool:
        """This replica left the fleet (its leases released)."""
        return self._left

    @property
    def replica_id(self) -> str:
        return self.book.replica_id

    def owned(self) -> frozenset[str]:
        """The streams the supervisor may act on: held (local deadline not passed) and
        loaded."""
        return self.book.owned() & self._ready

    def attach(self) -> None:
        """Fence the store's stream operations with this replica's leases and have the
        supervisor plan only what it holds (before `Supervisor.load`)."""
        self._store.set_fence(self.book)
        self._store.set_budget_rules(self._budget)
        self._supervisor.set_ownership(self.owned)

    async def budgets_configured(self) -> None:
        """Say which budgets this replica enforces (at start and after a reload): the fleet's
        spend rows of scopes no longer capped are dropped, as no charge keeps them up."""
        try:
            deleted = await self._store.budgets_configured(self._budget.capped())
        except StoreError as exc:  # the next start or reload tries again; counting goes on
            log.warning("cluster.budget_rows_not_dropped", error=str(exc), replica=self.replica_id)
            return
        if deleted:
            log.info("cluster.budget_rows_dropped", rows=deleted, replica=self.replica_id)

    async def run_once(self) -> None:
        """One lease round: heartbeat, renew, claim this replica's share; then drop what was
        lost, load what was gained, and hand back what belongs to a replica that joined."""
        async with self._round:
            await self._run_round()

    async def _run_round(self) -> None:
        if self._left:
            return
        began = self._monotonic()  # before the round: the local view never outlives the DB's
        # Shutting down (draining), the leases held are renewed (the stops under way stay
        # valid) and nothing is claimed or handed back.
        closing = self._supervisor.stopping
        result = await self._store.lease_round(
            self.book, self._streams(), lease_seconds=self._lease, claim=not closing
        )
        if self._left:
            return
        self.book.update(result.held, deadline=began + self._lease)
        if result.replicas != self.replicas:
            log.info("cluster.replicas", replicas=result.replicas, replica=self.replica_id)
        if result.leader != self.leader:
            log.info("cluster.leader", leader=result.leader, replica=self.replica_id)
        self.replicas = result.replicas
        self.leader = result.leader
        self._supervisor.fleet = FleetView(
            replica_id=self.replica_id,
            leader=result.leader,
            replicas=tuple(result.replicas),
            owners=result.owners,
            running=result.running,
        )
        lost = self._ready - set(result.held)
        if lost:
            log.warning("cluster.leases_lost", streams=sorted(lost), replica=self.replica_id)
            self._changes("lost", len(lost))
            self._forget(lost)
        again = sorted(set(result.claimed) & self._ready)
        if again:
            # Its own leases, claimed anew (a round came too late to renew them, or a fenced
            # operation found one lost): a new epoch, the same streams.
            log.info("cluster.leases_reclaimed", streams=again, replica=self.replica_id)
        gained = sorted(set(result.held) - self._ready)
        if gained:
            log.info("cluster.leases_claimed", streams=gained, replica=self.replica_id)
            await self._supervisor.take(gained)
            self._ready |= set(gained)
            self._changes("claimed", len(gained))
        # Stopping with the fleet: nothing is handed back (its new owner may have stopped
        # already); what this replica holds, it stops.
        misplaced = [] if result.fleet_stop or closing else result.misplaced
        give = self._supervisor.releasable([s for s in misplaced if s in self._ready])
        if give:
            self._forget(give)
            self.book.drop(give)
            released = await self._store.release_leases(self.book, give)
            log.info("cluster.leases_handed_back", streams=released, replica=self.replica_id)
            self._changes("handed_back", len(released))
        # What an action that ended after its stream was dropped may have put back.
        stale = set(self._supervisor.streams) - self._ready
        if stale:
            self._supervisor.drop(stale)
        if result.fleet_stop and not self.fleet_stopping:
            # After the streams gained are loaded: the shutdown this starts stops them too.
            self.fleet_stopping = True
            log.warning("cluster.fleet_stop", replica=self.replica_id, held=len(result.held))
            self._on_fleet_stop()
        await self._store.prune_feed()
        await self._supervisor.share_account(await self._store.budget_fired_rows())
        self.rounds += 1
        self._good = began

    def lease_problem(self) -> str | None:
        """Why this replica is not ready as far as its leases go, or None: no lease round has
        committed yet, or none within `lease_seconds` (its leases are lapsing: the others
        take its streams; the local deadline of every lease it held has passed)."""
        if self._left:
            return "this replica left the fleet"
        if self._good is None:
            return "no lease round has succeeded yet"
        since = self._monotonic() - self._good
        if since >= self._lease:
            return (
                f"no lease round has succeeded for {since:.0f} s (lease_seconds"
                f" {self._lease:g}): this replica's leases lapse"
            )
        return None

    @contextlib.asynccontextmanager
    async def listening(self, target: PgTarget) -> AsyncIterator[None]:
        """LISTEN for the feed's notifications on a connection of its own, so that the owner
        reads new callbacks at once rather than at its next tick (the tick stays the bound:
        without the connection, or while it is broken, the feed is polled)."""
        try:
            conn = await target.connect()
            await conn.add_listener(FEED_CHANNEL, self._notified)
        except (StoreError, OSError) as exc:
            log.warning("cluster.listen_failed", error=str(exc), replica=self.replica_id)
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(Exception):  # closing: a broken connection has no more
                await conn.close(timeout=5)

    def _notified(self, *_: Any) -> None:
        self.notified += 1
        self._fed.set()

    async def wait_for_feed(self, seconds: float) -> None:
        """Until a notification says the feed grew, or `seconds` passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._fed.wait()
        self._fed.clear()

    async def follow_once(self) -> None:
        """Tell the supervisor of the callbacks another replica stored for the streams this
        replica holds, as if they had come here (their money was counted where they came)."""
        if self._left:
            return
        spending = self._supervisor.spending
        if spending.budgets.action == "stop" and spending.caps:
            # Another replica's charges may have brought a cap near (a charge near one
            # notifies, and the tick is the bound): the next plan gates on the fleet's spend.
            spans = self._budget.periods(self._supervisor.now())
            self._supervisor.take_fleet_spend(await self._store.budget_totals(spans))
        entries, self._cursor = await self._store.feed(self._cursor, self._ready)
        for entry in entries:
            if entry.replica == self.replica_id or entry.stream not in self._ready:
                continue  # observed when it came (or no longer ours)
            self.followed += 1
            self._supervisor.observe(
                CallbackOutcome(
                    "stored",
                    entry.stream,
                    entry.callback,
                    stop_requested=entry.stop_requested,
                    at=entry.at,
                )
            )

    def _forget(self, streams: Collection[str]) -> None:
        self._ready -= set(streams)
        self._supervisor.drop(streams)

    async def last_replica(self) -> bool:
        """Is this the only live replica (the fleet stops with it)?"""
        return [r for r in await self._store.live_replicas() if r != self.replica_id] == []

    async def leave(self) -> list[str]:
        """Stop taking part: forget every stream, release every lease and drop out of the
        live set (one transaction), so the others adopt at their next round."""
        self._left = True
        streams = set(self._ready)
        self._forget(streams)
        released = await self._store.leave(self.book)
        self.book.drop(list(self.book.epochs))
        self.leader = False
        self._supervisor.fleet = None
        self._changes("released", len(released))
        log.info("cluster.left", released=len(released), replica=self.replica_id)
        return released
