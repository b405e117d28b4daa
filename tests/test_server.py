"""The HTTP surface: the callback route's answers, health, the status and resume API."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import random
from collections.abc import MutableMapping
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from bench.fuzz import RAW_REQUESTS, Mutator
from streamwatch.emulator import Script
from tests.conftest import SECRET, Daemon, stream_toml


def segment_body(task_id: str, index: int) -> dict[str, Any]:
    return {
        "code": 200,
        "message": "SUCCESS",
        "task_id": task_id,
        "data": {
            "status": 0,
            "message": "ok",
            "data": {
                "segment_index": index,
                "start_time": "0.0",
                "end_time": "5.0",
                "content_moderation": {"has_unsafe_content": False},
            },
            "token": None,
        },
    }


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def started(daemon: Daemon, **kwargs) -> str:
    app = await daemon.start(stream_toml("cam"), **kwargs)
    assert app.server is not None
    return app.server.base_url


async def test_wrong_secret_is_404(daemon, http):
    """A callback to any other path segment is not found, and nothing is stored."""
    base = await started(daemon)
    resp = await http.post(f"{base}/callbacks/mavi/{SECRET[:-1]}x", json=segment_body("t", 0))
    assert resp.status == 404
    assert await daemon.store.orphan_summary() == {}


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"task_id": "t"}',
        json.dumps({"task_id": "t", "data": {"status": 0}}).encode(),
    ],
)
async def test_malformed_callbacks_are_400(daemon, http, body):
    """Bodies that are not callbacks get 400 with a reason, never a 5xx."""
    base = await started(daemon)
    resp = await http.post(f"{base}/callbacks/mavi/{SECRET}", data=body)
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_oversized_body_is_413(daemon, http):
    """A body over [server] max_body_bytes is refused with 413."""
    base = await started(daemon)
    resp = await http.post(f"{base}/callbacks/mavi/{SECRET}", data=io.BytesIO(b"x" * 1_100_000))
    assert resp.status == 413


async def test_store_failure_is_503_so_mavi_retries(daemon, http, emulator):
    """When the store cannot commit, the callback is not acknowledged."""
    base = await started(daemon)
    await daemon.store.close()  # the state file goes away under the daemon
    resp = await http.post(f"{base}/callbacks/mavi/{SECRET}", json=segment_body("t", 0))
    assert resp.status == 503
    ready = await http.get(f"{base}/readyz")
    assert ready.status == 503
    assert "store" in (await ready.json())["problems"][0]
    await daemon.store.open()


async def test_health_and_readiness(daemon, http):
    """/healthz answers while alive; /readyz once the store takes writes."""
    base = await started(daemon)
    assert (await http.get(f"{base}/healthz")).status == 200
    resp = await http.get(f"{base}/readyz")
    assert resp.status == 200
    assert await resp.json() == {"ready": True, "problems": []}


async def test_status_requires_the_token_when_configured(daemon, http):
    """With status_token set, the status API answers 401 without the bearer token."""
    base = await started(daemon, token=True)
    assert (await http.get(f"{base}/api/v1/status")).status == 401
    bad = {"Authorization": "Bearer nope"}
    assert (await http.get(f"{base}/api/v1/status", headers=bad)).status == 401
    good = {"Authorization": "Bearer status-token-xyz"}
    resp = await http.get(f"{base}/api/v1/status", headers=good)
    assert resp.status == 200


async def test_status_document_fields_and_no_secrets(daemon, http):
    """The status document carries the documented fields and no secret or stream URL."""
    base = await started(daemon)
    await daemon.wait(lambda: daemon.state("cam").run_segments >= 2)
    text = await (await http.get(f"{base}/api/v1/status")).text()
    doc = json.loads(text)
    assert set(doc) == {
        "version",
        "now",
        "backend",
        "account",
        "streams",
        "orphans",
        "cost",
        "alerts",
        "preflight",
    }
    assert doc["alerts"] == {"pending": 0, "delivered": 0, "dead": 0}
    assert doc["preflight"] == {
        "probes": {},
        "precharges_avoided": 0,
        "precharges_avoided_usd": "0.000000",
    }
    stream = doc["streams"][0]
    assert stream["name"] == "cam"
    assert stream["state"] == "running"
    assert (stream["preflight"], stream["source"], stream["source_offline_since"]) == (
        False,
        None,
        None,
    )
    assert (stream["probes"], stream["precharges_avoided"]) == ({}, 0)
    assert stream["segments"] >= 2
    assert stream["last_segment_at"].endswith("Z")
    assert set(stream["cost"]) == {
        "today_usd",
        "month_usd",
        "burn_usd_per_hour",
        "estimated_unreported_usd",
        "budget",
    }
    assert doc["cost"]["precharge"] == "separate"
    assert doc["cost"]["month_usd"] == stream["cost"]["month_usd"] != "0.000000"
    for secret in (SECRET, "sk-mai-test-key", "rtmp://"):
        assert secret not in text


async def test_resume_api_validates_names(daemon, http):
    """Resume refuses unknown stream names and malformed bodies."""
    base = await started(daemon)
    resp = await http.post(f"{base}/api/v1/resume", json={"streams": ["nope"]})
    assert resp.status == 404
    resp = await http.post(f"{base}/api/v1/resume", json={"streams": "cam"})
    assert resp.status == 400
    resp = await http.post(f"{base}/api/v1/resume", json={"streams": []})
    assert resp.status == 200


async def test_upload_callbacks_record_library_status(daemon, http, emulator, tmp_path):
    """The batch API's upload callback reaches the daemon and records the video's status."""
    from pydantic import SecretStr

    from streamwatch.mavi.videos import VideoClient

    base = await started(daemon)
    hook = f"{base}/callbacks/mavi-video/{SECRET}"
    client = VideoClient(
        session=http, base_url=emulator.batch_url, api_key=SecretStr(emulator.api_key)
    )
    clip = tmp_path / "evidence.mp4"
    clip.write_bytes(b"\x00" * 4096)
    video = await client.upload(clip, callback_uri=hook)
    await emulator.library.settle()
    assert [(v.video_no, v.status) for v in await daemon.store.library_videos()] == [
        (video.video_no, "PARSE")
    ]
    wrong = await http.post(f"{base}/callbacks/mavi-video/{SECRET[:-1]}x", json={})
    assert wrong.status == 404
    bad = await http.post(hook, json={"videoNo": 5})
    assert bad.status == 400


async def raw_status(base: str, request: bytes) -> int:
    """Send bytes as they are (no client library would send these) and return the status."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
    return int(status_line.split()[1])


async def test_invalid_utf8_in_the_authorization_header_is_401(daemon):
    """A bearer token that is not UTF-8 is a wrong token (401) on every token-checked route,
    never a server error."""
    base = await started(daemon, token=True)
    for method, path in (("GET", "/api/v1/status"), ("POST", "/api/v1/resume")):
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n".encode()
            + b"Authorization: Bearer \xff\xfe\xc3(\r\nConnection: close\r\n\r\n"
        )
        assert await raw_status(base, request) == 401, path


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (DEEP, "application/json", 400),
        (b'{"streams": []}', "application/json; charset=bogus", 415),
        (b'{"streams": []}', "application/json; charset=latin-1", 415),
        (b'{"streams": ["\xff"]}', "application/json", 400),
        (b'{"streams": []}', "application/json; charset=UTF-8", 200),
    ],
)
async def test_resume_answers_unusable_bodies_with_4xx(daemon, http, body, content_type, status):
    """Resume refuses JSON nested beyond the parser, a charset other than UTF-8 and bytes that
    are not UTF-8 with a 4xx saying why (they were 500s)."""
    base = await started(daemon)
    headers = {"Content-Type": content_type}
    resp = await http.post(f"{base}/api/v1/resume", data=body, headers=headers)
    assert resp.status == status
    if status != 200:
        assert (await resp.json())["error"]


@pytest.mark.parametrize(
    "body",
    [
        DEEP,
        json.dumps({"videoNo": "\udc80", "status": "PARSE"}).encode(),
        json.dumps({"videoNo": "v1", "status": "x" * 300}).encode(),
        b'{"videoNo": "v\xff", "status": "PARSE"}',
    ],
)
async def test_upload_callbacks_refuse_unusable_bodies_with_400(daemon, http, body):
    """The upload callback answers 400 to deep JSON, a lone surrogate or bytes that are not
    UTF-8, and to overlong fields (the surrogate reached SQLite and gave a 500); nothing is
    stored."""
    base = await started(daemon)
    resp = await http.post(f"{base}/callbacks/mavi-video/{SECRET}", data=body)
    assert resp.status == 400
    assert await daemon.store.library_videos() == []


async def raw_request(port: int, request: bytes) -> tuple[str, bytes]:
    """Send raw bytes, read the status line, then wait for the server to close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            line = await reader.readline()
            rest = await reader.read()  # until the server closes: its logging is done
    finally:
        writer.close()
    parts = line.split()
    return (parts[1].decode() if len(parts) > 1 else "closed"), rest


def warnings_and_errors(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    """Warnings and errors, less what the daemon's own stream may report meanwhile: flagged
    segments (the emulator draws unsafe ones at random; each is a `segment.stored` warning) and
    the supervisor's view of it (on a loaded machine, `supervisor.billing_unreported`)."""
    return [
        e
        for e in logs
        if e["log_level"] in ("warning", "error", "critical")
        and not e["event"].startswith(("segment.", "supervisor."))
    ]


@pytest.mark.parametrize(
    "name", ["bad-header", "bad-chunk", "gzip-garbage", "deflate-garbage", "long-header"]
)
async def test_malformed_http_is_one_log_line_and_400(daemon, name, caplog):
    """A request aiohttp cannot parse, or whose body cannot be read (broken chunking or
    compression), is answered 400 and logged as one warning line without a traceback and
    without the request line (it holds the callback secret)."""
    await started(daemon)
    assert daemon.app is not None
    assert daemon.app.server is not None
    request = dict(RAW_REQUESTS)[name].replace(b"{path}", f"/callbacks/mavi/{SECRET}".encode())
    with capture_logs() as logs:
        status, _ = await raw_request(daemon.app.server.port or 0, request + b"\r\n" * 2)
    assert status == "400"
    lines = warnings_and_errors(logs)
    assert len(lines) == 1, lines
    assert lines[0]["event"] in ("http.bad_request", "callback.rejected")
    assert "exc_info" not in lines[0]
    assert SECRET not in repr(logs)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_flood_of_malformed_requests_is_one_log_line(daemon):
    """Two hundred requests aiohttp cannot parse (no secret needed to send them) are each
    answered 400, and logged as one `http.bad_request` line, not two hundred."""
    # No stream: under load, a stream's own warnings (an unsafe segment, billing unreported
    # while its callbacks wait behind the flood) came in between.
    await daemon.start("")
    assert daemon.app is not None
    assert daemon.app.server is not None
    request = dict(RAW_REQUESTS)["bad-header"].replace(b"{path}", b"/healthz") + b"\r\n" * 2
    with capture_logs() as logs:
        for _ in range(200):
            status, _ = await raw_request(daemon.app.server.port or 0, request)
            assert status == "400"
    assert [e["event"] for e in warnings_and_errors(logs)] == ["http.bad_request"]


async def test_mutated_bodies_never_get_a_5xx_or_a_traceback(daemon, http):
    """Bodies from the bench fuzzer's mutator (known and unknown task ids) are answered 200 or
    4xx, each refusal is one warning line, and nothing is logged as an error."""
    base = await started(daemon)
    await daemon.wait(lambda: daemon.state("cam").task_id is not None)
    task_id = daemon.state("cam").task_id
    assert task_id is not None
    mutator = Mutator(random.Random(3), [task_id])
    statuses: collections.Counter[int] = collections.Counter()
    with capture_logs() as logs:
        for _ in range(300):
            _, body = mutator.body()
            url = f"{base}/callbacks/mavi/{SECRET}"
            async with http.post(url, data=io.BytesIO(body)) as resp:
                statuses[resp.status] += 1
    assert set(statuses) <= {200, 400, 413}, statuses
    refused = sum(c for s, c in statuses.items() if s >= 400)
    assert len([e for e in logs if e["event"] == "callback.rejected"]) == refused
    assert [e for e in logs if e["log_level"] in ("error", "critical") or "exc_info" in e] == []


async def test_only_flagged_segments_are_logged_above_debug(daemon, emulator):
    """`segment.stored` is a warning for unsafe content, info for a logo, and debug for a
    segment with neither (at fleet scale a line per segment flooded the journal)."""
    url = "rtmp://cams.test/levels"
    emulator.scripts[url] = Script(outcomes=["safe", "unsafe", "logo:Acme", "safe"])
    with capture_logs() as logs:
        await daemon.start(stream_toml("levels", url, logo_detection=True))
        await daemon.wait(lambda: daemon.state("levels").run_segments >= 4)
    levels = {e["segment"]: e["log_level"] for e in logs if e["event"] == "segment.stored"}
    assert [levels.get(i) for i in range(4)] == ["debug", "warning", "info", "debug"]
