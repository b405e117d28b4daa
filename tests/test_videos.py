"""The async batch client against the emulator's batch API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr

from streamwatch.config import RetryConfig
from streamwatch.emulator import Emulator
from streamwatch.emulator.videos import LibraryVideo
from streamwatch.mavi.videos import (
    BadRequest,
    BatchAuthError,
    BatchBusy,
    DuplicateOperation,
    TranscriptionTimeout,
    VideoClient,
)
from tests.fakes.serve import serve

KEY = "sk-mai-batch"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(api_key=KEY)
    async with e.running():
        yield e


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[VideoClient]:
    async with aiohttp.ClientSession() as session:
        yield VideoClient(
            session=session,
            base_url=emu.batch_url,
            api_key=SecretStr(KEY),
            retry=RetryConfig(attempts=4, initial_seconds=0.01, max_seconds=0.02),
        )


def add_videos(emu: Emulator, n: int, *, status: str = "PARSE") -> list[str]:
    nos = []
    for i in range(n):
        no = f"VX{i:06d}"
        emu.library.videos[no] = LibraryVideo(
            no, f"clip {i}.mp4", 10, "x", 1_700_000_000_000 + i, status
        )
        nos.append(no)
    return nos


async def test_upload_then_list_across_pages(emu, client, tmp_path: Path):
    """Uploaded files appear; the iterator walks every page of the metadata search."""
    path = tmp_path / "lobby camera.mp4"
    path.write_bytes(b"\x00" * 300_000)
    video = await client.upload(path)
    assert video.name == "lobby camera.mp4"
    assert emu.library.videos[video.video_no].size == 300_000
    add_videos(emu, 45)
    seen = [v.video_no async for v in client.videos(page_size=20)]
    assert len(seen) == 46
    assert len(set(seen)) == 46
    assert emu.library.calls.count("searchDB") == 3, "20 + 20 + 6"
    page = await client.page(page=2, page_size=20)
    assert (page.current, page.pages, page.total) == (2, 3, 46)


async def test_status_filter(emu, client):
    """Metadata search filters by processing status."""
    add_videos(emu, 3, status="PARSE")
    add_videos(emu, 0)
    emu.library.videos["VFAIL"] = LibraryVideo("VFAIL", "bad.mp4", 0, "x", 1, "FAIL")
    failed = [v.video_no async for v in client.videos(status="FAIL")]
    assert failed == ["VFAIL"]


async def test_codes_inside_http_200_raise_without_retry(emu, client):
    """0401, 0001 and 0409 arrive in HTTP 200 and raise their own errors at once."""
    async with aiohttp.ClientSession() as session:
        bad = VideoClient(session=session, base_url=emu.batch_url, api_key=SecretStr("nope"))
        with pytest.raises(BatchAuthError):
            await bad.search("cars")
    with pytest.raises(BadRequest):
        await client.page(page_size=500)
    nos = add_videos(emu, 2)
    await client.delete(nos)
    with pytest.raises(DuplicateOperation):
        await client.delete(nos)
    assert emu.library.calls.count("searchAI") == 1


async def test_0429_storms_are_retried(emu, client):
    """Busy answers are retried with backoff until the call goes through, within bounds."""
    emu.library.busy_next = 3
    assert await client.search("clip") == []
    assert emu.library.calls.count("searchAI") == 4
    emu.library.busy_next = 10
    with pytest.raises(BatchBusy):
        await client.search("clip")


async def test_each_request_is_reported_with_its_outcome(emu):
    """`on_request` hears of every single request, each retry alone, with its endpoint, its
    outcome label (busy answers as rate_limited, a refused call as refused) and its duration."""
    heard: list[tuple[str, str, float]] = []
    async with aiohttp.ClientSession() as session:
        client = VideoClient(
            session=session,
            base_url=emu.batch_url,
            api_key=SecretStr(KEY),
            retry=RetryConfig(attempts=4, initial_seconds=0.01, max_seconds=0.02),
            on_request=lambda endpoint, outcome, seconds: heard.append(
                (endpoint, outcome, seconds)
            ),
        )
        emu.library.busy_next = 2
        assert await client.search("clip") == []
        with pytest.raises(BadRequest):
            await client.page(page_size=500)
    assert [(e, o) for e, o, _ in heard] == [
        ("searchAI", "rate_limited"),
        ("searchAI", "rate_limited"),
        ("searchAI", "ok"),
        ("searchDB", "refused"),
    ]
    assert all(seconds >= 0 for _, _, seconds in heard)


async def test_clip_search_and_delete_are_chunked(emu, client):
    """Clip search above 50 videos and deletes above 500 are split into allowed calls."""
    nos = add_videos(emu, 620)
    clips = await client.clips(nos[:120], "a red car")
    assert len(clips) == 120
    assert emu.library.calls.count("searchVideoFragment") == 3
    assert (clips[0].start, clips[0].end) == (5.0, 10.0)
    assert await client.delete(nos) == 620
    assert emu.library.calls.count("delete") == 2
    assert emu.library.videos == {}


async def test_chat_whole_and_streamed(emu, client):
    """Chat returns the whole answer, or the same answer as deltas when streamed."""
    nos = add_videos(emu, 2)
    whole = await client.chat(nos, "what happens?")
    parts = [d async for d in client.chat_stream(nos, "what happens?", history=[("hi", "hello")])]
    assert len(parts) > 3
    assert "".join(parts).strip() == whole


async def test_transcription_wait(emu, client):
    """A transcription is submitted, polled until finished, and returned with its lines."""
    nos = add_videos(emu, 1)
    task = await client.transcribe(nos[0])
    result = await client.wait_transcription(task, timeout_seconds=5, poll_seconds=0.01)
    assert result.finished
    assert result.segments[0] == (0.0, 4.5, "hello from the emulator")
    emu.library.polls_to_finish = 100
    slow = await client.transcribe(nos[0])
    with pytest.raises(TranscriptionTimeout):
        await client.wait_transcription(slow, timeout_seconds=0.05, poll_seconds=0.01)


async def test_upload_callback_is_posted(emu, client, tmp_path: Path):
    """With a callback URI, the emulator posts the parse result to it."""
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_post("/uploaded", hook)
    async with serve(app) as base:
        path = tmp_path / "a.mp4"
        path.write_bytes(b"\x01" * 1000)
        video = await client.upload(path, callback_uri=f"{base}/uploaded")
        await emu.library.settle()  # the parse and its callback
    assert received == [{"videoNo": video.video_no, "clientId": "emulator", "status": "PARSE"}]
