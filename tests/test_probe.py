"""Source probes: ffprobe's figures under the seed document's field names, typed one-line errors,
bounded time, no credentials shown; against generated files, a web server, and real live RTMP
and RTSP servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from streamwatch.probe import (
    MediaInfo,
    NotMedia,
    ProbeError,
    ProbeTimeout,
    ProbeUnavailable,
    SourceRefused,
    SourceUnreachable,
    UnsupportedSource,
    failure,
    media_info,
    probe,
)
from streamwatch.redact import redact_url
from tests.conftest import cli, free_port, tool
from tests.fakes.rtsp import refusing_rtsp
from tests.fakes.serve import serve
from tests.media import Pattern, make_file

PATTERN = Pattern(width=480, height=270, fps=30, channels=2)


async def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process, off the event loop (servers in this loop must answer it)."""
    return await asyncio.to_thread(cli, *args, env=env)


def ffprobe_json(path: Path) -> dict[str, Any]:
    """What ffprobe itself reports, for comparison."""
    argv = [tool("ffprobe"), "-v", "error", "-print_format", "json", "-show_format"]
    out = subprocess.run(
        [*argv, "-show_streams", str(path)],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One of each generated file, made once per run."""
    folder = tmp_path_factory.mktemp("media")
    names = {
        "h264_aac_mp4": "clip.mp4",
        "vp9_opus_webm": "clip.webm",
        "mp3": "tone.mp3",
        "random_bytes": "noise.bin",
        "truncated_mp4": "cut.mp4",
    }
    return {kind: make_file(folder / name, kind, PATTERN) for kind, name in names.items()}


# --- the document ---------------------------------------------------------------------------


def test_derived_fields_match_the_seed_document():
    """The seed's own example, fed through MediaInfo, comes out with the seed's derived values
    (MiB with two places, Mb/s, hh:mm:ss.cc, WxH, kHz, whole kb/s) and its field order."""
    info = MediaInfo(
        format="mp4,mov,m4a,3gp,3g2,mj2",
        filesize=15679283,
        duration=87.46,
        overall_bitrate=1438692,
        has_video=True,
        video_codec="h264",
        video_codec_long="H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10",
        width=1920,
        height=1080,
        fps=30.0,
        video_bitrate=1300000,
        pixel_format="yuv420p",
        has_audio=True,
        audio_codec="aac",
        audio_codec_long="AAC (Advanced Audio Coding)",
        audio_channels=2,
        audio_sample_rate=48000,
        audio_bitrate=128000,
    )
    seed = {
        "filesize": 15679283,
        "filesize_mb": 14.95,
        "duration": 87.46,
        "duration_formatted": "00:01:27.46",
        "format": "mp4,mov,m4a,3gp,3g2,mj2",
        "overall_bitrate": 1438692,
        "overall_bitrate_mbps": 1.44,
        "has_video": True,
        "video_codec": "h264",
        "video_codec_long": "H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10",
        "width": 1920,
        "height": 1080,
        "resolution": "1920x1080",
        "fps": 30.0,
        "video_bitrate": 1300000,
        "video_bitrate_mbps": 1.3,
        "pixel_format": "yuv420p",
        "has_audio": True,
        "audio_codec": "aac",
        "audio_codec_long": "AAC (Advanced Audio Coding)",
        "audio_channels": 2,
        "audio_sample_rate": 48000,
        "audio_sample_rate_khz": 48.0,
        "audio_bitrate": 128000,
        "audio_bitrate_kbps": 128,
    }
    doc = info.to_json()
    assert doc == seed
    assert list(doc) == list(seed)


def test_live_source_document_has_no_size_or_duration_and_skips_cover_art():
    """ffprobe's answer for a live stream (duration 0, no size) gives a document without size,
    duration or overall bit rate; an attached picture is not the video; an audio-only source
    has no video fields."""
    live = media_info(
        {
            "format": {"format_name": "flv", "duration": "0.000000"},
            "streams": [
                {"codec_type": "audio", "codec_name": "aac", "sample_rate": "44100", "channels": 2},
                {
                    "codec_type": "video",
                    "codec_name": "h264",
                    "width": 640,
                    "height": 360,
                    "avg_frame_rate": "0/0",
                    "r_frame_rate": "30000/1001",
                },
            ],
        }
    )
    doc = live.to_json()
    assert live.live
    assert not {"filesize", "duration", "duration_formatted", "overall_bitrate"} & set(doc)
    assert doc["fps"] == 29.97  # avg_frame_rate unknown: r_frame_rate
    assert doc["audio_sample_rate_khz"] == 44.1
    covered = media_info(
        {
            "format": {"format_name": "mp3", "duration": "3.5", "size": "1000"},
            "streams": [
                {"codec_type": "audio", "codec_name": "mp3"},
                {"codec_type": "video", "codec_name": "mjpeg", "disposition": {"attached_pic": 1}},
            ],
        }
    ).to_json()
    assert covered["has_video"] is False
    assert not [k for k in covered if k.startswith("video_") or k in ("width", "fps")]
    with pytest.raises(NotMedia):
        media_info({"format": {"format_name": "tty"}, "streams": [{"codec_type": "data"}]})


def test_fields_of_unexpected_types_are_taken_as_absent():
    """What the media writes into ffprobe's answer (a codec name that is a number, a format or
    disposition that is not an object, tags that are a list) reads as absent, not a crash."""
    odd = media_info(
        {
            "format": ["not", "an", "object"],
            "streams": [
                {
                    "codec_type": "video",
                    "codec_name": 264,
                    "disposition": "none",
                    "width": True,
                    "height": "360",
                    "bit_rate": "fast",
                    "tags": ["BPS", "1000"],
                },
                "not a stream",
            ],
        }
    ).to_json()
    assert odd["format"] == "unknown"
    assert odd["has_video"] is True
    assert "video_codec" not in odd
    assert "width" not in odd
    assert odd["height"] == 360
    assert "video_bitrate" not in odd


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:hunter2@cam.test:554/live", "rtsp://admin:***@cam.test:554/live"),
        ("rtsp://admin:p%40ss@cam.test/x", "rtsp://admin:***@cam.test/x"),
        ("rtsp://admin:p@ss@cam.test/x", "rtsp://admin:***@cam.test/x"),
        ("rtmp://live.test/app/stream", "rtmp://live.test/app/stream"),
        ("rtmp://live.test/app/s?token=abc&x=1", "rtmp://live.test/app/s?token=***&x=1"),
        (
            "https://cdn.test/a.m3u8?Signature=zz&Key-Pair-Id=k",
            "https://cdn.test/a.m3u8?Signature=***&Key-Pair-Id=***",
        ),
        ("rtsp://user@cam.test/x", "rtsp://***@cam.test/x"),
    ],
)
def test_redact_url(url: str, shown: str):
    """Probe output shows URLs as every other output does (streamwatch.redact): passwords, a
    lone user name and credential-like query values are replaced; the rest stays readable."""
    assert redact_url(url) == shown


def tag(a: int, b: str, c: str, d: str) -> int:
    return -(a | ord(b) << 8 | ord(c) << 16 | ord(d) << 24)


@pytest.mark.parametrize(
    ("code", "stderr", "kind", "words"),
    [
        (-111, "", SourceUnreachable, "connection refused"),
        (-2, "", SourceUnreachable, "no such file"),
        (-1, "[rtmp @ 0x1] Server error: No such stream", SourceUnreachable, "no such stream"),
        (
            -5,
            "[rtmp @ 0x1] Server error: Authentication failed. pw=s3cret",
            SourceRefused,
            "refused",
        ),
        (-5, "", SourceUnreachable, "closed the connection"),
        (
            -5,
            "[tcp @ 0x1] Failed to resolve hostname cam.test: Name",
            SourceUnreachable,
            "cam.test",
        ),
        (tag(0xF8, "4", "0", "1"), "", SourceRefused, "401"),
        (tag(0xF8, "4", "0", "3"), "", SourceRefused, "403"),
        (tag(0xF8, "4", "0", "4"), "", SourceUnreachable, "404"),
        (tag(0xF8, "5", "X", "X"), "", SourceUnreachable, "5xx"),
        (tag(ord("I"), "N", "D", "A"), "", NotMedia, "invalid data"),
        (tag(ord("I"), "N", "D", "A"), "[mov] moov atom not found", NotMedia, "truncated"),
        (tag(0xF8, "P", "R", "O"), "", UnsupportedSource, "protocol"),
        (-22, "", ProbeError, "ffprobe failed"),
    ],
)
def test_failure_classification(code: int, stderr: str, kind: type[ProbeError], words: str):
    """ffprobe's error code and stderr become the right error type with a one-line message
    that never repeats the URL's secrets."""
    url = "rtmp://u:s3cret@cam.test/live/x"
    err = failure(code, "Invalid argument", stderr, url=url)
    assert type(err) is kind
    assert words in str(err)
    assert "\n" not in str(err)
    assert "s3cret" not in str(err)


# --- files, against ffprobe itself ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["h264_aac_mp4", "vp9_opus_webm", "mp3"])
async def test_files_match_ffprobe(media: dict[str, Path], kind: str):
    """For H.264/AAC MP4, VP9/Opus WebM and audio-only MP3, codec, size, frame rate,
    duration and bit rates are what `ffprobe -print_format json` itself reports."""
    path = media[kind]
    info = await probe(path, timeout=20)
    ref = ffprobe_json(path)
    fmt = ref["format"]
    video = next((s for s in ref["streams"] if s["codec_type"] == "video"), None)
    audio = next(s for s in ref["streams"] if s["codec_type"] == "audio")
    assert info.format == fmt["format_name"]
    assert info.filesize == int(fmt["size"]) == path.stat().st_size
    assert info.duration == pytest.approx(float(fmt["duration"]), abs=0.001)
    assert info.overall_bitrate == int(fmt["bit_rate"])
    assert info.has_video is (video is not None)
    if video is not None:
        assert (info.video_codec, info.width, info.height) == (
            video["codec_name"],
            video["width"],
            video["height"],
        )
        assert info.fps == pytest.approx(float(Fraction(video["avg_frame_rate"])), abs=0.001)
        assert (info.width, info.height, info.fps) == (PATTERN.width, PATTERN.height, PATTERN.fps)
        assert info.video_bitrate == (int(video["bit_rate"]) if "bit_rate" in video else None)
        assert info.pixel_format == video["pix_fmt"]
    assert info.audio_codec == audio["codec_name"]
    assert info.audio_sample_rate == int(audio["sample_rate"])
    assert info.audio_channels == audio["channels"]
    assert info.audio_bitrate == (int(audio["bit_rate"]) if "bit_rate" in audio else None)
    expected = {"h264_aac_mp4": "h264", "vp9_opus_webm": "vp9", "mp3": None}[kind]
    assert info.video_codec == expected


@pytest.mark.parametrize(
    ("kind", "words"), [("random_bytes", "invalid data"), ("truncated_mp4", "truncated")]
)
async def test_corrupt_files_are_not_media(media: dict[str, Path], kind: str, words: str):
    """Random bytes and an MP4 cut before its index are `NotMedia`; the CLI says so in one line
    and exits 5."""
    with pytest.raises(NotMedia, match=words):
        await probe(media[kind], timeout=20)
    done = await run_cli("probe", str(media[kind]))
    assert done.returncode == 5, done.stderr
    assert done.stderr.count("\n") == 1
    assert words in done.stderr
    assert done.stdout == ""


async def test_cli_table_and_json_for_files(media: dict[str, Path]):
    """`probe FILE…` prints one table row per file; `--json` one object per line with the seed
    document's names, and `source` naming the file as given."""
    files = [str(media[k]) for k in ("h264_aac_mp4", "vp9_opus_webm", "mp3")]
    table = await run_cli("probe", *files)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SOURCE", "FORMAT", "DURATION", "SIZE", "BITRATE", "VIDEO", "AUDIO"]
    assert len(lines) == 4
    assert "h264 480x270 30 fps" in lines[1]
    assert "aac 2 ch 48 kHz" in lines[1]
    assert "vp9 480x270 30 fps" in lines[2]
    assert "opus 2 ch 48 kHz" in lines[2]
    assert re.search(r"Mb/s +- +mp3 1 ch 44\.1 kHz 128 kb/s$", lines[3])  # no video
    out = await run_cli("probe", "--json", *files)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [d["source"] for d in docs] == files
    assert docs[0]["resolution"] == "480x270"
    assert docs[0]["duration_formatted"] == "00:00:02.00"
    assert docs[2]["has_video"] is False
    assert "width" not in docs[2]


# --- HTTP(S) -----------------------------------------------------------------------------------


@pytest.fixture
async def web_media(media: dict[str, Path]) -> AsyncIterator[str]:
    """The MP4 over HTTP (range requests and all, as aiohttp serves files), once in the open
    and once behind Basic auth (user `viewer`, password `hunter2`)."""

    async def private(request: web.Request) -> web.StreamResponse:
        expected = "Basic dmlld2VyOmh1bnRlcjI="  # viewer:hunter2
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="media"'})
        return web.FileResponse(media["h264_aac_mp4"])

    async def public(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(media["h264_aac_mp4"])

    app = web.Application()
    app.router.add_get("/clip.mp4", public)
    app.router.add_get("/private/clip.mp4", private)
    async with serve(app) as base:
        yield base


async def test_http_media_url(web_media: str, media: dict[str, Path]):
    """An HTTP media URL probes like the file itself, size included."""
    info = await probe(f"{web_media}/clip.mp4", timeout=20)
    assert info == await probe(media["h264_aac_mp4"], timeout=20)


async def test_http_credentials_refused_and_never_shown(web_media: str):
    """A 401 is `SourceRefused` (exit 4); with the right credentials the probe works; the
    password appears in no output either way."""
    with pytest.raises(SourceRefused, match="401"):
        await probe(f"{web_media}/private/clip.mp4", timeout=20)
    wrong = web_media.replace("http://", "http://viewer:wrongpass@") + "/private/clip.mp4"
    done = await run_cli("probe", wrong)
    assert done.returncode == 4
    assert "401" in done.stderr
    assert "viewer:***@" in done.stderr
    assert "wrongpass" not in done.stdout + done.stderr
    right = web_media.replace("http://", "http://viewer:hunter2@") + "/private/clip.mp4"
    done = await run_cli("probe", "--json", right)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["video_codec"] == "h264"
    assert doc["source"] == right.replace("hunter2", "***")
    assert "hunter2" not in done.stdout + done.stderr


# --- live sources --------------------------------------------------------------------------


async def test_cli_probes_a_live_rtmp_source(live_sources):
    """`streamwatch probe rtmp://… --json` against a real RTMP server reports the codec,
    resolution and frame rate the feeding ffmpeg was told to produce, and no size or
    duration."""
    source = await live_sources.rtmp(PATTERN)
    done = await run_cli("probe", source.url, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["source"] == source.url
    assert doc["format"] == "flv"
    assert (doc["video_codec"], doc["width"], doc["height"], doc["fps"]) == ("h264", 480, 270, 30.0)
    assert doc["resolution"] == "480x270"
    assert (doc["audio_codec"], doc["audio_channels"], doc["audio_sample_rate"]) == (
        "aac",
        2,
        48000,
    )
    assert not {"filesize", "duration", "duration_formatted"} & set(doc)
    table = await run_cli("probe", source.url)
    assert table.returncode == 0, table.stderr
    assert "live" in table.stdout
    assert "h264 480x270 30 fps" in table.stdout


async def test_live_rtsp_source(live_sources):
    """A real RTSP server's stream probes with the feed's codec, size and rate."""
    source = await live_sources.rtsp(Pattern(width=320, height=240, fps=15))
    info = await probe(source.url, timeout=20)
    assert info.format == "rtsp"
    assert (info.video_codec, info.width, info.height, info.fps) == ("h264", 320, 240, 15.0)
    assert info.audio_codec == "aac"
    assert info.live


@pytest.mark.parametrize("kind", ["rtmp", "rtsp"])
async def test_a_stopped_source_is_unreachable_until_it_comes_back(live_sources, kind: str):
    """When the feed stops, its server answers that nothing is there (`SourceUnreachable`,
    exit 3); started again, the source probes again."""
    source = await getattr(live_sources, kind)(Pattern(width=320, height=240, fps=15, audio=False))
    await source.stop()
    with pytest.raises(SourceUnreachable) as caught:
        await probe(source.url, timeout=20)
    assert not isinstance(caught.value, ProbeTimeout)  # the server said so at once
    done = await run_cli("probe", source.url)
    assert done.returncode == 3
    await source.start()
    info = await probe(source.url, timeout=20)
    assert (info.width, info.has_audio) == (320, False)


async def test_refused_rtsp_credentials():
    """A camera that answers 401 is `SourceRefused`; the CLI exits 4 without the password."""
    async with refusing_rtsp() as base:
        url = base.replace("rtsp://", "rtsp://admin:hunter2@") + "/cam"
        with pytest.raises(SourceRefused):
            await probe(url, timeout=10)
        done = await run_cli("probe", url)
    assert done.returncode == 4
    assert "hunter2" not in done.stdout + done.stderr
    assert done.stderr.startswith("error: rtsp://admin:***@127.0.0.1:")


async def test_unreachable_source_one_line_without_password():
    """Nothing listening: `connection refused` in one line naming the URL without its
    password, exit 3."""
    url = f"rtsp://admin:hunter2@127.0.0.1:{free_port()}/cam"
    done = await run_cli("probe", url)
    assert done.returncode == 3
    assert done.stderr == f"error: {redact_url(url)}: connection refused\n"
    assert "hunter2" not in done.stderr


# --- bounded, and never blocking the loop ----------------------------------------------------


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP server that accepts and never says a word (a wedged media server)."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connected
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


def pid_recording_ffprobe(tmp_path: Path) -> tuple[str, Path]:
    """An ffprobe that writes its pid to a file first, so a test can see it is gone."""
    pid_file = tmp_path / "ffprobe.pid"
    wrapper = tmp_path / "ffprobe"
    wrapper.write_text(f'#!/bin/sh\necho $$ > "{pid_file}"\nexec "{tool("ffprobe")}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), pid_file


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_timeout_kills_ffprobe_and_the_loop_stays_free(silent_server, tmp_path: Path):
    """Against a server that never answers, the loop keeps running while ffprobe waits (the
    server's own accept runs before the probe ends), the probe ends with `ProbeTimeout` at
    its deadline, and the ffprobe process is gone."""
    port, connected = silent_server
    ffprobe, pid_file = pid_recording_ffprobe(tmp_path)
    task = asyncio.create_task(
        probe(f"rtmp://127.0.0.1:{port}/live/x", timeout=1.5, ffprobe=ffprobe)
    )
    async with asyncio.timeout(10):
        await connected.wait()
    assert not task.done()
    with pytest.raises(ProbeTimeout, match=r"no media within 1\.5 s"):
        await task
    assert gone(int(pid_file.read_text()))


async def test_cancelling_a_probe_kills_ffprobe(silent_server, tmp_path: Path):
    """A caller that gives up (cancels) takes the ffprobe process with it."""
    port, connected = silent_server
    ffprobe, pid_file = pid_recording_ffprobe(tmp_path)
    task = asyncio.create_task(probe(f"rtsp://127.0.0.1:{port}/x", timeout=30, ffprobe=ffprobe))
    async with asyncio.timeout(10):
        await connected.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gone(int(pid_file.read_text()))


# --- bad input and a missing ffprobe -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://127.0.0.1/x.mp4", "unsupported scheme ftp://"),
        ("udp://127.0.0.1:1234", "unsupported scheme udp://"),
        ("rtmp:///live/x", "no host"),
    ],
)
async def test_unsupported_sources(url: str, words: str, tmp_path: Path):
    """Schemes that are not probed, and URLs without a host, fail before any ffprobe runs: one
    line, exit 2, and no config file needed."""
    with pytest.raises(UnsupportedSource, match=words):
        await probe(url, ffprobe=str(tmp_path / "no-ffprobe-here"))
    done = await run_cli("probe", "-c", str(tmp_path / "absent.toml"), url)
    assert done.returncode == 2
    assert done.stderr == f"error: {url}: {done.stderr.split(': ', 2)[2]}"
    assert words in done.stderr
    assert done.stderr.count("\n") == 1


async def test_missing_ffprobe(media: dict[str, Path], tmp_path: Path):
    """Without ffprobe the probe says to install FFmpeg (`ProbeUnavailable`); the CLI exits 1."""
    with pytest.raises(ProbeUnavailable, match="install FFmpeg"):
        await probe(media["mp3"], ffprobe=str(tmp_path / "no-ffprobe-here"))
    done = await run_cli(
        "probe",
        str(media["mp3"]),
        env={"PATH": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 1
    assert "install FFmpeg" in done.stderr


# --- configured streams ------------------------------------------------------------------------


async def test_streams_by_name_never_show_their_credentials(live_sources, tmp_path: Path):
    """STREAM arguments probe the configured URL and are shown by name, with the password in
    the URL in no output; no argument probes every stream; an unknown name exits 1."""
    source = await live_sources.rtmp(Pattern(width=320, height=240, fps=15))
    with_password = source.url.replace("rtmp://", "rtmp://publisher:hunter2@")
    config = tmp_path / "streams.toml"
    config.write_text(
        f'[[streams]]\nname = "lobby"\nurl = "{with_password}"\n[[streams]]\nname = "dock"\n'
        f'url = "rtsp://admin:hunter2@127.0.0.1:{free_port()}/cam"\n'
    )
    everything = await run_cli("probe", "-c", str(config), "--json")
    assert everything.returncode == 3  # dock is unreachable
    lobby, dock = (json.loads(line) for line in everything.stdout.splitlines())
    assert (lobby["source"], lobby["width"], lobby["fps"]) == ("lobby", 320, 15.0)
    assert dock == {"source": "dock", "error": "unreachable", "message": "connection refused"}
    assert everything.stderr == "error: dock: connection refused\n"
    named = await run_cli("probe", "-c", str(config), "dock")
    assert named.returncode == 3
    assert (named.stdout, named.stderr) == ("", "error: dock: connection refused\n")
    unknown = await run_cli("probe", "-c", str(config), "garage")
    assert unknown.returncode == 1
    assert "garage" in unknown.stderr
    assert "lobby, dock" in unknown.stderr
    for out in (everything, named, unknown):
        assert "hunter2" not in out.stdout + out.stderr
