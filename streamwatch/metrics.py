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

import math
import platform
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from streamwatch import __version__
from streamwatch.config import StreamConfig
from streamwatch.ledger import PERIODS, Spending, burn_ticks_per_second
from streamwatch.mavi.callbacks import SegmentReport, StreamEnded
from streamwatch.pricing import TICKS_PER_USD
from streamwatch.store import CallbackOutcome, OrphanTotals, StreamTotals

__all__ = [
    "OTHER_LOGO",
    "TOKEN_KINDS",
    "Metrics",
    "Snapshot",
    "StateCollector",
    "StreamFamily",
    "render_page",
]

OTHER_LOGO = "__other__"
TOKEN_KINDS = ("input", "output", "video", "text")
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_PROCESSING = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
_API = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The instruments the daemon observes as things happen."""

    def __init__(self, registry: CollectorRegistry, *, max_logo_names: int = 20) -> None:
        self.registry = registry
        self.max_logo_names = max_logo_names
        self._logo_names: dict[str, set[str]] = {}
        # streamwatch_segment_tokens_total: each stream's counts by TOKEN_KINDS, rendered with
        # the other per-stream series (StateCollector.stream_families).
        self.tokens: dict[str, list[int]] = {}
        self.callbacks = Counter(
            "streamwatch_callbacks",
            "MAVI callbacks received, by outcome: stored, duplicate, orphan, rejected, failed.",
            ["outcome"],
            registry=registry,
        )
        # The children a stored callback counts, looked up once (labels() is a lock and a
        # dict lookup per call, on every callback).
        self._callback_outcomes = {
            kind: self.callbacks.labels(kind) for kind in ("stored", "duplicate", "orphan")
        }
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
        # One histogram for the fleet: per stream it was 11 series each, a third of a large
        # fleet's /metrics, for a figure nobody reads per stream.
        self.processing = Histogram(
            "streamwatch_segment_processing_seconds",
            "MAVI's processing time per segment, as it reports it, over all streams.",
            buckets=_PROCESSING,
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
        self.lease_changes = Counter(
            "streamwatch_stream_lease_changes",
            "[cluster] Stream leases this replica claimed, lost (expired or taken), handed back"
            " to a replica that joined, or released when stopping, by change.",
            ["change"],
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
        # The standard process_* (CPU, memory, file descriptors) and python_* (GC, version)
        # series every Prometheus client exports, on this registry.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    def callback(self, outcome: CallbackOutcome) -> None:
        """Count a stored callback and what it reported."""
        self._callback_outcomes[outcome.kind].inc()
        cb, stream = outcome.callback, outcome.stream
        if outcome.kind != "stored" or stream is None:
            return
        if isinstance(cb, SegmentReport):
            if cb.processing_ms is not None:
                self.processing.observe(cb.processing_ms / 1000)
            tokens = cb.tokens
            if tokens is not None:
                counts = self.tokens.get(stream)
                if counts is None:
                    counts = self.tokens[stream] = [0] * len(TOKEN_KINDS)
                counts[0] += tokens.input
                counts[1] += tokens.output
                counts[2] += tokens.video
                counts[3] += tokens.text
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


def render_page(
    registry: CollectorRegistry, families: Sequence[StreamFamily], accept: str
) -> tuple[bytes, str]:
    """The /metrics page and its content type: the registry through prometheus_client (its
    negotiation picks OpenMetrics when the scraper asks for it, else text 0.0.4), then the
    per-stream families; OpenMetrics' `# EOF` stays last."""
    encoder, content_type = choose_encoder(accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    head = encoder(registry)
    eof = b"# EOF\n"
    if openmetrics and head.endswith(eof):
        head = head[: -len(eof)]
    tail = "".join(f.text(openmetrics=openmetrics) for f in families).encode()
    return head + tail + (eof if openmetrics else b""), content_type


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
    # [cluster]: False on a replica that does not lead (the leader exports the fleet's
    # figures, so that sums over replicas add up); the live replicas, from the leader.
    fleet_figures: bool = True
    replicas: int | None = None
    unowned: int | None = None  # configured streams no replica holds a valid lease of


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


_INFO_HELP = "Configured streams, with their settings and labels (value 1). Join on `stream`."
_STATE_HELP = "1 for the stream's current state, 0 for the others."
_UP_HELP = "1 while the stream's task runs and reports, else 0."
_RESTARTS_HELP = "Tasks started for the stream after its first."
_UNSAFE_HELP = "Segments with unsafe content."
_LOGO_SEGMENTS_HELP = "Segments with at least one logo."
_ERRORS_HELP = "Segments MAVI failed to process (status -1)."
_LAST_HELP = "Unix time of the last callback stored for the stream."
_COST_HELP = "What MAVI charged for the stream (the ledger)."
_BURN_HELP = "What the stream costs per hour while its task runs (0 when stopped)."
_TOKENS_HELP = "Tokens MAVI reports per segment, by kind: input, output, video, text."
_PROBES_HELP = (
    "Preflight probes of the stream's source, by outcome: ok, unreachable, timeout,"
    " refused, not_media, failed, unavailable (no ffprobe)."
)
_AVOIDED_HELP = "Starts not made because preflight found the source offline: pre-charges avoided."
_SAVED_HELP = "What the pre-charges avoided by preflight would have cost."


def _escape(value: str) -> str:
    """A label value as the exposition formats write it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """As prometheus_client writes a value (`floatToGoString`: `1.0`, `1.5e+06`), with fast
    paths for whole numbers and finite floats (most per-stream series; the general one was a
    fifth of rendering a large fleet's page)."""
    if type(value) is int:
        if -1_000_000 < value < 1_000_000:
            return f"{value}.0"
        if 0 < value < 2**53:  # exact as a float: Go's exponent form of its digits
            digits = str(value)
            mantissa = f"{digits[0]}.{digits[1:]}".rstrip("0").rstrip(".")
            return f"{mantissa}e+{len(digits) - 1:02d}"
    elif type(value) is float and 0 < value < math.inf:
        text = repr(value)
        dot = text.find(".")
        if dot > 6 and "e" not in text:
            mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
            return f"{mantissa}e+{dot - 1:02d}"
        return text
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]  # unannotated upstream


class StreamFamily:
    """One family of per-stream series, as sample lines that both exposition formats share
    (only the HELP and TYPE lines differ). `labels`: the label names after `stream`."""

    def __init__(
        self,
        name: str,
        kind: Literal["gauge", "counter"],
        help_text: str,
        labels: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.labels = tuple(labels)
        self.sample = name + "_total" if kind == "counter" else name
        self.lines: list[str] = []

    def header(self, *, openmetrics: bool) -> str:
        name = self.name if openmetrics or self.kind == "gauge" else self.sample
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return f"# HELP {name} {help_text}\n# TYPE {name} {self.kind}\n"

    def text(self, *, openmetrics: bool) -> str:
        if not self.lines:
            return ""
        return self.header(openmetrics=openmetrics) + "".join(self.lines)


def _stream_families(
    info_labels: Sequence[str],
) -> tuple[tuple[str, Literal["gauge", "counter"], str, Sequence[str]], ...]:
    """The per-stream families, in the page's order: name, type, help, labels after
    `stream`. Each stream's line of each is made by `StateCollector._settings_lines` or
    `_counts_lines`, at the place `_FAMILY_PARTS` says."""
    return (
        ("streamwatch_stream_info", "gauge", _INFO_HELP, info_labels),
        ("streamwatch_stream_state", "gauge", _STATE_HELP, ("state",)),
        ("streamwatch_stream_up", "gauge", _UP_HELP, ()),
        ("streamwatch_stream_restarts", "counter", _RESTARTS_HELP, ()),
        ("streamwatch_stream_segments", "counter", "Segments processed and stored.", ()),
        ("streamwatch_stream_unsafe_segments", "counter", _UNSAFE_HELP, ()),
        ("streamwatch_stream_logo_segments", "counter", _LOGO_SEGMENTS_HELP, ()),
        ("streamwatch_stream_segment_errors", "counter", _ERRORS_HELP, ()),
        ("streamwatch_stream_last_segment_timestamp_seconds", "gauge", _LAST_HELP, ()),
        ("streamwatch_stream_cost_usd", "counter", _COST_HELP, ()),
        ("streamwatch_stream_burn_usd_per_hour", "gauge", _BURN_HELP, ()),
        ("streamwatch_stream_probes", "counter", _PROBES_HELP, ("outcome",)),
        ("streamwatch_stream_precharges_avoided", "counter", _AVOIDED_HELP, ()),
        ("streamwatch_stream_precharges_avoided_usd", "counter", _SAVED_HELP, ()),
        ("streamwatch_segment_tokens", "counter", _TOKENS_HELP, ("kind",)),
    )


# Where each family of `_stream_families` takes a stream's line from, in the stream's entry of
# `StateCollector._streams`: (2, i) the i-th of its settings lines, (4, i) of its counts lines.
_FAMILY_PARTS = (
    (2, 0),  # info
    (2, 1),  # state
    (2, 2),  # up
    (2, 3),  # restarts
    (4, 0),  # segments
    (4, 1),  # unsafe_segments
    (4, 2),  # logo_segments
    (4, 3),  # segment_errors
    (4, 4),  # last_segment_timestamp_seconds
    (4, 5),  # cost_usd
    (2, 4),  # burn_usd_per_hour
    (2, 5),  # probes
    (2, 6),  # precharges_avoided
    (2, 7),  # precharges_avoided_usd
    (4, 6),  # segment_tokens
)


def _counts_lines(
    name: str, total: StreamTotals | None, ticks: int, counts: Sequence[int] | None
) -> tuple[str, ...]:
    """One stream's lines of the families of `_stream_families` made of its counts (the
    last seven, in that order; "" for a family it has no line in)."""
    n = _number
    labels = f'{{stream="{_escape(name)}"}} '
    segments = unsafe = logo_segments = errors = last = token = ""
    if total is not None:
        segments = f"streamwatch_stream_segments_total{labels}{n(total.segments)}\n"
        unsafe = f"streamwatch_stream_unsafe_segments_total{labels}{n(total.unsafe_segments)}\n"
        logo_segments = f"streamwatch_stream_logo_segments_total{labels}{n(total.logo_segments)}\n"
        errors = f"streamwatch_stream_segment_errors_total{labels}{n(total.failed_segments)}\n"
        if total.last_callback_at is not None:
            last = (
                "streamwatch_stream_last_segment_timestamp_seconds"
                f"{labels}{n(total.last_callback_at)}\n"
            )
    if counts is not None:
        esc = _escape(name)
        token = "".join(
            f'streamwatch_segment_tokens_total{{stream="{esc}",kind="{kind}"}} {n(count)}\n'
            for kind, count in zip(TOKEN_KINDS, counts, strict=True)
            if count
        )
    cost = f"streamwatch_stream_cost_usd_total{labels}{n(_usd(ticks))}\n"
    return (segments, unsafe, logo_segments, errors, last, cost, token)


class StateCollector(Collector):
    """Series derived from a `Snapshot` taken at the start of each scrape."""

    def __init__(self, registry: CollectorRegistry, spending: Spending) -> None:
        self.snapshot = Snapshot()
        # Each stream's lines from the last scrape (`stream_families`), with what they were
        # made of: [view, settings, settings lines, counts, counts lines]; and the label keys
        # they were made with.
        self._streams: dict[str, list[Any]] = {}
        self._keys: tuple[str, ...] = ()
        self.spending = spending
        registry.register(self)

    def describe(self) -> list[Metric]:
        return []  # state series vary with the config; describe nothing, collect at scrape

    def collect(self) -> Iterator[Metric]:
        """The account's series (the per-stream ones are `stream_families`): with [cluster],
        from the leader only, beside the live replicas."""
        snap = self.snapshot
        if snap.fleet_figures:
            yield from self._account(snap)
        if snap.replicas is not None:
            yield GaugeMetricFamily(
                "streamwatch_cluster_replicas",
                "[cluster] Live replicas in the fleet (exported by the leader only).",
                value=snap.replicas,
            )
        if snap.unowned is not None:
            yield GaugeMetricFamily(
                "streamwatch_cluster_streams_unowned",
                "[cluster] Configured streams no replica holds a valid lease of, as of the"
                " leader's last lease round (exported by the leader only).",
                value=snap.unowned,
            )

    def stream_families(self, tokens: Mapping[str, Sequence[int]]) -> list[StreamFamily]:
        """The per-stream families of the current snapshot, with `tokens` (each stream's
        counts by TOKEN_KINDS): the bulk of a large fleet's page, rendered by `render_page`
        rather than through prometheus_client (a tenth of the time at 10,000 streams).

        Each stream's lines are kept from one scrape to the next with what they were made of
        (its view, totals, ticks, tokens and settings): only the streams that changed since
        are rendered again (at 10,000 streams, a scrape that found few changed took a fifth
        of the time of rendering them all)."""
        snap = self.snapshot
        names = sorted(
            set(snap.streams) | set(snap.totals) | set(snap.all_time_ticks) | set(tokens)
        )
        keys = tuple(sorted({k for v in snap.streams.values() for k in v.labels}))
        info_labels = ("fps", "content_moderation", "logo_detection", *(f"label_{k}" for k in keys))
        views, totals, ticks = snap.streams, snap.totals, snap.all_time_ticks
        specs = self.spending.specs
        previous = self._streams if keys == self._keys else {}
        kept: dict[str, list[Any]] = {}
        blocks = []
        for name in names:
            view, spec = views.get(name), specs.get(name)
            total, tick, counts = totals.get(name), ticks.get(name, 0), tokens.get(name)
            counted = (total, tick, tuple(counts) if counts else None)
            held = previous.get(name)
            if held is None:
                settings = self._settings_lines(name, view, spec, keys)
                held = [view, spec, settings, counted, _counts_lines(name, total, tick, counts)]
            else:
                if held[0] != view or held[1] is not spec:
                    held[0:3] = view, spec, self._settings_lines(name, view, spec, keys)
                if held[3] != counted:
                    held[3:5] = counted, _counts_lines(name, total, tick, counts)
            kept[name] = held
            blocks.append(held)
        self._streams, self._keys = kept, keys
        families = [
            StreamFamily(name, kind, help_text, labels)
            for name, kind, help_text, labels in _stream_families(info_labels)
        ]
        for family, (part, i) in zip(families, _FAMILY_PARTS, strict=True):
            body = "".join(block[part][i] for block in blocks)
            if body:
                family.lines.append(body)
        return families

    def _settings_lines(
        self,
        name: str,
        view: StreamView | None,
        spec: StreamConfig | None,
        keys: Sequence[str],
    ) -> tuple[str, ...]:
        """One stream's lines of the families of `_stream_families` made of its view and
        settings (the first eight, in that order; "" for a family it has no line in)."""
        if view is None:
            return ("",) * 8
        n = _number
        esc = _escape(name)
        labels = f'{{stream="{esc}"}} '
        settings = "".join(
            f',{label}="{_escape(value)}"'
            for label, value in (
                ("fps", str(view.fps or "")),
                ("content_moderation", str(view.content_moderation).lower()),
                ("logo_detection", str(view.logo_detection).lower()),
                *((f"label_{k}", view.labels.get(k, "")) for k in keys),
            )
        )
        rate = (
            burn_ticks_per_second(spec, self.spending.segment_seconds) * 3600
            if spec is not None and view.running
            else 0.0
        )
        probes = avoided = saved = ""
        if view.preflight or view.probes:  # from zero, so that increase() sees the first
            probes = "".join(
                f'streamwatch_stream_probes_total{{stream="{esc}",outcome="{outcome}"}}'
                f" {n(view.probes.get(outcome, 0))}\n"
                for outcome in PROBE_OUTCOMES
            )
            avoided = (
                f"streamwatch_stream_precharges_avoided_total{labels}{n(view.precharges_avoided)}\n"
            )
            saved = (
                f"streamwatch_stream_precharges_avoided_usd_total{labels}"
                f"{n(_usd(view.ticks_saved))}\n"
            )
        return (
            f'streamwatch_stream_info{{stream="{esc}"{settings}}} 1.0\n',
            "".join(
                f'streamwatch_stream_state{{stream="{esc}",state="{s}"}}'
                f" {1.0 if s == view.state else 0.0}\n"
                for s in STATES
            ),
            f"streamwatch_stream_up{labels}{1.0 if view.state == 'running' else 0.0}\n",
            f"streamwatch_stream_restarts_total{labels}{n(view.restarts)}\n",
            f"streamwatch_stream_burn_usd_per_hour{labels}{n(_usd(rate))}\n",
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
