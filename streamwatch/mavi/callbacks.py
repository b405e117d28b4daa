"""Parse MAVI segment callbacks into typed records, or refuse them with a reason.

A callback body becomes exactly one of `SegmentReport` (status 0), `SegmentFailed` (status -1,
or a status the contract does not list) or `StreamEnded` (14, 15, 16, 402). Everything is
checked here, before anything is stored, so that what is stored can be counted, priced and
alerted on without a surprise:

- the body is UTF-8 (a leading UTF-8 byte-order mark is skipped, as RFC 8259 allows; UTF-16
  and UTF-32 are refused), at most `MAX_DEPTH` levels deep, with no NaN or Infinity, no
  number a float cannot hold, and no string with a lone surrogate;
- the task id has the shape of an id (`streamwatch.mavi.ids`);
- counters are whole numbers in a sane range (no negatives), times and durations are finite
  and in range, booleans are JSON booleans (``"false"`` is refused, never read as true);
- free text is cut to a bound (status messages to `MAX_MESSAGE`, logo names to
  `MAX_LOGO_NAME`); a clip URL longer than `MAX_URL`, more than `MAX_LOGOS` logos or a logo
  element over `MAX_LOGO_BYTES` is refused.

Parsing stays lenient where MAVI's contract is loose: numbers sent as strings (the documented
string fields, and counters), `code` as an int or a string, unknown keys, undocumented logo
shapes. A refusal raises `CallbackError` with a short stable `reason` (a metric label) and a
message that says which field and why.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import NoReturn

from streamwatch.mavi.ids import TASK_ID_MAX, is_task_id
from streamwatch.redact import redact_urls

__all__ = [
    "END_STATUSES",
    "MAX_DEPTH",
    "MAX_LOGOS",
    "MAX_LOGO_BYTES",
    "MAX_LOGO_NAME",
    "MAX_MESSAGE",
    "MAX_SEGMENT_INDEX",
    "MAX_URL",
    "REASONS",
    "Callback",
    "CallbackError",
    "LogoHit",
    "SegmentFailed",
    "SegmentReport",
    "StreamEnded",
    "Tokens",
    "decode_body",
    "parse_callback",
]

STATUS_OK = 0
STATUS_FAILED = -1
STATUS_USER_STOPPED = 14
STATUS_NO_VIDEO = 15
STATUS_CAPACITY = 16
STATUS_NO_BALANCE = 402
END_STATUSES = frozenset({STATUS_USER_STOPPED, STATUS_NO_VIDEO, STATUS_CAPACITY, STATUS_NO_BALANCE})

MAX_DEPTH = 32  # a real callback is 6 levels deep
MAX_SEGMENT_INDEX = 100_000_000  # 15 years of 5-second segments
MAX_FRAMES = 100_000
MAX_TOKENS = 1_000_000_000
MAX_SECONDS = 1e12  # segment start and end times
MAX_PROCESSING_MS = 86_400_000.0  # a day
MAX_MESSAGE = 500
MAX_LOGO_NAME = 128
MAX_LOGOS = 64  # MAVI's max_logos is at most 50
MAX_LOGO_BYTES = 1024
MAX_URL = 2048
_INT32 = 2**31
_DIGITS = re.compile(r"[+-]?[0-9]{1,20}")

# Stable reason codes (the `reason` label of streamwatch_callbacks_rejected_total).
REASONS = ("encoding", "json", "depth", "shape", "field", "range")


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
    raw: object


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token usage MAVI reports for a segment (each a whole number >= 0)."""

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
    # Which feature blocks the callback carries: what it shows of the task's start request.
    moderation_block: bool = False
    logo_block: bool = False


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


# -- the document as a whole ------------------------------------------------------------------


def decode_body(body: bytes) -> str:
    """A callback body as text: strict UTF-8, without a leading byte-order mark."""
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(body) > 1 and (not body[0] or not body[1])):
        raise CallbackError("encoding", "the body is UTF-16 or UTF-32; send UTF-8")
    try:
        return body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise CallbackError("encoding", f"the body is not UTF-8 (byte {exc.start})") from None


def _constant(name: str) -> NoReturn:
    raise CallbackError("range", f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise CallbackError("range", "a number is too large for a float")
    return number


_DECODER = json.JSONDecoder(parse_constant=_constant, parse_float=_float)

# Text decoded from UTF-8 holds no surrogates: a lone one can only come from a \uD800-\uDFFF
# escape (pairs, as in an escaped emoji, are fine and are checked by the walk below).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _walk(doc: object, *, depth: bool, strings: bool) -> None:
    """Check nesting depth and/or strings (keys included) for lone surrogates."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            if depth and level > MAX_DEPTH:
                raise CallbackError("depth", f"nested deeper than {MAX_DEPTH} levels")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                if strings and isinstance(key, str):
                    _check_str(key)
                stack.append((value, level + 1))
        elif strings and isinstance(node, str):
            _check_str(node)


def _check_str(value: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CallbackError("field", "a string holds a lone surrogate") from None


def _load(body: bytes | str) -> object:
    """Parse the JSON: no NaN or Infinity, finite floats, at most `MAX_DEPTH` levels, no
    lone surrogates (integers are bounded where they are read). The checks that need a walk
    run only when the text could fail them (more brackets than the depth limit, a surrogate
    escape)."""
    if isinstance(body, str):
        text = body.removeprefix("\ufeff")
        _check_str(text)
    else:
        text = decode_body(body)
    try:
        doc = _DECODER.decode(text)
    except RecursionError:
        raise CallbackError("depth", f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        if isinstance(exc, CallbackError):
            raise
        raise CallbackError("json", f"body is not JSON ({_short(exc)})") from None
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    escaped = _SURROGATE_ESCAPE.search(text) is not None
    if deep or escaped:
        _walk(doc, depth=deep, strings=escaped)
    return doc


def _short(exc: ValueError) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


# -- fields -------------------------------------------------------------------------------------


def _num(value: object, field: str, *, high: float) -> float | None:
    """A finite number in [0, high], sent as a number or a numeric string; "" and null: None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise CallbackError("field", f"{field} is a boolean, not a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            number = float(value)
        except ValueError:
            raise CallbackError("field", f"{field} is not a number") from None
        if "_" in value:
            raise CallbackError("field", f"{field} is not a number")
    else:
        raise CallbackError("field", f"{field} is not a number")
    if not math.isfinite(number):
        raise CallbackError("range", f"{field} is not a finite number")
    if not 0 <= number <= high:
        raise CallbackError("range", f"{field} is out of range (0 to {high:g})")
    return number


def _int(value: object, field: str, *, low: int, high: int) -> int | None:
    """A whole number in [low, high], as a number or a numeric string; null: None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise CallbackError("field", f"{field} is a boolean, not a number")
    number: int
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise CallbackError("field", f"{field} is not a whole number")
        number = int(value)
    elif isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        number = int(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            as_float = float(value)
        except ValueError:
            raise CallbackError("field", f"{field} is not a number") from None
        if "_" in value or not math.isfinite(as_float) or not as_float.is_integer():
            raise CallbackError("field", f"{field} is not a whole number")
        number = int(as_float)
    else:
        raise CallbackError("field", f"{field} is not a number")
    if not low <= number <= high:
        raise CallbackError("range", f"{field} is out of range ({low} to {high})")
    return number


def _bool(value: object, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise CallbackError("field", f"{field} must be true or false")


def _text(value: object, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CallbackError("field", f"{field} is not a string")
    # MAVI's words may quote the stream URL: its credentials are masked before anything keeps
    # the text, and before it is cut (cut first, a password could keep its beginning).
    return redact_urls(value)[:MAX_MESSAGE]


def _obj(value: object, field: str) -> dict[str, object] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CallbackError("shape", f"{field} is not an object")
    return value


def _logo(item: object) -> LogoHit:
    if len(json.dumps(item)) > MAX_LOGO_BYTES:
        raise CallbackError("range", f"a logo element is over {MAX_LOGO_BYTES} bytes")
    if isinstance(item, dict):
        name = item.get("name", item.get("label", item.get("brand")))
        conf = item.get("confidence", item.get("score"))
        confidence = None
        if isinstance(conf, int | float | str) and not isinstance(conf, bool):
            try:
                confidence = float(conf)
            except ValueError:
                confidence = None
            if confidence is not None and not math.isfinite(confidence):
                confidence = None
        shown = name if isinstance(name, str) else None
        if isinstance(name, int | float) and not isinstance(name, bool):
            shown = str(name)
        return LogoHit(shown[:MAX_LOGO_NAME] if shown else shown, confidence, item)
    if isinstance(item, str):
        return LogoHit(item[:MAX_LOGO_NAME], None, item)
    return LogoHit(None, None, item)


def _logos(block: dict[str, object] | None) -> tuple[LogoHit, ...]:
    raw = block.get("logos") if block is not None else None
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise CallbackError("shape", "logo_detection.logos is not a list")
    if len(raw) > MAX_LOGOS:
        raise CallbackError("range", f"more than {MAX_LOGOS} logos in one segment")
    return tuple(_logo(x) for x in raw)


def _tokens(raw: dict[str, object] | None) -> Tokens | None:
    if raw is None:
        return None

    def get(key: str) -> int:
        return _int(raw.get(key), f"token.{key}", low=0, high=MAX_TOKENS) or 0

    return Tokens(
        get("input"), get("output"), get("total"), get("video_tokens"), get("text_tokens")
    )


def _url(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CallbackError("field", "video_url is not a string")
    if len(value) > MAX_URL:
        raise CallbackError("range", f"video_url is longer than {MAX_URL} characters")
    return value


def parse_callback(body: bytes | str) -> Callback:
    """Turn a callback body into its typed record, or raise `CallbackError`."""
    root = _obj(_load(body), "body")
    if root is None:
        raise CallbackError("shape", "body is null")
    task_id = root.get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise CallbackError("shape", "task_id is missing or not a string")
    if not is_task_id(task_id):
        raise CallbackError(
            "field",
            f"task_id is not an id (1 to {TASK_ID_MAX} letters, digits, '-' or '_')",
        )
    code = root.get("code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int | str)):
        raise CallbackError("field", "code is neither a number nor a string")
    outer = _obj(root.get("data"), "data")
    if outer is None:
        raise CallbackError("shape", "data is missing")
    status = _int(outer.get("status"), "data.status", low=-_INT32, high=_INT32 - 1)
    if status is None:
        raise CallbackError("shape", "data.status is missing")
    message = _text(outer.get("message"), "data.message")
    if status in END_STATUSES:
        return StreamEnded(task_id, status, message)
    if status != STATUS_OK:
        return SegmentFailed(task_id, status, message)
    seg = _obj(outer.get("data"), "data.data")
    if seg is None:
        raise CallbackError("shape", "status 0 without data.data")
    index = _int(seg.get("segment_index"), "segment_index", low=0, high=MAX_SEGMENT_INDEX)
    if index is None:
        raise CallbackError("shape", "segment_index is missing")
    moderation = _obj(seg.get("content_moderation"), "content_moderation")
    logo = _obj(seg.get("logo_detection"), "logo_detection")
    logos = _logos(logo)
    frames = None
    for block, name in ((moderation, "content_moderation"), (logo, "logo_detection")):
        if block is not None:
            count = _int(
                block.get("frames_processed"), f"{name}.frames_processed", low=0, high=MAX_FRAMES
            )
            frames = count if frames is None else frames
    unsafe = None
    if moderation is not None:
        unsafe = _bool(moderation.get("has_unsafe_content"), "has_unsafe_content")
    has_logo = None
    if logo is not None:
        has_logo = bool(_bool(logo.get("has_logo"), "has_logo")) or bool(logos)
    return SegmentReport(
        task_id=task_id,
        segment_index=index,
        start_time=_num(seg.get("start_time"), "start_time", high=MAX_SECONDS),
        end_time=_num(seg.get("end_time"), "end_time", high=MAX_SECONDS),
        video_url=_url(seg.get("video_url")),
        unsafe=unsafe,
        has_logo=has_logo,
        logos=logos,
        frames_processed=frames,
        processing_ms=_num(
            seg.get("processing_time_ms"), "processing_time_ms", high=MAX_PROCESSING_MS
        ),
        tokens=_tokens(_obj(outer.get("token"), "data.token")),
        moderation_block=moderation is not None,
        logo_block=logo is not None,
    )
