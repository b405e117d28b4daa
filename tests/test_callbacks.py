"""Callback parsing: lenient where MAVI is loose, strict where nothing can be done."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamwatch.mavi.callbacks import (
    CallbackError,
    SegmentFailed,
    SegmentReport,
    StreamEnded,
    parse_callback,
)

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
        (b"\xff\xfe", "json"),
        (b"[]", "shape"),
        (b"null", "shape"),
        (b'{"data": {"status": 0}}', "shape"),
        (b'{"task_id": "t"}', "shape"),
        (b'{"task_id": "t", "data": {"message": "x"}}', "shape"),
        (b'{"task_id": "t", "data": {"status": 0, "data": null}}', "shape"),
        (b'{"task_id": "t", "data": {"status": 0, "data": {"start_time": "1"}}}', "shape"),
        (b'{"task_id": "t", "data": {"status": 0, "data": {"segment_index": -1}}}', "shape"),
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
