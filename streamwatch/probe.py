"""What a media source carries — container, codecs, resolution, rates, size — read by FFmpeg.

`await probe(source, timeout=…)` runs `ffprobe` in a child process and returns a `MediaInfo`,
or raises a `ProbeError` whose message is one line for people. It never blocks the event loop
(the wait is asyncio's) and never outlives its timeout: at the deadline, or when the awaiting
task is cancelled, the child is killed and reaped.

Why ffprobe in a process rather than PyAV in a thread: a probe reads untrusted input from the
network, and a demuxer that crashes or hangs there takes a process with it — ffprobe's, not the
daemon that holds the ledger; a process can be killed at the deadline where a thread blocked in
FFmpeg cannot; FFmpeg comes from the distribution with its security updates; and the figures
are ffprobe's own, the ones an operator gets by running it by hand.

Messages never hold the credentials of a URL (`streamwatch.redact.redact_url` shows one).
This module is a leaf: the emulator and the CLI use it; of streamwatch it imports only `redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, TypedDict
from urllib.parse import unquote, urlsplit

from streamwatch.redact import MASK, redact_urls, url_secrets

__all__ = [
    "DEFAULT_TIMEOUT",
    "SCHEMES",
    "MediaDoc",
    "MediaInfo",
    "NotMedia",
    "ProbeError",
    "ProbeTimeout",
    "ProbeUnavailable",
    "SourceRefused",
    "SourceUnreachable",
    "UnsupportedSource",
    "failure",
    "ffprobe_args",
    "format_duration",
    "media_info",
    "probe",
]

DEFAULT_TIMEOUT = 10.0

# What ffprobe may open for each kind of source, nested opens included: an HLS playlist from a
# web server cannot make it read local files, a stream URL cannot reach for anything but its
# own transport.
_WHITELISTS = {
    "rtmp": "rtmp,tcp",
    "rtmps": "rtmps,tls,tcp",
    "rtsp": "rtsp,rtp,udp,tcp",
    "rtsps": "rtsps,rtsp,rtp,srtp,udp,tcp,tls",
    "http": "http,https,tcp,tls,crypto",
    "https": "http,https,tcp,tls,crypto",
    "file": "file",
}
SCHEMES = tuple(_WHITELISTS)
_LIVE = {"rtmp", "rtmps", "rtsp", "rtsps"}

# Query parameters that carry credentials in stream URLs (tokens, keys, signatures).
# -- errors ------------------------------------------------------------------------------------


class ProbeError(Exception):
    """The source could not be probed. `str()` is one line without credentials; `kind` is a
    stable word for machines (JSON output, metrics labels)."""

    kind: ClassVar[str] = "failed"


class UnsupportedSource(ProbeError):
    """Not a URL or file this module probes (scheme, or no host)."""

    kind = "unsupported"


class ProbeUnavailable(ProbeError):
    """ffprobe cannot be run here."""

    kind = "unavailable"


class SourceUnreachable(ProbeError):
    """Nothing answered with this source now: connection refused, host unknown, the server has
    no such stream, file missing. Usually a source that is offline."""

    kind = "unreachable"


class ProbeTimeout(SourceUnreachable):
    """No media within the timeout (a live server that waits for a publisher looks like this)."""

    kind = "timeout"

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no media within {timeout:g} s (offline, or too slow to answer)")
        self.timeout = timeout


class SourceRefused(ProbeError):
    """The server answered and refused access: missing or wrong credentials."""

    kind = "refused"


class NotMedia(ProbeError):
    """The source answered with something that is not audio or video."""

    kind = "not_media"


# -- results -----------------------------------------------------------------------------------


class MediaDoc(TypedDict, total=False):
    """The probe as JSON, with the field names of the media-metadata services' documents
    (MAVI-CONTRACT.md section 3). Fields a source does not have are left out: live sources
    have no size or duration, audio-only sources no video fields and the reverse."""

    filesize: int
    filesize_mb: float
    duration: float
    duration_formatted: str
    format: str
    overall_bitrate: int
    overall_bitrate_mbps: float
    has_video: bool
    video_codec: str
    video_codec_long: str
    width: int
    height: int
    resolution: str
    fps: float
    video_bitrate: int
    video_bitrate_mbps: float
    pixel_format: str
    has_audio: bool
    audio_codec: str
    audio_codec_long: str
    audio_channels: int
    audio_sample_rate: int
    audio_sample_rate_khz: float
    audio_bitrate: int
    audio_bitrate_kbps: int


@dataclass(frozen=True, kw_only=True, slots=True)
class MediaInfo:
    """What one source carries: the container and its first video and first audio stream."""

    format: str
    filesize: int | None = None
    duration: float | None = None
    overall_bitrate: int | None = None
    has_video: bool = False
    video_codec: str | None = None
    video_codec_long: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    video_bitrate: int | None = None
    pixel_format: str | None = None
    has_audio: bool = False
    audio_codec: str | None = None
    audio_codec_long: str | None = None
    audio_channels: int | None = None
    audio_sample_rate: int | None = None
    audio_bitrate: int | None = None

    @property
    def live(self) -> bool:
        """A source without an end (RTMP, RTSP, a live playlist)."""
        return self.duration is None

    @property
    def resolution(self) -> str | None:
        return f"{self.width}x{self.height}" if self.width and self.height else None

    def to_json(self) -> MediaDoc:
        """The document, derived fields computed as the media-metadata services do."""
        doc = MediaDoc()
        if self.filesize is not None:
            doc["filesize"] = self.filesize
            doc["filesize_mb"] = round(self.filesize / 2**20, 2)
        if self.duration is not None:
            doc["duration"] = self.duration
            doc["duration_formatted"] = format_duration(self.duration)
        doc["format"] = self.format
        if self.overall_bitrate is not None:
            doc["overall_bitrate"] = self.overall_bitrate
            doc["overall_bitrate_mbps"] = round(self.overall_bitrate / 1e6, 2)
        doc["has_video"] = self.has_video
        if self.has_video:
            _put(doc, "video_codec", self.video_codec)
            _put(doc, "video_codec_long", self.video_codec_long)
            _put(doc, "width", self.width)
            _put(doc, "height", self.height)
            _put(doc, "resolution", self.resolution)
            _put(doc, "fps", self.fps)
            if self.video_bitrate is not None:
                doc["video_bitrate"] = self.video_bitrate
                doc["video_bitrate_mbps"] = round(self.video_bitrate / 1e6, 2)
            _put(doc, "pixel_format", self.pixel_format)
        doc["has_audio"] = self.has_audio
        if self.has_audio:
            _put(doc, "audio_codec", self.audio_codec)
            _put(doc, "audio_codec_long", self.audio_codec_long)
            _put(doc, "audio_channels", self.audio_channels)
            if self.audio_sample_rate is not None:
                doc["audio_sample_rate"] = self.audio_sample_rate
                doc["audio_sample_rate_khz"] = round(self.audio_sample_rate / 1000, 3)
            if self.audio_bitrate is not None:
                doc["audio_bitrate"] = self.audio_bitrate
                doc["audio_bitrate_kbps"] = round(self.audio_bitrate / 1000)
        return doc


def _put(doc: MediaDoc, key: str, value: object) -> None:
    if value is not None:
        doc[key] = value  # type: ignore[literal-required]  # keys are MediaDoc's, by the callers


def format_duration(seconds: float) -> str:
    """87.46 -> "00:01:27.46" (hours, minutes, seconds and hundredths)."""
    hundredths = round(seconds * 100)
    hours, rest = divmod(hundredths, 360_000)
    minutes, rest = divmod(rest, 6_000)
    secs, frac = divmod(rest, 100)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{frac:02d}"


def media_info(doc: dict[str, object]) -> MediaInfo:
    """A `MediaInfo` from ffprobe's `-show_format -show_streams` JSON; `NotMedia` when it holds
    neither audio nor video (cover art does not count as video). A field of an unexpected type
    (the media, not ffprobe, decides much of what is written) is taken as absent."""
    listed = doc.get("streams")
    streams = [_obj(s) for s in listed if isinstance(s, dict)] if isinstance(listed, list) else []
    video = next(
        (
            s
            for s in streams
            if s.get("codec_type") == "video" and not _obj(s.get("disposition")).get("attached_pic")
        ),
        None,
    )
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    if video is None and audio is None:
        raise NotMedia("no audio or video stream in it")
    fmt = _obj(doc.get("format"))
    duration = _float(fmt.get("duration"))
    fields: dict[str, Any] = {  # MediaInfo's fields, each typed by the helper that reads it
        "format": _str(fmt.get("format_name")) or "unknown",
        "filesize": _int(fmt.get("size")),
        # A live source reports no duration, or 0.
        "duration": round(duration, 3) if duration else None,
        "overall_bitrate": _int(fmt.get("bit_rate")),
    }
    if video is not None:
        fields |= {
            "has_video": True,
            "video_codec": _str(video.get("codec_name")),
            "video_codec_long": _str(video.get("codec_long_name")),
            "width": _int(video.get("width")) or None,
            "height": _int(video.get("height")) or None,
            "fps": _rate(video.get("avg_frame_rate")) or _rate(video.get("r_frame_rate")),
            "video_bitrate": _bitrate(video),
            "pixel_format": _str(video.get("pix_fmt")),
        }
    if audio is not None:
        fields |= {
            "has_audio": True,
            "audio_codec": _str(audio.get("codec_name")),
            "audio_codec_long": _str(audio.get("codec_long_name")),
            "audio_channels": _int(audio.get("channels")),
            "audio_sample_rate": _int(audio.get("sample_rate")),
            "audio_bitrate": _bitrate(audio),
        }
    return MediaInfo(**fields)


def _obj(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return int(value)
    except (OverflowError, ValueError):
        return None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _rate(value: object) -> float | None:
    """A frame rate as ffprobe writes it ("30000/1001" -> 29.97); None when unknown ("0/0")."""
    try:
        rate = Fraction(str(value))
    except (ValueError, ZeroDivisionError):
        return None
    return round(float(rate), 3) if rate > 0 else None


def _bitrate(stream: dict[str, object]) -> int | None:
    """The stream's bit rate, or Matroska's per-track statistics tag when the stream has none."""
    rate = _int(stream.get("bit_rate"))
    if rate is None:
        tags = _obj(stream.get("tags"))
        rate = _int(tags.get("BPS") or tags.get("BPS-eng"))
    return rate


# -- URLs --------------------------------------------------------------------------------------


def _scrub(text: str, url: str) -> str:
    """Text from ffprobe or a server with the URL's secrets taken out, however short, as
    written and decoded."""
    found = {form for s in url_secrets(url) for form in (s, unquote(s)) if form}
    for secret in sorted(found, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return redact_urls(text)


def _target(source: str | os.PathLike[str]) -> tuple[str, str]:
    """(scheme, what to hand ffprobe) for a URL or a local path, or `UnsupportedSource`."""
    if not isinstance(source, str):
        return "file", "file:" + os.path.abspath(os.fspath(source))
    try:
        parts = urlsplit(source)
        scheme = parts.scheme.lower()
        host = parts.hostname
    except ValueError:
        raise UnsupportedSource("not a URL that can be parsed") from None
    if not scheme or ("://" not in source and scheme != "file"):
        raise UnsupportedSource("not a URL (rtmp://, rtsp://, http(s)://, file:) or a file path")
    if scheme not in _WHITELISTS:
        raise UnsupportedSource(
            f"unsupported scheme {scheme}:// (use {', '.join(s for s in SCHEMES if s != 'file')} "
            "or a file)"
        )
    if scheme == "file":
        # FFmpeg's file protocol takes a path after "file:", not a percent-encoded URL path.
        path = unquote(parts.path)
        if not path:
            raise UnsupportedSource("a file: URL needs a path")
        return scheme, "file:" + path
    if not host:
        raise UnsupportedSource(f"the {scheme} URL has no host")
    return scheme, source


# -- running ffprobe ---------------------------------------------------------------------------


def ffprobe_args(
    target: str, scheme: str, *, ffprobe: str = "ffprobe", live_analyze_seconds: float = 2.0
) -> list[str]:
    """The ffprobe command line for one source (JSON on stdout, the error as JSON too)."""
    args = [ffprobe, "-hide_banner", "-v", "error", "-show_error", "-show_format", "-show_streams"]
    args += ["-print_format", "json", "-protocol_whitelist", _WHITELISTS[scheme]]
    if scheme in _LIVE:
        # FFmpeg's default is to read up to 5 s of media before it answers, and an FLV stream
        # with no audio always takes all 5 (it waits for the audio the header announces).
        # A live stream shows its codecs and frame rate well within this.
        args += ["-analyzeduration", str(round(live_analyze_seconds * 1_000_000))]
    return [*args, "-i", target]


async def probe(
    source: str | os.PathLike[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - kills the child at the deadline, raises ProbeTimeout
    ffprobe: str = "ffprobe",
    live_analyze_seconds: float = 2.0,
) -> MediaInfo:
    """Probe a URL (rtmp, rtmps, rtsp, rtsps, http, https, file:) or a local path with ffprobe,
    within `timeout` seconds; a live stream (RTMP, RTSP) is read for `live_analyze_seconds`.
    Raises a `ProbeError` subclass; see the module docstring."""
    scheme, target = _target(source)
    url = source if isinstance(source, str) else target
    try:
        proc = await asyncio.create_subprocess_exec(
            *ffprobe_args(
                target, scheme, ffprobe=ffprobe, live_analyze_seconds=live_analyze_seconds
            ),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ProbeUnavailable(
            f"cannot run {ffprobe} ({exc.strerror or exc}): install FFmpeg "
            "(Debian/Ubuntu: apt-get install ffmpeg)"
        ) from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        raise ProbeTimeout(timeout) from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: the child goes too
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return _result(proc.returncode, out, err.decode(errors="replace"), url)


def _result(returncode: int | None, out: bytes, stderr: str, url: str) -> MediaInfo:
    try:
        doc = json.loads(out or b"{}")
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    error = doc.get("error")
    if returncode != 0 or isinstance(error, dict):
        if returncode is not None and returncode < 0:
            raise ProbeError(f"ffprobe was killed by signal {-returncode}")
        code = _int(error.get("code")) if isinstance(error, dict) else None
        text = str(error.get("string", "")) if isinstance(error, dict) else ""
        raise failure(code, text, stderr, url=url)
    return media_info(doc)


def _fferrtag(a: int, b: str, c: str, d: str) -> int:
    return -(a | ord(b) << 8 | ord(c) << 16 | ord(d) << 24)


_AVERROR_INVALIDDATA = _fferrtag(ord("I"), "N", "D", "A")
_AVERROR_PROTOCOL_NOT_FOUND = _fferrtag(0xF8, "P", "R", "O")
_HTTP = {
    _fferrtag(0xF8, "4", "0", "0"): (ProbeError, "the server answered 400 Bad Request"),
    _fferrtag(0xF8, "4", "0", "1"): (
        SourceRefused,
        "the server answered 401 Unauthorized: missing or wrong credentials",
    ),
    _fferrtag(0xF8, "4", "0", "3"): (SourceRefused, "the server answered 403 Forbidden"),
    _fferrtag(0xF8, "4", "0", "4"): (
        SourceUnreachable,
        "the server answered 404 Not Found (nothing published there, or a wrong path)",
    ),
    _fferrtag(0xF8, "4", "X", "X"): (ProbeError, "the server refused the request (4xx)"),
    _fferrtag(0xF8, "5", "X", "X"): (SourceUnreachable, "the server failed (5xx)"),
}
# FFmpeg reports system errors as AVERROR(errno), the negated errno.
_ERRNO = {
    -errno.ECONNREFUSED: (SourceUnreachable, "connection refused"),
    -errno.ETIMEDOUT: (SourceUnreachable, "connection timed out"),
    -errno.ECONNRESET: (SourceUnreachable, "connection reset by the server"),
    -errno.EHOSTUNREACH: (SourceUnreachable, "no route to host"),
    -errno.ENETUNREACH: (SourceUnreachable, "network unreachable"),
    -errno.ENOENT: (SourceUnreachable, "no such file"),
    -errno.EACCES: (SourceRefused, "permission denied"),
    -errno.EISDIR: (NotMedia, "a directory, not a media file"),
}
_AUTH_WORDS = re.compile(r"(?i)auth|unauthori[sz]ed|forbidden|rejected|denied|password")


def failure(code: int | None, text: str, stderr: str, *, url: str) -> ProbeError:
    """The error for a failed ffprobe run, from its error code (`-show_error`) and what it
    wrote on stderr. Messages are crafted here or scrubbed of the URL's secrets."""
    if "Failed to resolve hostname" in stderr:
        host = urlsplit(url).hostname or "the host"
        return SourceUnreachable(f"cannot resolve host {host}")
    if "not on whitelist" in stderr:
        proto = re.search(r"Protocol '([^']+)' not on whitelist", stderr)
        what = f"{proto.group(1)}:" if proto else "another protocol"
        return UnsupportedSource(f"the source refers to {what}, which a probe of it may not open")
    server = re.search(r"Server error: (.+)", stderr)
    if server:  # RTMP servers say why in words
        said = _scrub(server.group(1).strip(), url)
        if "no such stream" in said.lower():
            return SourceUnreachable("the server has no such stream (nothing is publishing it)")
        if _AUTH_WORDS.search(said):
            return SourceRefused(f"the server refused access: {said}")
        return SourceUnreachable(f"the server said: {said}")
    if code in _HTTP:
        cls, message = _HTTP[code]
        return cls(message)
    if code == _AVERROR_INVALIDDATA or "moov atom not found" in stderr:
        if "moov atom not found" in stderr:
            return NotMedia("not a complete media file (MP4 index missing: truncated?)")
        return NotMedia("not audio or video (invalid data)")
    if code == _AVERROR_PROTOCOL_NOT_FOUND:
        return UnsupportedSource("this ffprobe cannot open that protocol")
    if code in _ERRNO:
        cls, message = _ERRNO[code]
        return cls(message)
    if code == -errno.EIO:  # an RTMP server that closes the connection says nothing more
        return SourceUnreachable(
            "the server closed the connection (nothing published there, or access refused)"
        )
    reason = _scrub(text, url) if text else "no reason given"
    return ProbeError(f"ffprobe failed: {reason}")
