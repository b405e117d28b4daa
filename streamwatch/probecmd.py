"""`streamwatch probe [URL|STREAM …]`: what each source carries, as a table or JSON lines.

A source is a URL (rtmp, rtmps, rtsp, rtsps, http, https, file:), a path to a file, or the name
of a configured stream; none means every configured stream. Sources are shown by stream name,
path as given, or URL with its credentials replaced — never with a password.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamwatch.config import Config, load_config
from streamwatch.probe import DEFAULT_TIMEOUT, MediaInfo, ProbeError, probe
from streamwatch.redact import redact_url
from streamwatch.table import table

__all__ = ["EXIT_CODES", "Target", "UnknownSource", "add_parser", "probe_all", "run", "targets"]

# By error kind: the codes of every verb (cli.py EXIT_*), and 5 (EXIT_NOT_MEDIA) of its own.
EXIT_CODES = {
    "unavailable": 1,  # ffprobe cannot run here
    "unsupported": 2,  # a usage error: not a URL or scheme that can be probed
    "unreachable": 3,
    "timeout": 3,
    "failed": 3,
    "refused": 4,
    "not_media": 5,
}
EXIT_OK, EXIT_CONFIG = 0, 1
AT_ONCE = 4  # probes running at the same time (each is an ffprobe process)


def add_parser(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """The `probe` verb, run by `run`."""
    p = sub.add_parser(
        "probe",
        help="read sources (RTMP/RTSP, files, HTTP(S)) and show what media they carry",
        description="Ask ffprobe what each source carries (container, codecs, resolution, frame "
        "rate, bit rates; size and duration for files), before paying MAVI to watch it. "
        "Credentials in URLs are never printed.",
    )
    p.set_defaults(func=run)
    with_config(p)
    p.add_argument(
        "sources",
        nargs="*",
        metavar="URL|STREAM",
        help="URLs, files or configured stream names (default: every configured stream)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="give up on a source after this many seconds (default %(default)g)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per source, per line")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 600")
    return value


@dataclass(frozen=True)
class Target:
    """One source to probe, and how to name it where people see it."""

    label: str
    source: str | Path


class UnknownSource(Exception):
    """An argument that is not a URL, an existing file or a configured stream."""


def targets(names: list[str], config_path: Path) -> list[Target]:
    """What the arguments name, in their order; `UnknownSource` for one that names nothing
    (the config is read only when a stream name needs it)."""
    loaded: list[Config] = []

    def config(name: str) -> Config:
        if not loaded:
            if not config_path.exists():
                raise UnknownSource(
                    f"{name}: not a URL or an existing file, and no config file at "
                    f"{config_path} to find a stream by that name"
                )
            loaded.append(load_config(config_path))
        return loaded[0]

    if not names:
        streams = config("(every stream)").streams
        if not streams:
            raise UnknownSource(f"no [[streams]] in {config_path}: name a URL, file or stream")
        return [Target(s.name, s.url) for s in streams]
    found = []
    for name in names:
        if "://" in name or name.startswith("file:"):
            found.append(Target(redact_url(name), name))
        elif Path(name).exists():
            found.append(Target(name, Path(name)))
        else:
            streams = config(name).streams
            stream = next((s for s in streams if s.name == name), None)
            if stream is None:
                known = ", ".join(s.name for s in streams) or "none"
                raise UnknownSource(
                    f"{name}: not a URL, an existing file or a stream in {config_path} "
                    f"(streams: {known})"
                )
            found.append(Target(stream.name, stream.url))
    return found


async def probe_all(
    found: list[Target],
    *,
    timeout: float,  # noqa: ASYNC109 - each probe's own deadline, handed to probe()
    ffprobe: str = "ffprobe",
) -> list[MediaInfo | ProbeError]:
    """Each target's result in order, a few probes at a time."""
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(target: Target) -> MediaInfo | ProbeError:
        async with gate:
            try:
                return await probe(target.source, timeout=timeout, ffprobe=ffprobe)
            except ProbeError as exc:
                return exc

    return list(await asyncio.gather(*(one(t) for t in found)))


def run(args: argparse.Namespace) -> int:
    try:
        found = targets(args.sources, args.config)
    except UnknownSource as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    results = asyncio.run(probe_all(found, timeout=args.timeout))
    code = EXIT_OK
    rows: list[tuple[str, MediaInfo]] = []
    for target, result in zip(found, results, strict=True):
        if isinstance(result, ProbeError):
            print(f"error: {target.label}: {result}", file=sys.stderr)
            code = code or EXIT_CODES[result.kind]
            if args.json:
                doc = {"source": target.label, "error": result.kind, "message": str(result)}
                print(json.dumps(doc))
        elif args.json:
            print(json.dumps({"source": target.label, **result.to_json()}))
        else:
            rows.append((target.label, result))
    if rows:
        print(render(rows))
    return code


def render(probed: list[tuple[str, MediaInfo]]) -> str:
    """Probed sources as a table for people."""
    rows = [("SOURCE", "FORMAT", "DURATION", "SIZE", "BITRATE", "VIDEO", "AUDIO")]
    for label, info in probed:
        doc = info.to_json()
        rows.append(
            (
                label,
                info.format,
                doc.get("duration_formatted", "live"),
                f"{doc['filesize_mb']} MiB" if "filesize_mb" in doc else "-",
                f"{doc['overall_bitrate_mbps']} Mb/s" if "overall_bitrate_mbps" in doc else "-",
                _video(info),
                _audio(info),
            )
        )
    return "\n".join(table(rows))


def _video(info: MediaInfo) -> str:
    if not info.has_video:
        return "-"
    parts = [info.video_codec or "?", info.resolution or "?"]
    if info.fps:
        parts.append(f"{info.fps:g} fps")
    if info.video_bitrate:
        parts.append(f"{info.video_bitrate / 1e6:.2f} Mb/s")
    return " ".join(parts)


def _audio(info: MediaInfo) -> str:
    if not info.has_audio:
        return "-"
    parts = [info.audio_codec or "?"]
    if info.audio_channels:
        parts.append(f"{info.audio_channels} ch")
    if info.audio_sample_rate:
        parts.append(f"{info.audio_sample_rate / 1000:g} kHz")
    if info.audio_bitrate:
        parts.append(f"{round(info.audio_bitrate / 1000)} kb/s")
    return " ".join(parts)
