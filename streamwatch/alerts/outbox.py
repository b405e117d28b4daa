"""Deliver what the outbox holds: due alerts grouped per sink and grouping window, at most
`max_in_flight` deliveries per sink, retried with exponential backoff and jitter (never sooner
than a 429 asks), dead-lettered after the sink's `max_attempts` or a permanent refusal.

A daemon killed mid-delivery finds the alerts still pending on restart and sends them again:
delivery is at least once, and the stable alert id lets receivers deduplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from streamwatch.alerts.events import AlertEvent
from streamwatch.alerts.rules import Condition, Router, RuleState, Window
from streamwatch.alerts.sinks import Alert, Delivery, Sink
from streamwatch.alerts.sinks.alertmanager import AlertmanagerSink
from streamwatch.alerts.sources import from_record, from_segment, logo_hit
from streamwatch.config import StreamConfig
from streamwatch.mavi.callbacks import SegmentReport, StreamEnded
from streamwatch.metrics import Metrics
from streamwatch.store import AlertTx, CallbackOutcome, EventRow, NewAlert, OutboxRow, Store

if TYPE_CHECKING:
    from streamwatch.evidence import Evidence

__all__ = ["Alerts", "Outbox"]

log = structlog.get_logger("streamwatch.alerts")


class Outbox:
    """The delivery worker."""

    def __init__(
        self,
        *,
        store: Store,
        sinks: Mapping[str, Sink],
        retry_initial: float,
        retry_max: float,
        poll_seconds: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self.sinks = dict(sinks)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._poll = poll_seconds
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._limits = {name: asyncio.Semaphore(s.max_in_flight) for name, s in sinks.items()}
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._reposted: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Deliver until `stop()`, waking on new alerts and when retries fall due."""
        while not self._stopping:
            await self.deliver_due()
            await self.repost_due()
            self._wake.clear()
            due = await self._store.next_alert_at()
            wait = self._poll if due is None else min(self._poll, max(0.0, due - self._clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def repost_due(self) -> None:
        """Re-post the active alerts of sinks that want it (Alertmanager) when due."""
        now = self._clock()
        for name, sink in self.sinks.items():
            if not isinstance(sink, AlertmanagerSink):
                continue
            if now < self._reposted.get(name, 0.0) + sink.repeat_seconds:
                continue
            self._reposted[name] = now
            result = await sink.repost_active()
            if result is not None and self._metrics is not None:
                outcome = "reposted" if result.ok else "repost_failed"
                self._metrics.alert_deliveries.labels(name, outcome).inc()

    async def stop(self) -> None:
        """Stop picking new work and let deliveries under way finish."""
        self._stopping = True
        self._wake.set()
        await self.settle()

    async def settle(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def deliver_due(self) -> int:
        """Start delivering every due group not already under way. Returns groups started."""
        rows = await self._store.due_alerts(self._clock())
        groups: dict[tuple[str, str], list[OutboxRow]] = {}
        for row in rows:
            if row.id not in self._inflight:
                groups.setdefault((row.sink, row.group), []).append(row)
        for (sink, _), members in groups.items():
            self._inflight.update(r.id for r in members)
            task = asyncio.create_task(self._deliver(sink, members))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(groups)

    def _backoff(self, attempts: int) -> float:
        base = min(self._retry_max, self._retry_initial * 2.0 ** max(0, attempts - 1))
        return base * (0.5 + self._rng.random() / 2)

    async def _deliver(self, sink_name: str, rows: list[OutboxRow]) -> None:
        ids = [r.id for r in rows]
        try:
            sink = self.sinks.get(sink_name)
            if sink is None:
                await self._settle(sink_name, ids, "dead", error="sink no longer configured")
                return
            alerts = [Alert(r.alert_id, AlertEvent.from_json(r.event)) for r in rows]
            async with self._limits[sink_name]:
                result = await sink.deliver(alerts)
            # A sink may have split the group (one part too large): settle each part alone.
            by_id = {r.alert_id: r for r in rows}
            for part_ids, part in result.outcomes([a.alert_id for a in alerts]):
                part_rows = [by_id[i] for i in part_ids]
                await self._conclude(sink_name, sink.max_attempts, part_rows, part)
        finally:
            self._inflight.difference_update(ids)
            self._wake.set()

    async def _conclude(
        self, sink_name: str, max_attempts: int, rows: list[OutboxRow], result: Delivery
    ) -> None:
        ids = [r.id for r in rows]
        attempts = max(r.attempts for r in rows) + 1
        if result.ok:
            await self._settle(sink_name, ids, "delivered")
        elif result.retry and attempts < max_attempts:
            delay = max(result.retry_after or 0.0, self._backoff(attempts))
            await self._settle(
                sink_name, ids, "pending", next_at=self._clock() + delay, error=result.detail
            )
        else:
            await self._settle(sink_name, ids, "dead", error=result.detail)

    async def _settle(
        self,
        sink: str,
        ids: list[int],
        state: str,
        *,
        next_at: float | None = None,
        error: str | None = None,
    ) -> None:
        await self._store.settle_alerts(ids, state=state, next_at=next_at, error=error)
        outcome = {"delivered": "delivered", "pending": "retry", "dead": "dead"}[state]
        if self._metrics is not None:
            self._metrics.alert_deliveries.labels(sink, outcome).inc(len(ids))
        if state == "dead":
            log.error("alerts.dead_letter", sink=sink, alerts=len(ids), error=error)
        elif state == "pending":
            log.warning("alerts.retry_scheduled", sink=sink, alerts=len(ids), error=error)
        else:
            log.info("alerts.delivered", sink=sink, alerts=len(ids))


class Alerts:
    """Decides alerts inside the store's operations (it is the store's `AlertHook`) and runs
    the delivery worker.

    The hook methods run in the store's thread, inside the transaction recording what raised
    the alert: they read the stream's settings (`specs()`, replaced whole on reload, never
    mutated) and the rule state through the `AlertTx`, and write outbox rows and state back.
    """

    def __init__(
        self,
        *,
        router: Router,
        outbox: Outbox,
        store: Store,
        specs: Callable[[], Mapping[str, StreamConfig]] = dict,
        evidence: Evidence | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.router = router
        self.outbox = outbox
        self._store = store
        self._specs = specs
        self._evidence = evidence
        self._clock = clock
        self._writes: set[asyncio.Task[None]] = set()

    # -- the store's alert hook (store thread) -------------------------------------------------

    def callback(self, tx: AlertTx, outcome: CallbackOutcome) -> None:
        """Alerts for a stored callback: unsafe and logo segments (with their streaks), a task
        that ended by itself. (An unknown task is reported by its `orphan_task` event.)"""
        cb = outcome.callback
        stream = outcome.stream
        if stream is None:
            return
        spec = self._specs().get(stream)
        labels = spec.labels if spec else {}
        if isinstance(cb, SegmentReport):
            watched = tuple(spec.watch_logos) if spec else ()
            hit = logo_hit(cb, watched)
            before = tx.streaks(stream)
            streaks = (before[0] + 1 if cb.unsafe else 0, before[1] + 1 if hit else 0)
            if streaks != before:
                tx.set_streaks(stream, *streaks)
            if not (cb.unsafe or hit):
                return
            for event in from_segment(
                cb,
                stream=stream,
                at=tx.now,
                unsafe_streak=streaks[0],
                logo_streak=streaks[1],
                watched=watched,
                labels=labels,
                evidence=self._evidence_path(stream, spec, cb),
            ):
                self._route(tx, event)
        elif isinstance(cb, StreamEnded):
            if outcome.stop_requested or not tx.is_latest_task(stream, cb.task_id):
                return  # asked for by this daemon, or an older task's: no news
            ended = from_record(
                "task_ended",
                at=tx.now,
                stream=stream,
                task_id=cb.task_id,
                status=cb.status,
                detail=cb.message,
                labels=labels,
            )
            if ended is not None:
                self._route(tx, ended)

    def record(self, tx: AlertTx, event: EventRow) -> None:
        """Alerts for an event the supervisor recorded, if it is alert-worthy."""
        spec = self._specs().get(event.stream) if event.stream else None
        alert = from_record(
            event.kind,
            at=event.at,
            stream=event.stream,
            task_id=event.task_id,
            status=event.status,
            detail=event.detail,
            labels=spec.labels if spec else {},
        )
        if alert is not None:
            self._route(tx, alert)

    def committed(self) -> None:
        self.outbox.wake()

    def _evidence_path(
        self, stream: str, spec: StreamConfig | None, report: SegmentReport
    ) -> str | None:
        """Where the segment's clip will be archived, known before it is downloaded."""
        if self._evidence is None or spec is None or not spec.evidence:
            return None
        if not (report.video_url or "").startswith(("http://", "https://")):
            return None
        return str(self._evidence.path_for(stream, report))

    def _route(self, tx: AlertTx, event: AlertEvent) -> None:
        conditions, windows = self.router.keys(event)
        if not conditions:
            return
        state = RuleState(
            {k: Condition(*v) for k, v in tx.conditions(conditions).items()},
            {k: Window(*v) for k, v in tx.windows(windows).items()},
        )
        decision = self.router.route(event, tx.now, state, new_id=_new_id)
        tx.save(
            conditions={k: (c.last_sent, c.open) for k, c in decision.conditions.items()},
            windows={k: (w.group, w.until) for k, w in decision.windows.items()},
            alerts=[
                NewAlert(r.alert_id, r.sink, r.rule, r.group, r.event.to_json(), r.send_after)
                for r in decision.routed
            ],
        )

    # -- the event loop -------------------------------------------------------------------------

    def emit(self, event: AlertEvent) -> None:
        """Route an event nothing recorded (tests, tools) in an operation of its own."""
        task = asyncio.create_task(self._emit(event))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _emit(self, event: AlertEvent) -> None:
        routed = await self._store.with_alert_tx(
            lambda tx: self._route(tx, event), now=self._clock()
        )
        if routed:
            self.outbox.wake()

    async def settle(self) -> None:
        """Wait until every emitted alert is in the outbox and every delivery under way ended."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self.outbox.settle()


def _new_id() -> str:
    return str(uuid.uuid4())
