"""What the supervisor decides, apart from doing it: pure functions over stream states.

Each takes what is known (a stream's `StreamState`, what happened, the time, the `Policy`
knobs, a random draw for jitter) and returns the new state and what follows from it: the
`Action`s `plan()` wants launched, or the `Effect`s (events to log and record, an account
halt) of a callback, a start, a stop. They do no I/O and read no clock: the executor
(`supervisor.Supervisor`) applies what they return, and the tests drive them with tables
(tests/test_plan.py, tests/test_policy.py). It is longer than most modules on purpose: the
whole per-stream state machine (states, knobs, every transition) reads in one place.

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
- `stable_after_segments` segments in a row: the backoff exponent starts again from zero.
- `error_threshold` failed segments in a row, and `restart_loop_count` restarts within
  `restart_loop_window_seconds`: an event each (and its alert), once per streak.
- A task this daemon already runs is never started twice: tasks in the store are adopted.
- `preflight`: the source is probed before each start and restart (`on_probe`). Down: no
  start (no pre-charge; one avoided is counted with its price), `source_offline`, and probes
  again on the usual backoff; up again: the start goes ahead, and the offline event resolves.
  A task that ended with 15 restarts so, after a successful probe only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

from streamwatch.config import StreamConfig, SupervisorConfig
from streamwatch.ledger import BudgetGate
from streamwatch.mavi.callbacks import (
    STATUS_CAPACITY,
    STATUS_NO_BALANCE,
    STATUS_NO_VIDEO,
    STATUS_USER_STOPPED,
    Callback,
    SegmentFailed,
    SegmentReport,
)
from streamwatch.mavi.errors import AuthError, InsufficientBalance
from streamwatch.store import Halt, StreamRecord

__all__ = [
    "Action",
    "Effect",
    "Forget",
    "FpsAboveSource",
    "Halt",
    "MarkStalled",
    "Phase",
    "Policy",
    "ProbeFailed",
    "ProbeUnavailable",
    "Recovered",
    "RestartLoop",
    "SegmentErrors",
    "SourceInfo",
    "SourceOffline",
    "SourceOnline",
    "Start",
    "Stop",
    "StopReason",
    "StreamState",
    "TaskEnded",
    "after_stop",
    "backoff_delay",
    "note_restart",
    "on_callback",
    "on_open_intent",
    "on_probe",
    "on_resume",
    "on_start_failed",
    "on_start_unanswered",
    "on_start_unprobed",
    "on_stop_failed",
    "on_task_ended",
    "on_task_running",
    "orphan_to_stop",
    "plan",
]


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
    SOURCE_OFFLINE = "source_offline"  # preflight found the source down: probes on a backoff


StopReason = Literal["removed", "changed", "stalled", "shutdown", "budget"]


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the last successful probe of a stream's source found (`at`: when)."""

    at: float
    video_codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    bitrate: int | None = None  # the video's bit rate, else the whole stream's
    audio_codec: str | None = None

    @property
    def resolution(self) -> str | None:
        return f"{self.width}x{self.height}" if self.width and self.height else None

    def same_media(self, other: SourceInfo | None) -> bool:
        """The same codecs, size and frame rate as `other` (when and bit rate aside)."""
        return other is not None and (
            self.video_codec,
            self.width,
            self.height,
            self.fps,
            self.audio_codec,
        ) == (other.video_codec, other.width, other.height, other.fps, other.audio_codec)


@dataclass(frozen=True, slots=True)
class ProbeFailed:
    """A probe that found no media: `kind` is the probe error's stable word (`unreachable`,
    `timeout`, `refused`, `not_media`, `failed`, `unavailable`), `detail` its one line."""

    kind: str
    detail: str


PROBE_OK = "ok"


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
    offline_since: float | None = None  # preflight: the source was found down since then
    source: SourceInfo | None = None  # what the last probe that found media saw
    probes: tuple[tuple[str, int], ...] = ()  # preflight probes by outcome (sorted)
    precharges_avoided: int = 0  # starts not made because the source was down
    ticks_saved: int = 0  # what those pre-charges would have cost

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
            self.offline_since,
            self.probes,
            self.precharges_avoided,
            self.ticks_saved,
        )

    @classmethod
    def restored(cls, record: StreamRecord, *, now: float, policy: Policy) -> StreamState:
        """The state a new process starts from: held, backing off (never longer than the
        current `restart_max` from now), or idle; restarts outside the window forgotten."""
        retry_at = record.retry_at
        if retry_at is not None:
            retry_at = min(retry_at, now + policy.restart_max)
        if record.held_reason:
            phase = Phase.HELD
        elif retry_at is None:
            phase = Phase.IDLE
        else:
            phase = Phase.BACKOFF if record.offline_since is None else Phase.SOURCE_OFFLINE
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
            offline_since=record.offline_since,
            probes=record.probes,
            precharges_avoided=record.precharges_avoided,
            ticks_saved=record.ticks_saved,
        )


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
            state.phase in (Phase.BACKOFF, Phase.ADOPTING, Phase.SOURCE_OFFLINE)
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
    state: StreamState,
    error: Exception,
    *,
    now: float,
    policy: Policy,
    rand: float,
    detail: str | None = None,
) -> tuple[StreamState, Halt | None]:
    """A start was refused, failed after its retries, or failed before MAVI was asked (its
    intent is closed). `detail` is the error as it may be shown (default: the error)."""
    failed = replace(state, last_error=str(error) if detail is None else detail, intent=None)
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
    state: StreamState,
    attempt_id: str,
    *,
    now: float,
    policy: Policy,
    rand: float,
    detail: str | None = None,
) -> StreamState:
    """A start failed in a way that leaves open whether MAVI created the task: the stream
    adopts for at least `adopt_wait` (and no less than its backoff) before starting again.
    `detail`, when given, is what went wrong, as it may be shown."""
    failures = state.failures + 1
    delay = max(backoff_delay(failures, policy, rand=rand), policy.adopt_wait)
    return replace(
        state,
        phase=Phase.ADOPTING,
        intent=attempt_id,
        failures=failures,
        retry_at=now + delay,
        last_error=state.last_error if detail is None else detail,
    )


# -- what follows from a callback, a start, a stop ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Recovered:
    """A stalled stream's task called back again."""

    stream: str
    task_id: str


@dataclass(frozen=True, slots=True)
class SegmentErrors:
    """`count` failed segments in a row: the error threshold was reached."""

    stream: str
    task_id: str
    status: int
    count: int
    message: str

    @property
    def detail(self) -> str:
        return f"{self.count} failed segments in a row: {self.message}"


@dataclass(frozen=True, slots=True)
class TaskEnded:
    """The stream's current task ended (its event was recorded with the callback)."""

    stream: str
    task_id: str
    status: int


@dataclass(frozen=True, slots=True)
class RestartLoop:
    """The stream was restarted `restarts` times within the window."""

    stream: str
    restarts: int
    window: float

    @property
    def detail(self) -> str:
        return f"{self.restarts} restarts in {self.window / 60:.0f} min; each costs a pre-charge"


@dataclass(frozen=True, slots=True)
class SourceOffline:
    """Preflight found the stream's source down (the first probe of an outage)."""

    stream: str
    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class SourceOnline:
    """Preflight found the stream's source again after `offline_seconds` down (`source`: what
    it saw), or no longer looks (preflight turned off: `source` is None)."""

    stream: str
    offline_seconds: float
    source: SourceInfo | None

    @property
    def detail(self) -> str:
        if self.source is None:
            return (
                f"preflight is off: the source, offline for {self.offline_seconds:.0f}s when"
                " last probed, is no longer probed"
            )
        return f"the source is back after {self.offline_seconds:.0f}s offline"


@dataclass(frozen=True, slots=True)
class FpsAboveSource:
    """The stream is configured to analyse more frames per second than its source has."""

    stream: str
    fps: int
    source_fps: float

    @property
    def detail(self) -> str:
        return (
            f"fps = {self.fps} but the source has {self.source_fps:g} frames per second:"
            f" paying for frames that do not exist (set fps <= {max(1, int(self.source_fps))})"
        )


@dataclass(frozen=True, slots=True)
class ProbeUnavailable:
    """A preflight probe could not be run at all (no ffprobe): the start goes ahead."""

    stream: str
    detail: str


Effect = (
    Recovered
    | SegmentErrors
    | TaskEnded
    | RestartLoop
    | Halt
    | SourceOffline
    | SourceOnline
    | FpsAboveSource
    | ProbeUnavailable
)


def on_callback(
    state: StreamState,
    callback: Callback,
    *,
    stop_requested: bool,
    now: float,
    policy: Policy,
    rand: float,
) -> tuple[StreamState, list[Effect]]:
    """A stored callback of the stream's current task (whose stop is not under way): a
    segment marks it seen (recovering it from a stall, and resetting the backoff once it ran
    `stable_after_segments`), a failed segment counts towards the error threshold, an end
    decides what comes next (`on_task_ended`)."""
    if isinstance(callback, SegmentReport):
        segments = state.run_segments + 1
        effects: list[Effect] = []
        phase = state.phase
        if phase is Phase.STALLED:
            phase = Phase.RUNNING
            effects.append(Recovered(state.name, callback.task_id))
        new = replace(
            state,
            phase=phase,
            last_seen=now,
            run_segments=segments,
            failures=0 if segments >= policy.stable_after_segments else state.failures,
            consecutive_errors=0,
        )
        return new, effects
    if isinstance(callback, SegmentFailed):
        errors = state.consecutive_errors + 1
        new = replace(
            state, last_seen=now, consecutive_errors=errors, run_failed=state.run_failed + 1
        )
        if errors != policy.error_threshold:
            return new, []
        failed = SegmentErrors(
            state.name, callback.task_id, callback.status, errors, callback.message
        )
        return new, [failed]
    new, halt = on_task_ended(
        state, callback.status, requested=stop_requested, now=now, policy=policy, rand=rand
    )
    ended: list[Effect] = [TaskEnded(state.name, callback.task_id, callback.status)]
    return new, ended if halt is None else [*ended, halt]


def note_restart(
    state: StreamState, now: float, policy: Policy
) -> tuple[StreamState, list[Effect]]:
    """A new task of the stream started at `now` after an earlier one: note it, and say when
    this restart makes `restart_loop_count` within the window (once per loop)."""
    window = policy.restart_loop_window
    times = (*(t for t in state.restart_times if now - t < window), now)
    # One more than the count is enough to tell "just reached it" from "already past it".
    new = replace(state, restart_times=times[-(policy.restart_loop_count + 1) :])
    if len(times) == policy.restart_loop_count:
        return new, [RestartLoop(state.name, len(times), window)]
    return new, []


def on_task_running(
    state: StreamState,
    *,
    task_id: str,
    spec_hash: str,
    started_at: float,
    now: float,
    segments: int,
    segment_ticks: int,
) -> StreamState:
    """The stream runs `task_id` now: started (its answer recorded) or adopted (an open
    intent's task, with `segments` already stored). A task after an earlier one counts as a
    restart."""
    restarted = state.started_at is not None or state.last_end_status is not None
    return replace(
        state,
        phase=Phase.RUNNING,
        task_id=task_id,
        spec_hash=spec_hash,
        started_at=started_at,
        last_seen=now,
        retry_at=None,
        run_segments=segments,
        run_failed=0,
        segment_ticks=segment_ticks,
        consecutive_errors=0,
        restarts=state.restarts + int(restarted),
        last_error=None,
        intent=None,
    )


def after_stop(
    state: StreamState, reason: StopReason, *, now: float, policy: Policy, rand: float
) -> StreamState | None:
    """The stream's task was stopped by streamwatch for `reason`: None for a removed stream
    (forgotten); a stalled one backs off before it starts again; any other starts when the
    plan allows (a budget or the next start of a changed spec decides)."""
    if reason == "removed":
        return None
    ended = replace(state, task_id=None, spec_hash=None, stop_reason=None, consecutive_errors=0)
    if reason == "stalled":
        failures = state.failures + 1
        delay = backoff_delay(failures, policy, rand=rand)
        return replace(ended, phase=Phase.BACKOFF, failures=failures, retry_at=now + delay)
    return replace(ended, phase=Phase.IDLE)


def on_stop_failed(state: StreamState, error: str) -> StreamState:
    """A stop could not reach MAVI (or be noted): the task stays the stream's, and the next
    plan tries again."""
    return replace(state, phase=Phase.RUNNING, stop_reason=None, last_error=error)


def _counted(probes: tuple[tuple[str, int], ...], outcome: str) -> tuple[tuple[str, int], ...]:
    counts = dict(probes)
    counts[outcome] = counts.get(outcome, 0) + 1
    return tuple(sorted(counts.items()))


def on_probe(
    state: StreamState,
    result: SourceInfo | ProbeFailed,
    *,
    fps: int,
    precharge_ticks: int,
    now: float,
    policy: Policy,
    rand: float,
) -> tuple[StreamState, bool, list[Effect]]:
    """The preflight probe before a start of the stream answered `result`. Returns the new
    state, whether the start goes ahead, and what follows:
    - media: go; the source's summary kept; `SourceOnline` after an outage; `FpsAboveSource`
      when `fps` is above the source's frame rate and the source changed since it was last
      seen (so once per change, not at every start);
    - `unavailable` (no ffprobe here): go, with `ProbeUnavailable` (a preflight that cannot
      probe must not keep streams down);
    - anything else: the source is down. No start: one pre-charge (`precharge_ticks`)
      avoided; `source_offline` until the next probe on the usual backoff; `SourceOffline`
      on the first probe of an outage."""
    if isinstance(result, SourceInfo):
        effects: list[Effect] = []
        if state.offline_since is not None:
            effects.append(SourceOnline(state.name, max(0.0, now - state.offline_since), result))
        if result.fps and fps > result.fps and not result.same_media(state.source):
            effects.append(FpsAboveSource(state.name, fps, result.fps))
        new = replace(
            state,
            probes=_counted(state.probes, PROBE_OK),
            source=result,
            offline_since=None,
        )
        return new, True, effects
    probes = _counted(state.probes, result.kind)
    if result.kind == "unavailable":
        return replace(state, probes=probes), True, [ProbeUnavailable(state.name, result.detail)]
    failures = state.failures + 1
    new = replace(
        state,
        phase=Phase.SOURCE_OFFLINE,
        probes=probes,
        failures=failures,
        retry_at=now + backoff_delay(failures, policy, rand=rand),
        offline_since=now if state.offline_since is None else state.offline_since,
        precharges_avoided=state.precharges_avoided + 1,
        ticks_saved=state.ticks_saved + precharge_ticks,
        last_error=f"source offline: {result.detail}",
    )
    offline: list[Effect] = []
    if state.offline_since is None:
        offline.append(SourceOffline(state.name, result.kind, result.detail))
    return new, False, offline


def on_start_unprobed(state: StreamState, *, now: float) -> tuple[StreamState, list[Effect]]:
    """A start without a probe (preflight is off now) of a stream whose source preflight last
    found down: the outage is no longer watched, so it is forgotten and its alert resolved."""
    if state.offline_since is None:
        return state, []
    gone = SourceOnline(state.name, max(0.0, now - state.offline_since), None)
    return replace(state, offline_since=None), [gone]


def on_open_intent(
    state: StreamState, attempt_id: str, *, now: float, policy: Policy
) -> StreamState | None:
    """At load: a start whose answer never reached the store. The stream adopts for
    `adopt_wait` from now; None when it cannot (held, or running a recorded task): the
    intent is closed, and a task of that start is an orphan."""
    if state.task_id is not None or state.phase is Phase.HELD:
        return None
    return replace(
        state,
        phase=Phase.ADOPTING,
        intent=attempt_id,
        retry_at=max(state.retry_at or now, now + policy.adopt_wait),
        last_error="the last start's answer was not recorded; waiting for its task",
    )


def on_resume(state: StreamState) -> StreamState | None:
    """`streamwatch resume`: a held, backing-off or source-offline stream starts (or probes)
    at once, its backoff forgotten; None for a stream that waits for nothing."""
    if state.phase not in (Phase.HELD, Phase.BACKOFF, Phase.SOURCE_OFFLINE):
        return None
    return replace(state, phase=Phase.IDLE, held_reason=None, retry_at=None, failures=0)


def orphan_to_stop(
    policy: Policy, *, ended: bool, segments: int, candidate: bool, stopping: bool
) -> bool:
    """Whether to stop an orphan task after this callback of it: with `on_orphan = "stop"`,
    once it called back `orphan_stop_after` times, unless it ended, an open intent may adopt
    it, or its stop is already under way."""
    return (
        policy.on_orphan == "stop"
        and not ended
        and not candidate
        and not stopping
        and segments >= policy.orphan_stop_after
    )
