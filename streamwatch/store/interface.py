"""The store as the rest of the daemon sees it: `StoreReader` (queries) and `StateStore`
(queries and writes), with the alert hook's view of a transaction (`AlertTx`) and the hook
itself (`AlertHook`, implemented by `streamwatch.alerts.Alerts`).

Backend-neutral. The contract every backend keeps:
- A write returns once it is durably committed; what it records and the alerts it raises
  (through the hook, in the same transaction) commit together or not at all.
- A read sees every write whose call has returned, and never waits for writes under way.
  The two reads that lead to writes (`due_alerts`, `evidence_rows`) are ordered with the
  writes instead, as a claim is: they are the writer's.
- A read-only store (`StoreReader` alone) never migrates, writes or creates anything.

The hook is synchronous: it decides inside the transaction, reading and writing the rule
state through `AlertTx`. The SQLite backend runs it in its writer's thread; an asynchronous
backend runs it where it can use a synchronous view of its transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol, Self

from streamwatch.intent import Intent
from streamwatch.mavi.callbacks import Callback
from streamwatch.store.types import (
    Adopted,
    ArchivedClip,
    CallbackOutcome,
    ChargeTotal,
    EventRow,
    EvidenceRecord,
    Halt,
    JSONObject,
    LibraryVideo,
    NewAlert,
    OrphanCharges,
    OrphanTotals,
    OutboxRow,
    Pruned,
    Registered,
    StreamRecord,
    StreamTotals,
    TaskRow,
)

__all__ = ["AlertHook", "AlertTx", "StateStore", "StoreReader"]


class AlertTx(Protocol):
    """The alert hook's view of the transaction that records what raises an alert: the rule
    state it reads and changes, and the outbox. Valid only inside that operation; `now` is
    when the recorded thing happened."""

    @property
    def now(self) -> float: ...

    def conditions(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[float | None, bool]]:
        """(last_sent, open) per (rule, subject) that has a row."""
        ...

    def windows(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, float]]:
        """(group, until) per (rule, sink) that has a window."""
        ...

    def save(
        self,
        *,
        conditions: Mapping[tuple[str, str], tuple[float | None, bool]],
        windows: Mapping[tuple[str, str], tuple[str, float]],
        alerts: list[NewAlert],
    ) -> None:
        """Write changed rule state and new outbox rows."""
        ...

    def streaks(self, stream: str) -> tuple[int, int]:
        """The stream's (unsafe, logo) segments in a row."""
        ...

    def set_streaks(self, stream: str, unsafe: int, logo: int) -> None: ...

    def is_latest_task(self, stream: str, task_id: str) -> bool:
        """Is `task_id` the stream's most recently started task?"""
        ...


class AlertHook(Protocol):
    """Decides the alerts of what the store records, inside the same operation. It may only
    compute and use the `AlertTx` (no event-loop objects)."""

    def callback(self, tx: AlertTx, outcome: CallbackOutcome) -> None:
        """A callback was stored (or is the first from an unknown task)."""
        ...

    def record(self, tx: AlertTx, event: EventRow) -> None:
        """An event was recorded."""
        ...

    def committed(self) -> None:
        """Called in the event loop after a commit that wrote outbox rows."""
        ...


class StoreReader(Protocol):
    """The queries: all a read-only open offers. Each returns what was committed when it
    began."""

    @property
    def schema_version(self) -> int: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    # tasks and callbacks
    async def running_tasks(self) -> list[TaskRow]: ...

    async def task(self, task_id: str) -> TaskRow | None: ...

    async def tasks(self, stream: str | None = None) -> list[TaskRow]: ...

    async def stream_totals(self) -> dict[str, StreamTotals]: ...

    async def segment_count(self, *, task_id: str | None = None) -> int: ...

    async def segment_indexes(self, task_id: str) -> list[int]: ...

    # start intents
    async def open_intents(self) -> list[Intent]: ...

    async def intent_states(self) -> dict[str, int]: ...

    # the ledger
    async def charge_totals(self, *, since: float, until: float) -> list[ChargeTotal]: ...

    async def orphan_summary(self) -> dict[str, int]: ...

    async def orphan_totals(self) -> OrphanTotals: ...

    async def orphan_charge_totals(self, *, since: float, until: float) -> OrphanCharges: ...

    # streams, events, account state
    async def streams(self) -> dict[str, StreamRecord]: ...

    async def flagged_tasks(self, kind: str) -> set[str]: ...

    async def events(self, *, stream: str | None = None, limit: int = 1000) -> list[EventRow]: ...

    async def load_halt(self) -> Halt | None: ...

    async def load_budget_fired(self) -> frozenset[str]: ...

    # the outbox
    async def next_alert_at(self) -> float | None: ...

    async def active_alerts(self, sink: str) -> dict[str, JSONObject]: ...

    async def alert_counts(self) -> dict[str, int]: ...

    async def recent_alerts(self, *, limit: int = 50) -> list[OutboxRow]: ...

    # videos and evidence
    async def library_videos(self) -> list[LibraryVideo]: ...

    async def evidence(self) -> list[EvidenceRecord]: ...


class StateStore(StoreReader, Protocol):
    """The daemon's store: the queries, and every write."""

    def set_alert_hook(self, hook: AlertHook | None) -> None: ...

    async def check_writable(self) -> None: ...

    # tasks and callbacks
    async def apply_callback(
        self, callback: Callback, *, body: bytes | str, received_at: float | None = None
    ) -> CallbackOutcome: ...

    async def mark_stop_requested(self, task_id: str) -> None: ...

    async def record_task_ended(
        self, task_id: str, *, status: int | None, reason: str, at: float | None = None
    ) -> bool: ...

    # start intents, adoption, orphans
    async def record_task_started(
        self,
        *,
        task_id: str,
        stream: str,
        spec_hash: str,
        fps: int,
        content_moderation: bool,
        logo_detection: bool,
        max_logos: int,
        started_at: float,
        attempt_id: str | None = None,
    ) -> Registered: ...

    async def begin_start(self, intent: Intent) -> Adopted | None: ...

    async def close_intent(
        self, attempt_id: str, *, state: str, detail: str = "", at: float | None = None
    ) -> bool: ...

    async def adopt(self, attempt_id: str, *, at: float | None = None) -> Adopted | None: ...

    async def claim_orphan_stop(self, task_id: str) -> bool: ...

    async def record_orphan_stopped(
        self, task_id: str, *, detail: str, at: float | None = None
    ) -> None: ...

    # streams, events, account state
    async def save_streams(self, records: Iterable[StreamRecord]) -> None: ...

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
    ) -> None: ...

    async def save_halt(self, halt: Halt | None) -> None: ...

    async def save_budget_fired(self, fired: Collection[str]) -> None: ...

    # the outbox
    async def due_alerts(self, now: float, *, limit: int = 500) -> list[OutboxRow]:
        """Claimed by the delivery worker: ordered with the writes settling deliveries."""
        ...

    async def enqueue_alerts(self, alerts: list[NewAlert]) -> None: ...

    async def settle_alerts(
        self,
        ids: list[int],
        *,
        state: str,
        next_at: float | None = None,
        error: str | None = None,
        active: tuple[str, Mapping[str, Mapping[str, object] | None]] | None = None,
    ) -> None: ...

    async def with_alert_tx(
        self, fn: Callable[[AlertTx], None], *, now: float | None = None
    ) -> bool: ...

    # videos and evidence
    async def record_library_video(
        self, video_no: str, status: str, client_id: str | None, *, at: float | None = None
    ) -> bool: ...

    async def record_evidence(
        self,
        *,
        stream: str,
        task_id: str,
        segment_index: int,
        path: str,
        size: int,
        video_no: str | None = None,
        error: str | None = None,
    ) -> None: ...

    async def evidence_rows(self) -> list[ArchivedClip]:
        """The archive's working set: ordered with the writes recording clips."""
        ...

    async def forget_evidence(self, paths: list[str]) -> None: ...

    # retention
    async def prune(
        self, before: float, *, chunk: int = 2000, stop: Callable[[], bool] = ...
    ) -> Pruned: ...
