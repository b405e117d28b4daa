"""Durable state in one SQLite file (WAL): tasks, segments, events, orphans, settings, alerts.

Every operation goes through one writer: operations queued while a commit is in progress run
together in the next transaction, so a burst of callbacks costs one fsync, not one each. Each
operation runs in its own savepoint, so one failing operation does not fail its batch-mates.
A coroutine awaiting an operation resumes only after the transaction holding it committed.
Operations run in one thread of their own, one after another.

MAVI has no list endpoint, so the `tasks` table is the registry of what this daemon started.

Alerts are decided inside the operation that records what raises them (`AlertHook`): a stored
segment or callback, or a recorded event, commits together with its outbox rows and the rule
state (cooldowns, open conditions, grouping windows, streaks) they read and change.

Callbacks from tasks this daemon did not start (orphans) are counted per task in
`orphan_tasks`; only the first `ORPHAN_BODIES_PER_TASK` bodies of each, of at most
`ORPHAN_BODY_MAX_BYTES`, and at most `ORPHAN_BODIES_MAX` in all, are kept. What they cost is
estimated from what they show (`streamwatch.intent.price_orphan`) into `orphan_charges`, apart
from the confirmed `charges`.

Every start is written as an intent (`start_intents`) before MAVI is called. The answer's
task closes it in the transaction that records the task; an intent left open may be closed by
adopting the unknown task whose callbacks match it (`adopt`): the task is recorded with the
intent's parameters, its parked callbacks are claimed like live ones, and its estimated
orphan charges are replaced by the exact ones, in one transaction. An orphan is reported (an
`orphan_task` event) once no open intent may claim it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import structlog

from streamwatch.intent import (
    Candidate,
    Intent,
    OrphanPricer,
    Pricer,
    Shape,
    assign,
    owner,
    shape_of,
)
from streamwatch.mavi.callbacks import (
    Callback,
    CallbackError,
    SegmentFailed,
    SegmentReport,
    StreamEnded,
    decode_body,
    parse_callback,
)
from streamwatch.pricing import segment_cost_ticks

__all__ = [
    "ORPHAN_BODIES_MAX",
    "ORPHAN_BODIES_PER_TASK",
    "ORPHAN_BODY_MAX_BYTES",
    "Adopted",
    "AlertHook",
    "AlertTx",
    "CallbackOutcome",
    "ChargeTotal",
    "EventRow",
    "NewAlert",
    "OrphanCharges",
    "OrphanTotals",
    "OutboxRow",
    "Registered",
    "SchemaError",
    "Store",
    "StoreError",
    "StreamRecord",
    "StreamTotals",
    "TaskRow",
    "check_state_file",
]

log = structlog.get_logger("streamwatch.store")
T = TypeVar("T")

# What is kept of callbacks from tasks this daemon did not start: every one is counted, the
# first few bodies (small ones) are kept to claim early callbacks of a task being registered
# and to show what the stranger sends.
ORPHAN_BODIES_PER_TASK = 5
ORPHAN_BODY_MAX_BYTES = 8 * 1024
ORPHAN_BODIES_MAX = 10_000

# Each entry moves the schema from version i to i+1. Never edit a released entry: add one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE streams (
        name        TEXT PRIMARY KEY,
        held_reason TEXT,
        held_at     REAL
    );
    CREATE TABLE tasks (
        task_id            TEXT PRIMARY KEY,
        stream             TEXT NOT NULL,
        spec_hash          TEXT NOT NULL,
        fps                INTEGER NOT NULL,
        content_moderation INTEGER NOT NULL,
        logo_detection     INTEGER NOT NULL,
        max_logos          INTEGER NOT NULL,
        started_at         REAL NOT NULL,
        stop_requested     INTEGER NOT NULL DEFAULT 0,
        ended_at           REAL,
        end_status         INTEGER,
        end_reason         TEXT,
        last_callback_at   REAL,
        segments           INTEGER NOT NULL DEFAULT 0,
        unsafe_segments    INTEGER NOT NULL DEFAULT 0,
        logo_segments      INTEGER NOT NULL DEFAULT 0,
        failed_segments    INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tasks_by_stream ON tasks (stream, started_at);
    CREATE INDEX tasks_running ON tasks (stream) WHERE ended_at IS NULL;
    CREATE TABLE segments (
        task_id       TEXT NOT NULL,
        segment_index INTEGER NOT NULL,
        stream        TEXT NOT NULL,
        received_at   REAL NOT NULL,
        start_time    REAL,
        end_time      REAL,
        unsafe        INTEGER,
        has_logo      INTEGER,
        logos         TEXT,
        frames        INTEGER,
        processing_ms REAL,
        tokens        TEXT,
        video_url     TEXT,
        PRIMARY KEY (task_id, segment_index)
    ) WITHOUT ROWID;
    CREATE INDEX segments_by_stream ON segments (stream, received_at);
    CREATE TABLE segment_failures (
        id          INTEGER PRIMARY KEY,
        task_id     TEXT NOT NULL,
        stream      TEXT NOT NULL,
        status      INTEGER NOT NULL,
        message     TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE orphan_callbacks (
        id            INTEGER PRIMARY KEY,
        task_id       TEXT NOT NULL,
        segment_index INTEGER,
        status        INTEGER NOT NULL,
        received_at   REAL NOT NULL,
        body          TEXT NOT NULL
    );
    CREATE UNIQUE INDEX orphans_dedupe ON orphan_callbacks (task_id, segment_index)
        WHERE segment_index IS NOT NULL;
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        stream  TEXT,
        task_id TEXT,
        kind    TEXT NOT NULL,
        status  INTEGER,
        detail  TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_by_stream ON events (stream, at);
    """,
    # 2: the cost ledger. Every charge MAVI makes, in ticks of 1/2880 USD, written in the same
    # transaction as the start or segment it pays for.
    """
    ALTER TABLE tasks ADD COLUMN segment_ticks INTEGER NOT NULL DEFAULT 0;
    UPDATE tasks SET segment_ticks =
        (CASE WHEN content_moderation AND logo_detection THEN 4 ELSE 3 END) * (fps + 1);
    CREATE TABLE charges (
        id            INTEGER PRIMARY KEY,
        at            REAL NOT NULL,
        stream        TEXT NOT NULL,
        task_id       TEXT NOT NULL,
        kind          TEXT NOT NULL,
        segment_index INTEGER,
        ticks         INTEGER NOT NULL
    );
    CREATE INDEX charges_by_time ON charges (at);
    CREATE INDEX charges_by_stream ON charges (stream, at);
    INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)
        SELECT started_at, stream, task_id, 'precharge', NULL, segment_ticks FROM tasks;
    INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)
        SELECT s.received_at, s.stream, s.task_id, 'segment', s.segment_index, t.segment_ticks
        FROM segments s JOIN tasks t ON t.task_id = s.task_id;
    """,
    # 3: the alert outbox. An alert is here before any delivery is tried; `alert_id` is stable
    # across redeliveries so receivers can deduplicate.
    """
    CREATE TABLE alert_outbox (
        id           INTEGER PRIMARY KEY,
        alert_id     TEXT NOT NULL UNIQUE,
        sink         TEXT NOT NULL,
        rule         TEXT NOT NULL,
        grp          TEXT NOT NULL,
        event        TEXT NOT NULL,
        state        TEXT NOT NULL DEFAULT 'pending',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      REAL NOT NULL,
        last_error   TEXT,
        created_at   REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (state, next_at);
    """,
    # 4: library videos as their upload callbacks report them.
    """
    CREATE TABLE library_videos (
        video_no   TEXT PRIMARY KEY,
        status     TEXT NOT NULL,
        client_id  TEXT,
        updated_at REAL NOT NULL
    );
    """,
    # 5: the evidence archive's clips.
    """
    CREATE TABLE evidence (
        id            INTEGER PRIMARY KEY,
        stream        TEXT NOT NULL,
        task_id       TEXT NOT NULL,
        segment_index INTEGER NOT NULL,
        path          TEXT NOT NULL,
        size          INTEGER NOT NULL,
        video_no      TEXT,
        error         TEXT,
        created_at    REAL NOT NULL
    );
    CREATE INDEX evidence_by_age ON evidence (created_at);
    """,
    # 6: segment retention. The highest segment index pruned from each task: a redelivery of a
    # pruned segment is a duplicate, never stored or charged again.
    """
    ALTER TABLE tasks ADD COLUMN pruned_through INTEGER;
    """,
    # 7: alert rule state, kept with what raises alerts so that it survives restarts: per rule
    # and subject the last firing sent and whether it is open, per rule and sink the grouping
    # window, per stream the unsafe and logo streaks (a row only while one is non-zero).
    # Orphan tasks are counted here; only the first few small bodies of each are kept.
    """
    CREATE TABLE alert_conditions (
        rule      TEXT NOT NULL,
        subject   TEXT NOT NULL,
        last_sent REAL,
        open      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rule, subject)
    ) WITHOUT ROWID;
    CREATE TABLE alert_windows (
        rule  TEXT NOT NULL,
        sink  TEXT NOT NULL,
        grp   TEXT NOT NULL,
        until REAL NOT NULL,
        PRIMARY KEY (rule, sink)
    ) WITHOUT ROWID;
    CREATE TABLE alert_streaks (
        stream TEXT PRIMARY KEY,
        unsafe INTEGER NOT NULL DEFAULT 0,
        logo   INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE orphan_tasks (
        task_id   TEXT PRIMARY KEY,
        first_at  REAL NOT NULL,
        last_at   REAL NOT NULL,
        callbacks INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    INSERT INTO orphan_tasks (task_id, first_at, last_at, callbacks)
        SELECT task_id, min(received_at), max(received_at), count(*)
        FROM orphan_callbacks GROUP BY task_id;
    DELETE FROM orphan_callbacks WHERE length(CAST(body AS BLOB)) > 8192 OR id IN (
        SELECT id FROM (
            SELECT id, row_number() OVER (PARTITION BY task_id ORDER BY id) AS n
            FROM orphan_callbacks
        ) WHERE n > 5
    );
    """,
    # 8: what must outlive the process. Per stream, the supervisor's memory of it: the restart
    # backoff (attempts, next retry), how its last task ended and why it does not run, and
    # its recent restarts (restart-loop detection); existing streams take their last task's
    # end. Events by task, so that per-task flags (`billing_unreported`) are found after a
    # restart. Per Alertmanager sink, the lasting conditions it re-posts (as posted).
    """
    ALTER TABLE streams ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE streams ADD COLUMN retry_at REAL;
    ALTER TABLE streams ADD COLUMN last_end_status INTEGER;
    ALTER TABLE streams ADD COLUMN last_error TEXT;
    ALTER TABLE streams ADD COLUMN restart_times TEXT NOT NULL DEFAULT '[]';
    INSERT INTO streams (name) SELECT DISTINCT stream FROM tasks WHERE true
        ON CONFLICT(name) DO NOTHING;
    UPDATE streams SET last_end_status = (
        SELECT end_status FROM tasks WHERE tasks.stream = streams.name
        ORDER BY started_at DESC, rowid DESC LIMIT 1
    );
    CREATE INDEX events_by_task ON events (task_id, kind) WHERE task_id IS NOT NULL;
    CREATE TABLE alert_active (
        sink    TEXT NOT NULL,
        subject TEXT NOT NULL,
        posted  TEXT NOT NULL,
        PRIMARY KEY (sink, subject)
    ) WITHOUT ROWID;
    """,
    # 9: start intents, written before each start call and closed by its answer, a refusal,
    # the adoption of the unknown task that matches it, or none matching in time (state:
    # open, started, failed, adopted, unmatched). Orphan tasks: what their callbacks show
    # (features, fps, NULL until a segment shows them) and their estimated charges, one row
    # per segment (-1: the pre-charge), apart from the confirmed ledger.
    """
    CREATE TABLE start_intents (
        attempt_id         TEXT PRIMARY KEY,
        stream             TEXT NOT NULL,
        url_hash           TEXT NOT NULL,
        spec_hash          TEXT NOT NULL,
        fps                INTEGER NOT NULL,
        content_moderation INTEGER NOT NULL,
        logo_detection     INTEGER NOT NULL,
        max_logos          INTEGER NOT NULL,
        created_at         REAL NOT NULL,
        state              TEXT NOT NULL DEFAULT 'open',
        task_id            TEXT,
        closed_at          REAL,
        detail             TEXT
    );
    CREATE INDEX start_intents_open ON start_intents (stream, created_at) WHERE state = 'open';
    CREATE TABLE orphan_charges (
        task_id       TEXT NOT NULL,
        segment_index INTEGER NOT NULL,
        at            REAL NOT NULL,
        ticks         INTEGER NOT NULL,
        uncertain     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, segment_index)
    ) WITHOUT ROWID;
    CREATE INDEX orphan_charges_by_time ON orphan_charges (at);
    ALTER TABLE orphan_tasks ADD COLUMN segments INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE orphan_tasks ADD COLUMN content_moderation INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN logo_detection INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN fps INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN uncertain INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE orphan_tasks ADD COLUMN reported INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE orphan_tasks ADD COLUMN end_status INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN stopped_at REAL;
    CREATE INDEX orphan_tasks_by_first ON orphan_tasks (first_at);
    CREATE INDEX orphan_tasks_unreported ON orphan_tasks (task_id) WHERE reported = 0;
    """,
)


class StoreError(Exception):
    """The store could not do what was asked; the message says what to check."""


class SchemaError(StoreError):
    """The state file's schema is newer than this version of streamwatch understands."""


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
    event: Mapping[str, Any]
    send_after: float


class AlertTx:
    """The alert hook's view of the transaction that records what raises an alert: the rule
    state it reads and changes, and the outbox. Valid only inside that operation (the store's
    thread); `now` is when the recorded thing happened."""

    def __init__(self, conn: sqlite3.Connection, now: float, store: Store) -> None:
        self._conn = conn
        self.now = now
        self._store = store
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
            _insert_alerts(self._conn, alerts, self.now)
            self.wrote = self._store._alerts_written = True

    def streaks(self, stream: str) -> tuple[int, int]:
        """The stream's (unsafe, logo) segments in a row."""
        row = self._conn.execute(
            "SELECT unsafe, logo FROM alert_streaks WHERE stream = ?", (stream,)
        ).fetchone()
        return (row[0], row[1]) if row is not None else (0, 0)

    def set_streaks(self, stream: str, unsafe: int, logo: int) -> None:
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


class AlertHook(Protocol):
    """Decides the alerts of what the store records, inside the same operation. Runs in the
    store's thread: it may only compute and use the `AlertTx` (no event-loop objects)."""

    def callback(self, tx: AlertTx, outcome: CallbackOutcome) -> None:
        """A callback was stored (or is the first from an unknown task)."""

    def record(self, tx: AlertTx, event: EventRow) -> None:
        """An event was recorded."""

    def committed(self) -> None:
        """Called in the event loop after a commit that wrote outbox rows."""


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """What the supervisor keeps of a stream between processes: why it is held, its restart
    backoff (consecutive failures, next retry), how its last task ended, the last error, and
    the times of its recent restarts."""

    name: str
    held_reason: str | None = None
    failures: int = 0
    retry_at: float | None = None
    last_end_status: int | None = None
    last_error: str | None = None
    restart_times: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One alert for one sink, as kept in the outbox."""

    id: int
    alert_id: str
    sink: str
    rule: str
    group: str
    event: dict[str, Any]
    state: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: float
    delivered_at: float | None


@dataclass(frozen=True, slots=True)
class Registered:
    """A task just recorded: its pre-charge, the early callbacks it claimed, in order, and
    the orphan estimates (at, ticks) their exact charges replaced."""

    precharge_ticks: int
    claimed: list[CallbackOutcome]
    orphan_removed: list[tuple[float, int]] = field(default_factory=list)


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


@dataclass(frozen=True, slots=True)
class ChargeTotal:
    """Charges over a time range for one stream."""

    stream: str
    precharges: int
    segments: int
    ticks: int


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
class EventRow:
    """One recorded stream or account event."""

    at: float
    stream: str | None
    task_id: str | None
    kind: str
    status: int | None
    detail: str


_Op = Callable[[sqlite3.Connection], Any]


class Store:
    """The daemon's SQLite store. Use `async with Store(path) as store:`."""

    def __init__(
        self,
        path: Path,
        *,
        batch_max: int = 512,
        clock: Callable[[], float] = time.time,
        precharge_covers_first_segment: bool = False,
        on_commit: Callable[[float, int], None] | None = None,
        orphan_pricer: Pricer | None = None,
    ) -> None:
        """`orphan_pricer` prices the segments of unknown tasks (default: as if no stream
        were configured)."""
        self.path = path
        self._on_commit = on_commit  # (seconds, operations) after each commit
        # How to read MAVI's pre-charge (undocumented): as its own charge (False, the
        # conservative default) or as payment for the task's first processed segment.
        self._first_free = precharge_covers_first_segment
        self._batch_max = batch_max
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[tuple[_Op, asyncio.Future[Any]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        # One thread runs every operation: SQLite's allocations stay in one malloc arena
        # instead of one per thread of the default pool (which kept RSS high after bursts).
        self._thread: ThreadPoolExecutor | None = None
        self._hook: AlertHook | None = None
        self._pricer: Pricer = orphan_pricer or OrphanPricer()
        self._open: list[Intent] | None = None  # open intents, see _intents()
        self._alerts_written = False  # set by AlertTx in the store thread, read after commit
        self.commits = 0  # transactions committed, for tests and benchmarks

    def set_alert_hook(self, hook: AlertHook | None) -> None:
        """Route alerts with `hook` inside the operations that record callbacks and events."""
        self._hook = hook

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open (creating if needed) the file, migrate it, and start the writer."""
        self._open = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamwatch-store")
        try:
            self._conn = await self._in_thread(self._connect)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def close(self) -> None:
        """Finish every queued operation, then close the file."""
        if self._writer is not None:
            await self._queue.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._in_thread(conn.close)
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None

    def _connect(self) -> sqlite3.Connection:
        if self.path.parent and not self.path.parent.exists():
            raise StoreError(f"the directory for the state file does not exist: {self.path.parent}")
        try:
            _owner_only(self.path)
        except OSError as exc:
            raise StoreError(f"cannot open the state file {self.path}: {exc.strerror}") from None
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30
            )
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before any callback in it is acknowledged.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state file {self.path}: {exc}") from None
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise SchemaError(
                f"{self.path} has schema version {version}, newer than this streamwatch "
                f"understands ({len(MIGRATIONS)}); upgrade streamwatch or restore a backup"
            )
        for target in range(version + 1, len(MIGRATIONS) + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(MIGRATIONS[target - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("store.migrated", path=str(self.path), version=target)

    @property
    def schema_version(self) -> int:
        return len(MIGRATIONS)

    # -- the writer -------------------------------------------------------------------------

    async def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreError("the store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future))
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            self._alerts_written = False
            try:
                results = await self._in_thread(self._run_batch, [op for op, _ in batch])
                if self._on_commit is not None:
                    self._on_commit(time.perf_counter() - started, len(batch))
                if self._alerts_written and self._hook is not None:
                    self._hook.committed()
            except Exception as exc:  # noqa: BLE001 - the commit failed: nothing in the batch is stored
                log.error("store.commit_failed", error=str(exc), batch=len(batch))
                results = [StoreError(f"could not commit to {self.path}: {exc}")] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                self._queue.task_done()

    def _run_batch(self, ops: list[_Op]) -> list[Any]:
        conn = self._conn
        assert conn is not None
        results: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    results.append(op(conn))
                    conn.execute("RELEASE op")
                except Exception as exc:  # noqa: BLE001 - one bad op must not fail its batch-mates
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    self._open = None  # it may have changed intents it has rolled back
                    results.append(exc)
            conn.execute("COMMIT")
        except BaseException:
            self._open = None
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    # -- callbacks ----------------------------------------------------------------------------

    async def apply_callback(
        self, callback: Callback, *, body: bytes | str, received_at: float | None = None
    ) -> CallbackOutcome:
        """Store one parsed callback (and the alerts it raises); returns once committed.
        `body` is what was parsed (kept only for orphans)."""
        at = self._clock() if received_at is None else received_at
        text = body if isinstance(body, str) else decode_body(body)
        return await self._run(lambda c: self._apply(c, callback, text, at))

    def _apply(
        self, conn: sqlite3.Connection, cb: Callback, body: str, at: float
    ) -> CallbackOutcome:
        outcome = _apply(conn, cb, body, at, self._first_free)
        if outcome is None:
            return self._orphan(conn, cb, body, at)
        hook = self._hook
        if hook is not None and outcome.kind == "stored":
            hook.callback(AlertTx(conn, at, self), outcome)
        return outcome

    def _orphan(
        self, conn: sqlite3.Connection, cb: Callback, body: str, at: float
    ) -> CallbackOutcome:
        """Count a callback from an unknown task, estimate what it costs, keep its body if it
        is among the first few, and report the task once no open intent may claim it."""
        index = cb.segment_index if isinstance(cb, SegmentReport) else None
        seen = shape_of(cb) if isinstance(cb, SegmentReport) else None
        price = self._pricer(seen)
        if index is not None and (
            # Its estimate doubles as the dedupe record of an orphan segment (the kept bodies
            # are one too, for orphans counted before estimates were).
            conn.execute(
                "INSERT OR IGNORE INTO orphan_charges (task_id, segment_index, at, ticks,"
                " uncertain) VALUES (?,?,?,?,?)",
                (cb.task_id, index, at, price.ticks, price.uncertain),
            ).rowcount
            == 0
            or conn.execute(
                "SELECT 1 FROM orphan_callbacks WHERE task_id = ? AND segment_index = ?",
                (cb.task_id, index),
            ).fetchone()
        ):
            return CallbackOutcome("duplicate", None, cb)
        ended = cb.status if isinstance(cb, StreamEnded) else None
        # One statement counts the callback, notes what it shows (the shape, from the first
        # segment that shows one) and returns what the rest needs.
        row = conn.execute(
            "UPDATE orphan_tasks SET callbacks = callbacks + 1, last_at = max(last_at, ?),"
            " segments = segments + ?, uncertain = max(uncertain, ?),"
            " end_status = coalesce(end_status, ?),"
            " logo_detection = CASE WHEN content_moderation IS NULL THEN ? ELSE logo_detection END,"
            " fps = CASE WHEN content_moderation IS NULL THEN ? ELSE fps END,"
            " content_moderation = coalesce(content_moderation, ?)"
            " WHERE task_id = ? RETURNING callbacks, segments, first_at, content_moderation,"
            " logo_detection, fps, end_status, stopped_at",
            (
                at,
                int(ended is None),
                price.uncertain,
                ended,
                None if seen is None else seen.logo_detection,
                None if seen is None else seen.fps,
                None if seen is None else seen.content_moderation,
                cb.task_id,
            ),
        ).fetchone()
        first = row is None
        ticks = 0
        if first:
            shape = (
                (None, None, None)
                if seen is None
                else (
                    seen.content_moderation,
                    seen.logo_detection,
                    seen.fps,
                )
            )
            row = conn.execute(
                "INSERT INTO orphan_tasks (task_id, first_at, last_at, callbacks, segments,"
                " uncertain, end_status, content_moderation, logo_detection, fps, reported)"
                " VALUES (?,?,?,1,?,?,?,?,?,?,0) RETURNING callbacks, segments, first_at,"
                " content_moderation, logo_detection, fps, end_status, stopped_at",
                (cb.task_id, at, at, int(ended is None), price.uncertain, ended, *shape),
            ).fetchone()
            # MAVI pre-charged the task when it started: estimated once, at its first sign.
            conn.execute(
                "INSERT INTO orphan_charges (task_id, segment_index, at, ticks, uncertain)"
                " VALUES (?,-1,?,?,?)",
                (cb.task_id, at, price.ticks, price.uncertain),
            )
            ticks += price.ticks
        seen_before, segments = row[0], row[1]
        if isinstance(cb, SegmentReport):
            ticks += price.ticks
            if self._first_free and segments == 1:  # the pre-charge paid for it
                conn.execute(
                    "UPDATE orphan_charges SET ticks = 0 WHERE task_id = ? AND segment_index = ?",
                    (cb.task_id, index),
                )
                ticks -= price.ticks
        if (
            seen_before <= ORPHAN_BODIES_PER_TASK
            and len(body) <= ORPHAN_BODY_MAX_BYTES
            and len(body.encode()) <= ORPHAN_BODY_MAX_BYTES
            and conn.execute("SELECT count(*) FROM orphan_callbacks").fetchone()[0]
            < ORPHAN_BODIES_MAX
        ):
            status = 0 if isinstance(cb, SegmentReport) else cb.status
            conn.execute(
                "INSERT INTO orphan_callbacks (task_id, segment_index, status, received_at, body)"
                " VALUES (?,?,?,?,?)",
                (cb.task_id, index, status, at, body),
            )
        candidate = _as_candidate(cb.task_id, row[2:])
        claimant = owner(self._intents(conn), candidate) if candidate is not None else None
        if first and claimant is None:
            self._report_orphans(conn, at, only=cb.task_id)
        return CallbackOutcome(
            "orphan",
            None,
            cb,
            ticks=ticks,
            at=at,
            first_from_task=first,
            orphan_segments=segments,
            segment_ticks=price.ticks,
            candidate_for=claimant.attempt_id if claimant is not None else None,
        )

    def _candidate(self, conn: sqlite3.Connection, task_id: str) -> Candidate | None:
        """The orphan as a candidate for adoption: None until a segment has shown its shape,
        and once it has ended or been stopped."""
        row = conn.execute(
            "SELECT first_at, content_moderation, logo_detection, fps, end_status, stopped_at"
            " FROM orphan_tasks WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        return None if row is None else _as_candidate(task_id, row)

    def _close_intent(
        self,
        conn: sqlite3.Connection,
        attempt_id: str,
        state: str,
        at: float,
        *,
        task_id: str | None = None,
        detail: str = "",
    ) -> bool:
        cur = conn.execute(
            "UPDATE start_intents SET state = ?, closed_at = ?, task_id = ?, detail = ?"
            " WHERE attempt_id = ? AND state = 'open'",
            (state, at, task_id, detail[:500] or None, attempt_id),
        )
        self._open = None
        return cur.rowcount == 1

    def _intents(self, conn: sqlite3.Connection) -> list[Intent]:
        """The open intents, cached between the operations that change them (every such
        operation runs in this thread and drops the cache, as does a failed commit)."""
        if self._open is None:
            self._open = _open_intents(conn)
        return self._open

    def _report_orphans(
        self, conn: sqlite3.Connection, at: float, *, only: str | None = None
    ) -> None:
        """Record `orphan_task` (and its alert) for each orphan not yet reported that no open
        intent may claim any more."""
        where, args = ("AND task_id = ?", (only,)) if only else ("", ())
        pending = [
            r[0]
            for r in conn.execute(
                f"SELECT task_id FROM orphan_tasks WHERE reported = 0 {where}", args
            ).fetchall()
        ]
        if not pending:
            return
        intents = self._intents(conn)
        for task_id in pending:
            candidate = self._candidate(conn, task_id)
            if candidate is not None and owner(intents, candidate) is not None:
                continue
            conn.execute("UPDATE orphan_tasks SET reported = 1 WHERE task_id = ?", (task_id,))
            self._event(
                conn,
                EventRow(
                    at,
                    None,
                    task_id,
                    "orphan_task",
                    None,
                    f"task {task_id} sends callbacks but was not started by this daemon",
                ),
            )

    def _event(self, conn: sqlite3.Connection, row: EventRow) -> None:
        """Insert an event, with the alerts it raises."""
        conn.execute(
            "INSERT INTO events (at, stream, task_id, kind, status, detail) VALUES (?,?,?,?,?,?)",
            (row.at, row.stream, row.task_id, row.kind, row.status, row.detail),
        )
        if self._hook is not None:
            self._hook.record(AlertTx(conn, row.at, self), row)

    async def with_alert_tx(
        self, fn: Callable[[AlertTx], None], *, now: float | None = None
    ) -> bool:
        """Run `fn` in an operation of its own (to route an event no record raised). True if
        it wrote outbox rows."""
        when = self._clock() if now is None else now

        def op(conn: sqlite3.Connection) -> bool:
            tx = AlertTx(conn, when, self)
            fn(tx)
            return tx.wrote

        return await self._run(op)

    # -- tasks --------------------------------------------------------------------------------

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
    ) -> Registered:
        """Register a task MAVI just started with its pre-charge, close the start's intent
        (`attempt_id`), and claim callbacks that arrived before it was registered (they were
        parked as orphans; their estimated charges give way to exact ones)."""
        ticks = segment_cost_ticks(
            fps=fps, content_moderation=content_moderation, logo_detection=logo_detection
        )

        def op(conn: sqlite3.Connection) -> Registered:
            conn.execute(
                "INSERT INTO tasks (task_id, stream, spec_hash, fps, content_moderation,"
                " logo_detection, max_logos, started_at, segment_ticks)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    task_id,
                    stream,
                    spec_hash,
                    fps,
                    content_moderation,
                    logo_detection,
                    max_logos,
                    started_at,
                    ticks,
                ),
            )
            conn.execute(
                "INSERT INTO charges (at, stream, task_id, kind, ticks)"
                " VALUES (?, ?, ?, 'precharge', ?)",
                (started_at, stream, task_id, ticks),
            )
            removed, claimed = self._claim(conn, task_id)
            if attempt_id is not None:
                self._close_intent(conn, attempt_id, "started", started_at, task_id=task_id)
                self._report_orphans(conn, started_at)
            return Registered(ticks, claimed, [(at, t) for _, at, t in removed])

        return await self._run(op)

    def _claim(
        self, conn: sqlite3.Connection, task_id: str
    ) -> tuple[list[tuple[int, float, int]], list[CallbackOutcome]]:
        """Take a just-recorded task's orphan past: drop its estimated charges (returned as
        (segment_index, at, ticks)) and store its parked callbacks as its own, in order."""
        removed = conn.execute(
            "DELETE FROM orphan_charges WHERE task_id = ? RETURNING segment_index, at, ticks",
            (task_id,),
        ).fetchall()
        rows = conn.execute(
            "SELECT body, received_at FROM orphan_callbacks WHERE task_id = ? ORDER BY id",
            (task_id,),
        ).fetchall()
        conn.execute("DELETE FROM orphan_callbacks WHERE task_id = ?", (task_id,))
        conn.execute("DELETE FROM orphan_tasks WHERE task_id = ?", (task_id,))
        claimed = []
        for body, received_at in rows:
            try:
                early = parse_callback(body)
            except CallbackError:
                continue  # kept by an older version that checked less: not claimable
            claimed.append(self._apply(conn, early, body, received_at))
        return sorted(removed), claimed

    # -- start intents ------------------------------------------------------------------------

    async def begin_start(self, intent: Intent) -> Adopted | None:
        """Write `intent` before its start call. An intent of the stream still open is
        settled first, in the same transaction: if an unknown task matches it, that task is
        adopted and returned (and no new intent is written: there is nothing to start);
        otherwise it is closed as unmatched."""

        def op(conn: sqlite3.Connection) -> Adopted | None:
            at = intent.created_at
            for old in [i for i in self._intents(conn) if i.stream == intent.stream]:
                adopted = self._try_adopt(conn, old, at)
                if adopted is not None:
                    return adopted
                self._close_intent(conn, old.attempt_id, "unmatched", at)
                self._event(
                    conn,
                    EventRow(
                        at,
                        old.stream,
                        None,
                        "intent_unmatched",
                        None,
                        "no task showed up for the start whose answer was lost: starting again",
                    ),
                )
            conn.execute(
                "INSERT INTO start_intents (attempt_id, stream, url_hash, spec_hash, fps,"
                " content_moderation, logo_detection, max_logos, created_at)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    intent.attempt_id,
                    intent.stream,
                    intent.url_hash,
                    intent.spec_hash,
                    intent.fps,
                    intent.content_moderation,
                    intent.logo_detection,
                    intent.max_logos,
                    intent.created_at,
                ),
            )
            self._open = None
            self._report_orphans(conn, at)
            return None

        return await self._run(op)

    async def close_intent(
        self, attempt_id: str, *, state: str, detail: str = "", at: float | None = None
    ) -> bool:
        """Close an open intent (`failed`: MAVI refused the start; `unmatched`: its stream
        is gone). True if it was open."""
        when = self._clock() if at is None else at

        def op(conn: sqlite3.Connection) -> bool:
            closed = self._close_intent(conn, attempt_id, state, when, detail=detail)
            if closed:
                self._report_orphans(conn, when)
            return closed

        return await self._run(op)

    async def open_intents(self) -> list[Intent]:
        """Intents still open, oldest first: starts whose answer was never recorded."""
        return await self._run(_open_intents)

    async def intent_states(self) -> dict[str, int]:
        """How many intents are in each state (open, started, failed, adopted, unmatched)."""
        return await self._run(
            lambda c: dict(c.execute("SELECT state, count(*) FROM start_intents GROUP BY state"))
        )

    async def adopt(self, attempt_id: str, *, at: float | None = None) -> Adopted | None:
        """Adopt the unknown task that matches the open intent `attempt_id` (see
        `streamwatch.intent.assign`), if there is one; None otherwise, or if it is closed."""
        when = self._clock() if at is None else at

        def op(conn: sqlite3.Connection) -> Adopted | None:
            intent = next((i for i in self._intents(conn) if i.attempt_id == attempt_id), None)
            return None if intent is None else self._try_adopt(conn, intent, when)

        return await self._run(op)

    def _try_adopt(self, conn: sqlite3.Connection, intent: Intent, at: float) -> Adopted | None:
        rows = conn.execute(
            "SELECT task_id FROM orphan_tasks WHERE first_at >= ?", (intent.created_at,)
        ).fetchall()
        candidates = [c for r in rows if (c := self._candidate(conn, r[0])) is not None]
        task_id = assign(self._intents(conn), candidates).get(intent.attempt_id)
        if task_id is None:
            return None
        return self._adopt(conn, intent, task_id, at)

    def _adopt(self, conn: sqlite3.Connection, intent: Intent, task_id: str, at: float) -> Adopted:
        ticks = segment_cost_ticks(
            fps=intent.fps,
            content_moderation=intent.content_moderation,
            logo_detection=intent.logo_detection,
        )
        conn.execute(
            "INSERT INTO tasks (task_id, stream, spec_hash, fps, content_moderation,"
            " logo_detection, max_logos, started_at, segment_ticks) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                task_id,
                intent.stream,
                intent.spec_hash,
                intent.fps,
                intent.content_moderation,
                intent.logo_detection,
                intent.max_logos,
                intent.created_at,
                ticks,
            ),
        )
        first_at = conn.execute(
            "SELECT first_at FROM orphan_tasks WHERE task_id = ?", (task_id,)
        ).fetchone()[0]
        removed, claimed = self._claim(conn, task_id)
        precharge_at = next((when for index, when, _ in removed if index == -1), first_at)
        conn.execute(
            "INSERT INTO charges (at, stream, task_id, kind, ticks) VALUES (?,?,?,'precharge',?)",
            (precharge_at, intent.stream, task_id, ticks),
        )
        # Segments counted while the task was unknown whose bodies were not kept: stored as
        # known to have been processed (nothing else is known of them) and charged exactly.
        backfilled = []
        for index, when, _ in removed:
            if index < 0:
                continue
            cur = conn.execute(
                "INSERT OR IGNORE INTO segments (task_id, segment_index, stream, received_at)"
                " VALUES (?,?,?,?)",
                (task_id, index, intent.stream, when),
            )
            if cur.rowcount == 0:
                continue  # claimed with its body
            (before,) = conn.execute(
                "UPDATE tasks SET segments = segments + 1,"
                " last_callback_at = max(coalesce(last_callback_at, 0), ?) WHERE task_id = ?"
                " RETURNING segments - 1",
                (when, task_id),
            ).fetchone()
            charge = 0 if self._first_free and before == 0 else ticks
            conn.execute(
                "INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)"
                " VALUES (?,?,?,'segment',?,?)",
                (when, intent.stream, task_id, index, charge),
            )
            backfilled.append((when, charge))
        self._close_intent(conn, intent.attempt_id, "adopted", at, task_id=task_id)
        self._event(
            conn,
            EventRow(
                at,
                intent.stream,
                task_id,
                "intent_adopted",
                None,
                f"the task MAVI started for the start whose answer was lost called back: adopted"
                f" with {len(removed) - 1} segment(s) so far",
            ),
        )
        self._report_orphans(conn, at)
        return Adopted(
            task_id=task_id,
            stream=intent.stream,
            spec_hash=intent.spec_hash,
            started_at=intent.created_at,
            precharge_ticks=ticks,
            precharge_at=precharge_at,
            claimed=claimed,
            backfilled=backfilled,
            orphan_removed=[(when, t) for _, when, t in removed],
        )

    # -- orphan tasks -------------------------------------------------------------------------

    async def claim_orphan_stop(self, task_id: str) -> bool:
        """May this daemon stop the orphan `task_id` now? Not once it has ended or been
        stopped, nor while an open intent may still adopt it."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM orphan_tasks WHERE task_id = ? AND end_status IS NULL"
                " AND stopped_at IS NULL",
                (task_id,),
            ).fetchone()
            if row is None:
                return False
            candidate = self._candidate(conn, task_id)
            return candidate is None or owner(self._intents(conn), candidate) is None

        return await self._run(op)

    async def record_orphan_stopped(
        self, task_id: str, *, detail: str, at: float | None = None
    ) -> None:
        """Note that this daemon stopped the orphan, with its `orphan_stopped` event."""
        when = self._clock() if at is None else at

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE orphan_tasks SET stopped_at = ? WHERE task_id = ?", (when, task_id)
            )
            self._event(conn, EventRow(when, None, task_id, "orphan_stopped", None, detail))

        await self._run(op)

    async def mark_stop_requested(self, task_id: str) -> None:
        """Note that this daemon asked MAVI to stop the task, before asking."""
        await self._run(
            lambda c: c.execute("UPDATE tasks SET stop_requested = 1 WHERE task_id = ?", (task_id,))
        )

    async def record_task_ended(
        self, task_id: str, *, status: int | None, reason: str, at: float | None = None
    ) -> bool:
        """Mark a task ended unless it already is. True if this call ended it."""
        when = self._clock() if at is None else at

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE tasks SET ended_at = ?, end_status = ?, end_reason = ?"
                " WHERE task_id = ? AND ended_at IS NULL",
                (when, status, reason, task_id),
            )
            return cur.rowcount == 1

        return await self._run(op)

    async def running_tasks(self) -> list[TaskRow]:
        """Tasks recorded as started and not ended: the ones to adopt after a restart."""
        return await self._run(
            lambda c: [
                _task_row(r)
                for r in c.execute(f"{_TASK_SELECT} WHERE ended_at IS NULL ORDER BY started_at")
            ]
        )

    async def task(self, task_id: str) -> TaskRow | None:
        def op(conn: sqlite3.Connection) -> TaskRow | None:
            row = conn.execute(f"{_TASK_SELECT} WHERE task_id = ?", (task_id,)).fetchone()
            return _task_row(row) if row else None

        return await self._run(op)

    async def tasks(self, stream: str | None = None) -> list[TaskRow]:
        where, args = ("WHERE stream = ?", (stream,)) if stream else ("", ())
        return await self._run(
            lambda c: [
                _task_row(r) for r in c.execute(f"{_TASK_SELECT} {where} ORDER BY started_at", args)
            ]
        )

    async def stream_totals(self) -> dict[str, StreamTotals]:
        """Per-stream counts, summed over tasks (cheap: no scan of the segments table)."""

        def op(conn: sqlite3.Connection) -> dict[str, StreamTotals]:
            rows = conn.execute(
                "SELECT stream, count(*), sum(segments), sum(unsafe_segments),"
                " sum(logo_segments), sum(failed_segments), max(last_callback_at)"
                " FROM tasks GROUP BY stream"
            )
            return {r[0]: StreamTotals(r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows}

        return await self._run(op)

    async def prune(
        self, before: float, *, chunk: int = 2000, stop: Callable[[], bool] = lambda: False
    ) -> Pruned:
        """Delete what is older than `before`: segment records, segment failures, orphan
        callbacks, and alerts already delivered or dead. Segments go a chunk per write, by
        stream (its index), so callbacks are stored in between, and `stop()` is asked between
        chunks (the rest waits for the next run). Task totals, charges and events stay:
        counters, costs and history do not change."""

        def segments(conn: sqlite3.Connection, stream: str) -> int:
            rows = conn.execute(
                "SELECT task_id, segment_index FROM segments"
                " WHERE stream = ? AND received_at < ? LIMIT ?",
                (stream, before, chunk),
            ).fetchall()
            conn.executemany("DELETE FROM segments WHERE task_id = ? AND segment_index = ?", rows)
            highest: dict[str, int] = {}
            for task_id, index in rows:
                highest[task_id] = max(index, highest.get(task_id, index))
            conn.executemany(
                "UPDATE tasks SET pruned_through = max(coalesce(pruned_through, -1), ?)"
                " WHERE task_id = ?",
                [(index, task_id) for task_id, index in highest.items()],
            )
            return len(rows)

        def rest(conn: sqlite3.Connection) -> tuple[int, int, int]:
            failures = conn.execute(
                "DELETE FROM segment_failures WHERE received_at < ?", (before,)
            ).rowcount
            orphans = conn.execute(
                "DELETE FROM orphan_callbacks WHERE received_at < ?", (before,)
            ).rowcount
            conn.execute("DELETE FROM orphan_tasks WHERE last_at < ?", (before,))
            alerts = conn.execute(
                "DELETE FROM alert_outbox WHERE state IN ('delivered', 'dead') AND created_at < ?",
                (before,),
            ).rowcount
            return failures, orphans, alerts

        streams = await self._run(
            lambda c: [r[0] for r in c.execute("SELECT DISTINCT stream FROM tasks")]
        )
        pruned = 0
        for stream in streams:
            while True:
                count = await self._run(functools.partial(segments, stream=stream))
                pruned += count
                if count < chunk:
                    break
                if stop():
                    return Pruned(pruned, 0, 0, 0)
        failures, orphans, alerts = await self._run(rest)
        return Pruned(pruned, failures, orphans, alerts)

    async def segment_count(self, *, task_id: str | None = None) -> int:
        where, args = ("WHERE task_id = ?", (task_id,)) if task_id else ("", ())
        return await self._run(
            lambda c: int(c.execute(f"SELECT count(*) FROM segments {where}", args).fetchone()[0])
        )

    async def segment_indexes(self, task_id: str) -> list[int]:
        return await self._run(
            lambda c: [
                r[0]
                for r in c.execute(
                    "SELECT segment_index FROM segments WHERE task_id = ? ORDER BY segment_index",
                    (task_id,),
                )
            ]
        )

    async def charge_totals(self, *, since: float, until: float) -> list[ChargeTotal]:
        """Charges with `since <= at < until`, per stream."""

        def op(conn: sqlite3.Connection) -> list[ChargeTotal]:
            rows = conn.execute(
                "SELECT stream, sum(kind = 'precharge'), sum(kind = 'segment'), sum(ticks)"
                " FROM charges WHERE at >= ? AND at < ? GROUP BY stream ORDER BY stream",
                (since, until),
            )
            return [ChargeTotal(*r) for r in rows]

        return await self._run(op)

    async def orphan_summary(self) -> dict[str, int]:
        """Callbacks per task id this daemon never started."""
        return await self._run(
            lambda c: dict(c.execute("SELECT task_id, callbacks FROM orphan_tasks"))
        )

    async def orphan_totals(self) -> OrphanTotals:
        """How many unknown tasks sent callbacks, and how many (without loading the ids)."""
        return await self._run(
            lambda c: OrphanTotals(
                *c.execute(
                    "SELECT count(*), coalesce(sum(callbacks), 0), coalesce(sum(uncertain), 0),"
                    " count(stopped_at), count(end_status) FROM orphan_tasks"
                ).fetchone()
            )
        )

    async def orphan_charge_totals(self, *, since: float, until: float) -> OrphanCharges:
        """Estimated charges of orphan tasks with `since <= at < until`."""
        return await self._run(
            lambda c: OrphanCharges(
                *c.execute(
                    "SELECT count(DISTINCT task_id), coalesce(sum(segment_index = -1), 0),"
                    " coalesce(sum(segment_index >= 0), 0), coalesce(sum(ticks), 0),"
                    " count(DISTINCT CASE WHEN uncertain THEN task_id END)"
                    " FROM orphan_charges WHERE at >= ? AND at < ?",
                    (since, until),
                ).fetchone()
            )
        )

    # -- streams, events, settings -----------------------------------------------------------

    async def save_streams(self, records: Iterable[StreamRecord]) -> None:
        """Write what the supervisor keeps of these streams between processes. A hold keeps
        the time it began."""
        when = self._clock()
        rows = [
            (
                r.name,
                r.held_reason,
                when if r.held_reason else None,
                r.failures,
                r.retry_at,
                r.last_end_status,
                r.last_error,
                json.dumps(list(r.restart_times)),
            )
            for r in records
        ]
        await self._run(
            lambda c: c.executemany(
                "INSERT INTO streams (name, held_reason, held_at, failures, retry_at,"
                " last_end_status, last_error, restart_times) VALUES (?,?,?,?,?,?,?,?)"
                " ON CONFLICT(name) DO UPDATE SET held_reason = excluded.held_reason,"
                " held_at = CASE WHEN excluded.held_reason IS NULL THEN NULL"
                " ELSE coalesce(streams.held_at, excluded.held_at) END,"
                " failures = excluded.failures, retry_at = excluded.retry_at,"
                " last_end_status = excluded.last_end_status, last_error = excluded.last_error,"
                " restart_times = excluded.restart_times",
                rows,
            )
        )

    async def streams(self) -> dict[str, StreamRecord]:
        """What the supervisor kept of each stream (see `save_streams`)."""
        return await self._run(
            lambda c: {
                r[0]: StreamRecord(r[0], r[1], r[2], r[3], r[4], r[5], tuple(json.loads(r[6])))
                for r in c.execute(
                    "SELECT name, held_reason, failures, retry_at, last_end_status, last_error,"
                    " restart_times FROM streams ORDER BY name"
                )
            }
        )

    async def flagged_tasks(self, kind: str) -> set[str]:
        """Tasks not ended that have an event of `kind` (a flag raised once per task)."""
        return await self._run(
            lambda c: {
                r[0]
                for r in c.execute(
                    "SELECT DISTINCT e.task_id FROM events e JOIN tasks t USING (task_id)"
                    " WHERE e.kind = ? AND t.ended_at IS NULL",
                    (kind,),
                )
            }
        )

    async def add_event(
        self,
        kind: str,
        *,
        stream: str | None = None,
        task_id: str | None = None,
        status: int | None = None,
        detail: str = "",
        at: float | None = None,
        setting: tuple[str, Any] | None = None,
    ) -> None:
        """Record an event (and, with an alert hook, the alerts it raises, in one commit).
        `setting` (a key and its JSON value, as `set_setting` takes) is written in the same
        commit: what says the event happened cannot be apart from it."""
        row = EventRow(self._clock() if at is None else at, stream, task_id, kind, status, detail)

        def op(conn: sqlite3.Connection) -> None:
            self._event(conn, row)
            if setting is not None:
                _set_setting(conn, *setting)

        await self._run(op)

    async def events(self, *, stream: str | None = None, limit: int = 1000) -> list[EventRow]:
        where, args = ("WHERE stream = ?", (stream,)) if stream else ("", ())

        def op(conn: sqlite3.Connection) -> list[EventRow]:
            rows = conn.execute(
                f"SELECT at, stream, task_id, kind, status, detail FROM events {where}"
                " ORDER BY id DESC LIMIT ?",
                (*args, limit),
            )
            return [EventRow(*r) for r in rows][::-1]

        return await self._run(op)

    async def get_setting(self, key: str) -> Any:
        def op(conn: sqlite3.Connection) -> Any:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return json.loads(row[0]) if row else None

        return await self._run(op)

    async def set_setting(self, key: str, value: Any) -> None:
        """Store a JSON value under key; None deletes it."""
        await self._run(lambda c: _set_setting(c, key, value))

    # -- the alert outbox ----------------------------------------------------------------------

    async def enqueue_alerts(
        self, alerts: list[tuple[str, str, str, str, dict[str, object], float]]
    ) -> None:
        """Add (alert_id, sink, rule, group, event, send_after) rows, committed on return."""
        now = self._clock()
        rows = [NewAlert(a, s, r, g, e, t) for a, s, r, g, e, t in alerts]
        await self._run(lambda c: _insert_alerts(c, rows, now))

    async def due_alerts(self, now: float, *, limit: int = 500) -> list[OutboxRow]:
        """Pending alerts whose time has come, oldest first."""
        return await self._run(
            lambda c: [
                _outbox_row(r)
                for r in c.execute(
                    f"{_OUTBOX_SELECT} WHERE state = 'pending' AND next_at <= ?"
                    " ORDER BY id LIMIT ?",
                    (now, limit),
                )
            ]
        )

    async def next_alert_at(self) -> float | None:
        """When the next pending alert falls due, if any is pending."""
        return await self._run(
            lambda c: c.execute(
                "SELECT min(next_at) FROM alert_outbox WHERE state = 'pending'"
            ).fetchone()[0]
        )

    async def settle_alerts(
        self,
        ids: list[int],
        *,
        state: str,
        next_at: float | None = None,
        error: str | None = None,
        active: tuple[str, Mapping[str, Mapping[str, Any] | None]] | None = None,
    ) -> None:
        """Record a delivery attempt for these rows: delivered, to retry at `next_at`, or dead.
        `active` (a sink and, per subject, the alert it keeps active or None) is written in
        the same commit (see `active_alerts`)."""
        now = self._clock()

        def op(conn: sqlite3.Connection) -> None:
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

        await self._run(op)

    async def active_alerts(self, sink: str) -> dict[str, dict[str, Any]]:
        """The lasting conditions a re-posting sink (Alertmanager) keeps active, by subject,
        as it posted them."""
        return await self._run(
            lambda c: {
                subject: json.loads(posted)
                for subject, posted in c.execute(
                    "SELECT subject, posted FROM alert_active WHERE sink = ? ORDER BY subject",
                    (sink,),
                )
            }
        )

    async def record_library_video(
        self, video_no: str, status: str, client_id: str | None, *, at: float | None = None
    ) -> bool:
        """Store a library video's reported status. True if it changed."""
        when = self._clock() if at is None else at

        def op(conn: sqlite3.Connection) -> bool:
            old = conn.execute(
                "SELECT status FROM library_videos WHERE video_no = ?", (video_no,)
            ).fetchone()
            conn.execute(
                "INSERT INTO library_videos (video_no, status, client_id, updated_at)"
                " VALUES (?,?,?,?) ON CONFLICT(video_no) DO UPDATE SET status = excluded.status,"
                " client_id = excluded.client_id, updated_at = excluded.updated_at",
                (video_no, status, client_id, when),
            )
            return old is None or old[0] != status

        return await self._run(op)

    async def library_videos(self) -> dict[str, str]:
        return await self._run(
            lambda c: dict(c.execute("SELECT video_no, status FROM library_videos"))
        )

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
    ) -> None:
        now = self._clock()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO evidence (stream, task_id, segment_index, path, size, video_no,"
                " error, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (stream, task_id, segment_index, path, size, video_no, error, now),
            )
        )

    async def evidence_rows(self) -> list[tuple[str, float, int]]:
        """(path, created_at, size) of archived clips, oldest first."""
        return await self._run(
            lambda c: [
                (r[0], r[1], r[2])
                for r in c.execute(
                    "SELECT path, created_at, size FROM evidence WHERE error IS NULL"
                    " ORDER BY created_at, id"
                )
            ]
        )

    async def evidence(self) -> list[dict[str, Any]]:
        """Every evidence record, oldest first."""
        cols = (
            "stream",
            "task_id",
            "segment_index",
            "path",
            "size",
            "video_no",
            "error",
            "created_at",
        )
        return await self._run(
            lambda c: [
                dict(zip(cols, r, strict=True))
                for r in c.execute(f"SELECT {', '.join(cols)} FROM evidence ORDER BY id")
            ]
        )

    async def forget_evidence(self, paths: list[str]) -> None:
        await self._run(
            lambda c: c.executemany("DELETE FROM evidence WHERE path = ?", [(p,) for p in paths])
        )

    async def alert_counts(self) -> dict[str, int]:
        """Outbox rows by state: pending, delivered, dead."""
        counts = {"pending": 0, "delivered": 0, "dead": 0}
        rows = await self._run(
            lambda c: c.execute(
                "SELECT state, count(*) FROM alert_outbox GROUP BY state"
            ).fetchall()
        )
        counts.update(dict(rows))
        return counts

    async def recent_alerts(self, *, limit: int = 50) -> list[OutboxRow]:
        """The newest outbox rows, newest last."""
        return await self._run(
            lambda c: [
                _outbox_row(r)
                for r in c.execute(f"{_OUTBOX_SELECT} ORDER BY id DESC LIMIT ?", (limit,))
            ][::-1]
        )

    async def check_writable(self) -> None:
        """Raise unless a write transaction commits (for readiness probes)."""
        await self._run(lambda c: c.execute("UPDATE settings SET key = key WHERE 0"))


_TASK_SELECT = (
    "SELECT task_id, stream, spec_hash, fps, content_moderation, logo_detection, max_logos,"
    " started_at, stop_requested, ended_at, end_status, end_reason, last_callback_at, segments,"
    " failed_segments, segment_ticks FROM tasks"
)


_OUTBOX_SELECT = (
    "SELECT id, alert_id, sink, rule, grp, event, state, attempts, next_at, last_error,"
    " created_at, delivered_at FROM alert_outbox"
)


def _outbox_row(r: tuple[Any, ...]) -> OutboxRow:
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


def _task_row(r: tuple[Any, ...]) -> TaskRow:
    return TaskRow(
        task_id=r[0],
        stream=r[1],
        spec_hash=r[2],
        fps=r[3],
        content_moderation=bool(r[4]),
        logo_detection=bool(r[5]),
        max_logos=r[6],
        started_at=r[7],
        stop_requested=bool(r[8]),
        ended_at=r[9],
        end_status=r[10],
        end_reason=r[11],
        last_callback_at=r[12],
        segments=r[13],
        failed_segments=r[14],
        segment_ticks=r[15],
    )


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one `Store.prune` deleted."""

    segments: int
    failures: int
    orphans: int
    alerts: int


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    schema_version: int
    bytes: int


def check_state_file(path: Path) -> str | None:
    """What keeps `path` from being used as the state file, or None: its folder must exist and
    be writable (SQLite keeps its -wal beside it), and a file already there must be a
    streamwatch state file this version understands. Reads only; never creates or migrates."""
    path = path.absolute()  # a relative path is relative to where the daemon starts: say where
    folder = path.parent
    if path.is_dir():
        return f"{path} is a folder; name a file in it, e.g. {path / 'streamwatch.db'}"
    if not folder.is_dir():
        return f"the folder {folder} does not exist; create it, or name a file in another folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create files in {folder} (as this user); the state file needs to"
    if not path.exists():
        return None  # created at the first start
    if not path.is_file():
        return f"{path} is not a regular file"
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as conn:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error as exc:
        return f"{path} is not a streamwatch state file ({exc}); move it away or name another file"
    if version > len(MIGRATIONS):
        return (
            f"{path} has schema version {version}, newer than this streamwatch understands "
            f"({len(MIGRATIONS)}); upgrade streamwatch or restore a backup"
        )
    if (version == 0 and tables) or (version > 0 and "tasks" not in tables):
        return f"{path} is an SQLite database but not a streamwatch state file; name another file"
    return None


def backup(
    source: Path, dest: Path, *, progress: Callable[[int, int], None] | None = None
) -> BackupResult:
    """Copy the state file to `dest` with SQLite's online backup, safe while the daemon runs
    (a consistent snapshot, the WAL included). The copy is written beside `dest`, checked with
    `PRAGMA integrity_check`, made a single self-contained file (no -wal), readable by its owner
    only, and renamed into place: a failed backup never replaces a good one. `dest` may be a
    directory: the copy is then named streamwatch-YYYYMMDDTHHMMSSZ.db. `progress(done, total)`
    is called in pages as the copy goes."""
    if not source.is_file():
        raise StoreError(f"no state file at {source}")
    if dest.is_dir():
        dest = dest / time.strftime("streamwatch-%Y%m%dT%H%M%SZ.db", time.gmtime())
    if dest.resolve() == source.resolve():
        raise StoreError("the backup cannot be the state file itself")
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    try:
        os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot write the backup {part}: {exc.strerror}") from None

    def step(_status: int, remaining: int, total: int) -> None:
        if progress is not None:
            progress(total - remaining, total)

    try:
        # mode=rw: never create a state file where there was none; no migration either.
        uri = f"{source.resolve().as_uri()}?mode=rw"
        with (
            contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as src,
            contextlib.closing(sqlite3.connect(part)) as dst,
        ):
            src.backup(dst, pages=1024, progress=step)
            (version,) = src.execute("PRAGMA user_version").fetchone()
            dst.execute("PRAGMA journal_mode=DELETE")
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise StoreError(f"the backup failed its integrity check: {check}")
        with part.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(part, dest)
    except BaseException as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"cannot back up {source}: {exc}") from None
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write the backup {dest}: {exc.strerror}") from None
        raise
    return BackupResult(dest, int(version), dest.stat().st_size)


def _owner_only(path: Path) -> None:
    """Create the state file readable by its owner only (0600), whatever the umask: SQLite
    would create it 0644, and its -wal and -shm files take the main file's mode. An existing
    file (or companion) that others may read is tightened to match."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _tighten(path, os.fstat(fd).st_mode, lambda mode: os.fchmod(fd, mode))
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        try:
            st = companion.stat()
        except FileNotFoundError:
            continue
        _tighten(companion, st.st_mode, companion.chmod)


def _tighten(path: Path, mode: int, chmod: Callable[[int], None]) -> None:
    if not mode & 0o077:
        return
    try:
        chmod(stat.S_IMODE(mode) & 0o700)
    except PermissionError:  # another user's file: say so, the daemon can still run
        log.warning("store.file_not_private", path=str(path), mode=oct(stat.S_IMODE(mode)))
    else:
        log.info("store.file_made_private", path=str(path), was=oct(stat.S_IMODE(mode)))


def _set_setting(conn: sqlite3.Connection, key: str, value: Any) -> None:
    if value is None:
        conn.execute("DELETE FROM settings WHERE key = ?", (key,))
    else:
        conn.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _insert_alerts(conn: sqlite3.Connection, alerts: list[NewAlert], now: float) -> None:
    conn.executemany(
        "INSERT INTO alert_outbox (alert_id, sink, rule, grp, event, next_at, created_at)"
        " VALUES (?,?,?,?,?,?,?)",
        [
            (a.alert_id, a.sink, a.rule, a.group, json.dumps(a.event), a.send_after, now)
            for a in alerts
        ],
    )


_INTENT_SELECT = (
    "SELECT attempt_id, stream, url_hash, spec_hash, fps, content_moderation, logo_detection,"
    " max_logos, created_at FROM start_intents"
)


def _open_intents(conn: sqlite3.Connection) -> list[Intent]:
    rows = conn.execute(f"{_INTENT_SELECT} WHERE state = 'open' ORDER BY created_at, attempt_id")
    return [Intent(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7], r[8]) for r in rows]


def _as_candidate(task_id: str, row: Sequence[Any]) -> Candidate | None:
    """(first_at, content_moderation, logo_detection, fps, end_status, stopped_at) as a
    candidate for adoption: None until a segment has shown its shape, once it has ended or
    been stopped."""
    first_at, moderation, logos, fps, end_status, stopped_at = row
    if moderation is None or end_status is not None or stopped_at is not None:
        return None
    return Candidate(task_id, first_at, Shape(bool(moderation), bool(logos), fps))


def _apply(
    conn: sqlite3.Connection, cb: Callback, body: str, at: float, first_free: bool
) -> CallbackOutcome | None:
    """Store a callback of a recorded task; None if its task is not recorded."""
    row = conn.execute(
        "SELECT stream, stop_requested, segment_ticks, segments, pruned_through FROM tasks"
        " WHERE task_id = ?",
        (cb.task_id,),
    ).fetchone()
    if row is None:
        return None
    stream, stop_requested, segment_ticks, stored_before = row[0], bool(row[1]), row[2], row[3]
    if isinstance(cb, SegmentReport):
        if row[4] is not None and cb.segment_index <= row[4]:
            return CallbackOutcome("duplicate", stream, cb)  # stored once, pruned since
        cur = conn.execute(
            "INSERT OR IGNORE INTO segments (task_id, segment_index, stream, received_at,"
            " start_time, end_time, unsafe, has_logo, logos, frames, processing_ms, tokens,"
            " video_url) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                cb.task_id,
                cb.segment_index,
                stream,
                at,
                cb.start_time,
                cb.end_time,
                cb.unsafe,
                cb.has_logo,
                json.dumps([logo.raw for logo in cb.logos]) if cb.logos else None,
                cb.frames_processed,
                cb.processing_ms,
                json.dumps(_tokens_json(cb)) if cb.tokens else None,
                cb.video_url,
            ),
        )
        if cur.rowcount == 0:
            return CallbackOutcome("duplicate", stream, cb)
        conn.execute(
            "UPDATE tasks SET segments = segments + 1, unsafe_segments = unsafe_segments + ?,"
            " logo_segments = logo_segments + ?,"
            " last_callback_at = max(coalesce(last_callback_at, 0), ?) WHERE task_id = ?",
            (bool(cb.unsafe), bool(cb.has_logo), at, cb.task_id),
        )
        ticks = 0 if first_free and stored_before == 0 else segment_ticks
        conn.execute(
            "INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)"
            " VALUES (?, ?, ?, 'segment', ?, ?)",
            (at, stream, cb.task_id, cb.segment_index, ticks),
        )
        return CallbackOutcome("stored", stream, cb, ticks=ticks, at=at)
    if isinstance(cb, SegmentFailed):
        conn.execute(
            "INSERT INTO segment_failures (task_id, stream, status, message, received_at)"
            " VALUES (?,?,?,?,?)",
            (cb.task_id, stream, cb.status, cb.message[:500], at),
        )
        conn.execute(
            "UPDATE tasks SET failed_segments = failed_segments + 1,"
            " last_callback_at = max(coalesce(last_callback_at, 0), ?) WHERE task_id = ?",
            (at, cb.task_id),
        )
        return CallbackOutcome("stored", stream, cb)
    assert isinstance(cb, StreamEnded)
    cur = conn.execute(
        "UPDATE tasks SET end_status = ?, ended_at = coalesce(ended_at, ?),"
        " end_reason = coalesce(end_reason, 'callback') WHERE task_id = ? AND end_status IS NULL",
        (cb.status, at, cb.task_id),
    )
    if cur.rowcount == 0:
        return CallbackOutcome("duplicate", stream, cb, stop_requested)
    conn.execute(
        "INSERT INTO events (at, stream, task_id, kind, status, detail) VALUES (?,?,?,?,?,?)",
        (at, stream, cb.task_id, "task_ended", cb.status, cb.message[:500]),
    )
    return CallbackOutcome("stored", stream, cb, stop_requested)


def _tokens_json(cb: SegmentReport) -> dict[str, int]:
    t = cb.tokens
    assert t is not None
    return {
        "input": t.input,
        "output": t.output,
        "total": t.total,
        "video": t.video,
        "text": t.text,
    }
