"""The vendor's own SDK, pymavi 0.1.7, unmodified against the emulator's batch API.

pymavi is synchronous (requests): each call runs in a thread while the emulator serves on this
event loop. It joins paths to its base URL by appending (`base_url + "chat"`), so the base URL
ends with a slash. `upload_video_from_url` is the one method left out: it calls `uploadUrl`,
which MAVI's documentation does not describe, so the emulator does not serve it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymavi import MaviClient

from streamwatch.emulator import Emulator
from streamwatch.emulator.videos import DURATION_SECONDS

KEY = "sk-mai-sdk"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(api_key=KEY)
    async with e.running():
        yield e


async def test_every_pymavi_call_the_emulator_serves(emu, tmp_path: Path):
    """Upload, metadata search, video search, clip search, chat (whole and streamed),
    transcription and delete all return what pymavi promises, read from the emulator."""
    sdk = MaviClient(KEY, base_url=emu.batch_url + "/")
    video = tmp_path / "lobby camera.mp4"
    video.write_bytes(b"\x00" * 4096)

    video_no, name = await asyncio.to_thread(sdk.upload_video, str(video))
    stored = emu.library.videos[video_no]
    assert (name, stored.size) == (stored.name, 4096)
    await emu.library.settle()  # parsed: PARSE, which pymavi's searches ask for
    uploaded = str(stored.upload_ms)
    meta = {"videoName": name, "videoStatus": "PARSE", "uploadTime": uploaded}

    assert await asyncio.to_thread(sdk.search_video_metadata) == {video_no: meta}
    assert await asyncio.to_thread(sdk.search_video, "camera") == {video_no: meta}
    clips = await asyncio.to_thread(sdk.search_key_clip, "a person", [video_no])
    assert clips == [
        {
            "videoNo": video_no,
            "videoName": name,
            "fragmentStartTime": "5",
            "fragmentEndTime": "10",
            "duration": str(DURATION_SECONDS),
        }
    ]

    whole = await asyncio.to_thread(sdk.chat_with_videos, [video_no], "who enters?")
    assert whole == "The 1 video(s) show what you asked about: who enters?"
    deltas = await asyncio.to_thread(
        lambda: list(sdk.chat_with_videos([video_no], "who enters?", stream=True))
    )
    assert len(deltas) > 1
    assert "".join(deltas).strip() == whole

    task_no = await asyncio.to_thread(sdk.transcribe_video, video_no)
    first = await asyncio.to_thread(sdk.get_transcription, task_no)
    assert (first["status"], first["transcriptions"]) == ("UNFINISHED", [])
    done = await asyncio.to_thread(sdk.get_transcription, task_no)
    assert done["status"] == "FINISH"
    assert (done["taskNo"], done["videoNo"], done["type"]) == (task_no, video_no, "AUDIO")
    assert [line["content"] for line in done["transcriptions"]] == [
        "hello from the emulator",
        "a second line",
    ]

    assert await asyncio.to_thread(sdk.delete_video, [video_no]) is None
    assert emu.library.videos == {}


async def test_pymavi_reaches_the_urls_streamwatch_emulator_prints(tmp_path: Path):
    """`streamwatch emulator` prints both base URLs with the port it got; the vendor's SDK works
    on the printed batch URL plus a slash, and the v2 URL answers a stream start."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "emulator",
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            lines = [(await proc.stdout.readline()).decode().strip() for _ in range(2)]
        printed = dict(line.removeprefix("MAVI emulator: ").split(" = ") for line in lines)
        assert set(printed) == {"base_url", "batch_base_url"}
        assert printed["base_url"].endswith("/serve/api/v2")
        assert printed["batch_base_url"].endswith("/api/serve/video")
        assert printed["base_url"].removesuffix("/serve/api/v2") == printed[
            "batch_base_url"
        ].removesuffix("/api/serve/video")

        sdk = MaviClient("any-key", base_url=printed["batch_base_url"] + "/")
        video = tmp_path / "clip.mp4"
        video.write_bytes(b"\x00" * 1024)
        video_no, _ = await asyncio.to_thread(sdk.upload_video, str(video))
        assert await asyncio.to_thread(sdk.chat_with_videos, [video_no], "hi") == (
            "The 1 video(s) show what you asked about: hi"
        )
        started = await asyncio.to_thread(
            sdk.session.post,
            printed["base_url"] + "/stream/start",
            json={"url": "rtmp://cams.test/lobby", "enable_content_moderation": True},
            timeout=10,
        )
        assert started.json()["data"]["task_id"]
    finally:
        proc.terminate()
        await proc.wait()
