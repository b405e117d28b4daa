"""Keep one MAVI task running per configured stream, and react to how tasks end.

`Supervisor` is the executor: it runs `policy.plan()` whenever something changes or a tick
passes and launches its actions, applies what the pure decisions of `streamwatch.policy` say
follows from a callback, a start or a stop, calls MAVI (starts through the crash-safe
protocol of `streamwatch.starts`), and records what happened in the store. It decides
nothing itself: every transition of a stream's state is a function of `policy`, and the
budget bookkeeping (what has fired, the gate) is the ledger's.

Why one module of this length: it is one executor whose steps (plan, start, adopt, stop,
observe, resume, shut down) share the stream table, the task group and the store, and each
step is short; split across modules they would share that state through a back door.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import operator
import random
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import Any, Protocol

import structlog

from streamwatch.background import Failures, TaskGroup
from streamwatch.config import BudgetsConfig, StreamConfig
from streamwatch.ledger import (
    PERIODS,
    BudgetEvent,
    BudgetGate,
    Fired,
    Spending,
    period_bounds,
    period_key,
    unreported_segments,
)
from streamwatch.mavi.callbacks import StreamEnded
from streamwatch.mavi.errors import MaviError
from streamwatch.policy import (
    Action,
    Effect,
    FpsAboveSource,
    Halt,
    MarkStalled,
    Phase,
    Policy,
    ProbeFailed,
    ProbeUnavailable,
    Recovered,
    RestartLoop,
    SegmentErrors,
    SourceInfo,
    SourceOffline,
    SourceOnline,
    Start,
    Stop,
    StreamState,
    TaskEnded,
    after_stop,
    note_restart,
    on_callback,
    on_open_intent,
    on_probe,
    on_resume,
    on_start_failed,
    on_start_unanswered,
    on_start_unprobed,
    on_stop_failed,
    on_task_running,
    orphan_to_stop,
    plan,
)
from streamwatch.pricing import segment_cost_ticks
from streamwatch.probe import MediaInfo, ProbeError, probe
from streamwatch.redact import Redactor
from streamwatch.starts import Started, StartFailed, Starts, StreamStarter
from streamwatch.store import (
    Adopted,
    CallbackOutcome,
    FleetSpend,
    SpendTotal,
    StateStore,
    StreamRecord,
)
from streamwatch.store.budget import OverBudget
from streamwatch.store.leases import Fenced, FleetView

__all__ = ["AfterCommit", "Prober", "Supervisor", "source_info"]

log = structlog.get_logger("streamwatch.supervisor")


class AfterCommit(Protocol):
    """What follows a committed callback (the server's pipeline: evidence, the supervisor's
    `observe`, metrics, the log)."""

    def __call__(self, outcome: CallbackOutcome) -> None: ...


class Prober(Protocol):
    """What preflight probes a source with (`streamwatch.probe.probe`)."""

    async def __call__(self, source: str, *, timeout: float) -> MediaInfo: ...  # noqa: ASYNC109 - the probe kills its child at the deadline


def source_info(info: MediaInfo, at: float) -> SourceInfo:
    """The summary of a probe kept per stream (status API, fps check)."""
    return SourceInfo(
        at=at,
        video_codec=info.video_codec,
        width=info.width,
        height=info.height,
        fps=info.fps,
        bitrate=info.video_bitrate or info.overall_bitrate,
        audio_codec=info.audio_codec,
    )


class _Streams(dict[str, StreamState]):
    """The supervisor's stream states. Notes the streams whose durable part (`record()`)
    changes, so that only those are written to the store."""

    def __init__(self) -> None:
        super().__init__()
        self.dirty: set[str] = set()

    def __setitem__(self, name: str, state: StreamState) -> None:
        old = self.get(name)
        # The record's fields compared in place: building two records to compare them was
        # a tenth of the callback path's bookkeeping after the commit.
        if old is None or _durable(old) != _durable(state):
            self.dirty.add(name)
        super().__setitem__(name, state)


# What `StreamState.record()` keeps, read off a state (its fields have the record's names).
_durable = operator.attrgetter(*(f.name for f in dataclasses.fields(StreamRecord)))


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
        prober: Prober = probe,
    ) -> None:
        self._client = client
        self._probe = prober
        # Every text that leaves through the status API, events and alerts passes here.
        self._redact = redact or Redactor()
        self.spending = spending
        self.gate = BudgetGate()
        self._fired: Fired = frozenset()  # budget events already raised, this period
        self._unreported_flagged: set[str] = set()  # tasks flagged as billing unreported
        self._store = store
        self._starts = Starts(client=client, store=store, clock=clock, text=self._text)
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
        self._ending: set[str] = set()  # stopped at shutdown, final callback not stored yet
        self._probing: set[asyncio.Task[MediaInfo]] = set()  # preflight probes under way
        # What follows a committed callback: callbacks claimed at a start or an adoption go
        # the same way as live ones (see `set_after_commit`).
        self._after_commit: AfterCommit = self.observe
        # [cluster]: the streams this replica holds the lease of (None: a single daemon, which
        # owns every stream). See `set_ownership`.
        self._owned: Callable[[], frozenset[str]] | None = None
        self._halt_saved: Halt | None = None  # the halt as this replica last wrote or read it
        # [cluster]: the fleet as the last lease round saw it (None: a single daemon).
        self.fleet: FleetView | None = None

    def set_after_commit(self, after_commit: AfterCommit) -> None:
        """Send callbacks claimed by a recorded or adopted task through `after_commit`, as the
        callback handler does for live ones (it must call `observe`). Set after construction:
        that pipeline is the server's, which is built on this supervisor."""
        self._after_commit = after_commit

    # -- set-up ---------------------------------------------------------------------------------

    def set_ownership(self, owned: Callable[[], frozenset[str]]) -> None:
        """[cluster]: plan only the streams `owned()` names (the leases this replica holds,
        whose local deadline has not passed). Set before `load()`, which then loads the
        account's state but no stream: each comes with `take()` once its lease is claimed."""
        self._owned = owned

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
        self.halt = self._halt_saved = await self._store.load_halt()
        self._fired = frozenset(await self._store.load_budget_fired())
        await self._load_spending(now)
        self._unreported_flagged = await self._store.flagged_tasks("billing_unreported")
        if self._owned is None:
            await self._load_streams(None, now)
        self._notify()

    async def share_account(self, fired: Collection[str] = ()) -> None:
        """[cluster]: take the account's state as the fleet left it in the store (each lease
        round): the spend of every replica's charges, the budget thresholds fired (`fired`:
        those in the fleet's own rows), and the halt another replica imposed or lifted."""
        now = self._clock()
        await self._load_spending(now)
        self._fired = self._fired | await self._store.load_budget_fired() | set(fired)
        stored = await self._store.load_halt()
        if stored is not None and stored != self.halt:
            if self.halt is None or stored.since >= self.halt.since:
                log.error("supervisor.account_halted", reason=stored.reason, until=stored.until)
                self.halt = self._halt_saved = stored
        elif stored is None and self.halt is not None and self.halt == self._halt_saved:
            # Saved by this replica, gone from the store: another replica resumed the account.
            log.info("supervisor.account_resumed_by_fleet", reason=self.halt.reason)
            self.halt = self._halt_saved = None
        self._notify()

    async def _load_spending(self, now: float) -> None:
        """The ledger's totals (every period, every stream, the orphans' estimates)."""
        everything = await self._store.charge_totals(since=float("-inf"), until=float("inf"))
        self.spending.all_time = {t.stream: t.ticks for t in everything}
        for period in PERIODS:
            start, end = period_bounds(period, now)
            totals = await self._store.charge_totals(since=start, until=end)
            self.spending.load(period, period_key(period, now), {t.stream: t.ticks for t in totals})
            orphans = await self._store.orphan_charge_totals(since=start, until=end)
            self.spending.load_orphans(period, period_key(period, now), orphans.ticks)

    async def take(self, names: Collection[str]) -> None:
        """[cluster]: this replica now holds these streams' leases: load each as a restart
        would (its record, its running task adopted as it is, never restarted, its open
        intents looked for at once). What was known of them before is replaced."""
        fresh = set(names)
        if not fresh:
            return
        for name in fresh:
            self.streams.pop(name, None)
            self.streams.dirty.discard(name)
        self._by_task = {t: n for t, n in self._by_task.items() if n not in fresh}
        await self._load_streams(fresh, self._clock())
        for name in sorted(fresh):
            self._try_adopt(name)
        self._notify()

    def drop(self, names: Collection[str]) -> None:
        """[cluster]: this replica no longer holds these streams' leases: forget them, with no
        call to MAVI and nothing written (their new owner carries on)."""
        for name in names:
            state = self.streams.pop(name, None)
            self.streams.dirty.discard(name)
            if state is not None:
                log.info("supervisor.stream_dropped", stream=name, task_id=state.task_id)
        self._by_task = {t: n for t, n in self._by_task.items() if n not in names}
        self._notify()

    def releasable(self, names: Collection[str]) -> list[str]:
        """Of these streams, those that may be handed to another replica now: none of their
        actions (a start, a stop, an adoption) is under way."""
        busy = (Phase.STARTING, Phase.STOPPING, Phase.ADOPTING)
        return sorted(n for n in names if (s := self.streams.get(n)) is None or s.phase not in busy)

    async def _load_streams(self, names: Collection[str] | None, now: float) -> None:
        """Restore what the store says of these streams (every stream: None): their records,
        their running tasks (adopted), and their open intents."""
        for record in (await self._store.streams()).values():
            if names is not None and record.name not in names:
                continue
            if record != StreamRecord(record.name):
                self.streams[record.name] = StreamState.restored(
                    record, now=now, policy=self.policy
                )
        for task in await self._store.running_tasks():
            if names is not None and task.stream not in names:
                continue
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
        await self._load_intents(names, now)

    async def _load_intents(self, names: Collection[str] | None, now: float) -> None:
        """Starts whose answer never reached the store: MAVI may have created their tasks.
        Each such stream adopts for `adopt_wait` from now (callbacks parked before the restart
        are matched at once)."""
        for intent in await self._store.open_intents():
            name = intent.stream
            if names is not None and name not in names:
                continue
            known = self.streams.get(name, StreamState(name))
            adopting = on_open_intent(known, intent.attempt_id, now=now, policy=self.policy)
            if adopting is None:
                # A task of this start is an orphan (reported, or stopped with on_orphan).
                await self._store.close_intent(
                    intent.attempt_id, state="unmatched", detail=f"stream {known.phase}"
                )
                continue
            self.streams[name] = adopting
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

    def stop_planning(self) -> None:
        """Plan nothing more (no start from now on); `shutdown()` follows."""
        self._stopping = True
        self._wake.set()

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
        if self._stopping:
            return []  # shutting down: `shutdown()` stops what it must
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
        desired: Mapping[str, StreamConfig] = self.desired
        streams: Mapping[str, StreamState] = self.streams
        policy = self.policy
        if self._owned is not None:
            # [cluster]: only what this replica holds; a stream not held is neither started,
            # stopped nor forgotten here (its owner decides).
            owned = self._owned()
            desired = {n: c for n, c in self.desired.items() if n in owned}
            streams = {n: s for n, s in self.streams.items() if n in owned}
            fleet = self.fleet
            if fleet is not None and policy.max_running is not None:
                # max_running is the account's: what runs on the other replicas (as of the
                # last lease round) takes its share.
                others = sum(1 for n in fleet.running if n not in owned)
                policy = replace(policy, max_running=max(0, policy.max_running - others))
        actions = plan(desired, streams, now=now, halt=self.halt, policy=policy, gate=self.gate)
        for action in actions:
            self._launch(action)
        return actions

    # -- money ---------------------------------------------------------------------------------

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
        fired, events = self.spending.check(
            now,
            running=[n for n, s in self.streams.items() if s.task_id],
            fired=pruned,
            estimates=estimates,
        )
        if fired == self._fired:
            return
        self._fired = fired
        if not events:  # only keys of past periods dropped
            self._spawn(self._store.save_budget_fired(fired))
        self._budget_events(events)

    def _count(
        self,
        stream: str,
        ticks: int,
        at: float,
        *,
        task_id: str | None,
        spend: FleetSpend | None = None,
    ) -> None:
        """Count a charge the store recorded, and record the thresholds it crossed, each with
        this charge and the spend right after it. [cluster] `spend`: what the charge's
        transaction found (the fleet's totals after it, the thresholds it fired there)."""
        if spend is None:
            self._fired, events = self.spending.charge(stream, ticks, at, fired=self._fired)
            self._budget_events(events, task_id)
            return
        self.spending.add(stream, ticks, at)
        self._take_spend(spend)

    def _take_spend(self, spend: FleetSpend) -> None:
        """[cluster]: the fleet's totals a charge's transaction found, and the thresholds it
        fired there (their events and alerts recorded with it: logged here)."""
        self.spending.take_totals(spend.totals)
        for fired in spend.fired:
            log.warning(
                "supervisor.budget_threshold",
                stream=fired.stream,
                period=fired.period,
                percent=fired.percent,
                detail=fired.detail,
            )
        self._fired = self._fired | {f.key for f in spend.fired}

    def now(self) -> float:
        """The supervisor's clock (the one its charges are dated by)."""
        return self._clock()

    def take_fleet_spend(self, totals: Iterable[SpendTotal]) -> None:
        """[cluster]: the fleet's spend as the store holds it (another replica's charges may
        have brought a cap near): the next plan gates on it."""
        now = self._clock()
        before = self.spending.gate(now, self.estimates(now))
        self.spending.take_totals(totals)
        if self.spending.gate(now, self.estimates(now)) != before:
            self._notify()

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
                    budget_fired=self._fired,
                    fires=event.key,
                )
            )

    # -- actions -------------------------------------------------------------------------------

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
        """Start the stream's task (`Starts`: intent written, MAVI asked, answer recorded) and
        take what came of it. Every way this can fail ends in a known state (backoff, halt, or
        adopting)."""
        spec = self.desired.get(name)
        state = self.streams[name]
        if spec is not None and spec.preflight:
            await self._preflight(name, spec)
            spec = self.desired.get(name)  # as it is now: a reload may have changed it
            state = self.streams.get(name, state)
            if self._stopping or (spec is not None and state.phase is not Phase.STARTING):
                return  # the source is down (source_offline), or shutting down: no start
        elif state.offline_since is not None:
            state, effects = on_start_unprobed(state, now=self._clock())
            self.streams[name] = state
            self._apply(effects)
        if spec is None:  # removed while queued (or while its source was probed)
            self.streams.pop(name, None)
            if state.intent is not None:
                await self._close_intent(state.intent, "the stream was removed")
            return
        outcome = await self._starts.start(name, spec)
        if isinstance(outcome, Adopted):
            self._took_adopted(name, outcome)
        elif isinstance(outcome, StartFailed):
            await self._start_failed(name, state, outcome)
        else:
            await self._started(name, state, outcome, fps=spec.fps)

    async def _preflight(self, name: str, spec: StreamConfig) -> None:
        """Probe the stream's source before its start, and apply what `on_probe` decides: the
        stream stays `starting` when the start goes ahead, or is `source_offline`. The probe
        is a task of its own, awaited by this start's (so planning and other streams go on),
        which `shutdown()` cancels (no start follows once it began)."""
        now = self._clock()
        result: SourceInfo | ProbeFailed
        probing = asyncio.create_task(
            self._probe(spec.url, timeout=spec.preflight_timeout_seconds),
            name=f"supervisor.preflight:{name}",
        )
        self._probing.add(probing)
        try:
            info = await probing
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if self._stopping and (this is None or not this.cancelling()):
                return  # `shutdown()` cancelled the probe
            raise
        except ProbeError as exc:
            result = ProbeFailed(exc.kind, self._text(str(exc)))
        except Exception as exc:  # noqa: BLE001 - every start ends in a known state: a bug in a probe is a failed probe
            self._tasks.failures.failed("supervisor.preflight", exc, stream=name)
            result = ProbeFailed("failed", self._text(f"{type(exc).__name__}: {exc}"))
        else:
            result = source_info(info, self._clock())
        finally:
            self._probing.discard(probing)
        current = self.desired.get(name)
        state = self.streams.get(name)
        if current is None or state is None:  # removed while it probed: `_start` forgets it
            return
        ticks = segment_cost_ticks(
            fps=current.fps,
            content_moderation=current.content_moderation,
            logo_detection=current.logo_detection,
        )
        new, go, effects = on_probe(
            state,
            result,
            fps=current.fps,
            precharge_ticks=ticks,
            now=self._clock(),
            policy=self.policy,
            rand=self._rng.random(),
        )
        self.streams[name] = new
        if isinstance(result, SourceInfo):
            log.info(
                "supervisor.preflight_ok",
                stream=name,
                video_codec=result.video_codec,
                resolution=result.resolution,
                fps=result.fps,
                seconds=round(result.at - now, 3),
            )
        else:
            log.info(
                "supervisor.preflight_failed",
                stream=name,
                kind=result.kind,
                error=result.detail,
                start=go,
                retry_in=None if go else round((new.retry_at or now) - now, 3),
            )
        self._apply(effects)
        if not go:
            self._notify(replan=False)

    async def _started(self, name: str, state: StreamState, started: Started, *, fps: int) -> None:
        registered = started.registered
        task_id = started.task_id
        new = self._take_task(
            name,
            state,
            task_id=task_id,
            spec_hash=started.spec_hash,
            started_at=started.at,
            now=started.at,
            segment_ticks=registered.precharge_ticks,
            charges=[(started.at, registered.precharge_ticks)],
            orphan_removed=registered.orphan_removed,
            spend=registered.spend,
        )
        effects: list[Effect] = []
        if new.restarts > state.restarts:
            new, effects = note_restart(new, started.at, self.policy)
        self.streams[name] = new
        log.info("supervisor.task_started", stream=name, task_id=task_id, fps=fps)
        self._apply(effects)
        await self._record("task_started", stream=name, task_id=task_id)
        for outcome in registered.claimed:
            self._after_commit(outcome)

    def _take_task(
        self,
        name: str,
        state: StreamState,
        *,
        task_id: str,
        spec_hash: str,
        started_at: float,
        now: float,
        segment_ticks: int,
        charges: list[tuple[float, int]],
        orphan_removed: Iterable[tuple[float, int]],
        spend: FleetSpend | None,
        segments: int = 0,
    ) -> StreamState:
        """What a task recorded as the stream's (started, or adopted for its open intent)
        changes, whichever way it came: its charges counted (the pre-charge first), its
        orphan estimates taken back, the task known as the stream's. Returns the stream's
        running state, for the caller to set."""
        for at, ticks in charges:
            if spend is None:
                self._count(name, ticks, at, task_id=task_id)
            else:  # [cluster]: the thresholds were found in the charges' transaction
                self.spending.add(name, ticks, at)
        if spend is not None:
            self._take_spend(spend)
        for at, ticks in orphan_removed:
            self.spending.add_orphan(-ticks, at)
        self.spending.forget_orphan(task_id)
        self._by_task[task_id] = name
        return on_task_running(
            state,
            task_id=task_id,
            spec_hash=spec_hash,
            started_at=started_at,
            now=now,
            segments=segments,
            segment_ticks=segment_ticks,
        )

    async def _start_failed(self, name: str, state: StreamState, failed: StartFailed) -> None:
        """A start did not end with a recorded task: a refusal backs off (or halts the
        account); a start MAVI may have answered adopts."""
        now, detail, error = self._clock(), failed.detail, failed.error
        status = error.status if isinstance(error, MaviError) else None
        rand = self._rng.random()
        if isinstance(error, OverBudget) and failed.unanswered is None:
            # [cluster]: the fleet's spend, read in the intent's transaction, leaves no room
            # for its pre-charge: MAVI was not asked; the gate holds it (over_budget).
            self.spending.take_totals(error.spend.totals)
            self.streams[name] = replace(state, phase=Phase.IDLE)
            log.warning("supervisor.start_over_budget", stream=name, reason=str(error))
            return
        if isinstance(error, Fenced) and failed.unanswered is None:
            # [cluster]: the lease moved before the intent was written: MAVI was not asked,
            # and the stream is another replica's now (dropped at the next lease round).
            self.streams[name] = replace(state, phase=Phase.IDLE)
            log.info("supervisor.fenced", stream=name, action="start")
            return
        if failed.unanswered is None:
            new, halt = on_start_failed(
                state, error, now=now, policy=self.policy, rand=rand, detail=detail
            )
            self.streams[name] = new
            if halt is not None:
                self._impose_halt(halt)
            log.warning("supervisor.start_failed", stream=name, error=detail, status=status)
            await self._record("start_failed", stream=name, status=status, detail=detail)
            return
        attempt_id = failed.unanswered
        new = on_start_unanswered(
            state, attempt_id, now=now, policy=self.policy, rand=rand, detail=detail
        )
        self.streams[name] = new
        self._notify(replan=False)  # waiters see it adopting before its callbacks come
        wait = (new.retry_at or now) - now
        log.warning(
            "supervisor.start_unanswered",
            stream=name,
            attempt_id=attempt_id,
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
        self.streams[name] = self._take_task(
            name,
            self.streams.get(name, StreamState(name)),
            task_id=adopted.task_id,
            spec_hash=adopted.spec_hash,
            started_at=adopted.started_at,
            now=self._clock(),
            segment_ticks=adopted.precharge_ticks,
            charges=[(adopted.precharge_at, adopted.precharge_ticks), *adopted.backfilled],
            orphan_removed=adopted.orphan_removed,
            spend=adopted.spend,
            segments=len(adopted.backfilled),
        )
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
        except Fenced:
            # [cluster]: the lease moved before the stop was noted: MAVI was not asked, and the
            # task is another replica's now (the stream is dropped at the next lease round).
            state = self.streams.get(action.stream)
            if state is not None and state.task_id == action.task_id:
                self.streams[action.stream] = replace(state, phase=Phase.RUNNING)
            log.info("supervisor.fenced", stream=action.stream, action="stop")
            return
        except Exception as exc:  # noqa: BLE001 - a stop's edge: whatever failed, it is retried
            # Could not reach MAVI (or note the stop): keep the task as ours and try again on
            # the next pass. Anything but MAVI's own errors is a bug: its traceback is logged.
            if not isinstance(exc, MaviError):
                self._tasks.failures.failed("supervisor.stop", exc, stream=action.stream)
            error = self._text(str(exc) or type(exc).__name__)
            state = self.streams.get(action.stream)
            if state is not None and state.task_id == action.task_id:
                self.streams[action.stream] = on_stop_failed(state, error)
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
        after = after_stop(
            state, action.reason, now=self._clock(), policy=self.policy, rand=self._rng.random()
        )
        if after is None:
            self.streams.pop(action.stream, None)
        else:
            self.streams[action.stream] = after

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
        self._halt_saved = halt

    def _apply(self, effects: Iterable[Effect]) -> None:
        """Log and record what a decision says follows (or halt the account)."""
        for effect in effects:
            if isinstance(effect, Halt):
                self._impose_halt(effect)
            elif isinstance(effect, Recovered):
                log.info(
                    "supervisor.stream_recovered", stream=effect.stream, task_id=effect.task_id
                )
                self._spawn(
                    self._record("stream_recovered", stream=effect.stream, task_id=effect.task_id)
                )
            elif isinstance(effect, SegmentErrors):
                log.warning(
                    "supervisor.segment_errors", stream=effect.stream, consecutive=effect.count
                )
                self._spawn(
                    self._record(
                        "segment_errors",
                        stream=effect.stream,
                        task_id=effect.task_id,
                        status=effect.status,
                        detail=effect.detail,
                    )
                )
            elif isinstance(effect, TaskEnded):
                # Its event (and alert, unless this daemon asked for the stop) was recorded
                # with the callback.
                self._by_task.pop(effect.task_id, None)
                log.warning(
                    "supervisor.task_ended",
                    stream=effect.stream,
                    task_id=effect.task_id,
                    status=effect.status,
                )
            elif isinstance(effect, RestartLoop):
                log.warning(
                    "supervisor.restart_loop", stream=effect.stream, restarts=effect.restarts
                )
                self._spawn(
                    self._record("restart_loop", stream=effect.stream, detail=effect.detail)
                )
            elif isinstance(effect, SourceOffline):
                log.warning(
                    "supervisor.source_offline",
                    stream=effect.stream,
                    kind=effect.kind,
                    error=effect.detail,
                )
                self._spawn(
                    self._record(
                        "source_offline",
                        stream=effect.stream,
                        detail=f"source offline ({effect.kind}): {effect.detail}; no start"
                        " (no pre-charge) until a probe finds it",
                    )
                )
            elif isinstance(effect, SourceOnline):
                log.info(
                    "supervisor.source_online",
                    stream=effect.stream,
                    offline_seconds=round(effect.offline_seconds, 3),
                )
                self._spawn(
                    self._record("source_online", stream=effect.stream, detail=effect.detail)
                )
            elif isinstance(effect, FpsAboveSource):
                log.warning(
                    "supervisor.fps_above_source",
                    stream=effect.stream,
                    fps=effect.fps,
                    source_fps=effect.source_fps,
                )
                self._spawn(
                    self._record("fps_above_source", stream=effect.stream, detail=effect.detail)
                )
            elif isinstance(effect, ProbeUnavailable):
                log.warning(
                    "supervisor.preflight_unavailable", stream=effect.stream, error=effect.detail
                )
                self._spawn(
                    self._record(
                        "preflight_unavailable",
                        stream=effect.stream,
                        detail=f"preflight cannot probe: {effect.detail}; started without it",
                    )
                )

    # -- what callbacks tell us ----------------------------------------------------------------

    def observe(self, outcome: CallbackOutcome) -> None:
        """Update stream state from a stored callback. Cheap and synchronous: it runs in the
        callback handler after the store committed."""
        if outcome.kind == "orphan":
            self._observe_orphan(outcome)
            return
        if isinstance(outcome.callback, StreamEnded) and outcome.callback.task_id in self._ending:
            self._ending.discard(outcome.callback.task_id)  # stored now, or before (a duplicate)
            self._notify(replan=False)
        if outcome.kind != "stored" or outcome.stream is None:
            return
        name = outcome.stream
        # Plain segments change nothing plan() looks at (stalls are found on ticks), so they
        # do not wake the planner; an end, a recovery or a charge near a cap does.
        replan = False
        if outcome.ticks:
            # Counted whichever task it came from: an old task's late segment costs money too.
            self._count(
                name,
                outcome.ticks,
                outcome.at,
                task_id=outcome.callback.task_id,
                spend=outcome.spend,
            )
            replan = self.spending.near_cap(name, outcome.at)
        state = self.streams.get(name)
        cb = outcome.callback
        if state is None or state.task_id != cb.task_id or state.phase is Phase.STOPPING:
            # An older task of the stream, or one whose stop is in flight (that stop decides
            # what comes next): stored, nothing more to do.
            return
        new, effects = on_callback(
            state,
            cb,
            stop_requested=outcome.stop_requested,
            now=self._clock(),
            policy=self.policy,
            rand=self._rng.random(),
        )
        self.streams[name] = new
        self._apply(effects)
        replan = replan or any(isinstance(e, Recovered | TaskEnded) for e in effects)
        self._notify(replan=replan)

    def _observe_orphan(self, outcome: CallbackOutcome) -> None:
        """A callback from a task nobody recorded: count its estimate, let the intent that
        may own it adopt it, or (on_orphan = "stop") stop it once it has called back enough."""
        cb = outcome.callback
        replan = False
        if outcome.ticks:
            self.spending.add_orphan(outcome.ticks, outcome.at)
            replan = self.spending.near_account_cap(outcome.at)
        ended = isinstance(cb, StreamEnded)
        if ended:
            self.spending.forget_orphan(cb.task_id)
        else:
            self.spending.note_orphan(cb.task_id, outcome.segment_ticks, outcome.at)
        if outcome.candidate_for is not None:
            owner = next(
                (n for n, s in self.streams.items() if s.intent == outcome.candidate_for), None
            )
            if owner is not None:
                self._try_adopt(owner)
        if orphan_to_stop(
            self.policy,
            ended=ended,
            segments=outcome.orphan_segments,
            candidate=outcome.candidate_for is not None,
            stopping=cb.task_id in self._orphan_stops,
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
            self._halt_saved = None
            await self._record("account_resumed")
        released = []
        for name, state in list(self.streams.items()):
            new = on_resume(state) if not names or name in names else None
            if new is not None:
                self.streams[name] = new
                await self._record("stream_resumed", stream=name)
                released.append(name)
        await self._persist()
        self._notify()
        return released

    async def shutdown(self, *, stop_tasks: bool, attempts: int = 1) -> list[str]:
        """Stop planning; with `stop_tasks`, stop every running task, trying a stop that
        failed again up to `attempts` times in all. Returns the ids of the stops made."""
        self._stopping = True
        self._wake.set()
        for probing in self._probing:  # no start follows: nothing to wait for
            probing.cancel()
        await self.settle()
        stopped: list[str] = []
        for _ in range(attempts if stop_tasks else 0):
            stops = [
                Stop(s.name, s.task_id, "shutdown")
                for s in self.streams.values()
                if s.task_id is not None and s.phase in (Phase.RUNNING, Phase.STALLED)
            ]
            if not stops:
                break
            self._ending |= {s.task_id for s in stops}
            for stop in stops:
                # As _launch does: the stop in flight owns what its final 14 means.
                state = self.streams[stop.stream]
                self.streams[stop.stream] = replace(
                    state, phase=Phase.STOPPING, stop_reason="shutdown"
                )
            await asyncio.gather(*(self._stop(a) for a in stops), return_exceptions=True)
            stopped += [a.task_id for a in stops if a.task_id not in stopped]
            # A stop that failed left its stream running the task (`on_stop_failed`): no final
            # callback is coming for it; the next attempt tries it again.
            asked = {a.task_id for a in stops}
            self._ending -= {
                s.task_id
                for s in self.streams.values()
                if s.phase is Phase.RUNNING and s.task_id in asked
            }
        await self._persist()
        return stopped

    @property
    def ending(self) -> frozenset[str]:
        """The tasks `shutdown()` stopped whose final callback is not stored yet (the daemon
        keeps serving a little for them: `wait_until(lambda: not supervisor.ending)`)."""
        return frozenset(self._ending)

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
        fires: str | None = None,
    ) -> None:
        """Write an event to the store; the alerts it raises (and `budget_fired`, the budget
        thresholds fired) are written with it. `fires`: the budget event's key ([cluster]:
        recorded only by the replica that fires it first)."""
        await self._store.add_event(
            kind,
            stream=stream,
            task_id=task_id,
            status=status,
            detail=self._text(detail),
            budget_fired=budget_fired,
            fires=fires,
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
