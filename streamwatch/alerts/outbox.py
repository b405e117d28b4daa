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

import structlog

from streamwatch.alerts.events import AlertEvent
from streamwatch.alerts.rules import Router
from streamwatch.alerts.sinks import Alert, Delivery, Sink
from streamwatch.alerts.sinks.alertmanager import AlertmanagerSink
from streamwatch.alerts.sources import from_record, from_segment
from streamwatch.mavi.callbacks import SegmentReport
from streamwatch.metrics import Metrics
from streamwatch.store import OutboxRow, Store

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
    """Routes events to the outbox and runs the delivery worker."""

    def __init__(
        self,
        *,
        router: Router,
        outbox: Outbox,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.router = router
        self.outbox = outbox
        self._store = store
        self._clock = clock
        self._writes: set[asyncio.Task[None]] = set()
        self._unsafe: dict[str, int] = {}
        self._logos: dict[str, int] = {}

    def record(
        self,
        kind: str,
        *,
        stream: str | None = None,
        task_id: str | None = None,
        status: int | None = None,
        detail: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """Alert on something the daemon recorded, if it is alert-worthy."""
        event = from_record(
            kind,
            at=self._clock(),
            stream=stream,
            task_id=task_id,
            status=status,
            detail=detail,
            labels=labels,
        )
        if event is not None:
            self.emit(event)

    def segment(
        self,
        report: SegmentReport,
        *,
        stream: str,
        labels: Mapping[str, str],
        watched: tuple[str, ...],
        evidence: str | None = None,
    ) -> None:
        """Alert on a stored segment, counting unsafe and logo segments in a row."""
        self._unsafe[stream] = self._unsafe.get(stream, 0) + 1 if report.unsafe else 0
        names = {logo.name for logo in report.logos if logo.name}
        hit = bool(names & set(watched)) if watched else bool(names)
        self._logos[stream] = self._logos.get(stream, 0) + 1 if hit else 0
        for event in from_segment(
            report,
            stream=stream,
            at=self._clock(),
            unsafe_streak=self._unsafe[stream],
            logo_streak=self._logos[stream],
            watched=watched,
            labels=labels,
            evidence=evidence,
        ):
            self.emit(event)

    def emit(self, event: AlertEvent) -> None:
        """Route an event; what a rule selects is written to the outbox, then delivered."""
        routed = self.router.route(event, self._clock())
        if not routed:
            return
        rows = [
            (str(uuid.uuid4()), r.sink, r.rule, r.group, r.event.to_json(), r.send_after)
            for r in routed
        ]
        task = asyncio.create_task(self._enqueue(rows))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _enqueue(
        self, rows: list[tuple[str, str, str, str, dict[str, object], float]]
    ) -> None:
        await self._store.enqueue_alerts(rows)
        self.outbox.wake()

    async def settle(self) -> None:
        """Wait until every emitted alert is in the outbox and every delivery under way ended."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self.outbox.settle()
