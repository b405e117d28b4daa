"""`streamwatch video …` as a user runs it, against the emulator's batch API."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from streamwatch.emulator import Emulator

KEY = "sk-mai-cli"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    e = Emulator(api_key=KEY)
    async with e.running():
        yield e


async def video(emu: Emulator, config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "video",
        args[0],
        "-c",
        str(config),
        "--url",
        emu.batch_url,
        *args[1:],
        stdout=PIPE,
        stderr=PIPE,
        env={**os.environ, "MAVI_API_KEY": KEY},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_folder_upload_resumes_and_every_verb_works(emu, tmp_path: Path):
    """An upload cut short by refusals resumes without re-uploading; then list, search, clips,
    chat, transcribe and delete all work and print JSON."""
    config = tmp_path / "streams.toml"
    config.write_text("[mavi.retry]\nattempts = 2\ninitial_seconds = 0.01\nmax_seconds = 0.02\n")
    folder = tmp_path / "evidence"
    folder.mkdir()
    for name in ("red car.mp4", "blue car.mp4", "dog.mp4"):
        (folder / name).write_bytes(os.urandom(50_000))
    (folder / "notes.txt").write_text("not a video")

    emu.library.per_minute["upload"] = 2  # the third upload is refused: the run is cut short
    code, out, err = await video(emu, config, "upload", str(folder), "--jobs", "1", "--json")
    assert code == 1
    first = json.loads(out)
    assert (first["uploaded"], first["failed"]) == (2, 1)
    assert "[3/3]" in err, "progress is shown"

    emu.library.per_minute["upload"] = 100
    code, out, _ = await video(emu, config, "upload", str(folder), "--json")
    assert code == 0
    second = json.loads(out)
    assert (second["uploaded"], second["skipped"], second["failed"]) == (1, 2, 0)
    assert sorted(v.name for v in emu.library.videos.values()) == [
        "blue car.mp4",
        "dog.mp4",
        "red car.mp4",
    ]

    await emu.library.settle()  # parsed
    code, out, _ = await video(emu, config, "list", "--json")
    nos = [v["videoNo"] for v in json.loads(out)]
    assert len(nos) == 3
    code, out, _ = await video(emu, config, "search", "car", "--json")
    assert sorted(v["name"] for v in json.loads(out)) == ["blue car.mp4", "red car.mp4"]
    code, out, _ = await video(emu, config, "clips", "a car", *nos, "--json")
    assert len(json.loads(out)) == 3
    code, out, _ = await video(emu, config, "chat", "what happens?", nos[0])
    assert code == 0
    assert "what happens?" in out
    code, out, _ = await video(emu, config, "transcribe", nos[0], "--json")
    assert json.loads(out)["segments"][0]["text"] == "hello from the emulator"
    code, out, _ = await video(emu, config, "delete", *nos, "--json")
    assert json.loads(out) == {"deleted": 3}
    code, _, err = await video(emu, config, "delete", nos[0])
    assert code == 1
    assert "0409" in err


async def test_clips_and_chat_with_a_video_not_in_the_library(emu, tmp_path: Path):
    """`video clips` (and `chat`) naming a videoNo the library does not have fail with one
    line naming it, instead of printing nothing and exiting 0."""
    config = tmp_path / "streams.toml"
    config.write_text("")
    for args in (("clips", "x", "VI9999999999"), ("chat", "what happens?", "VI9999999999")):
        code, out, err = await video(emu, config, *args)
        assert code == 1, (args, out, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "VI9999999999" in lines[0]
        assert "not in the library" in lines[0]


async def test_upload_refuses_a_file_that_is_not_a_video(emu, tmp_path: Path):
    """A non-video file named directly is refused as a bad argument (exit 2) and nothing is
    uploaded, as a folder upload would skip it; a missing file is a bad argument too."""
    config = tmp_path / "streams.toml"
    config.write_text("")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    for path, fragment in ((notes, "not a video file"), (tmp_path / "nope.mp4", "no such file")):
        code, _, err = await video(emu, config, "upload", str(path))
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert fragment in lines[0]
        assert "config" not in lines[0]
    assert emu.library.videos == {}


def test_a_manifest_that_is_not_ours_is_started_over(tmp_path: Path):
    """An upload manifest holding something else (a list, an entry that is not an object) is
    not trusted: every file is uploaded again, instead of the command failing."""
    from streamwatch.videocmd import MANIFEST, _plan

    clip = tmp_path / "a.mp4"
    clip.write_bytes(b"x" * 10)
    (tmp_path / MANIFEST).write_text("[1, 2]")
    assert _plan([tmp_path]) == ([clip], 0, {tmp_path: {}})
    (tmp_path / MANIFEST).write_text(json.dumps({"a.mp4": "done"}))
    todo, skipped, _ = _plan([tmp_path])
    assert (todo, skipped) == ([clip], 0)
