"""Keep one MAVI task running per configured stream, and react to how tasks end.

The deciding is pure: `plan()` looks at what is wanted (the config) and what is observed
(`StreamState` per stream, the account halt) and returns actions; `on_task_ended()` and
`on_start_failed()` say how a stream's state changes. `Supervisor` is the thin executor that
calls MAVI, records what happened in the store, and runs `plan()` again whenever something
changes or a tick passes.

Policy, in short:
- 15 (no video), 16 (capacity) and failed starts: restart with exponential backoff + jitter.
- Every start is written as an intent first. A start whose answer was lost (a crash, a
  timeout, a malformed answer, any unexpected failure) leaves it open: the stream is
  `adopting` for `adopt_wait_segments` periods, and adopts the unknown task whose callbacks
  match the intent; if none does, it starts again. A refusal (4xx) closes it.
- Tasks nobody started here (orphans): their spend is estimated and counted against the
  account's caps; `on_orphan = "stop"` stops one after `orphan_stop_after_segments` callbacks,
  unless an open intent may still adopt it.
- 14 not asked for by streamwatch: a person stopped it; hold until `streamwatch resume`.
- 402, or 401 at start: halt the whole account; retry after `balance_recheck_seconds` or on resume.
- No callback for `stall_after_segments` periods: stalled; `on_stall` waits or restarts.
- A task this daemon already runs is never started twice: tasks in the store are adopted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal, Protocol

import structlog

from streamwatch.background import Failures, TaskGroup
from streamwatch.config import BudgetsConfig, StreamConfig, SupervisorConfig
from streamwatch.intent import Intent, OrphanPrice, Shape, is_definitive, price_orphan, url_hash
from streamwatch.ledger import (
    PERIODS,
    BudgetEvent,
    BudgetGate,
    Spending,
    period_bounds,
    period_key,
    unreported_segments,
)
from streamwatch.mavi.callbacks import (
    STATUS_CAPACITY,
    STATUS_NO_BALANCE,
    STATUS_NO_VIDEO,
    STATUS_USER_STOPPED,
    SegmentFailed,
    SegmentReport,
    StreamEnded,
)
from streamwatch.mavi.errors import AuthError, InsufficientBalance, MaviError
from streamwatch.mavi.streams import StartRequest
from streamwatch.redact import Redactor
from streamwatch.store import Adopted, CallbackOutcome, Halt, StateStore, StreamRecord

__all__ = [
    "Action",
    "Halt",
    "MarkStalled",
    "Phase",
    "Policy",
    "Start",
    "Stop",
    "StreamState",
    "Supervisor",
    "backoff_delay",
    "on_start_failed",
    "on_start_unanswered",
    "on_task_ended",
    "plan",
]

log = structlog.get_logger("streamwatch.supervisor")


class Phase(StrEnum):
    """Where a stream is in its life. These strings are part of the status API."""

    IDLE = "idle"  # wanted, no task: starts when the account and capacity allow
    STARTING = "starting"
    RUNNING = "running"
    STALLED = "stalled"  # running, but no callback for too long
    BACKOFF = "backoff"  # waiting to restart after a failure
    ADOPTING = "adopting"  # a start's answer was lost: waiting for its task's callbacks
    STOPPING = "stopping"
    HELD = "held"  # stopped by a person; waits for `streamwatch resume`


StopReason = Literal["removed", "changed", "stalled", "shutdown", "budget"]


@dataclass(frozen=True, slots=True)
class StreamState:
    """What the supervisor knows of one stream."""

    name: str
    phase: Phase = Phase.IDLE
    task_id: str | None = None
    spec_hash: str | None = None  # of the running task
    started_at: float | None = None
    last_seen: float | None = None  # last callback, or when the task was started/adopted
    retry_at: float | None = None
    failures: int = 0  # consecutive failed runs: the backoff exponent
    restarts: int = 0
    run_segments: int = 0  # segments of the current task
    run_failed: int = 0  # failed (-1) callbacks of the current task
    segment_ticks: int = 0  # what one segment of the current task costs
    consecutive_errors: int = 0
    stop_reason: StopReason | None = None
    held_reason: str | None = None
    last_end_status: int | None = None
    last_error: str | None = None
    restart_times: tuple[float, ...] = ()  # recent restarts, for restart-loop detection
    intent: str | None = None  # while adopting: the attempt id of the start's open intent

    def record(self) -> StreamRecord:
        """What of this state outlives the process (the store keeps it between runs)."""
        return StreamRecord(
            self.name,
            self.held_reason,
            self.failures,
            self.retry_at,
            self.last_end_status,
            self.last_error,
            self.restart_times,
        )

    @classmethod
    def restored(cls, record: StreamRecord, *, now: float, policy: Policy) -> StreamState:
        """The state a new process starts from: held, backing off (never longer than the
        current `restart_max` from now), or idle; restarts outside the window forgotten."""
        retry_at = record.retry_at
        if retry_at is not None:
            retry_at = min(retry_at, now + policy.restart_max)
        phase = (
            Phase.HELD if record.held_reason else Phase.IDLE if retry_at is None else Phase.BACKOFF
        )
        return cls(
            record.name,
            phase,
            held_reason=record.held_reason,
            failures=record.failures,
            retry_at=retry_at,
            last_end_status=record.last_end_status,
            last_error=record.last_error,
            restart_times=tuple(
                t for t in record.restart_times if now - t < policy.restart_loop_window
            ),
        )


class _Streams(dict[str, StreamState]):
    """The supervisor's stream states. Notes the streams whose durable part (`record()`)
    changes, so that only those are written to the store."""

    def __init__(self) -> None:
        super().__init__()
        self.dirty: set[str] = set()

    def __setitem__(self, name: str, state: StreamState) -> None:
        old = self.get(name)
        if old is None or old.record() != state.record():
            self.dirty.add(name)
        super().__setitem__(name, state)


@dataclass(frozen=True, slots=True)
class Policy:
    """The knobs `plan()` needs, taken from config."""

    stall_seconds: float
    on_stall: Literal["wait", "restart"]
    restart_initial: float
    restart_max: float
    restart_jitter: float
    stable_after_segments: int
    error_threshold: int
    restart_loop_count: int
    restart_loop_window: float
    balance_recheck: float
    max_running: int | None
    adopt_wait: float = 0.0
    on_orphan: Literal["report", "stop"] = "report"
    orphan_stop_after: int = 3

    @classmethod
    def from_config(
        cls, sup: SupervisorConfig, *, segment_seconds: float, max_running: int | None
    ) -> Policy:
        return cls(
            stall_seconds=sup.stall_after_segments * segment_seconds,
            on_stall=sup.on_stall,
            restart_initial=sup.restart_initial_seconds,
            restart_max=sup.restart_max_seconds,
            restart_jitter=sup.restart_jitter,
            stable_after_segments=sup.stable_after_segments,
            error_threshold=sup.error_threshold,
            restart_loop_count=sup.restart_loop_count,
            restart_loop_window=sup.restart_loop_window_seconds,
            balance_recheck=sup.balance_recheck_seconds,
            max_running=max_running,
            adopt_wait=sup.adopt_wait_segments * segment_seconds,
            on_orphan=sup.on_orphan,
            orphan_stop_after=sup.orphan_stop_after_segments,
        )


@dataclass(frozen=True, slots=True)
class Start:
    stream: str


@dataclass(frozen=True, slots=True)
class Stop:
    stream: str
    task_id: str
    reason: StopReason


@dataclass(frozen=True, slots=True)
class MarkStalled:
    stream: str
    task_id: str


@dataclass(frozen=True, slots=True)
class Forget:
    stream: str


Action = Start | Stop | MarkStalled | Forget

_OCCUPYING = (Phase.STARTING, Phase.RUNNING, Phase.STALLED, Phase.STOPPING)


def _occupies(state: StreamState, now: float) -> bool:
    """Does the stream hold a place under max_running? One adopting may have a task at MAVI:
    it holds its place while it waits, and starts in it when the wait is over."""
    if state.phase is Phase.ADOPTING:
        return state.retry_at is None or now < state.retry_at
    return state.phase in _OCCUPYING


def plan(
    desired: Mapping[str, StreamConfig],
    observed: Mapping[str, StreamState],
    *,
    now: float,
    halt: Halt | None,
    policy: Policy,
    gate: BudgetGate | None = None,
) -> list[Action]:
    """Decide what to do next. Pure: same inputs, same actions."""
    gate = gate or BudgetGate()
    actions: list[Action] = []
    halted = halt is not None and now < halt.until
    startable: list[StreamState] = []
    occupying = sum(1 for s in observed.values() if _occupies(s, now))
    for name in sorted(set(desired) | set(observed)):
        state = observed.get(name, StreamState(name))
        spec = desired.get(name)
        has_task = state.phase in (Phase.RUNNING, Phase.STALLED) and state.task_id is not None
        waiting = state.retry_at is not None and now < state.retry_at
        if spec is None:
            if has_task:
                assert state.task_id is not None
                actions.append(Stop(name, state.task_id, "removed"))
            elif state.phase is Phase.ADOPTING and waiting:
                continue  # a task it adopts now is stopped as removed
            elif state.phase not in (Phase.STARTING, Phase.STOPPING):
                actions.append(Forget(name))
            continue
        if has_task:
            assert state.task_id is not None
            if name in gate.stop:
                actions.append(Stop(name, state.task_id, "budget"))
                continue
            if state.spec_hash != spec.spec_hash():
                actions.append(Stop(name, state.task_id, "changed"))
                continue
            silent = now - (state.last_seen or now)
            if state.phase is Phase.RUNNING and silent > policy.stall_seconds:
                actions.append(MarkStalled(name, state.task_id))
                if policy.on_stall == "restart":
                    actions.append(Stop(name, state.task_id, "stalled"))
            elif state.phase is Phase.STALLED and policy.on_stall == "restart":
                actions.append(Stop(name, state.task_id, "stalled"))
            continue
        if halted or name in gate.no_start:
            continue
        if state.phase is Phase.IDLE or (
            state.phase in (Phase.BACKOFF, Phase.ADOPTING)
            and state.retry_at is not None
            and not waiting
        ):
            startable.append(state)
    # Fill free capacity, longest-waiting first, so no stream starves behind the others.
    free = None if policy.max_running is None else max(0, policy.max_running - occupying)
    startable.sort(key=lambda s: (s.retry_at or 0.0, s.name))
    for state in startable[:free]:
        actions.append(Start(state.name))
    return actions


def backoff_delay(failures: int, policy: Policy, *, rand: float) -> float:
    """Seconds before restart number `failures` (1-based); `rand` in [0, 1) draws the jitter."""
    base = min(policy.restart_max, policy.restart_initial * 2.0 ** max(0, failures - 1))
    return base * (1 - policy.restart_jitter * rand)


def on_task_ended(
    state: StreamState,
    status: int,
    *,
    requested: bool,
    now: float,
    policy: Policy,
    rand: float,
) -> tuple[StreamState, Halt | None]:
    """The stream's current task ended with `status` (via callback). Returns the new state
    and, for 402, the account halt to impose."""
    ended = replace(
        state,
        task_id=None,
        spec_hash=None,
        last_end_status=status,
        stop_reason=None,
        consecutive_errors=0,
    )
    if status == STATUS_USER_STOPPED and not requested:
        return replace(ended, phase=Phase.HELD, held_reason="stopped outside streamwatch"), None
    if status == STATUS_NO_BALANCE:
        halt = Halt("balance", now, now + policy.balance_recheck, "task ended with status 402")
        return replace(ended, phase=Phase.IDLE), halt
    if status in (STATUS_NO_VIDEO, STATUS_CAPACITY) or status == STATUS_USER_STOPPED:
        failures = state.failures + 1
        delay = backoff_delay(failures, policy, rand=rand)
        return (
            replace(ended, phase=Phase.BACKOFF, failures=failures, retry_at=now + delay),
            None,
        )
    raise ValueError(f"status {status} does not end a task")


def on_start_failed(
    state: StreamState, error: MaviError, *, now: float, policy: Policy, rand: float
) -> tuple[StreamState, Halt | None]:
    """A start was refused or failed after its retries."""
    failed = replace(state, last_error=str(error))
    if isinstance(error, InsufficientBalance):
        halt = Halt("balance", now, now + policy.balance_recheck, "start refused with HTTP 402")
        return replace(failed, phase=Phase.IDLE), halt
    if isinstance(error, AuthError):
        halt = Halt("auth", now, now + policy.balance_recheck, "start refused with HTTP 401")
        return replace(failed, phase=Phase.IDLE), halt
    failures = state.failures + 1
    delay = backoff_delay(failures, policy, rand=rand)
    return replace(failed, phase=Phase.BACKOFF, failures=failures, retry_at=now + delay), None


def on_start_unanswered(
    state: StreamState, attempt_id: str, *, now: float, policy: Policy, rand: float
) -> StreamState:
    """A start failed in a way that leaves open whether MAVI created the task: the stream
    adopts for at least `adopt_wait` (and no less than its backoff) before starting again."""
    failures = state.failures + 1
    delay = max(backoff_delay(failures, policy, rand=rand), policy.adopt_wait)
    return replace(
        state, phase=Phase.ADOPTING, intent=attempt_id, failures=failures, retry_at=now + delay
    )


class StreamStarter(Protocol):
    """What the executor needs from a MAVI stream client."""

    async def start(self, request: StartRequest) -> str: ...

    async def stop(self, task_id: str) -> bool: ...


class Supervisor:
    """Executes `plan()` against MAVI and the store; one instance per daemon."""

    def __init__(
        self,
        *,
        client: StreamStarter,
        store: StateStore,
        policy: Policy,
        tick_seconds: float,
        spending: Spending,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        redact: Callable[[str], str] | None = None,
        failures: Failures | None = None,
    ) -> None:
        self._client = client
        # Every text that leaves through the status API, events and alerts passes here.
        self._redact = redact or Redactor()
        self.spending = spending
        self.gate = BudgetGate()
        self._fired: set[str] = set()  # budget events already raised, this period
        self._unreported_flagged: set[str] = set()  # tasks flagged as billing unreported
        self._store = store
        self.policy = policy
        self._tick = tick_seconds
        self._clock = clock
        self._rng = rng or random.Random()
        self.desired: dict[str, StreamConfig] = {}
        # What of a stream's state must outlive the process (its backoff, how its last task
        # ended, why it is held, its recent restarts) is written to the store when it changes,
        # before the stream's next start.
        self.streams = _Streams()
        self.halt: Halt | None = None
        self._by_task: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        # Every action and record runs in this group (entered by `running()`).
        self._tasks = TaskGroup("supervisor", failures)
        self._stopping = False
        self._adopt_tried = False
        self._orphan_stops: set[str] = set()  # orphan tasks whose stop is under way
        self._shapes: tuple[Mapping[str, StreamConfig], list[Shape]] = ({}, [])
        # What follows a committed callback (the server sets its own: evidence, metrics, the
        # log, then observe): callbacks claimed at a start or an adoption go the same way.
        self._after_commit: Callable[[CallbackOutcome], None] = self.observe

    def price_orphan(self, seen: Shape | None) -> OrphanPrice:
        """What a segment of an unknown task showing `seen` is estimated to cost, given the
        configured streams (the store's orphan pricer; it runs in the store's thread)."""
        desired = self.desired  # replaced whole on reload, never changed in place
        if self._shapes[0] is not desired:
            shapes = [
                Shape(s.content_moderation, s.logo_detection, s.fps) for s in desired.values()
            ]
            self._shapes = (desired, shapes)
        return price_orphan(seen, self._shapes[1])

    def set_after_commit(self, after_commit: Callable[[CallbackOutcome], None]) -> None:
        """Send callbacks claimed by a recorded or adopted task through `after_commit`, as the
        callback handler does for live ones (it must call `observe`)."""
        self._after_commit = after_commit

    # -- set-up ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Supervisor]:
        """Own the supervisor's actions (starts, stops, records) in a task group: `load()`
        and everything after it run inside. On exit, wait for those under way."""
        async with self._tasks:
            yield self

    async def load(self, streams: Iterable[StreamConfig]) -> None:
        """Set the desired streams and adopt what the store says is running or held."""
        self.desired = {s.name: s for s in streams}
        now = self._clock()
        self.halt = await self._store.load_halt()
        self._fired = set(await self._store.load_budget_fired())
        everything = await self._store.charge_totals(since=float("-inf"), until=float("inf"))
        self.spending.all_time = {t.stream: t.ticks for t in everything}
        for period in PERIODS:
            start, end = period_bounds(period, now)
            totals = await self._store.charge_totals(since=start, until=end)
            self.spending.load(period, period_key(period, now), {t.stream: t.ticks for t in totals})
            orphans = await self._store.orphan_charge_totals(since=start, until=end)
            self.spending.load_orphans(period, period_key(period, now), orphans.ticks)
        for record in (await self._store.streams()).values():
            if record != StreamRecord(record.name):
                self.streams[record.name] = StreamState.restored(
                    record, now=now, policy=self.policy
                )
        self._unreported_flagged = await self._store.flagged_tasks("billing_unreported")
        for task in await self._store.running_tasks():
            if task.stream in self._by_task.values():
                # Two live tasks for one stream can only come from an old crash: keep the newest
                # and stop the other, so the account pays for one.
                old = self.streams[task.stream]
                assert old.task_id is not None
                self._spawn(self._stop(Stop(task.stream, old.task_id, "changed")))
            # What the stream's record says (its backoff, its last end) stays known.
            self.streams[task.stream] = replace(
                self.streams.get(task.stream, StreamState(task.stream)),
                phase=Phase.RUNNING,
                retry_at=None,
                task_id=task.task_id,
                spec_hash=task.spec_hash,
                started_at=task.started_at,
                last_seen=max(task.last_callback_at or 0.0, now),
                run_segments=task.segments,
                run_failed=task.failed_segments,
                segment_ticks=task.segment_ticks,
            )
            self._by_task[task.task_id] = task.stream
            log.info("supervisor.task_adopted", stream=task.stream, task_id=task.task_id)
            await self._record("task_adopted", stream=task.stream, task_id=task.task_id)
        await self._load_intents(now)
        self._notify()

    async def _load_intents(self, now: float) -> None:
        """Starts whose answer never reached the store: MAVI may have created their tasks.
        Each such stream adopts for `adopt_wait` from now (callbacks parked before the restart
        are matched at once)."""
        for intent in await self._store.open_intents():
            name = intent.stream
            known = self.streams.get(name, StreamState(name))
            if known.task_id is not None or known.phase is Phase.HELD:
                # Held, or running a recorded task: not adopting; a task of this start is an
                # orphan (reported, or stopped with on_orphan = "stop").
                await self._store.close_intent(
                    intent.attempt_id, state="unmatched", detail=f"stream {known.phase}"
                )
                continue
            self.streams[name] = replace(
                known,
                phase=Phase.ADOPTING,
                intent=intent.attempt_id,
                retry_at=max(known.retry_at or now, now + self.policy.adopt_wait),
                last_error="the last start's answer was not recorded; waiting for its task",
            )
            log.info(
                "supervisor.intent_open",
                stream=name,
                attempt_id=intent.attempt_id,
                wait_seconds=self.policy.adopt_wait,
            )

    def reload(self, streams: Iterable[StreamConfig], budgets: BudgetsConfig) -> None:
        """Take a new desired set and caps (SIGHUP); the next plan adds, removes, restarts,
        and stops or releases streams by the new budgets."""
        self.desired = {s.name: s for s in streams}
        self.spending.configure(budgets, self.desired.values())
        self._notify()

    # -- the loop ------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once `shutdown()` began: the planning loop ends."""
        return self._stopping

    async def run_once(self) -> None:
        """One pass of the planning loop (the daemon runs it in its task group). The first
        pass first looks for the tasks of intents left open by an earlier process: callbacks
        parked before a restart may match at once."""
        if not self._adopt_tried:
            self._adopt_tried = True
            for name in list(self.streams):
                self._try_adopt(name)
        self.step()

    async def wait_for_work(self) -> None:
        """Until something changed that plan() must see, or a tick passed."""
        self._wake.clear()
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # lands as the event fires, and this loop would never end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._tick):
                await self._wake.wait()

    def step(self) -> list[Action]:
        """One planning pass: decide and launch the actions. Returns them (for tests)."""
        now = self._clock()
        if self.halt is not None and now >= self.halt.until:
            log.info("supervisor.halt_expired", reason=self.halt.reason)
            self._spawn(self._record("halt_expired", detail=self.halt.reason))
            self.halt = None
            self._spawn(self._store.save_halt(None))
        estimates = self.estimates(now)
        self._flag_unreported(estimates)
        self.gate = self.spending.gate(now, estimates)
        self._check_budgets(now, estimates)
        actions = plan(
            self.desired, self.streams, now=now, halt=self.halt, policy=self.policy, gate=self.gate
        )
        for action in actions:
            self._launch(action)
        return actions

    def _note_restart(self, name: str, now: float) -> None:
        window = self.policy.restart_loop_window
        state = self.streams[name]
        times = (*(t for t in state.restart_times if now - t < window), now)
        # One more than the count is enough to tell "just reached it" from "already past it".
        keep = times[-(self.policy.restart_loop_count + 1) :]
        self.streams[name] = replace(state, restart_times=keep)
        if len(times) == self.policy.restart_loop_count:
            log.warning("supervisor.restart_loop", stream=name, restarts=len(times))
            self._spawn(
                self._record(
                    "restart_loop",
                    stream=name,
                    detail=f"{len(times)} restarts in {window / 60:.0f} min; each costs a"
                    " pre-charge",
                )
            )

    def estimates(self, now: float) -> dict[str, int]:
        """Ticks MAVI has presumably billed per stream but not reported by callback yet.
        Reads state only: status and metrics call it too."""
        slack = self.spending.budgets.unreported_after_segments
        out: dict[str, int] = {}
        for s in self.streams.values():
            if s.task_id is None or s.started_at is None:
                continue
            missing = unreported_segments(
                started_at=s.started_at,
                now=now,
                segment_seconds=self.spending.segment_seconds,
                received=s.run_segments + s.run_failed,
                slack=slack,
            )
            if missing:
                out[s.name] = missing * s.segment_ticks
        return out

    def _flag_unreported(self, estimates: Mapping[str, int]) -> None:
        """Record once per task that it is billing without reporting."""
        for name in estimates:
            task_id = self.streams[name].task_id
            if task_id is None or task_id in self._unreported_flagged:
                continue
            self._unreported_flagged.add(task_id)
            missing = estimates[name] // max(1, self.streams[name].segment_ticks)
            log.warning(
                "supervisor.billing_unreported",
                stream=name,
                task_id=task_id,
                missing_segments=missing,
            )
            self._spawn(
                self._record(
                    "billing_unreported",
                    stream=name,
                    task_id=task_id,
                    detail=f"{missing} segment(s) billed but not reported",
                )
            )

    def _check_budgets(self, now: float, estimates: Mapping[str, int]) -> None:
        pruned = self.spending.prune(self._fired, now)
        events = self.spending.check(
            now,
            running=[n for n, s in self.streams.items() if s.task_id],
            fired=pruned,
            estimates=estimates,
        )
        if not events and pruned == self._fired:
            return
        self._fired = pruned
        if not events:
            self._spawn(self._store.save_budget_fired(frozenset(self._fired)))
        self._budget_events(events)

    def _count(self, stream: str, ticks: int, at: float, *, task_id: str | None) -> None:
        """Count a charge the store recorded, and record the thresholds it crossed, each with
        this charge and the spend right after it."""
        self._budget_events(self.spending.add(stream, ticks, at, fired=self._fired), task_id)

    def _budget_events(self, events: list[BudgetEvent], task_id: str | None = None) -> None:
        """Log and record budget events; what has fired is written with each, in one commit,
        so a restart neither repeats nor loses one."""
        for event in events:
            log.warning(
                f"supervisor.{event.kind}",
                stream=event.cap.stream,
                period=event.cap.period,
                percent=event.percent,
                detail=event.detail,
            )
            self._spawn(
                self._record(
                    event.kind,
                    stream=event.cap.stream,
                    task_id=task_id if event.charge_stream else None,
                    detail=event.detail,
                    budget_fired=frozenset(self._fired),
                )
            )

    def _launch(self, action: Action) -> None:
        name = action.stream
        state = self.streams.get(name, StreamState(name))
        if isinstance(action, Start):
            self.streams[name] = replace(state, phase=Phase.STARTING)
            self._spawn(self._start(name))
        elif isinstance(action, Stop):
            if state.phase is Phase.STOPPING:
                return
            self.streams[name] = replace(state, phase=Phase.STOPPING, stop_reason=action.reason)
            self._spawn(self._stop(action))
        elif isinstance(action, MarkStalled):
            self.streams[name] = replace(state, phase=Phase.STALLED)
            log.warning("supervisor.stream_stalled", stream=name, task_id=action.task_id)
            self._spawn(self._record("stream_stalled", stream=name, task_id=action.task_id))
        else:
            dropped = self.streams.pop(name, None)
            if dropped is not None and dropped.intent is not None:
                self._spawn(self._close_intent(dropped.intent, "the stream was removed"))
        self._notify()

    async def _close_intent(self, attempt_id: str, detail: str) -> None:
        await self._store.close_intent(attempt_id, state="unmatched", detail=detail)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run an action or a record in the supervisor's task group, named after it; the
        planner looks again when it is done, whatever became of it."""
        name = "supervisor." + str(getattr(coro, "__name__", "action")).lstrip("_")
        try:
            self._tasks.spawn(name, self._then_replan(coro))
        except RuntimeError:
            coro.close()
            raise

    async def _then_replan(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        finally:
            self._notify()

    async def _start(self, name: str) -> None:
        """Start the stream's task: intent written, MAVI asked, answer recorded. Every way
        this can fail ends in a known state (backoff, halt, or adopting)."""
        spec = self.desired.get(name)
        state = self.streams[name]
        if spec is None:  # removed while queued
            self.streams.pop(name, None)
            if state.intent is not None:
                await self._close_intent(state.intent, "the stream was removed")
            return
        intent = Intent(
            attempt_id=uuid.uuid4().hex,
            stream=name,
            url_hash=url_hash(spec.url),
            spec_hash=spec.spec_hash(),
            fps=spec.fps,
            content_moderation=spec.content_moderation,
            logo_detection=spec.logo_detection,
            max_logos=spec.max_logos,
            created_at=self._clock(),
        )
        try:
            # Written before the call: a crash from here on leaves a trace to adopt from.
            adopted = await self._store.begin_start(intent)
        except Exception as exc:  # noqa: BLE001 - not written, so MAVI is not asked: back off
            await self._start_failed(name, state, exc, intent=None)
            return
        if adopted is not None:  # the previous start's task showed up after all
            self._took_adopted(name, adopted)
            return
        request = StartRequest(
            url=spec.url,
            content_moderation=spec.content_moderation,
            logo_detection=spec.logo_detection,
            fps=spec.fps,
            max_logos=spec.max_logos,
        )
        try:
            task_id = await self._client.start(request)
        except Exception as exc:  # noqa: BLE001 - any failure ends the start in a known state
            await self._start_failed(name, state, exc, intent=intent)
            return
        now = self._clock()
        try:
            registered = await self._store.record_task_started(
                task_id=task_id,
                stream=name,
                spec_hash=spec.spec_hash(),
                fps=spec.fps,
                content_moderation=spec.content_moderation,
                logo_detection=spec.logo_detection,
                max_logos=spec.max_logos,
                started_at=now,
                attempt_id=intent.attempt_id,
            )
        except Exception as exc:  # noqa: BLE001 - MAVI started it: the open intent adopts it
            await self._start_failed(name, state, exc, intent=intent)
            return
        self._count(name, registered.precharge_ticks, now, task_id=task_id)
        for at, ticks in registered.orphan_removed:
            self.spending.add_orphan(-ticks, at)
        self.spending.forget_orphan(task_id)
        restarted = state.started_at is not None or state.last_end_status is not None
        self.streams[name] = replace(
            state,
            phase=Phase.RUNNING,
            task_id=task_id,
            spec_hash=spec.spec_hash(),
            started_at=now,
            last_seen=now,
            retry_at=None,
            run_segments=0,
            run_failed=0,
            segment_ticks=registered.precharge_ticks,
            consecutive_errors=0,
            restarts=state.restarts + int(restarted),
            last_error=None,
            intent=None,
        )
        self._by_task[task_id] = name
        log.info("supervisor.task_started", stream=name, task_id=task_id, fps=spec.fps)
        if restarted:
            self._note_restart(name, now)
        await self._record("task_started", stream=name, task_id=task_id)
        for outcome in registered.claimed:
            self._after_commit(outcome)

    async def _start_failed(
        self, name: str, state: StreamState, error: Exception, *, intent: Intent | None
    ) -> None:
        """A start did not end with a recorded task. A refusal (or a failure before MAVI was
        asked) closes the intent and backs off; anything else leaves it open and adopts."""
        text = str(error) if isinstance(error, MaviError) else f"{type(error).__name__}: {error}"
        detail = self._text(text)
        definitive = intent is None or is_definitive(error)
        if intent is not None and definitive:
            try:
                await self._store.close_intent(intent.attempt_id, state="failed", detail=detail)
            except Exception:  # noqa: BLE001 - still open: then adopting is the safe reading
                definitive = False
        now = self._clock()
        status = error.status if isinstance(error, MaviError) else None
        if definitive:
            refusal = error if isinstance(error, MaviError) else MaviError(detail)
            new, halt = on_start_failed(
                state, refusal, now=now, policy=self.policy, rand=self._rng.random()
            )
            self.streams[name] = replace(new, last_error=detail, intent=None)
            if halt is not None:
                self._impose_halt(halt)
            log.warning("supervisor.start_failed", stream=name, error=detail, status=status)
            await self._record("start_failed", stream=name, status=status, detail=detail)
            return
        assert intent is not None
        new = on_start_unanswered(
            state, intent.attempt_id, now=now, policy=self.policy, rand=self._rng.random()
        )
        self.streams[name] = replace(new, last_error=detail)
        wait = (new.retry_at or now) - now
        log.warning(
            "supervisor.start_unanswered",
            stream=name,
            attempt_id=intent.attempt_id,
            error=detail,
            status=status,
            wait_seconds=round(wait, 3),
            exc_info=None if isinstance(error, MaviError) else error,
        )
        await self._record(
            "start_failed",
            stream=name,
            status=status,
            detail=f"{detail}; MAVI may have started the task: waiting {wait:.0f}s for its"
            " callbacks before starting again",
        )
        self._try_adopt(name)  # its callbacks may already be here

    def _try_adopt(self, name: str) -> None:
        """Look for the task of an adopting stream's open intent now (in the background).
        While it looks, the stream is `starting`: nothing else starts or adopts for it."""
        state = self.streams.get(name)
        if state is None or state.phase is not Phase.ADOPTING or state.intent is None:
            return
        self.streams[name] = replace(state, phase=Phase.STARTING)
        self._spawn(self._adopt(name, state.intent))

    async def _adopt(self, name: str, attempt_id: str) -> None:
        try:
            adopted = await self._store.adopt(attempt_id)
        except Exception as exc:  # noqa: BLE001 - the stream stays adopting; its next callback retries
            log.error("supervisor.adopt_failed", stream=name, error=self._text(str(exc)))
            adopted = None
        if adopted is not None:
            self._took_adopted(name, adopted)
            return
        state = self.streams.get(name)
        if state is not None and state.phase is Phase.STARTING:
            self.streams[name] = replace(state, phase=Phase.ADOPTING)
        self._notify()

    def _took_adopted(self, name: str, adopted: Adopted) -> None:
        """The stream's open intent adopted a task: it runs, its charges are the stream's."""
        state = self.streams.get(name, StreamState(name))
        self._count(name, adopted.precharge_ticks, adopted.precharge_at, task_id=adopted.task_id)
        for at, ticks in adopted.backfilled:
            self._count(name, ticks, at, task_id=adopted.task_id)
        for at, ticks in adopted.orphan_removed:
            self.spending.add_orphan(-ticks, at)
        self.spending.forget_orphan(adopted.task_id)
        restarted = state.started_at is not None or state.last_end_status is not None
        self.streams[name] = replace(
            state,
            phase=Phase.RUNNING,
            task_id=adopted.task_id,
            spec_hash=adopted.spec_hash,
            started_at=adopted.started_at,
            last_seen=self._clock(),
            retry_at=None,
            run_segments=len(adopted.backfilled),
            run_failed=0,
            segment_ticks=adopted.precharge_ticks,
            consecutive_errors=0,
            restarts=state.restarts + int(restarted),
            last_error=None,
            intent=None,
        )
        self._by_task[adopted.task_id] = name
        # Its event (and the alert it resolves) was recorded with the adoption.
        log.info(
            "supervisor.intent_adopted",
            stream=name,
            task_id=adopted.task_id,
            claimed=len(adopted.claimed),
            backfilled=len(adopted.backfilled),
        )
        for outcome in adopted.claimed:
            self._after_commit(outcome)
        self._notify()

    async def _stop(self, action: Stop) -> None:
        try:
            # Noted first, so that the task's final 14 is known as asked for.
            await self._store.mark_stop_requested(action.task_id)
            stopped_now = await self._client.stop(action.task_id)
        except Exception as exc:  # noqa: BLE001 - a stop's edge: whatever failed, it is retried
            # Could not reach MAVI (or note the stop): keep the task as ours and try again on
            # the next pass. Anything but MAVI's own errors is a bug: its traceback is logged.
            if not isinstance(exc, MaviError):
                self._tasks.failures.failed("supervisor.stop", exc, stream=action.stream)
            error = self._text(str(exc) or type(exc).__name__)
            state = self.streams.get(action.stream)
            if state is not None and state.task_id == action.task_id:
                self.streams[action.stream] = replace(
                    state, phase=Phase.RUNNING, stop_reason=None, last_error=error
                )
            log.warning("supervisor.stop_failed", stream=action.stream, error=error)
            await self._record(
                "stop_failed", stream=action.stream, task_id=action.task_id, detail=error
            )
            return
        await self._store.record_task_ended(
            action.task_id, status=None, reason=f"stopped by streamwatch ({action.reason})"
        )
        self._by_task.pop(action.task_id, None)
        log.info(
            "supervisor.task_stopped",
            stream=action.stream,
            task_id=action.task_id,
            reason=action.reason,
            was_running=stopped_now,
        )
        await self._record(
            "task_stopped", stream=action.stream, task_id=action.task_id, detail=action.reason
        )
        state = self.streams.get(action.stream)
        if state is None or state.task_id != action.task_id:
            return
        ended = replace(state, task_id=None, spec_hash=None, stop_reason=None, consecutive_errors=0)
        if action.reason == "removed":
            self.streams.pop(action.stream, None)
        elif action.reason in ("shutdown", "budget"):
            self.streams[action.stream] = replace(ended, phase=Phase.IDLE)
        elif action.reason == "stalled":
            failures = state.failures + 1
            delay = backoff_delay(failures, self.policy, rand=self._rng.random())
            self.streams[action.stream] = replace(
                ended, phase=Phase.BACKOFF, failures=failures, retry_at=self._clock() + delay
            )
        else:
            self.streams[action.stream] = replace(ended, phase=Phase.IDLE)

    def _impose_halt(self, halt: Halt) -> None:
        """Halt the account now, in the same step as the stream state that caused it (so no
        plan can run in between and start again), and persist it in the background."""
        new = self.halt is None or self.halt.reason != halt.reason
        self.halt = halt
        if new:
            log.error("supervisor.account_halted", reason=halt.reason, until=halt.until)
        self._spawn(self._persist_halt(halt, new=new))

    async def _persist_halt(self, halt: Halt, *, new: bool) -> None:
        if new:
            await self._record("account_halted", detail=f"{halt.reason}: {halt.detail}")
        await self._store.save_halt(halt)

    # -- what callbacks tell us ----------------------------------------------------------------

    def observe(self, outcome: CallbackOutcome) -> None:
        """Update stream state from a stored callback. Cheap and synchronous: it runs in the
        callback handler after the store committed."""
        if outcome.kind == "orphan":
            self._observe_orphan(outcome)
            return
        if outcome.kind != "stored" or outcome.stream is None:
            return
        name = outcome.stream
        # Plain segments change nothing plan() looks at (stalls are found on ticks), so they
        # do not wake the planner; an end, a recovery or a charge near a cap does.
        replan = False
        if outcome.ticks:
            # Counted whichever task it came from: an old task's late segment costs money too.
            self._count(name, outcome.ticks, outcome.at, task_id=outcome.callback.task_id)
            replan = self.spending.near_cap(name, outcome.at)
        state = self.streams.get(name)
        cb = outcome.callback
        if state is None or state.task_id != cb.task_id or state.phase is Phase.STOPPING:
            # An older task of the stream, or one whose stop is in flight (that stop decides
            # what comes next): stored, nothing more to do.
            return
        now = self._clock()
        if isinstance(cb, SegmentReport):
            segments = state.run_segments + 1
            failures = 0 if segments >= self.policy.stable_after_segments else state.failures
            phase = state.phase
            if phase is Phase.STALLED:
                phase = Phase.RUNNING
                replan = True
                log.info("supervisor.stream_recovered", stream=name, task_id=cb.task_id)
                self._spawn(self._record("stream_recovered", stream=name, task_id=cb.task_id))
            self.streams[name] = replace(
                state,
                phase=phase,
                last_seen=now,
                run_segments=segments,
                failures=failures,
                consecutive_errors=0,
            )
        elif isinstance(cb, SegmentFailed):
            errors = state.consecutive_errors + 1
            self.streams[name] = replace(
                state, last_seen=now, consecutive_errors=errors, run_failed=state.run_failed + 1
            )
            if errors == self.policy.error_threshold:
                log.warning("supervisor.segment_errors", stream=name, consecutive=errors)
                self._spawn(
                    self._record(
                        "segment_errors",
                        stream=name,
                        task_id=cb.task_id,
                        status=cb.status,
                        detail=f"{errors} failed segments in a row: {cb.message}",
                    )
                )
        elif isinstance(cb, StreamEnded):
            self._by_task.pop(cb.task_id, None)
            new, halt = on_task_ended(
                state,
                cb.status,
                requested=outcome.stop_requested,
                now=now,
                policy=self.policy,
                rand=self._rng.random(),
            )
            self.streams[name] = new
            # Its event (and alert, unless this daemon asked for the stop) was recorded with it.
            log.warning("supervisor.task_ended", stream=name, task_id=cb.task_id, status=cb.status)
            if halt is not None:
                self._impose_halt(halt)
            replan = True
        self._notify(replan=replan)

    def _observe_orphan(self, outcome: CallbackOutcome) -> None:
        """A callback from a task nobody recorded: count its estimate, let the intent that
        may own it adopt it, or (on_orphan = "stop") stop it once it has called back enough."""
        cb = outcome.callback
        replan = False
        if outcome.ticks:
            self.spending.add_orphan(outcome.ticks, outcome.at)
            replan = self.spending.near_account_cap(outcome.at)
        if isinstance(cb, StreamEnded):
            self.spending.forget_orphan(cb.task_id)
        else:
            self.spending.note_orphan(cb.task_id, outcome.segment_ticks, outcome.at)
        if outcome.candidate_for is not None:
            owner = next(
                (n for n, s in self.streams.items() if s.intent == outcome.candidate_for), None
            )
            if owner is not None:
                self._try_adopt(owner)
        elif (
            self.policy.on_orphan == "stop"
            and not isinstance(cb, StreamEnded)
            and outcome.orphan_segments >= self.policy.orphan_stop_after
            and cb.task_id not in self._orphan_stops
        ):
            self._orphan_stops.add(cb.task_id)
            self._spawn(self._stop_orphan(cb.task_id, outcome.orphan_segments))
        self._notify(replan=replan)

    async def _stop_orphan(self, task_id: str, segments: int) -> None:
        """Stop a task nobody here started (on_orphan = "stop"), unless an open intent may
        still adopt it. A failed stop is tried again at its next callback."""
        try:
            if not await self._store.claim_orphan_stop(task_id):
                self._orphan_stops.discard(task_id)
                return
            was_running = await self._client.stop(task_id)
        except Exception as exc:  # noqa: BLE001 - logged and recorded; retried at its next callback
            error = self._text(str(exc))
            log.warning("supervisor.orphan_stop_failed", task_id=task_id, error=error)
            self._orphan_stops.discard(task_id)
            await self._record("orphan_stop_failed", task_id=task_id, detail=error)
            return
        self.spending.forget_orphan(task_id)
        detail = (
            f"task {task_id} was not started by this daemon and called back {segments} time(s)"
            f" unclaimed: {'stopped' if was_running else 'it had already ended'}"
            " (on_orphan = stop)"
        )
        log.warning(
            "supervisor.orphan_stopped", task_id=task_id, segments=segments, was_running=was_running
        )
        await self._store.record_orphan_stopped(task_id, detail=detail)

    # -- people ------------------------------------------------------------------------------

    async def resume(self, streams: Iterable[str] = ()) -> list[str]:
        """Lift the account halt and release held streams (all of them when none are named).
        Returns the streams released."""
        names = list(streams)
        if self.halt is not None:
            self.halt = None
            await self._store.save_halt(None)
            await self._record("account_resumed")
        released = []
        for name, state in list(self.streams.items()):
            if (not names or name in names) and state.phase in (Phase.HELD, Phase.BACKOFF):
                self.streams[name] = replace(
                    state, phase=Phase.IDLE, held_reason=None, retry_at=None, failures=0
                )
                await self._record("stream_resumed", stream=name)
                released.append(name)
        await self._persist()
        self._notify()
        return released

    async def shutdown(self, *, stop_tasks: bool) -> list[str]:
        """Stop planning; with `stop_tasks`, stop every running task. Returns the stopped ids."""
        self._stopping = True
        self._wake.set()
        await self.settle()
        stopped: list[str] = []
        if stop_tasks:
            stops = [
                Stop(s.name, s.task_id, "shutdown")
                for s in self.streams.values()
                if s.task_id is not None and s.phase in (Phase.RUNNING, Phase.STALLED)
            ]
            for stop in stops:
                # As _launch does: the stop in flight owns what its final 14 means.
                state = self.streams[stop.stream]
                self.streams[stop.stream] = replace(
                    state, phase=Phase.STOPPING, stop_reason="shutdown"
                )
            await asyncio.gather(*(self._stop(a) for a in stops), return_exceptions=True)
            stopped = [a.task_id for a in stops]
        await self._persist()
        return stopped

    # -- waiting (tests, status) -------------------------------------------------------------

    async def settle(self) -> None:
        """Wait until every action and record launched so far has finished."""
        await self._tasks.settle()

    async def _record(
        self,
        kind: str,
        *,
        stream: str | None = None,
        task_id: str | None = None,
        status: int | None = None,
        detail: str = "",
        budget_fired: Collection[str] | None = None,
    ) -> None:
        """Write an event to the store; the alerts it raises (and `budget_fired`, the budget
        thresholds fired) are written with it."""
        await self._store.add_event(
            kind,
            stream=stream,
            task_id=task_id,
            status=status,
            detail=self._text(detail),
            budget_fired=budget_fired,
        )

    async def _persist(self) -> None:
        """Write the durable part of every stream whose part changed: read and queued to the
        store in one go, so writes land in the order the changes were made. A write that
        fails is reported, not retried here: a stream's next change writes its whole record."""
        records = [s.record() for n in self.streams.dirty if (s := self.streams.get(n))]
        self.streams.dirty.clear()
        if records:
            await self._store.save_streams(records)

    def _text(self, text: str) -> str:
        """`text` as it may leave the process (events, alerts, the status API): secrets
        masked first, then cut to 500 characters (cut first, a masked secret could leave its
        beginning behind)."""
        return self._redact(text)[:500]

    def _notify(self, *, replan: bool = True) -> None:
        """Tell waiters that state changed (and write what of it must outlive the process);
        with `replan`, also run plan() now."""
        if self.streams.dirty:
            self._spawn(self._persist())
        if replan:
            self._wake.set()
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, checking after every change. Bound it with
        `asyncio.timeout()`."""
        while not predicate():
            await self._changed.wait()

    def display_state(self, name: str, now: float) -> str:
        """The state people see: the phase, or `halted` / `over_budget` for a stream that
        waits to start only because the account is halted or a budget forbids it."""
        state = self.streams.get(name)
        phase = state.phase if state else Phase.IDLE
        if phase in (Phase.IDLE, Phase.BACKOFF):
            if self.halt is not None and now < self.halt.until:
                return "halted"
            if name in self.gate.no_start:
                return "over_budget"
        return str(phase)

    def running_count(self) -> int:
        return sum(1 for s in self.streams.values() if s.phase in (Phase.RUNNING, Phase.STALLED))

    def stream_for_task(self, task_id: str) -> str | None:
        return self._by_task.get(task_id)
