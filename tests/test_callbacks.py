"""Callback parsing: lenient where MAVI is loose, strict where nothing can be done."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fuzz import Mutator
from streamwatch.mavi.callbacks import (
    MAX_LOGO_NAME,
    MAX_MESSAGE,
    MAX_SEGMENT_INDEX,
    REASONS,
    CallbackError,
    SegmentFailed,
    SegmentReport,
    StreamEnded,
    Tokens,
    decode_body,
    parse_callback,
)
from streamwatch.mavi.ids import is_task_id

DOCUMENTED = {
    "code": 200,
    "message": "SUCCESS",
    "task_id": "550e8400-e29b-41d4-a716-446655440000",
    "data": {
        "status": 0,
        "message": "Segment processed successfully",
        "data": {
            "segment_index": 12,
            "start_time": "60.0",
            "end_time": "65.0",
            "video_url": "https://cdn.test/segment_12.mp4",
            "content_moderation": {"has_unsafe_content": False, "frames_processed": 5},
            "logo_detection": {
                "has_logo": True,
                "logos": [{"name": "Acme"}],
                "frames_processed": 5,
            },
            "processing_time_ms": "812",
        },
        "token": {
            "input": 1200,
            "output": 40,
            "total": 1240,
            "video_tokens": 1100,
            "text_tokens": 140,
        },
    },
}


def with_data(**changes: Any) -> bytes:
    doc = json.loads(json.dumps(DOCUMENTED))
    doc["data"]["data"].update(changes)
    return json.dumps(doc).encode()


def test_documented_example_parses_to_a_segment_report():
    """The contract's example becomes a typed report with numbers, not strings."""
    report = parse_callback(json.dumps(DOCUMENTED))
    assert isinstance(report, SegmentReport)
    assert report.segment_index == 12
    assert (report.start_time, report.end_time, report.processing_ms) == (60.0, 65.0, 812.0)
    assert report.unsafe is False
    assert report.has_logo is True
    assert [logo.name for logo in report.logos] == ["Acme"]
    assert report.tokens is not None
    assert report.tokens.total == 1240


@pytest.mark.parametrize(
    ("logos", "names", "confidences"),
    [
        ([{"label": "Nike", "score": "0.8"}], ["Nike"], [0.8]),
        ([{"brand": "Coke", "confidence": 0.5, "box": [1, 2, 3, 4]}], ["Coke"], [0.5]),
        (["Pepsi"], ["Pepsi"], [None]),
        ([{"unknown": 1}], [None], [None]),
        ([42], [None], [None]),
        ([{"name": "X", "confidence": "high"}], ["X"], [None]),
    ],
)
def test_undocumented_logo_shapes_are_tolerated(logos, names, confidences):
    """Logo elements of any shape are kept as received; name and confidence when present."""
    report = parse_callback(with_data(logo_detection={"has_logo": True, "logos": logos}))
    assert isinstance(report, SegmentReport)
    assert [logo.name for logo in report.logos] == names
    assert [logo.confidence for logo in report.logos] == confidences
    assert [logo.raw for logo in report.logos] == logos


@pytest.mark.parametrize("status", [14, 15, 16, 402])
def test_end_statuses_become_stream_ended(status):
    """14, 15, 16 and 402 end the task; their data and token are null."""
    doc = {
        "code": "200",
        "task_id": "t",
        "data": {"status": status, "message": "m", "data": None, "token": None},
    }
    ended = parse_callback(json.dumps(doc))
    assert ended == StreamEnded("t", status, "m")


@pytest.mark.parametrize("status", [-1, "-1", 7])
def test_failed_and_unknown_statuses_are_segment_failures(status):
    """-1 (and any status the contract does not list) is a failed segment, not an end."""
    doc = {"task_id": "t", "data": {"status": status, "message": "boom", "data": None}}
    failed = parse_callback(json.dumps(doc))
    assert isinstance(failed, SegmentFailed)
    assert failed.status == int(status)


def test_features_not_enabled_are_none():
    """A segment without a moderation block says 'not checked', not 'safe'."""
    doc = json.loads(json.dumps(DOCUMENTED))
    del doc["data"]["data"]["content_moderation"]
    report = parse_callback(json.dumps(doc))
    assert isinstance(report, SegmentReport)
    assert report.unsafe is None


def test_extra_keys_are_ignored():
    """Keys MAVI may add later do not break parsing."""
    report = parse_callback(with_data(new_field={"x": 1}, segment_index="3"))
    assert isinstance(report, SegmentReport)
    assert report.segment_index == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "json"),
        (b"\xff\xfe", "encoding"),
        (b"[]", "shape"),
        (b"null", "shape"),
        (b'{"data": {"status": 0}}', "shape"),
        (b'{"task_id": "t"}', "shape"),
        (b'{"task_id": "t", "data": {"message": "x"}}', "shape"),
        (b'{"task_id": "t", "data": {"status": 0, "data": null}}', "shape"),
        (b'{"task_id": "t", "data": {"status": 0, "data": {"start_time": "1"}}}', "shape"),
        (b'{"task_id": "t", "data": {"status": 0, "data": {"segment_index": -1}}}', "range"),
        (b'{"task_id": "t", "data": {"status": 0, "data": {"segment_index": 1.5}}}', "field"),
        (b'{"task_id": "t", "data": {"status": "zero"}}', "field"),
        (b'{"task_id": 5, "data": {"status": 0}}', "shape"),
        (with_data(start_time="soon"), "field"),
    ],
)
def test_unusable_bodies_are_rejected_with_a_reason(body, reason):
    """Bodies that cannot be stored raise CallbackError with a stable reason code."""
    with pytest.raises(CallbackError) as info:
        parse_callback(body)
    assert info.value.reason == reason


def deep(depth: int) -> bytes:
    return with_data(new_field=None).replace(b"null", b"[" * depth + b"1" + b"]" * depth, 1)


def raw(field: str, token: str) -> bytes:
    """The documented body with `field` of data.data set to a raw JSON token."""
    return with_data(**{field: "@@"}).replace(b'"@@"', token.encode(), 1)


def tokens(**changes: Any) -> bytes:
    doc = json.loads(json.dumps(DOCUMENTED))
    doc["data"]["token"].update(changes)
    return json.dumps(doc).encode()


def moderation(**changes: Any) -> bytes:
    return with_data(content_moderation={"has_unsafe_content": False, **changes})


def with_root(**changes: Any) -> bytes:
    doc = json.loads(json.dumps(DOCUMENTED))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (deep(40), "depth"),
        (deep(100_000), "depth"),
        (b"[" * 400_000, "depth"),
        (raw("start_time", "1e999"), "range"),
        (raw("processing_time_ms", "-1e999"), "range"),
        (raw("start_time", "NaN"), "range"),
        (raw("end_time", "Infinity"), "range"),
        (raw("segment_index", "18446744073709551616"), "range"),
        (tokens(video_tokens=2**63), "range"),
        (raw("segment_index", "1" * 5000), "json"),
        (with_data(start_time="nan"), "range"),
        (with_data(processing_time_ms="-5"), "range"),
        (with_data(segment_index=2**40), "range"),
        (tokens(input=-1), "range"),
        (tokens(total="-3"), "range"),
        (tokens(output=1.5), "field"),
        (moderation(frames_processed=-5), "range"),
        (moderation(has_unsafe_content="false"), "field"),
        (moderation(has_unsafe_content=1), "field"),
        (with_data(logo_detection={"has_logo": "true"}), "field"),
        (raw("video_url", '"\\ud800"'), "field"),
        (with_root(message="\ud83d"), "field"),
        (with_data(video_url=5), "field"),
        (with_data(video_url="https://x/" + "a" * 3000), "range"),
        (with_data(logo_detection={"has_logo": True, "logos": "Acme"}), "shape"),
        (with_data(logo_detection={"logos": [{"name": "x"}] * 65}), "range"),
        (with_data(logo_detection={"logos": [{"name": "x", "box": [0] * 600}]}), "range"),
        (with_root(code=[200]), "field"),
        (with_root(task_id="../../../tmp/x"), "field"),
        (with_root(task_id="a/b"), "field"),
        (with_root(task_id="x" * 129), "field"),
        (with_root(task_id="a\x00b"), "field"),
        (json.dumps({"task_id": "t", "data": {"status": 7, "message": 5}}).encode(), "field"),
        (json.dumps({"task_id": "t", "data": {"status": 2**40}}).encode(), "range"),
        (json.dumps(DOCUMENTED).encode("utf-16"), "encoding"),
        (json.dumps(DOCUMENTED).encode("utf-16-le"), "encoding"),
        (json.dumps(DOCUMENTED).encode("utf-32"), "encoding"),
        (json.dumps(DOCUMENTED).replace("SUCCESS", "SUCC\xe9SS").encode("latin-1"), "encoding"),
        (b'{"task_id": "t\xed\xa0\x80", "data": {"status": -1}}', "encoding"),
    ],
)
def test_bodies_that_broke_the_store_are_refused_before_it(body, reason):
    """Deep nesting, numbers no float or SQLite integer holds, NaN/Infinity, negative counters,
    strings for booleans, lone surrogates, path-like task ids and non-UTF-8 encodings are
    refused with a stable reason instead of reaching the store."""
    with pytest.raises(CallbackError) as info:
        parse_callback(body)
    assert info.value.reason == reason


def test_a_utf8_byte_order_mark_is_skipped():
    """A UTF-8 BOM before the JSON is tolerated (RFC 8259) and not part of anything parsed."""
    plain = parse_callback(json.dumps(DOCUMENTED).encode())
    assert parse_callback(b"\xef\xbb\xbf" + json.dumps(DOCUMENTED).encode()) == plain
    assert decode_body(b"\xef\xbb\xbf{}") == "{}"


def test_loose_parts_of_the_contract_stay_loose():
    """Numbers as strings, `code` as string or int, integral floats, a missing verdict, long
    free text (cut to its bound) and logo names of any type are accepted."""
    doc = json.loads(json.dumps(DOCUMENTED))
    doc["code"] = "200"
    doc["message"] = "m" * 10_000
    doc["data"]["message"] = "x" * 10_000
    doc["data"]["token"] = {"input": "1200", "output": 40.0, "total": None}
    seg = doc["data"]["data"]
    seg.update(segment_index="12", start_time=60, end_time="65", processing_time_ms=812)
    seg["content_moderation"] = {"frames_processed": "5"}
    seg["logo_detection"] = {"logos": [{"name": "N" * 500}, {"label": 7}, None, ["a"]]}
    report = parse_callback(json.dumps(doc))
    assert isinstance(report, SegmentReport)
    assert (report.segment_index, report.start_time, report.end_time) == (12, 60.0, 65.0)
    assert report.tokens is not None
    assert (report.tokens.input, report.tokens.output, report.tokens.total) == (1200, 40, 0)
    assert report.unsafe is None
    assert report.frames_processed == 5
    assert report.has_logo is True
    assert [logo.name for logo in report.logos] == ["N" * MAX_LOGO_NAME, "7", None, None]
    failed = parse_callback(
        json.dumps({"code": 200, "task_id": "t", "data": {"status": -1, "message": "e" * 9999}})
    )
    assert isinstance(failed, SegmentFailed)
    assert len(failed.message) == MAX_MESSAGE


def storable(cb: Any) -> None:
    """What the store and the metrics rely on, for any callback the parser returns."""
    assert is_task_id(cb.task_id)
    if not isinstance(cb, SegmentReport):
        assert -(2**31) <= cb.status < 2**31
        assert len(cb.message) <= MAX_MESSAGE
        cb.message.encode("utf-8")
        return
    assert 0 <= cb.segment_index <= MAX_SEGMENT_INDEX
    for value in (cb.start_time, cb.end_time, cb.processing_ms):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert cb.frames_processed is None or cb.frames_processed >= 0
    assert cb.unsafe in (None, True, False)
    assert cb.has_logo in (None, True, False)
    if cb.tokens is not None:
        assert all(0 <= getattr(cb.tokens, k) < 2**63 for k in Tokens.__slots__)
    assert cb.video_url is None or (isinstance(cb.video_url, str) and len(cb.video_url) <= 2048)
    if cb.video_url is not None:
        cb.video_url.encode("utf-8")
    assert len(cb.logos) <= 64
    for logo in cb.logos:
        assert logo.name is None or len(logo.name) <= MAX_LOGO_NAME
        assert logo.confidence is None or math.isfinite(logo.confidence)
        json.dumps(logo.raw, allow_nan=False).encode("utf-8")


def checked(body: bytes) -> bool:
    """Parse `body`: True if refused with a known reason; if accepted, check it is storable."""
    try:
        cb = parse_callback(body)
    except CallbackError as exc:
        reason = exc.reason
    else:
        storable(cb)
        return False
    assert reason in REASONS
    return True


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(["false", "true", "-1", "1e999", "nan", "\ud800", "a\udfffb", "12"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


PATHS = _paths(DOCUMENTED)[1:]


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(PATHS), value=json_values(), bom=st.booleans())
def test_any_value_anywhere_parses_to_something_storable_or_is_refused(path, value, bom):
    """Replacing any part of the documented callback by any JSON value (NaN, Infinity, huge
    integers and lone surrogates included) either parses to a callback the store can hold or
    raises CallbackError: never another exception."""
    doc = json.loads(json.dumps(DOCUMENTED))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    body = (b"\xef\xbb\xbf" if bom else b"") + json.dumps(doc).encode()
    checked(body)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_bytes_parse_or_are_refused(body):
    """Arbitrary bytes never raise anything but CallbackError."""
    checked(body)


@settings(max_examples=200, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=MAX_SEGMENT_INDEX),
    start=st.floats(min_value=0, max_value=1e9),
    unsafe=st.booleans(),
    counts=st.lists(st.integers(min_value=0, max_value=10**9), min_size=5, max_size=5),
    as_strings=st.booleans(),
)
def test_every_valid_callback_is_accepted_exactly(index, start, unsafe, counts, as_strings):
    """The checks refuse nothing the contract allows: valid values come back unchanged."""
    doc = json.loads(json.dumps(DOCUMENTED))
    seg = doc["data"]["data"]
    seg.update(segment_index=str(index) if as_strings else index, start_time=repr(start))
    seg["content_moderation"]["has_unsafe_content"] = unsafe
    keys = ("input", "output", "total", "video_tokens", "text_tokens")
    doc["data"]["token"] = {
        k: str(c) if as_strings else c for k, c in zip(keys, counts, strict=True)
    }
    report = parse_callback(json.dumps(doc))
    assert isinstance(report, SegmentReport)
    assert (report.segment_index, report.start_time, report.unsafe) == (index, start, unsafe)
    assert report.tokens == Tokens(*counts)


def test_fuzz_mutations_parse_or_are_refused():
    """The bench fuzzer's mutations (bench/fuzz.py) never raise anything but CallbackError."""
    mutator = Mutator(random.Random(7), ["550e8400-e29b-41d4-a716-446655440000"])
    refused = sum(checked(mutator.body()[1]) for _ in range(1500))
    assert 0 < refused < 1500
