"""Start intents and orphan tasks: the deciding part, pure.

A MAVI start creates a task that bills, and its answer can be lost: the daemon killed between
the call and the record, a timeout, a malformed answer. MAVI has no list endpoint, so the
daemon writes an `Intent` before every start call and closes it when the answer is recorded.
An intent still open means MAVI may have created a task nobody recorded. Such a task shows up
only through its callbacks, which name no URL; what they do show is a `Shape`: the feature
blocks present and `frames_processed`, which is fps * MAVI's 5-second segment (inferred from
the contract's examples, so a mismatch means "fps unknown", never an error). `assign()` ties
unknown tasks back to open intents by that shape; `price_orphan()` prices the segments of a
task nobody claims; `is_definitive()` tells a refusal (no task was created) from a failure
after which a task may exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from streamwatch.mavi.callbacks import SegmentReport
from streamwatch.mavi.errors import MaviError, RejectedRequest
from streamwatch.pricing import SEGMENT_SECONDS, segment_cost_ticks

__all__ = [
    "Candidate",
    "Intent",
    "OrphanPrice",
    "OrphanPricer",
    "Pricer",
    "Shape",
    "assign",
    "infer_fps",
    "is_definitive",
    "owner",
    "price_orphan",
    "shape_of",
    "url_hash",
]


@dataclass(frozen=True, slots=True)
class Shape:
    """What a task's callbacks show of its start request: the features, and the fps when
    `frames_processed` gives it (None: unknown)."""

    content_moderation: bool
    logo_detection: bool
    fps: int | None


def infer_fps(frames_processed: int | None) -> int | None:
    """fps from a segment's `frames_processed` (fps * 5 s), or None when it does not say."""
    if frames_processed is None or frames_processed <= 0 or frames_processed % SEGMENT_SECONDS:
        return None
    return frames_processed // SEGMENT_SECONDS


def shape_of(report: SegmentReport) -> Shape | None:
    """The shape a processed segment shows; None when it carries no feature block at all."""
    if not (report.moderation_block or report.logo_block):
        return None
    return Shape(report.moderation_block, report.logo_block, infer_fps(report.frames_processed))


def url_hash(url: str) -> str:
    """A digest of a stream URL, to recognise it without keeping it (it may hold credentials)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Intent:
    """A start about to be asked of MAVI, written before the call."""

    attempt_id: str
    stream: str
    url_hash: str
    spec_hash: str
    fps: int
    content_moderation: bool
    logo_detection: bool
    max_logos: int
    created_at: float

    @property
    def shape(self) -> Shape:
        return Shape(self.content_moderation, self.logo_detection, self.fps)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An unknown task that has shown its shape: when it first called back, and how."""

    task_id: str
    first_at: float
    shape: Shape


def _fits(intent: Intent, candidate: Candidate) -> bool:
    # A task cannot call back before it was asked for; an unknown fps never matches (the
    # task might be anyone's).
    return (
        candidate.first_at >= intent.created_at
        and candidate.shape.fps is not None
        and candidate.shape == intent.shape
    )


def owner(intents: Iterable[Intent], candidate: Candidate) -> Intent | None:
    """The open intent an unknown task may belong to: of those whose shape it shows and that
    were written before its first callback, the latest. An earlier one cannot claim it (the
    later start, of the same shape, is the likelier author)."""
    fitting = [i for i in intents if _fits(i, candidate)]
    return max(fitting, key=lambda i: (i.created_at, i.attempt_id)) if fitting else None


def assign(intents: Sequence[Intent], candidates: Sequence[Candidate]) -> dict[str, str]:
    """Which unknown task each open intent adopts (attempt id -> task id): each candidate
    goes to its `owner()`, and an intent takes the earliest of its candidates; the others
    stay orphans. Callbacks name no URL, so among streams of the same shape whose intents
    were open at once, the match is by order and may pair them the other way round."""
    chosen: dict[str, str] = {}
    for candidate in sorted(candidates, key=lambda c: (c.first_at, c.task_id)):
        intent = owner(intents, candidate)
        if intent is not None and intent.attempt_id not in chosen:
            chosen[intent.attempt_id] = candidate.task_id
    return chosen


def is_definitive(error: BaseException) -> bool:
    """True when a failed start certainly created no task: MAVI refused it with a 4xx (401,
    402, 429, a capacity or parameter refusal). A timeout, a broken connection, a 5xx, a 2xx
    without a usable task id or any other exception leaves the question open."""
    if isinstance(error, RejectedRequest) or not isinstance(error, MaviError):
        return False
    return error.status is not None and 400 <= error.status < 500 and error.status != 408


@dataclass(frozen=True, slots=True)
class OrphanPrice:
    """What one segment (and the pre-charge) of an unknown task is estimated to cost."""

    ticks: int
    fps: int
    content_moderation: bool
    logo_detection: bool
    uncertain: bool  # fps (or the features) could not be read from the callbacks


def price_orphan(seen: Shape | None, configured: Iterable[Shape]) -> OrphanPrice:
    """Price an unknown task's segment from what its callback shows (`seen`; None when it
    shows nothing, e.g. a failed segment or an end), given the shapes of the configured
    streams. The fps is read from `frames_processed`; when it cannot be, it is the fps every
    configured stream with the same features runs at, if they agree. Otherwise the estimate is
    uncertain and conservative: the highest fps of those streams (of all streams when none has
    these features; 1 when none is configured), and both features when none is shown."""
    known = [(s.content_moderation, s.logo_detection, s.fps) for s in configured]
    if seen is not None and seen.fps is not None:
        return _priced(seen.fps, seen.content_moderation, seen.logo_detection, uncertain=False)
    features = (True, True) if seen is None else (seen.content_moderation, seen.logo_detection)
    same = {fps for *f, fps in known if tuple(f) == features and fps is not None}
    if seen is not None and len(same) == 1:
        return _priced(same.pop(), *features, uncertain=False)
    every = {fps for *_, fps in known if fps is not None}
    return _priced(max(same or every or {1}), *features, uncertain=True)


class Pricer(Protocol):
    """Prices a segment of an unknown task from what its callback shows (the store's
    `orphan_pricer`). It runs in the store's thread: pure, reading only what is replaced
    whole."""

    def __call__(self, seen: Shape | None) -> OrphanPrice: ...


class OrphanPricer:
    """`price_orphan()` against the configured streams' shapes, which `configure()` replaces
    (at a reload)."""

    def __init__(self, shapes: Iterable[Shape] = ()) -> None:
        self._shapes = tuple(shapes)

    def configure(self, shapes: Iterable[Shape]) -> None:
        self._shapes = tuple(shapes)  # replaced whole: the store's thread reads it

    def __call__(self, seen: Shape | None) -> OrphanPrice:
        return price_orphan(seen, self._shapes)


def _priced(fps: int, moderation: bool, logos: bool, *, uncertain: bool) -> OrphanPrice:
    ticks = segment_cost_ticks(fps=fps, content_moderation=moderation, logo_detection=logos)
    return OrphanPrice(ticks, fps, moderation, logos, uncertain)
