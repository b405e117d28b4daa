"""Start intents and orphans, the pure part: fingerprints, matching, intent decisions, and
what an orphan's segment is estimated to cost."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from streamwatch.intent import (
    Candidate,
    Intent,
    Shape,
    assign,
    infer_fps,
    is_definitive,
    owner,
    price_orphan,
    shape_of,
)
from streamwatch.mavi.callbacks import SegmentReport, parse_callback
from streamwatch.mavi.errors import (
    AuthError,
    CapacityError,
    InsufficientBalance,
    MaviError,
    RateLimited,
    RejectedRequest,
    TransientError,
)
from streamwatch.policy import Phase, StreamState, on_start_unanswered, plan
from streamwatch.pricing import segment_cost_ticks
from tests.test_plan import POLICY, spec


def intent(attempt: str, at: float, *, fps: int = 1, logos: bool = False) -> Intent:
    return Intent(attempt, f"s-{attempt}", "u", "h", fps, True, logos, 5, at)


def cand(task: str, at: float, *, fps: int | None = 1, logos: bool = False) -> Candidate:
    return Candidate(task, at, Shape(True, logos, fps))


@pytest.mark.parametrize(
    ("frames", "fps"),
    [(5, 1), (10, 2), (150, 30), (None, None), (0, None), (7, None), (-5, None)],
)
def test_fps_is_frames_over_five_seconds_or_unknown(frames, fps):
    """frames_processed is fps x 5 s; anything else means the fps is unknown, never an error."""
    assert infer_fps(frames) == fps


@pytest.mark.parametrize(
    ("blocks", "shape"),
    [
        (
            {"content_moderation": {"has_unsafe_content": False, "frames_processed": 10}},
            (True, False, 2),
        ),
        ({"logo_detection": {"has_logo": False, "frames_processed": 5}}, (False, True, 1)),
        (
            {
                "content_moderation": {"has_unsafe_content": None},
                "logo_detection": {"has_logo": False, "logos": []},
            },
            (True, True, None),
        ),
        ({}, None),
    ],
)
def test_shape_is_the_feature_blocks_present_and_the_fps(blocks, shape):
    """A feature block counts when present, whatever it holds; no block at all shows nothing."""
    body = {"task_id": "t", "data": {"status": 0, "data": {"segment_index": 0, **blocks}}}
    report = parse_callback(json.dumps(body))
    assert isinstance(report, SegmentReport)
    seen = shape_of(report)
    assert (None if seen is None else (seen.content_moderation, seen.logo_detection, seen.fps)) == (
        shape
    )


@pytest.mark.parametrize(
    ("intents", "candidates", "expected"),
    [
        # The task of an intent calls back after it: adopted.
        ([intent("a", 10)], [cand("T", 11)], {"a": "T"}),
        # A callback before the intent was written cannot be its task.
        ([intent("a", 10)], [cand("T", 9)], {}),
        # Another fps, another feature set, an unknown fps: never a match.
        ([intent("a", 10, fps=2)], [cand("T", 11, fps=1)], {}),
        ([intent("a", 10)], [cand("T", 11, logos=True)], {}),
        ([intent("a", 10)], [cand("T", 11, fps=None)], {}),
        # Two candidates: the earliest is adopted, the other stays an orphan.
        ([intent("a", 10)], [cand("late", 13), cand("early", 12)], {"a": "early"}),
        # Two open intents of one shape: a task belongs to the latest written before it.
        (
            [intent("a", 10), intent("b", 20)],
            [cand("T1", 15), cand("T2", 25)],
            {"a": "T1", "b": "T2"},
        ),
        ([intent("a", 10), intent("b", 20)], [cand("T2", 25)], {"b": "T2"}),
        # Of different shapes, each takes its own.
        (
            [intent("a", 10, fps=1), intent("b", 20, fps=2)],
            [cand("T1", 25, fps=1), cand("T2", 26, fps=2)],
            {"a": "T1", "b": "T2"},
        ),
    ],
)
def test_assign(intents, candidates, expected):
    """Which unknown task each open intent adopts."""
    assert assign(intents, candidates) == expected


def test_an_intent_in_flight_owns_what_calls_back_after_it():
    """A newer intent of the same shape (a start still waiting for its answer) keeps an older
    intent from claiming tasks that first called back after it was written."""
    older, newer = intent("old", 10), intent("new", 20)
    assert owner([older, newer], cand("T", 25)) == newer
    assert owner([older], cand("T", 25)) == older
    assert owner([older, newer], cand("T", 15)) == older


@pytest.mark.parametrize(
    ("error", "definitive"),
    [
        (AuthError("401", status=401), True),
        (InsufficientBalance("402", status=402), True),
        (CapacityError("409", status=409), True),
        (RateLimited("429", status=429), True),
        (TransientError("408", status=408), False),
        (TransientError("503", status=503), False),
        (TransientError("timeout"), False),
        (RejectedRequest("no task_id", status=200), False),
        (MaviError("?"), False),
        (ValueError("invalid literal for int()"), False),
    ],
)
def test_only_a_4xx_refusal_says_no_task_was_created(error, definitive):
    """A refusal closes the intent; a timeout, a 5xx, a malformed answer or any other
    exception leaves it open, since MAVI may have created the task."""
    assert is_definitive(error) is definitive


BOTH2 = Shape(True, True, 2)
MOD1 = Shape(True, False, 1)
MOD3 = Shape(True, False, 3)


@pytest.mark.parametrize(
    ("seen", "configured", "fps", "features", "uncertain"),
    [
        # The callback shows its fps: priced from it, whatever is configured.
        (Shape(True, False, 4), [MOD1], 4, (True, False), False),
        # Unknown fps: the fps of the configured streams with these features, if they agree.
        (Shape(True, False, None), [MOD3, BOTH2], 3, (True, False), False),
        (Shape(True, False, None), [MOD3, MOD3], 3, (True, False), False),
        # They disagree, or none has these features: uncertain, at the highest fps.
        (Shape(True, False, None), [MOD1, MOD3], 3, (True, False), True),
        (Shape(False, True, None), [MOD1, BOTH2], 2, (False, True), True),
        (Shape(False, True, None), [], 1, (False, True), True),
        # Nothing shown (a failed segment, an end): both features, the highest fps, uncertain.
        (None, [MOD1, BOTH2], 2, (True, True), True),
        (None, [], 1, (True, True), True),
    ],
)
def test_orphan_pricing(seen, configured, fps, features, uncertain):
    """An orphan's segment is priced from what it shows, else from the configured streams."""
    price = price_orphan(seen, configured)
    assert (price.fps, (price.content_moderation, price.logo_detection), price.uncertain) == (
        fps,
        features,
        uncertain,
    )
    assert price.ticks == segment_cost_ticks(
        fps=fps, content_moderation=features[0], logo_detection=features[1]
    )


def test_an_unanswered_start_adopts_for_the_window_or_the_backoff_whichever_is_longer():
    """After a start whose answer was lost the stream adopts, at least `adopt_wait` long."""
    policy = replace(POLICY, adopt_wait=7.0)
    state = StreamState("cam", Phase.STARTING, failures=0)
    new = on_start_unanswered(state, "att", now=100.0, policy=policy, rand=0.0)
    assert (new.phase, new.intent, new.failures, new.retry_at) == (Phase.ADOPTING, "att", 1, 107.0)
    long = on_start_unanswered(
        StreamState("cam", failures=9), "att", now=100.0, policy=policy, rand=0.0
    )
    assert long.retry_at == 100.0 + policy.restart_max


def test_plan_waits_for_an_adopting_stream_then_starts_it():
    """An adopting stream is not started before its window ends; it holds a slot under
    max_running; removed, it is forgotten only once the window has passed."""
    adopting = StreamState("cam", Phase.ADOPTING, intent="att", retry_at=50.0)
    one_slot = replace(POLICY, max_running=1)
    both = {"cam": spec("cam"), "other": spec("other")}
    assert plan(both, {"cam": adopting}, now=49.0, halt=None, policy=one_slot) == []
    started = plan({"cam": spec("cam")}, {"cam": adopting}, now=50.0, halt=None, policy=one_slot)
    assert [(type(a).__name__, a.stream) for a in started] == [("Start", "cam")]
    assert plan({}, {"cam": adopting}, now=49.0, halt=None, policy=POLICY) == []
    gone = plan({}, {"cam": adopting}, now=50.0, halt=None, policy=POLICY)
    assert [(type(a).__name__, a.stream) for a in gone] == [("Forget", "cam")]
