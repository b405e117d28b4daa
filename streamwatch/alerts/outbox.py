"""Deliver what the outbox holds: due alerts grouped per sink and grouping window, at most
`max_in_flight` deliveries per sink, retried with exponential backoff and jitter (never sooner
than a 429 asks), dead-lettered after the sink's `max_attempts` or a permanent refusal.

A daemon killed mid-delivery finds the alerts still pending on restart and sends them again:
delivery is at least once, and the stable alert id lets receivers deduplicate. A sink that
raises instead of answering is a failed attempt like any other (logged with its traceback and
counted as a background failure). Deliveries run in the outbox's task group (`running()`).

What an Alertmanager sink keeps active (lasting conditions it re-posts) is written to the
store with each delivery that changes it, and read back by the next process.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from streamwatch.alerts.events import AlertEvent
from streamwatch.alerts.rules import Condition, Router, RuleState, Window
from streamwatch.alerts.sinks import Alert, Delivery, Sink
from streamwatch.alerts.sinks.alertmanager import STATEFUL, AlertmanagerSink
from streamwatch.alerts.sources import from_record, from_segment, logo_hit
from streamwatch.background import Failures, TaskGroup, repeat
from streamwatch.config import StreamConfig
from streamwatch.mavi.callbacks import SegmentReport, StreamEnded
from streamwatch.metrics import Metrics
from streamwatch.store import AlertTx, CallbackOutcome, EventRow, NewAlert, OutboxRow, StateStore

if TYPE_CHECKING:
    from streamwatch.evidence import Evidence

__all__ = ["Alerts", "Outbox"]

log = structlog.get_logger("streamwatch.alerts")


class Outbox:
    """The delivery worker."""

    def __init__(
        self,
        *,
        store: StateStore,
        sinks: Mapping[str, Sink],
        retry_initial: float,
        retry_max: float,
        poll_seconds: float,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        failures: Failures | None = None,
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
        # Deliveries (and `Alerts.emit` writes) run in this group, entered by `running()`.
        self.tasks = TaskGroup("alerts", failures)
        self._wake = asyncio.Event()
        self._stopping = False
        self._reposted: dict[str, float] = {}
        # [cluster]: the outbox is shared by replicas: a re-posting sink's active set is the
        # store's (any replica may have delivered the firing alert a resolve ends), and only
        # the replica that `leads()` re-posts it.
        self.shared = False
        self.leads: Callable[[], bool] = lambda: True

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Outbox]:
        """Own the deliveries, and give re-posting sinks (Alertmanager) back the conditions
        they kept active before a restart. On exit, wait for deliveries under way."""
        async with self.tasks:
            for name, sink in self.sinks.items():
                if isinstance(sink, AlertmanagerSink):
                    sink.active = await self._store.active_alerts(name)
            yield self

    def wake(self) -> None:
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def run(self) -> None:
        """Deliver until `stop()`, waking on new alerts and when retries fall due; a pass
        that fails is tried again after a backoff (the daemon runs the same loop in its own
        task group)."""
        await repeat(
            "alerts.outbox",
            self.run_once,
            wait=self.wait_for_work,
            running=lambda: not self._stopping,
            on_failure="retry",
            failures=self.tasks.failures,
        )

    async def run_once(self) -> None:
        """One pass: start the deliveries that are due, re-post what is due for it."""
        await self.deliver_due()
        await self.repost_due()

    async def wait_for_work(self) -> None:
        """Until a new alert is written, a retry falls due, or `poll_seconds` passed."""
        self._wake.clear()
        due = await self._store.next_alert_at()
        wait = self._poll if due is None else min(self._poll, max(0.0, due - self._clock()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._wake.wait()

    async def repost_due(self) -> None:
        """Re-post the active alerts of sinks that want it (Alertmanager) when due."""
        if not self.leads():
            return
        now = self._clock()
        for name, sink in self.sinks.items():
            if not isinstance(sink, AlertmanagerSink):
                continue
            if now < self._reposted.get(name, 0.0) + sink.repeat_seconds:
                continue
            self._reposted[name] = now
            if self.shared:
                sink.active = await self._store.active_alerts(name)
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
        """Wait until the deliveries (and emitted alerts' writes) under way have ended."""
        await self.tasks.settle()

    async def deliver_due(self) -> int:
        """Start delivering every due group not already under way. Returns groups started."""
        rows = await self._store.due_alerts(self._clock())
        groups: dict[tuple[str, str], list[OutboxRow]] = {}
        for row in rows:
            if row.id not in self._inflight:
                groups.setdefault((row.sink, row.group), []).append(row)
        for (sink, _), members in groups.items():
            self._inflight.update(r.id for r in members)
            try:
                self.tasks.spawn("alerts.delivery", self._deliver(sink, members))
            except RuntimeError:
                self._inflight.difference_update(r.id for r in members)
                raise
        return len(groups)

    def _active(self, sink_name: str, rows: list[OutboxRow]) -> dict[str, Mapping[str, Any] | None]:
        """For a re-posting sink, what it now keeps active for the lasting conditions these
        delivered alerts are about (None: no longer active)."""
        sink = self.sinks.get(sink_name)
        if not isinstance(sink, AlertmanagerSink):
            return {}
        events = [AlertEvent.from_json(r.event) for r in rows]
        return {e.subject: sink.active.get(e.subject) for e in events if e.kind in STATEFUL}

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
            if self.shared and isinstance(sink, AlertmanagerSink):
                sink.active = await self._store.active_alerts(sink_name)
            try:
                async with self._limits[sink_name]:
                    result = await sink.deliver(alerts)
            except Exception as exc:  # noqa: BLE001 - a sink that raises made a failed attempt
                self.tasks.failures.failed("alerts.delivery", exc, sink=sink_name)
                result = Delivery(
                    False, retry=True, detail=f"the sink raised {type(exc).__name__} (see the log)"
                )
            # A sink may have split the group (one part too large): settle each part alone.
            by_id = {r.alert_id: r for r in rows}
            for part_ids, part in result.outcomes([a.alert_id for a in alerts]):
                part_rows = [by_id[i] for i in part_ids]
                await self._conclude(sink_name, sink.max_attempts, part_rows, part)
        finally:
            self._inflight.difference_update(ids)
        # Settled: what is due next may go now. (Not after a failure to settle: the rows are
        # then picked up by the next poll, never in a tight loop.)
        self._wake.set()

    async def _conclude(
        self, sink_name: str, max_attempts: int, rows: list[OutboxRow], result: Delivery
    ) -> None:
        ids = [r.id for r in rows]
        attempts = max(r.attempts for r in rows) + 1
        if result.ok:
            await self._settle(sink_name, ids, "delivered", active=self._active(sink_name, rows))
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
        active: Mapping[str, Mapping[str, Any] | None] | None = None,
    ) -> None:
        await self._store.settle_alerts(
            ids, state=state, next_at=next_at, error=error, active=(sink, active or {})
        )
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
        store: StateStore,
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
        """Route an event nothing recorded (tests, tools) in an operation of its own, in the
        outbox's task group (a failure to write it is logged and counted)."""
        self.outbox.tasks.spawn("alerts.emit", self._emit(event))

    async def _emit(self, event: AlertEvent) -> None:
        routed = await self._store.with_alert_tx(
            lambda tx: self._route(tx, event), now=self._clock()
        )
        if routed:
            self.outbox.wake()

    async def settle(self) -> None:
        """Wait until every emitted alert is in the outbox and every delivery under way ended."""
        await self.outbox.settle()


def _new_id() -> str:
    return str(uuid.uuid4())
