"""Prometheus metrics on a registry passed in (never the global one).

Two kinds of series:
- instruments observed as things happen (`Metrics`): callbacks, MAVI requests, store commits,
  per-segment processing time, tokens, logo detections, stop statuses;
- state read at scrape time (`StateCollector`): stream state and `up`, totals from the store,
  last segment time, cost, burn rate, budgets, the account halt, orphans. Reading state when
  scraped means these can never drift from what the daemon knows.

Names follow Prometheus conventions (base units, `_total`, `_seconds`, `_info`); money is in
USD (`_usd`). Every name here is part of the README's metrics contract.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from streamwatch import __version__
from streamwatch.ledger import PERIODS, Spending, burn_ticks_per_second
from streamwatch.mavi.callbacks import SegmentReport, StreamEnded
from streamwatch.pricing import TICKS_PER_USD
from streamwatch.store import CallbackOutcome, OrphanTotals, StreamTotals

__all__ = ["OTHER_LOGO", "Metrics", "Snapshot", "StateCollector"]

OTHER_LOGO = "__other__"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PROCESSING = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
_API = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The instruments the daemon observes as things happen."""

    def __init__(self, registry: CollectorRegistry, *, max_logo_names: int = 20) -> None:
        self.registry = registry
        self.max_logo_names = max_logo_names
        self._logo_names: dict[str, set[str]] = {}
        self.callbacks = Counter(
            "streamwatch_callbacks",
            "MAVI callbacks received, by outcome: stored, duplicate, orphan, rejected, failed.",
            ["outcome"],
            registry=registry,
        )
        self.callbacks_rejected = Counter(
            "streamwatch_callbacks_rejected",
            "MAVI callbacks refused, by reason: secret, too_large, unreadable, encoding, json,"
            " depth, shape, field, range.",
            ["reason"],
            registry=registry,
        )
        self.callback_errors = Counter(
            "streamwatch_callback_errors",
            "Failures after a callback was stored (it is still acknowledged), by step:"
            " evidence, supervisor, metrics, log.",
            ["step"],
            registry=registry,
        )
        self.callback_seconds = Histogram(
            "streamwatch_callback_duration_seconds",
            "Time to handle a callback, from request to answer (storing included).",
            buckets=_LATENCY,
            registry=registry,
        )
        self.mavi_requests = Counter(
            "streamwatch_mavi_requests",
            "Requests to the MAVI API, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.mavi_seconds = Histogram(
            "streamwatch_mavi_request_duration_seconds",
            "Duration of single requests to the MAVI API (each retry counts alone).",
            ["endpoint"],
            buckets=_API,
            registry=registry,
        )
        self.store_commit_seconds = Histogram(
            "streamwatch_store_commit_duration_seconds",
            "Time to run and commit one batch of store writes.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.store_batch = Histogram(
            "streamwatch_store_batch_operations",
            "Operations committed together in one store transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.processing = Histogram(
            "streamwatch_segment_processing_seconds",
            "MAVI's processing time per segment, as it reports it.",
            ["stream"],
            buckets=_PROCESSING,
            registry=registry,
        )
        self.tokens = Counter(
            "streamwatch_segment_tokens",
            "Tokens MAVI reports per segment, by kind: input, output, video, text.",
            ["stream", "kind"],
            registry=registry,
        )
        self.logos = Counter(
            "streamwatch_logo_detections",
            f"Logos detected, by name; past the per-stream cap of distinct names, {OTHER_LOGO}.",
            ["stream", "logo"],
            registry=registry,
        )
        self.stops = Counter(
            "streamwatch_stream_stops",
            "Tasks ended by MAVI, by status: 14 stopped, 15 no video, 16 capacity, 402 balance.",
            ["stream", "status"],
            registry=registry,
        )
        self.background_failures = Counter(
            "streamwatch_background_failures",
            "Background tasks that failed (each logged as background.failed with its"
            " traceback), by task: supervisor, supervisor.<action>, alerts.outbox,"
            " alerts.delivery, alerts.emit, evidence.capture, emulator.video, reload, prune,"
            " systemd.",
            ["task"],
            registry=registry,
        )
        # Series from zero for the loops every daemon runs, so that increase() sees the first.
        for task in ("supervisor", "reload"):
            self.background_failures.labels(task)
        self.alert_deliveries = Counter(
            "streamwatch_alert_deliveries",
            "Alert delivery attempts by sink and outcome: delivered, retry, dead.",
            ["sink", "outcome"],
            registry=registry,
        )
        self.http_connections = Gauge(
            "streamwatch_http_connections",
            "Connections open to the daemon's HTTP server (callbacks, API, metrics).",
            registry=registry,
        )
        self.http_connections_limit = Gauge(
            "streamwatch_http_connections_limit",
            "The cap on open connections in force ([server] max_connections, lowered to fit "
            "the file limit).",
            registry=registry,
        )
        self.http_connections_closed = Counter(
            "streamwatch_http_connections_closed",
            "Connections the server closed itself, by reason: over_limit, evicted, "
            "header_timeout, body_timeout, idle_timeout.",
            ["reason"],
            registry=registry,
        )
        self.http_accept_errors = Counter(
            "streamwatch_http_accept_errors",
            "Connections the server could not accept: out of file descriptors or memory.",
            registry=registry,
        )
        InfoBuild(registry)

    def callback(self, outcome: CallbackOutcome) -> None:
        """Count a stored callback and what it reported."""
        self.callbacks.labels(outcome.kind).inc()
        cb, stream = outcome.callback, outcome.stream
        if outcome.kind != "stored" or stream is None:
            return
        if isinstance(cb, SegmentReport):
            if cb.processing_ms is not None:
                self.processing.labels(stream).observe(cb.processing_ms / 1000)
            if cb.tokens is not None:
                for kind, value in (
                    ("input", cb.tokens.input),
                    ("output", cb.tokens.output),
                    ("video", cb.tokens.video),
                    ("text", cb.tokens.text),
                ):
                    if value:
                        self.tokens.labels(stream, kind).inc(value)
            for logo in cb.logos:
                self.logos.labels(stream, self._logo_label(stream, logo.name)).inc()
        elif isinstance(cb, StreamEnded):
            self.stops.labels(stream, str(cb.status)).inc()

    def mavi_request(self, endpoint: str, outcome: str, seconds: float) -> None:
        """Observe one request to MAVI (the clients' `on_request` hook)."""
        self.mavi_requests.labels(endpoint, outcome).inc()
        self.mavi_seconds.labels(endpoint).observe(seconds)

    def commit(self, seconds: float, operations: int) -> None:
        """Observe one store commit (the store's `on_commit` hook)."""
        self.store_commit_seconds.observe(seconds)
        self.store_batch.observe(operations)

    def rejected(self, reason: str) -> None:
        self.callbacks.labels("rejected").inc()
        self.callbacks_rejected.labels(reason).inc()

    def _logo_label(self, stream: str, name: str | None) -> str:
        seen = self._logo_names.setdefault(stream, set())
        label = (name or "unknown")[:64]
        if label in seen:
            return label
        if len(seen) >= self.max_logo_names:
            return OTHER_LOGO
        seen.add(label)
        return label


class InfoBuild(Collector):
    """`streamwatch_build_info{version, python}`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("streamwatch_build", "Version of streamwatch and Python.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


@dataclass
class StreamView:
    """What the collector needs of one stream, taken when the scrape starts."""

    state: str
    running: bool
    restarts: int
    labels: Mapping[str, str]
    fps: int | None
    content_moderation: bool | None
    logo_detection: bool | None
    preflight: bool = False
    probes: Mapping[str, int] = field(default_factory=dict)  # preflight probes by outcome
    precharges_avoided: int = 0
    ticks_saved: int = 0


@dataclass
class Snapshot:
    """Daemon state read for one scrape."""

    streams: dict[str, StreamView] = field(default_factory=dict)
    totals: dict[str, StreamTotals] = field(default_factory=dict)
    orphans: OrphanTotals = field(default_factory=lambda: OrphanTotals(0, 0))
    halt_reason: str | None = None
    all_time_ticks: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, int] = field(default_factory=dict)
    intents: dict[str, int] = field(default_factory=dict)
    now: float = 0.0


STATES = (
    "idle",
    "starting",
    "running",
    "stalled",
    "backoff",
    "adopting",
    "stopping",
    "held",
    "halted",
    "over_budget",
    "source_offline",
)
PROBE_OUTCOMES = ("ok", "unreachable", "timeout", "refused", "not_media", "failed", "unavailable")


def _usd(ticks: float) -> float:
    return ticks / TICKS_PER_USD


class StateCollector(Collector):
    """Series derived from a `Snapshot` taken at the start of each scrape."""

    def __init__(self, registry: CollectorRegistry, spending: Spending) -> None:
        self.snapshot = Snapshot()
        self.spending = spending
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []  # state series vary with the config; describe nothing, collect at scrape

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield from self._streams(snap)
        yield from self._account(snap)

    def _streams(self, snap: Snapshot) -> Iterator[Metric]:
        keys = sorted({k for v in snap.streams.values() for k in v.labels})
        info = GaugeMetricFamily(
            "streamwatch_stream_info",
            "Configured streams, with their settings and labels (value 1). Join on `stream`.",
            labels=[
                "stream",
                "fps",
                "content_moderation",
                "logo_detection",
                *(f"label_{k}" for k in keys),
            ],
        )
        state = GaugeMetricFamily(
            "streamwatch_stream_state",
            "1 for the stream's current state, 0 for the others.",
            labels=["stream", "state"],
        )
        up = GaugeMetricFamily(
            "streamwatch_stream_up",
            "1 while the stream's task runs and reports, else 0.",
            labels=["stream"],
        )
        restarts = CounterMetricFamily(
            "streamwatch_stream_restarts",
            "Tasks started for the stream after its first.",
            labels=["stream"],
        )
        segments = CounterMetricFamily(
            "streamwatch_stream_segments", "Segments processed and stored.", labels=["stream"]
        )
        unsafe = CounterMetricFamily(
            "streamwatch_stream_unsafe_segments",
            "Segments with unsafe content.",
            labels=["stream"],
        )
        logo_segments = CounterMetricFamily(
            "streamwatch_stream_logo_segments",
            "Segments with at least one logo.",
            labels=["stream"],
        )
        errors = CounterMetricFamily(
            "streamwatch_stream_segment_errors",
            "Segments MAVI failed to process (status -1).",
            labels=["stream"],
        )
        last = GaugeMetricFamily(
            "streamwatch_stream_last_segment_timestamp_seconds",
            "Unix time of the last callback stored for the stream.",
            labels=["stream"],
        )
        cost = CounterMetricFamily(
            "streamwatch_stream_cost_usd",
            "What MAVI charged for the stream (the ledger).",
            labels=["stream"],
        )
        burn = GaugeMetricFamily(
            "streamwatch_stream_burn_usd_per_hour",
            "What the stream costs per hour while its task runs (0 when stopped).",
            labels=["stream"],
        )
        probes = CounterMetricFamily(
            "streamwatch_stream_probes",
            "Preflight probes of the stream's source, by outcome: ok, unreachable, timeout,"
            " refused, not_media, failed, unavailable (no ffprobe).",
            labels=["stream", "outcome"],
        )
        avoided = CounterMetricFamily(
            "streamwatch_stream_precharges_avoided",
            "Starts not made because preflight found the source offline: pre-charges avoided.",
            labels=["stream"],
        )
        saved = CounterMetricFamily(
            "streamwatch_stream_precharges_avoided_usd",
            "What the pre-charges avoided by preflight would have cost.",
            labels=["stream"],
        )
        for name in sorted(set(snap.streams) | set(snap.totals) | set(snap.all_time_ticks)):
            view = snap.streams.get(name)
            if view is not None:
                info.add_metric(
                    [
                        name,
                        str(view.fps or ""),
                        str(view.content_moderation).lower(),
                        str(view.logo_detection).lower(),
                        *(view.labels.get(k, "") for k in keys),
                    ],
                    1,
                )
                for s in STATES:
                    state.add_metric([name, s], 1 if view.state == s else 0)
                up.add_metric([name], 1 if view.state == "running" else 0)
                restarts.add_metric([name], view.restarts)
                spec = self.spending.specs.get(name)
                rate = (
                    burn_ticks_per_second(spec, self.spending.segment_seconds) * 3600
                    if spec is not None and view.running
                    else 0.0
                )
                burn.add_metric([name], _usd(rate))
                if view.preflight or view.probes:  # from zero, so that increase() sees the first
                    for outcome in PROBE_OUTCOMES:
                        probes.add_metric([name, outcome], view.probes.get(outcome, 0))
                    avoided.add_metric([name], view.precharges_avoided)
                    saved.add_metric([name], _usd(view.ticks_saved))
            total = snap.totals.get(name)
            if total is not None:
                segments.add_metric([name], total.segments)
                unsafe.add_metric([name], total.unsafe_segments)
                logo_segments.add_metric([name], total.logo_segments)
                errors.add_metric([name], total.failed_segments)
                if total.last_callback_at is not None:
                    last.add_metric([name], total.last_callback_at)
            cost.add_metric([name], _usd(snap.all_time_ticks.get(name, 0)))
        yield from (
            info,
            state,
            up,
            restarts,
            segments,
            unsafe,
            logo_segments,
            errors,
            last,
            cost,
            burn,
            probes,
            avoided,
            saved,
        )

    def _account(self, snap: Snapshot) -> Iterator[Metric]:
        spend = GaugeMetricFamily(
            "streamwatch_account_spend_usd",
            "Confirmed charges in the current UTC day or calendar month.",
            labels=["period"],
        )
        for period in ("day", "month"):
            spend.add_metric([period], _usd(self.spending.spent(None, period, snap.now)))
        yield spend
        # The account's caps are {scope="account", period}; a stream's are {scope="stream",
        # stream, period}, so that no stream name (not even "account") can share a label set
        # with the account.
        budget_help = (
            " Labels: scope (account or stream), period (day or month), and stream for a stream."
        )
        cap = GaugeMetricFamily(
            "streamwatch_budget_cap_usd", "Configured budget caps." + budget_help
        )
        used = GaugeMetricFamily(
            "streamwatch_budget_spent_usd",
            "Spend against each cap this period, estimates of unreported billing included."
            + budget_help,
        )
        left = GaugeMetricFamily(
            "streamwatch_budget_remaining_usd",
            "What is left of each cap this period." + budget_help,
        )
        for c in self.spending.caps:
            labels = (
                {"scope": "stream", "stream": c.stream, "period": c.period}
                if c.stream
                else {"scope": "account", "period": c.period}
            )
            spent = self.spending.effective(c, snap.now, {})
            cap.add_sample(cap.name, labels, _usd(c.ticks))
            used.add_sample(used.name, labels, _usd(spent))
            left.add_sample(left.name, labels, _usd(max(0, c.ticks - spent)))
        yield from (cap, used, left)
        halted = GaugeMetricFamily(
            "streamwatch_account_halted",
            "1 while starts are halted account-wide, by reason (balance, auth).",
            labels=["reason"],
        )
        for reason in ("balance", "auth"):
            halted.add_metric([reason], 1 if snap.halt_reason == reason else 0)
        yield halted
        yield GaugeMetricFamily(
            "streamwatch_orphan_tasks",
            "Task ids that sent callbacks but were not started by this daemon.",
            value=snap.orphans.tasks,
        )
        orphan_spend = GaugeMetricFamily(
            "streamwatch_orphan_spend_usd",
            "Estimated charges of tasks this daemon did not start, in the current UTC day or"
            " calendar month (counted against the account's caps, apart from confirmed spend).",
            labels=["period"],
        )
        for period in PERIODS:
            orphan_spend.add_metric([period], _usd(self.spending.orphan_spent(period, snap.now)))
        yield orphan_spend
        yield GaugeMetricFamily(
            "streamwatch_orphan_tasks_stopped",
            'Orphan tasks this daemon stopped (on_orphan = "stop").',
            value=snap.orphans.stopped,
        )
        intents = GaugeMetricFamily(
            "streamwatch_start_intents",
            "Start intents by state: open (answer not recorded yet), started, failed (refused),"
            " adopted (its task matched by callbacks), unmatched (none showed up in time).",
            labels=["state"],
        )
        for state in ("open", "started", "failed", "adopted", "unmatched"):
            intents.add_metric([state], snap.intents.get(state, 0))
        yield intents
        outbox = GaugeMetricFamily(
            "streamwatch_alert_outbox",
            "Alerts in the outbox by state: pending, delivered, dead (dead letters).",
            labels=["state"],
        )
        for state in ("pending", "delivered", "dead"):
            outbox.add_metric([state], snap.outbox.get(state, 0))
        yield outbox
        yield CounterMetricFamily(
            "streamwatch_orphan_callbacks",
            "Callbacks received from tasks this daemon did not start.",
            value=snap.orphans.callbacks,
        )
