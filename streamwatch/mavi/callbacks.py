"""Parse MAVI segment callbacks into typed records.

A callback body becomes exactly one of `SegmentReport` (status 0), `SegmentFailed` (status -1,
or a status the contract does not list) or `StreamEnded` (14, 15, 16, 402). Parsing is
lenient where MAVI is loose (numbers sent as strings, `code` as int or string, unknown keys,
undocumented logo shapes) and strict only where nothing useful can be done: no task id, no
status, or a processed segment without its index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "END_STATUSES",
    "Callback",
    "CallbackError",
    "LogoHit",
    "SegmentFailed",
    "SegmentReport",
    "StreamEnded",
    "Tokens",
    "parse_callback",
]

STATUS_OK = 0
STATUS_FAILED = -1
STATUS_USER_STOPPED = 14
STATUS_NO_VIDEO = 15
STATUS_CAPACITY = 16
STATUS_NO_BALANCE = 402
END_STATUSES = frozenset({STATUS_USER_STOPPED, STATUS_NO_VIDEO, STATUS_CAPACITY, STATUS_NO_BALANCE})


class CallbackError(ValueError):
    """The body is not a MAVI callback. `reason` is a short stable code for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LogoHit:
    """One detected logo. `raw` keeps the element exactly as MAVI sent it."""

    name: str | None
    confidence: float | None
    raw: Any


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token usage MAVI reports for a segment."""

    input: int
    output: int
    total: int
    video: int
    text: int


@dataclass(frozen=True, slots=True)
class SegmentReport:
    """A processed 5-second segment (status 0)."""

    task_id: str
    segment_index: int
    start_time: float | None
    end_time: float | None
    video_url: str | None
    unsafe: bool | None  # None when content moderation was not enabled
    has_logo: bool | None  # None when logo detection was not enabled
    logos: tuple[LogoHit, ...]
    frames_processed: int | None
    processing_ms: float | None
    tokens: Tokens | None


@dataclass(frozen=True, slots=True)
class SegmentFailed:
    """A segment MAVI could not process (status -1, or an unlisted status)."""

    task_id: str
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The task has ended: 14 stopped, 15 no video, 16 capacity, 402 balance."""

    task_id: str
    status: int
    message: str


Callback = SegmentReport | SegmentFailed | StreamEnded


def _num(value: Any, field: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise CallbackError("field", f"{field} is a boolean")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CallbackError("field", f"{field} is not a number") from None


def _int(value: Any, field: str) -> int | None:
    number = _num(value, field)
    if number is None:
        return None
    if not number.is_integer():
        raise CallbackError("field", f"{field} is not a whole number")
    return int(number)


def _obj(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CallbackError("shape", f"{field} is not an object")
    return value


def _logo(item: Any) -> LogoHit:
    if isinstance(item, dict):
        name = item.get("name", item.get("label", item.get("brand")))
        conf = item.get("confidence", item.get("score"))
        try:
            confidence = float(conf) if conf is not None and not isinstance(conf, bool) else None
        except (TypeError, ValueError):
            confidence = None
        return LogoHit(str(name) if name is not None else None, confidence, item)
    if isinstance(item, str):
        return LogoHit(item, None, item)
    return LogoHit(None, None, item)


def _tokens(raw: dict[str, Any] | None) -> Tokens | None:
    if raw is None:
        return None

    def get(key: str) -> int:
        return _int(raw.get(key), f"token.{key}") or 0

    return Tokens(
        get("input"), get("output"), get("total"), get("video_tokens"), get("text_tokens")
    )


def parse_callback(body: bytes | str) -> Callback:
    """Turn a callback body into its typed record, or raise `CallbackError`."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CallbackError("json", f"body is not JSON ({type(exc).__name__})") from None
    root = _obj(doc, "body")
    if root is None:
        raise CallbackError("shape", "body is null")
    task_id = root.get("task_id")
    if not isinstance(task_id, str) or not task_id or len(task_id) > 200:
        raise CallbackError("shape", "task_id is missing or not a string")
    outer = _obj(root.get("data"), "data")
    if outer is None:
        raise CallbackError("shape", "data is missing")
    status = _int(outer.get("status"), "data.status")
    if status is None:
        raise CallbackError("shape", "data.status is missing")
    message = str(outer.get("message") or "")
    if status in END_STATUSES:
        return StreamEnded(task_id, status, message)
    if status != STATUS_OK:
        return SegmentFailed(task_id, status, message)
    seg = _obj(outer.get("data"), "data.data")
    if seg is None:
        raise CallbackError("shape", "status 0 without data.data")
    index = _int(seg.get("segment_index"), "segment_index")
    if index is None or index < 0:
        raise CallbackError("shape", "segment_index is missing or negative")
    moderation = _obj(seg.get("content_moderation"), "content_moderation")
    logo = _obj(seg.get("logo_detection"), "logo_detection")
    logos_raw = logo.get("logos") if logo else None
    logos = tuple(_logo(x) for x in logos_raw) if isinstance(logos_raw, list) else ()
    frames = None
    if moderation is not None:
        frames = _int(moderation.get("frames_processed"), "frames_processed")
    elif logo is not None:
        frames = _int(logo.get("frames_processed"), "frames_processed")
    video_url = seg.get("video_url")
    return SegmentReport(
        task_id=task_id,
        segment_index=index,
        start_time=_num(seg.get("start_time"), "start_time"),
        end_time=_num(seg.get("end_time"), "end_time"),
        video_url=video_url if isinstance(video_url, str) else None,
        unsafe=bool(moderation.get("has_unsafe_content")) if moderation is not None else None,
        has_logo=(bool(logo.get("has_logo")) or bool(logos)) if logo is not None else None,
        logos=logos,
        frames_processed=frames,
        processing_ms=_num(seg.get("processing_time_ms"), "processing_time_ms"),
        tokens=_tokens(_obj(outer.get("token"), "data.token")),
    )
