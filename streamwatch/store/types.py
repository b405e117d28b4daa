"""What the store takes and gives back: typed rows, the account halt, and its errors.

Backend-neutral: nothing here knows SQL. Every row is a frozen dataclass, so callers read
fields, never positions or string keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamwatch.mavi.callbacks import Callback

__all__ = [
    "Adopted",
    "ArchivedClip",
    "BackupResult",
    "CallbackOutcome",
    "ChargeTotal",
    "EventRow",
    "EvidenceRecord",
    "FiredThreshold",
    "FleetSpend",
    "Halt",
    "JSONObject",
    "LibraryVideo",
    "NewAlert",
    "OrphanCharges",
    "OrphanTotals",
    "OutboxRow",
    "Pruned",
    "Registered",
    "SchemaError",
    "SpendTotal",
    "StoreError",
    "StreamRecord",
    "StreamTotals",
    "TaskRow",
]

# An alert event as its JSON document: the alerts package owns its shape, the store keeps it.
JSONObject = dict[str, Any]


class StoreError(Exception):
    """The store could not do what was asked; the message says what to check."""


class SchemaError(StoreError):
    """The state file's schema is not the one this version of streamwatch reads: newer (it
    is never touched), or older where migrating is not allowed (a read-only open)."""


@dataclass(frozen=True, slots=True)
class Halt:
    """The account is halted: nothing starts until `until` or an explicit resume."""

    reason: Literal["balance", "auth"]
    since: float
    until: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SpendTotal:
    """[cluster]: the fleet's confirmed spend of a stream (the account: None) in a period."""

    stream: str | None
    period: str
    period_key: str
    ticks: int


@dataclass(frozen=True, slots=True)
class FiredThreshold:
    """[cluster]: a budget threshold a charge crossed (`key` as `ledger.BudgetEvent.key`)."""

    key: str
    stream: str | None
    period: str
    percent: int
    detail: str


@dataclass(frozen=True, slots=True)
class FleetSpend:
    """[cluster]: what a charge found in its transaction: the fleet's totals right after it,
    and the thresholds it fired (their events and alerts recorded with it)."""

    totals: tuple[SpendTotal, ...]
    fired: tuple[FiredThreshold, ...] = ()


@dataclass(frozen=True, slots=True)
class CallbackOutcome:
    """What storing one callback did. `stream` is None for orphans."""

    kind: Literal["stored", "duplicate", "orphan"]
    stream: str | None
    callback: Callback
    # For an ended task: was the stop requested by this daemon (an expected 14)?
    stop_requested: bool = False
    # What MAVI charged for it (a stored segment), in ticks of 1/2880 USD, and when.
    ticks: int = 0
    at: float = 0.0
    # For an orphan: is this the first callback seen from that task? Its segment callbacks
    # so far, what one of its segments is estimated to cost, and the open intent (attempt id)
    # that may adopt it. `ticks` is then the estimate this callback added.
    first_from_task: bool = False
    orphan_segments: int = 0
    segment_ticks: int = 0
    candidate_for: str | None = None
    # [cluster]: the fleet's spend right after its charge, and the thresholds it fired.
    spend: FleetSpend | None = None


@dataclass(frozen=True, slots=True)
class Registered:
    """A task just recorded: its pre-charge, the early callbacks it claimed, in order, and
    the orphan estimates (at, ticks) their exact charges replaced."""

    precharge_ticks: int
    claimed: list[CallbackOutcome]
    orphan_removed: list[tuple[float, int]] = field(default_factory=list)
    spend: FleetSpend | None = None  # [cluster]: as `CallbackOutcome.spend`, its pre-charge


@dataclass(frozen=True, slots=True)
class Adopted:
    """An unknown task recorded as a stream's for its open intent. Its charges moved from
    the orphan estimates (`orphan_removed`, (at, ticks)) to the stream: the pre-charge, the
    parked callbacks claimed (`claimed`, charged as they are stored) and the segments whose
    bodies were not kept (`backfilled`, (at, ticks))."""

    task_id: str
    stream: str
    spec_hash: str
    started_at: float
    precharge_ticks: int
    precharge_at: float
    claimed: list[CallbackOutcome]
    backfilled: list[tuple[float, int]]
    orphan_removed: list[tuple[float, int]]
    spend: FleetSpend | None = None  # [cluster]: after its pre-charge and backfilled segments


@dataclass(frozen=True, slots=True)
class TaskRow:
    """A task this daemon started, as recorded."""

    task_id: str
    stream: str
    spec_hash: str
    fps: int
    content_moderation: bool
    logo_detection: bool
    max_logos: int
    started_at: float
    stop_requested: bool
    ended_at: float | None
    end_status: int | None
    end_reason: str | None
    last_callback_at: float | None
    segments: int
    failed_segments: int
    segment_ticks: int


@dataclass(frozen=True, slots=True)
class StreamTotals:
    """Counts over every task of a stream."""

    tasks: int
    segments: int
    unsafe_segments: int
    logo_segments: int
    failed_segments: int
    last_callback_at: float | None


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """What the supervisor keeps of a stream between processes: why it is held, its restart
    backoff (consecutive failures, next retry), how its last task ended, the last error, and
    the times of its recent restarts; for preflight, since when its source is offline, its
    probes by outcome, and the pre-charges (and ticks) that not starting saved."""

    name: str
    held_reason: str | None = None
    failures: int = 0
    retry_at: float | None = None
    last_end_status: int | None = None
    last_error: str | None = None
    restart_times: tuple[float, ...] = ()
    offline_since: float | None = None
    probes: tuple[tuple[str, int], ...] = ()  # (outcome, count), sorted by outcome
    precharges_avoided: int = 0
    ticks_saved: int = 0


@dataclass(frozen=True, slots=True)
class EventRow:
    """One recorded stream or account event."""

    at: float
    stream: str | None
    task_id: str | None
    kind: str
    status: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class ChargeTotal:
    """Charges over a time range for one stream."""

    stream: str
    precharges: int
    segments: int
    ticks: int


@dataclass(frozen=True, slots=True)
class OrphanTotals:
    """Tasks this daemon did not start that sent callbacks, and how many callbacks."""

    tasks: int
    callbacks: int
    uncertain: int = 0  # priced without knowing their fps (or features)
    stopped: int = 0  # stopped by this daemon (on_orphan = "stop")
    ended: int = 0  # sent an end status


@dataclass(frozen=True, slots=True)
class OrphanCharges:
    """Estimated charges of orphan tasks over a time range."""

    tasks: int
    precharges: int
    segments: int
    ticks: int
    uncertain_tasks: int


@dataclass(frozen=True, slots=True)
class NewAlert:
    """An outbox row to write: one alert for one sink."""

    alert_id: str
    sink: str
    rule: str
    group: str
    event: JSONObject
    send_after: float


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One alert for one sink, as kept in the outbox."""

    id: int
    alert_id: str
    sink: str
    rule: str
    group: str
    event: JSONObject
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    delivered_at: float | None


@dataclass(frozen=True, slots=True)
class LibraryVideo:
    """A library video as its upload callbacks last reported it."""

    video_no: str
    status: str
    client_id: str | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    """One evidence capture: the clip archived (`error` None) or why it was not."""

    stream: str
    task_id: str
    segment_index: int
    path: str
    size: int
    video_no: str | None
    error: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class ArchivedClip:
    """A clip in the evidence archive, as its retention needs it."""

    path: str
    created_at: float
    size: int


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one `prune` deleted."""

    segments: int
    failures: int
    orphans: int
    alerts: int


@dataclass(frozen=True, slots=True)
class BackupResult:
    """A backup written: where, of which schema, how large."""

    path: Path
    schema_version: int
    bytes: int
