"""The supervisor's pure decisions, table-driven."""

from __future__ import annotations

from dataclasses import replace

import pytest

from streamwatch.config import StreamConfig
from streamwatch.mavi.errors import AuthError, CapacityError, InsufficientBalance, TransientError
from streamwatch.policy import (
    Forget,
    Halt,
    MarkStalled,
    Phase,
    Policy,
    Start,
    Stop,
    StreamState,
    backoff_delay,
    on_start_failed,
    on_task_ended,
    plan,
)
from streamwatch.store import StreamRecord

POLICY = Policy(
    stall_seconds=30,
    on_stall="restart",
    restart_initial=5,
    restart_max=300,
    restart_jitter=0.2,
    stable_after_segments=12,
    error_threshold=3,
    restart_loop_count=5,
    restart_loop_window=1800,
    balance_recheck=900,
    max_running=None,
)


def spec(name: str, fps: int = 1) -> StreamConfig:
    return StreamConfig(
        name=name,
        url=f"rtmp://h/{name}",
        fps=fps,
        content_moderation=True,
        logo_detection=False,
        max_logos=5,
    )


def running(name: str, *, fps: int = 1, last_seen: float = 100.0, phase: Phase = Phase.RUNNING):
    return StreamState(
        name,
        phase,
        task_id=f"task-{name}",
        spec_hash=spec(name, fps).spec_hash(),
        started_at=50.0,
        last_seen=last_seen,
    )


NOW = 110.0
HALT = Halt("balance", 100.0, 200.0)


@pytest.mark.parametrize(
    ("desired", "observed", "halt", "policy", "expected"),
    [
        pytest.param(["a"], [], None, POLICY, [Start("a")], id="new stream starts"),
        pytest.param(["a"], [running("a")], None, POLICY, [], id="healthy stream is left alone"),
        pytest.param(
            [],
            [running("a")],
            None,
            POLICY,
            [Stop("a", "task-a", "removed")],
            id="removed stream is stopped",
        ),
        pytest.param(
            [],
            [StreamState("a", Phase.BACKOFF)],
            None,
            POLICY,
            [Forget("a")],
            id="removed idle stream is forgotten",
        ),
        pytest.param(
            [],
            [StreamState("a", Phase.STARTING)],
            None,
            POLICY,
            [],
            id="removed stream mid-start waits for the start",
        ),
        pytest.param(
            ["a"],
            [StreamState("a", Phase.SOURCE_OFFLINE, retry_at=NOW + 1, offline_since=90.0)],
            None,
            POLICY,
            [],
            id="offline source waits for its next probe",
        ),
        pytest.param(
            ["a"],
            [StreamState("a", Phase.SOURCE_OFFLINE, retry_at=NOW - 1, offline_since=90.0)],
            None,
            POLICY,
            [Start("a")],
            id="offline source is probed again (a start) when its backoff is over",
        ),
        pytest.param(
            [],
            [StreamState("a", Phase.SOURCE_OFFLINE, retry_at=NOW + 1)],
            None,
            POLICY,
            [Forget("a")],
            id="removed offline stream is forgotten",
        ),
        pytest.param(
            [("a", 2)],
            [running("a")],
            None,
            POLICY,
            [Stop("a", "task-a", "changed")],
            id="changed stream restarts",
        ),
        pytest.param(
            ["a"],
            [running("a", last_seen=70.0)],
            None,
            POLICY,
            [MarkStalled("a", "task-a"), Stop("a", "task-a", "stalled")],
            id="silent stream is stalled and restarted",
        ),
        pytest.param(
            ["a"],
            [running("a", last_seen=70.0)],
            None,
            replace(POLICY, on_stall="wait"),
            [MarkStalled("a", "task-a")],
            id="stall with wait policy only marks",
        ),
        pytest.param(
            ["a"],
            [running("a", last_seen=70.0, phase=Phase.STALLED)],
            None,
            replace(POLICY, on_stall="wait"),
            [],
            id="stalled stream under wait is not marked twice",
        ),
        pytest.param(
            ["a"], [StreamState("a", Phase.HELD)], None, POLICY, [], id="held stream stays stopped"
        ),
        pytest.param(
            ["a"],
            [StreamState("a", Phase.BACKOFF, retry_at=120.0)],
            None,
            POLICY,
            [],
            id="backoff not yet over",
        ),
        pytest.param(
            ["a"],
            [StreamState("a", Phase.BACKOFF, retry_at=105.0)],
            None,
            POLICY,
            [Start("a")],
            id="backoff over",
        ),
        pytest.param(
            ["a", "b"],
            [StreamState("b", Phase.BACKOFF, retry_at=105.0)],
            HALT,
            POLICY,
            [],
            id="halt blocks every start",
        ),
        pytest.param(["a"], [running("a")], HALT, POLICY, [], id="halt leaves running tasks"),
        pytest.param(
            ["a"],
            [],
            Halt("balance", 0.0, 105.0),
            POLICY,
            [Start("a")],
            id="expired halt no longer blocks",
        ),
        pytest.param(
            ["a", "b", "c"],
            [running("a")],
            None,
            replace(POLICY, max_running=2),
            [Start("b")],
            id="max_running fills free slots only",
        ),
        pytest.param(
            ["a", "b"],
            [
                StreamState("a", Phase.BACKOFF, retry_at=100.0),
                StreamState("b", Phase.BACKOFF, retry_at=90.0),
            ],
            None,
            replace(POLICY, max_running=1),
            [Start("b")],
            id="longest waiting goes first",
        ),
    ],
)
def test_plan(desired, observed, halt, policy, expected):
    """plan() turns wanted and observed state into exactly these actions."""
    specs = {}
    for item in desired:
        name, fps = item if isinstance(item, tuple) else (item, 1)
        specs[name] = spec(name, fps)
    actions = plan(specs, {s.name: s for s in observed}, now=NOW, halt=halt, policy=policy)
    assert actions == expected


def test_plan_is_pure():
    """The same inputs give the same actions and leave the inputs unchanged."""
    observed = {"a": running("a", last_seen=0.0)}
    first = plan({"a": spec("a")}, observed, now=NOW, halt=None, policy=POLICY)
    assert plan({"a": spec("a")}, observed, now=NOW, halt=None, policy=POLICY) == first
    assert observed["a"].phase is Phase.RUNNING


@pytest.mark.parametrize(
    ("status", "requested", "phase", "halted"),
    [
        (14, False, Phase.HELD, False),
        (14, True, Phase.BACKOFF, False),
        (15, False, Phase.BACKOFF, False),
        (16, False, Phase.BACKOFF, False),
        (402, False, Phase.IDLE, True),
    ],
)
def test_task_endings(status, requested, phase, halted):
    """How each end status moves the stream, and which halt the account."""
    state, halt = on_task_ended(
        running("a"), status, requested=requested, now=NOW, policy=POLICY, rand=0.0
    )
    assert state.phase is phase
    assert state.task_id is None
    assert state.last_end_status == status
    assert (halt is not None) == halted
    if halt is not None:
        assert halt.until == NOW + POLICY.balance_recheck
    if phase is Phase.BACKOFF:
        assert state.retry_at == NOW + 5
        assert state.failures == 1


def test_non_ending_status_is_refused():
    """Feeding a non-terminal status to on_task_ended is a programming error."""
    with pytest.raises(ValueError, match="does not end"):
        on_task_ended(running("a"), 0, requested=False, now=NOW, policy=POLICY, rand=0.0)


@pytest.mark.parametrize(
    ("error", "phase", "halt_reason"),
    [
        (InsufficientBalance("x", status=402), Phase.IDLE, "balance"),
        (AuthError("x", status=401), Phase.IDLE, "auth"),
        (CapacityError("x", status=409), Phase.BACKOFF, None),
        (TransientError("x", status=503), Phase.BACKOFF, None),
    ],
)
def test_start_failures(error, phase, halt_reason):
    """402 and 401 halt the account; anything else backs off."""
    state, halt = on_start_failed(
        StreamState("a", Phase.STARTING), error, now=NOW, policy=POLICY, rand=0.5
    )
    assert state.phase is phase
    assert (halt.reason if halt else None) == halt_reason
    assert state.last_error == "x"


@pytest.mark.parametrize(
    ("failures", "rand", "delay"),
    [
        (1, 0.0, 5.0),
        (2, 0.0, 10.0),
        (3, 0.0, 20.0),
        (7, 0.0, 300.0),
        (50, 0.0, 300.0),
        (1, 0.5, 4.5),
        (2, 0.999, 10 * (1 - 0.2 * 0.999)),
    ],
)
def test_backoff_doubles_is_capped_and_jittered(failures, rand, delay):
    """Backoff doubles from the initial delay up to the cap, minus up to `jitter` of it."""
    assert backoff_delay(failures, POLICY, rand=rand) == pytest.approx(delay)


LATER = 1_000_000.0


@pytest.mark.parametrize(
    ("record", "phase", "retry_at", "restart_times"),
    [
        # Backing off: the retry time holds, the attempt count with it.
        (StreamRecord("a", failures=3, retry_at=LATER + 40), Phase.BACKOFF, LATER + 40, ()),
        # A retry time further off than the current restart_max (lowered since) is brought in.
        (StreamRecord("a", failures=9, retry_at=LATER + 5000), Phase.BACKOFF, LATER + 300, ()),
        # A retry time already past: started by the next plan.
        (StreamRecord("a", failures=1, retry_at=LATER - 1), Phase.BACKOFF, LATER - 1, ()),
        # Held, with why and how the last task ended.
        (StreamRecord("a", held_reason="by hand", last_end_status=14), Phase.HELD, None, ()),
        # Restarts outside the window are forgotten; those inside count toward a loop.
        (
            StreamRecord("a", restart_times=(LATER - 2000, LATER - 10)),
            Phase.IDLE,
            None,
            (LATER - 10,),
        ),
    ],
)
def test_a_restored_stream_goes_on_where_it_was(record, phase, retry_at, restart_times):
    """What the store kept of a stream becomes its state in the next process: held, backing
    off until the same time (never beyond restart_max from now), or idle; its failures, last
    end and error are kept."""
    state = StreamState.restored(record, now=LATER, policy=POLICY)
    assert (state.phase, state.retry_at, state.restart_times) == (phase, retry_at, restart_times)
    assert (state.failures, state.last_end_status, state.held_reason) == (
        record.failures,
        record.last_end_status,
        record.held_reason,
    )
    assert replace(
        state.record(), retry_at=record.retry_at, restart_times=record.restart_times
    ) == (record)
