"""The supervisor's decisions besides `plan()` (in tests/test_plan.py), table-driven: what a
callback, a stop, a restart, an open intent, a resume, an orphan's callbacks and a preflight
probe lead to."""

from __future__ import annotations

from dataclasses import replace

import pytest

from streamwatch.mavi.callbacks import SegmentFailed, SegmentReport, StreamEnded
from streamwatch.policy import (
    FpsAboveSource,
    Halt,
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
)

POLICY = Policy(
    stall_seconds=30,
    on_stall="restart",
    restart_initial=5,
    restart_max=300,
    restart_jitter=0.2,
    stable_after_segments=3,
    error_threshold=2,
    restart_loop_count=3,
    restart_loop_window=600,
    balance_recheck=900,
    max_running=None,
    adopt_wait=20,
    on_orphan="stop",
    orphan_stop_after=3,
)
NOW = 1_000.0
RUNNING = StreamState(
    "a",
    Phase.RUNNING,
    task_id="T",
    spec_hash="h",
    started_at=900.0,
    last_seen=990.0,
    failures=2,
    run_segments=1,
    segment_ticks=4,
)


def segment(index: int = 1) -> SegmentReport:
    return SegmentReport(
        task_id="T",
        segment_index=index,
        start_time=None,
        end_time=None,
        video_url=None,
        unsafe=False,
        has_logo=None,
        logos=(),
        frames_processed=5,
        processing_ms=None,
        tokens=None,
        moderation_block=True,
    )


FAILED = SegmentFailed("T", -1, "decode error")


@pytest.mark.parametrize(
    ("state", "callback", "requested", "expected", "effects"),
    [
        pytest.param(
            RUNNING,
            segment(),
            False,
            replace(RUNNING, last_seen=NOW, run_segments=2),
            [],
            id="a segment marks the task seen; failures kept until stable",
        ),
        pytest.param(
            replace(RUNNING, run_segments=2, consecutive_errors=1),
            segment(),
            False,
            replace(RUNNING, last_seen=NOW, run_segments=3, failures=0),
            [],
            id="the stable_after_segments-th segment resets the backoff and the error streak",
        ),
        pytest.param(
            replace(RUNNING, phase=Phase.STALLED),
            segment(),
            False,
            replace(RUNNING, last_seen=NOW, run_segments=2),
            [Recovered("a", "T")],
            id="a segment recovers a stalled stream",
        ),
        pytest.param(
            RUNNING,
            FAILED,
            False,
            replace(RUNNING, last_seen=NOW, consecutive_errors=1, run_failed=1),
            [],
            id="a failed segment below the threshold is counted",
        ),
        pytest.param(
            replace(RUNNING, consecutive_errors=1, run_failed=1),
            FAILED,
            False,
            replace(RUNNING, last_seen=NOW, consecutive_errors=2, run_failed=2),
            [SegmentErrors("a", "T", -1, 2, "decode error")],
            id="the threshold-th failed segment in a row raises segment_errors",
        ),
        pytest.param(
            replace(RUNNING, consecutive_errors=2, run_failed=2),
            FAILED,
            False,
            replace(RUNNING, last_seen=NOW, consecutive_errors=3, run_failed=3),
            [],
            id="past the threshold, once per streak",
        ),
        pytest.param(
            RUNNING,
            StreamEnded("T", 15, "no video"),
            False,
            replace(
                RUNNING,
                phase=Phase.BACKOFF,
                task_id=None,
                spec_hash=None,
                last_end_status=15,
                failures=3,
                retry_at=NOW + 20,
            ),
            [TaskEnded("a", "T", 15)],
            id="an end with 15 backs off",
        ),
        pytest.param(
            RUNNING,
            StreamEnded("T", 402, "balance"),
            False,
            replace(RUNNING, phase=Phase.IDLE, task_id=None, spec_hash=None, last_end_status=402),
            [
                TaskEnded("a", "T", 402),
                Halt("balance", NOW, NOW + 900, "task ended with status 402"),
            ],
            id="an end with 402 halts the account",
        ),
        pytest.param(
            RUNNING,
            StreamEnded("T", 14, "stopped"),
            False,
            replace(
                RUNNING,
                phase=Phase.HELD,
                task_id=None,
                spec_hash=None,
                last_end_status=14,
                held_reason="stopped outside streamwatch",
            ),
            [TaskEnded("a", "T", 14)],
            id="an end with 14 nobody here asked for holds the stream",
        ),
    ],
)
def test_what_a_callback_of_the_current_task_decides(state, callback, requested, expected, effects):
    """Each callback of the stream's current task gives its new state and the effects that
    follow: a recovery, the error threshold reached once per streak, the task's end (with a
    halt for 402)."""
    new, found = on_callback(
        state, callback, stop_requested=requested, now=NOW, policy=POLICY, rand=0.0
    )
    assert (new, found) == (expected, effects)


STOPPING = replace(RUNNING, phase=Phase.STOPPING, consecutive_errors=1)
IDLE_AFTER = replace(
    STOPPING, phase=Phase.IDLE, task_id=None, spec_hash=None, stop_reason=None, consecutive_errors=0
)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("removed", None),
        ("changed", IDLE_AFTER),
        ("shutdown", IDLE_AFTER),
        ("budget", IDLE_AFTER),
        ("stalled", replace(IDLE_AFTER, phase=Phase.BACKOFF, failures=3, retry_at=NOW + 20)),
    ],
)
def test_the_state_after_a_stop_by_reason(reason, expected):
    """A removed stream is forgotten; a stalled one backs off (one more failure); any other
    is idle, its task cleared, for the plan to start when it may."""
    assert after_stop(STOPPING, reason, now=NOW, policy=POLICY, rand=0.0) == expected


def test_a_failed_stop_keeps_the_task():
    """A stop that failed leaves the task running as the stream's, with the error shown."""
    assert on_stop_failed(STOPPING, "HTTP 503") == replace(
        STOPPING, phase=Phase.RUNNING, last_error="HTTP 503"
    )


@pytest.mark.parametrize(
    ("before", "kept", "loop"),
    [
        pytest.param((), (NOW,), [], id="a first restart"),
        pytest.param((NOW - 10,), (NOW - 10, NOW), [], id="below the count"),
        pytest.param(
            (NOW - 20, NOW - 10),
            (NOW - 20, NOW - 10, NOW),
            [RestartLoop("a", 3, 600)],
            id="reaching the count is a loop",
        ),
        pytest.param(
            (NOW - 30, NOW - 20, NOW - 10),
            (NOW - 30, NOW - 20, NOW - 10, NOW),
            [],
            id="past the count: already reported",
        ),
        pytest.param(
            (NOW - 5000, NOW - 3000, NOW - 10),
            (NOW - 10, NOW),
            [],
            id="restarts outside the window are forgotten",
        ),
        pytest.param(
            (NOW - 40, NOW - 30, NOW - 20, NOW - 10),
            (NOW - 30, NOW - 20, NOW - 10, NOW),
            [],
            id="only count + 1 restarts are kept",
        ),
    ],
)
def test_restart_loop_detection(before, kept, loop):
    """A restart is noted; the one that makes `restart_loop_count` within the window is a
    loop, reported once."""
    state, found = note_restart(replace(RUNNING, restart_times=before), NOW, POLICY)
    assert (state.restart_times, found) == (kept, loop)


@pytest.mark.parametrize(
    ("state", "restarts"),
    [
        (StreamState("a", Phase.STARTING), 0),
        (StreamState("a", Phase.STARTING, started_at=500.0, restarts=2), 3),
        (StreamState("a", Phase.ADOPTING, last_end_status=15, intent="I"), 1),
    ],
)
def test_a_running_task_counts_a_restart_after_an_earlier_one(state, restarts):
    """A started or adopted task makes the stream running with a fresh run; a task after an
    earlier one (started, or ended) counts as a restart."""
    new = on_task_running(
        replace(state, retry_at=NOW, last_error="x"),
        task_id="T",
        spec_hash="h",
        started_at=NOW - 1,
        now=NOW,
        segments=2,
        segment_ticks=4,
    )
    assert (new.phase, new.task_id, new.started_at, new.last_seen) == (
        Phase.RUNNING,
        "T",
        NOW - 1,
        NOW,
    )
    assert (new.run_segments, new.segment_ticks, new.retry_at, new.last_error, new.intent) == (
        2,
        4,
        None,
        None,
        None,
    )
    assert new.restarts == restarts


def test_start_failures_show_the_detail_given():
    """A failed start shows the error as it may be shown (masked), not the raw text; an
    exception that is no MAVI error backs off, and the intent is let go; an unanswered start
    keeps its intent to adopt from."""
    refused, halt = on_start_failed(
        StreamState("a", Phase.STARTING, intent="I"),
        ValueError("secret in here"),
        now=NOW,
        policy=POLICY,
        rand=0.0,
        detail="ValueError: ***",
    )
    assert (refused.phase, refused.last_error, refused.intent, halt) == (
        Phase.BACKOFF,
        "ValueError: ***",
        None,
        None,
    )
    unanswered = on_start_unanswered(
        StreamState("a", Phase.STARTING),
        "I",
        now=NOW,
        policy=POLICY,
        rand=0.0,
        detail="timeout",
    )
    assert (unanswered.phase, unanswered.intent, unanswered.last_error) == (
        Phase.ADOPTING,
        "I",
        "timeout",
    )
    assert unanswered.retry_at == NOW + POLICY.adopt_wait


@pytest.mark.parametrize(
    ("state", "retry_at"),
    [
        (StreamState("a"), NOW + 20),
        (StreamState("a", Phase.BACKOFF, retry_at=NOW + 100), NOW + 100),
        (StreamState("a", Phase.HELD, held_reason="by hand"), None),
        (RUNNING, None),
    ],
)
def test_an_open_intent_found_at_load(state, retry_at):
    """At load, a stream with an open intent adopts for at least `adopt_wait` (longer if its
    backoff says so); a held stream, or one running a recorded task, does not (None: the
    intent is closed)."""
    new = on_open_intent(state, "I", now=NOW, policy=POLICY)
    if retry_at is None:
        assert new is None
    else:
        assert new is not None
        assert (new.phase, new.intent, new.retry_at) == (Phase.ADOPTING, "I", retry_at)


@pytest.mark.parametrize(
    ("state", "released"),
    [
        (StreamState("a", Phase.HELD, held_reason="by hand"), True),
        (StreamState("a", Phase.BACKOFF, failures=4, retry_at=NOW + 60), True),
        (StreamState("a", Phase.SOURCE_OFFLINE, failures=2, retry_at=NOW + 9), True),
        (RUNNING, False),
        (StreamState("a"), False),
    ],
)
def test_resume_releases_held_and_backing_off_streams(state, released):
    """A resume makes a held, backing-off or source-offline stream idle with its backoff
    forgotten, and leaves any other alone."""
    new = on_resume(state)
    if not released:
        assert new is None
    else:
        assert new == replace(state, phase=Phase.IDLE, held_reason=None, retry_at=None, failures=0)


@pytest.mark.parametrize(
    ("on_orphan", "ended", "segments", "candidate", "stopping", "stop"),
    [
        ("stop", False, 3, False, False, True),
        ("stop", False, 2, False, False, False),
        ("stop", True, 5, False, False, False),
        ("stop", False, 5, True, False, False),
        ("stop", False, 5, False, True, False),
        ("report", False, 5, False, False, False),
    ],
)
def test_when_an_orphan_is_stopped(on_orphan, ended, segments, candidate, stopping, stop):
    """With on_orphan = "stop", an orphan is stopped once it called back enough, unless it
    ended, an open intent may adopt it or its stop is under way; "report" never stops."""
    policy = replace(POLICY, on_orphan=on_orphan)
    found = orphan_to_stop(
        policy, ended=ended, segments=segments, candidate=candidate, stopping=stopping
    )
    assert found is stop


# -- preflight ---------------------------------------------------------------------------------

SEEN = SourceInfo(at=NOW, video_codec="h264", width=640, height=360, fps=25.0, bitrate=400_000)
DOWN = ProbeFailed("unreachable", "connection refused")
STARTING = StreamState("a", Phase.STARTING)
OFFLINE = StreamState(
    "a",
    Phase.STARTING,
    failures=1,
    offline_since=NOW - 50,
    probes=(("unreachable", 1),),
    precharges_avoided=1,
    ticks_saved=8,
    last_error="source offline: connection refused",
)


@pytest.mark.parametrize(
    ("state", "result", "fps", "expected", "go", "effects"),
    [
        # Source up at the first look: the start goes ahead, the summary is kept.
        (
            STARTING,
            SEEN,
            1,
            replace(STARTING, source=SEEN, probes=(("ok", 1),)),
            True,
            [],
        ),
        # Source down at the first look: no start, one pre-charge avoided, probes on the
        # backoff, and the outage's one event.
        (
            STARTING,
            DOWN,
            1,
            replace(
                STARTING,
                phase=Phase.SOURCE_OFFLINE,
                failures=1,
                retry_at=NOW + 5,
                offline_since=NOW,
                probes=(("unreachable", 1),),
                precharges_avoided=1,
                ticks_saved=8,
                last_error="source offline: connection refused",
            ),
            False,
            [SourceOffline("a", "unreachable", "connection refused")],
        ),
        # Still down: the backoff doubles, the avoided pre-charges add up, no second event.
        (
            OFFLINE,
            ProbeFailed("timeout", "no media within 2 s"),
            1,
            replace(
                OFFLINE,
                phase=Phase.SOURCE_OFFLINE,
                failures=2,
                retry_at=NOW + 10,
                probes=(("timeout", 1), ("unreachable", 1)),
                precharges_avoided=2,
                ticks_saved=16,
                last_error="source offline: no media within 2 s",
            ),
            False,
            [],
        ),
        # Back: the start goes ahead and the outage resolves.
        (
            OFFLINE,
            SEEN,
            1,
            replace(
                OFFLINE, offline_since=None, source=SEEN, probes=(("ok", 1), ("unreachable", 1))
            ),
            True,
            [SourceOnline("a", 50.0, SEEN)],
        ),
        # No ffprobe here: a preflight that cannot look starts anyway, and says so.
        (
            STARTING,
            ProbeFailed("unavailable", "cannot run ffprobe"),
            1,
            replace(STARTING, probes=(("unavailable", 1),)),
            True,
            [ProbeUnavailable("a", "cannot run ffprobe")],
        ),
        # Configured above the source's frame rate, first seen: a warning.
        (
            STARTING,
            SEEN,
            30,
            replace(STARTING, source=SEEN, probes=(("ok", 1),)),
            True,
            [FpsAboveSource("a", 30, 25.0)],
        ),
        # The same source again (a later start): no second warning.
        (
            replace(STARTING, source=replace(SEEN, at=NOW - 100, bitrate=1)),
            SEEN,
            30,
            replace(STARTING, source=SEEN, probes=(("ok", 1),)),
            True,
            [],
        ),
        # The source changed (a lower frame rate now): warned again.
        (
            replace(STARTING, source=replace(SEEN, fps=50.0)),
            SEEN,
            30,
            replace(STARTING, source=SEEN, probes=(("ok", 1),)),
            True,
            [FpsAboveSource("a", 30, 25.0)],
        ),
    ],
)
def test_what_a_preflight_probe_decides(state, result, fps, expected, go, effects):
    """A probe before a start: media lets the start go (resolving an outage, warning once per
    source change when fps is above the source's); no media keeps the stream source_offline on
    the usual backoff with the pre-charge counted as avoided; no ffprobe starts anyway."""
    new, started, said = on_probe(
        state, result, fps=fps, precharge_ticks=8, now=NOW, policy=POLICY, rand=0.0
    )
    assert (new, started, said) == (expected, go, effects)


def test_a_restored_offline_stream_probes_again_when_its_backoff_is_over():
    """What the store kept of an outage (since when, probes, pre-charges avoided) comes back
    with the stream, which is source_offline until its retry time."""
    state = replace(
        OFFLINE, phase=Phase.SOURCE_OFFLINE, retry_at=NOW + 7, last_error=None, failures=3
    )
    restored = StreamState.restored(state.record(), now=NOW, policy=POLICY)
    assert restored.phase is Phase.SOURCE_OFFLINE
    assert (restored.offline_since, restored.retry_at) == (NOW - 50, NOW + 7)
    assert (restored.probes, restored.precharges_avoided, restored.ticks_saved) == (
        (("unreachable", 1),),
        1,
        8,
    )


def test_a_start_without_preflight_forgets_an_outage_preflight_saw():
    """preflight turned off (a reload) while the source was offline: the next start, without
    a probe, forgets the outage and resolves it; a stream with no outage is left alone."""
    offline = replace(OFFLINE, phase=Phase.STARTING)
    new, effects = on_start_unprobed(offline, now=NOW)
    assert new == replace(offline, offline_since=None)
    assert effects == [SourceOnline("a", 50.0, None)]
    assert "no longer probed" in SourceOnline("a", 50.0, None).detail
    assert on_start_unprobed(STARTING, now=NOW) == (STARTING, [])
