"""`streamwatch video …`: the batch API from the command line.

`upload` takes files or folders, runs `--jobs` uploads at once with progress on stderr, and
resumes: a manifest (`.streamwatch-uploads.json` in each folder) records what was uploaded, so
a second run skips unchanged files. Every verb can print JSON (`--json`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from streamwatch.config import Config, ConfigError, ConfigProblem, read_secret
from streamwatch.mavi.videos import BatchError, Video, VideoClient
from streamwatch.table import table

__all__ = ["add_parsers", "run"]

MANIFEST = ".streamwatch-uploads.json"
VideoVerb = Callable[[VideoClient, argparse.Namespace], Awaitable[int]]
"""A `video` verb: what it does with the client and its arguments; its exit code."""
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".ts"}


def add_parsers(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    *,
    url: Callable[[str], str],
    positive: Callable[[str], int],
) -> None:
    """The `video` verbs, run by `run`; `url` and `positive` check the --url and --jobs
    arguments."""
    video = sub.add_parser(
        "video",
        help="batch video: upload, list, search, chat, …",
        description="MAVI's batch video API: upload files, list and search the library, find "
        "moments, chat about videos, transcribe and delete. VIDEO arguments are videoNos, as "
        "`video list` and `video upload` print them.",
    )
    video.set_defaults(func=run)
    verbs = video.add_subparsers(dest="video_verb", required=True, metavar="VERB")

    def verb(name: str, text: str, about: str, run: VideoVerb) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, help=text, description=about)
        p.set_defaults(video_run=run)
        with_config(p)
        p.add_argument(
            "--url", type=url, help="batch API base URL (default: [mavi] batch_base_url)"
        )
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = verb(
        "upload",
        "upload files or folders (resumable)",
        "Upload video files, and the video files in folders, to the library, several at once. "
        f"A manifest ({MANIFEST}) in each folder records what was uploaded, so a second run "
        "skips it.",
        _upload,
    )
    p.add_argument(
        "paths",
        nargs="+",
        type=upload_path,
        metavar="PATH",
        help=f"a video file ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder of them",
    )
    p.add_argument("--jobs", type=positive, default=3, help="uploads at once (default %(default)s)")
    p.add_argument("--callback", help="callBackUri for parse notifications")
    p = verb("list", "list the library", "List every video in the library with its status.", _list)
    p.add_argument(
        "--status",
        choices=["PARSE", "UNPARSE", "FAIL", "PARSE_ERROR"],
        help="only videos in this state: PARSE ready, UNPARSE pending, FAIL or PARSE_ERROR failed",
    )
    p = verb(
        "search",
        "find videos by an English prompt",
        "Find the library's videos that match an English prompt.",
        _search,
    )
    p.add_argument("query", help="what to look for, in English")
    p = verb(
        "clips",
        "find moments in videos by an English prompt",
        "Find the moments in the given videos that match an English prompt.",
        _clips,
    )
    p.add_argument("query", help="what to look for, in English")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="videoNos to search in")
    p = verb(
        "chat",
        "ask about videos; the answer streams to the terminal",
        "Ask a question about videos; the answer is printed as it is written.",
        _chat,
    )
    p.add_argument("message", help="the question, in English")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="videoNos to ask about")
    p = verb(
        "transcribe",
        "transcribe a video and wait for the text",
        "Transcribe a video's audio (or what is seen) and print the timed text when done.",
        _transcribe,
    )
    p.add_argument("video", metavar="VIDEO", help="the videoNo")
    p.add_argument(
        "--type",
        choices=["AUDIO", "VIDEO", "AUDIO/VIDEO"],
        default="AUDIO",
        help="transcribe speech (AUDIO), what is seen (VIDEO) or both (default %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait")
    p = verb(
        "delete",
        "delete videos from the library",
        "Delete videos from the library for good.",
        _delete,
    )
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="videoNos to delete")


def upload_path(text: str) -> Path:
    """An existing folder, or a file named like a video: the `upload` argument."""
    path = Path(text)
    if path.is_dir():
        return path
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"{text} is not a video file (its name must end in {', '.join(sorted(VIDEO_SUFFIXES))})"
        )
    return path


def run(args: argparse.Namespace, config: Config) -> int:
    return asyncio.run(_run(args, config))


async def _run(args: argparse.Namespace, config: Config) -> int:
    if config.mavi.backend == "emulator" and args.url is None:
        raise ConfigError(
            "--url",
            [
                ConfigProblem(
                    "mavi.backend",
                    "the built-in emulator runs inside the daemon; give "
                    "--url, e.g. http://127.0.0.1:9400/api/serve/video of "
                    '`streamwatch emulator`, or set backend = "mavi"',
                )
            ],
        )
    problems: list[ConfigProblem] = []
    key = read_secret(config.mavi.api_key, "mavi.api_key", os.environ, problems)
    if key is None and args.url is None:
        raise ConfigError("secrets", problems)
    base = args.url or config.mavi.batch_base_url
    async with aiohttp.ClientSession() as session:
        client = VideoClient(
            session=session,
            base_url=base,
            api_key=key or SecretStr("emulator"),
            retry=config.mavi.retry,
        )
        handler: VideoVerb = args.video_run
        try:
            return await handler(client, args)
        except BatchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


def _video_doc(v: Video) -> dict[str, object]:
    return {
        "videoNo": v.video_no,
        "name": v.name,
        "status": v.status,
        "uploadTimeMs": v.upload_time_ms,
    }


def _print_videos(videos: list[Video], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_video_doc(v) for v in videos], indent=2))
        return
    for line in table([(v.video_no, v.status or "-", v.name or "") for v in videos]):
        print(line)
    if not videos:
        print("(no videos)")


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES
            )
        else:
            out.append(p)  # a video file: `upload_path` checked it
    return out


def _manifest(folder: Path) -> dict[str, object]:
    try:
        doc = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}  # not ours: start over


def _plan(paths: list[Path]) -> tuple[list[Path], int, dict[Path, dict[str, object]]]:
    """The files still to upload, how many are skipped, and the folders' manifests."""
    manifests: dict[Path, dict[str, object]] = {}
    todo: list[Path] = []
    skipped = 0
    for f in _files(paths):
        m = manifests.setdefault(f.parent, _manifest(f.parent))
        st = f.stat()
        done = m.get(f.name)
        if (
            isinstance(done, dict)
            and done.get("size") == st.st_size
            and done.get("mtime") == st.st_mtime
        ):
            skipped += 1
        else:
            todo.append(f)
    return todo, skipped, manifests


def _remember(manifests: dict[Path, dict[str, object]], f: Path, video_no: str) -> None:
    """Record an upload in its folder's manifest, at once, so an interrupted run resumes."""
    st = f.stat()
    manifests[f.parent][f.name] = {"videoNo": video_no, "size": st.st_size, "mtime": st.st_mtime}
    (f.parent / MANIFEST).write_text(json.dumps(manifests[f.parent], indent=1))


async def _upload(client: VideoClient, args: argparse.Namespace) -> int:
    todo, skipped, manifests = await asyncio.to_thread(_plan, args.paths)
    total = len(todo)
    results: list[dict[str, object]] = []
    failed = 0
    limit = asyncio.Semaphore(max(1, args.jobs))

    async def one(f: Path) -> None:
        nonlocal failed
        async with limit:
            try:
                video = await client.upload(f, callback_uri=args.callback)
            except BatchError as exc:
                failed += 1
                results.append({"file": str(f), "error": str(exc)})
            else:
                await asyncio.to_thread(_remember, manifests, f, video.video_no)
                results.append({"file": str(f), "videoNo": video.video_no})
            print(
                f"\r[{len(results)}/{total}] {f.name[:60]:<60}", end="", file=sys.stderr, flush=True
            )

    await asyncio.gather(*(one(f) for f in todo))
    if total:
        print(file=sys.stderr)
    summary = {"uploaded": total - failed, "skipped": skipped, "failed": failed, "files": results}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for r in results:
            print(
                f"{r.get('videoNo', 'FAILED'):<14} {r['file']}"
                + (f"  ({r['error']})" if "error" in r else "")
            )
        print(
            f"uploaded {summary['uploaded']}, skipped {skipped} already uploaded, failed {failed}"
        )
    return 0 if not failed else 1


async def _list(client: VideoClient, args: argparse.Namespace) -> int:
    videos = [v async for v in client.videos(status=args.status)]
    _print_videos(videos, args.json)
    return 0


async def _search(client: VideoClient, args: argparse.Namespace) -> int:
    _print_videos(await client.search(args.query), args.json)
    return 0


async def _clips(client: VideoClient, args: argparse.Namespace) -> int:
    clips = await client.clips(args.videos, args.query)
    if args.json:
        print(
            json.dumps(
                [
                    {"videoNo": c.video_no, "name": c.name, "start": c.start, "end": c.end}
                    for c in clips
                ],
                indent=2,
            )
        )
    else:
        rows = [(c.video_no, f"{c.start:.1f}s", "to", f"{c.end:.1f}s", c.name or "") for c in clips]
        for line in table(rows, right=(1, 3)):
            print(line)
        if not clips:
            print("(no moments found)")
    return 0


async def _chat(client: VideoClient, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"msg": await client.chat(args.videos, args.message)}))
        return 0
    async for delta in client.chat_stream(args.videos, args.message):
        print(delta, end="", flush=True)
    print()
    return 0


async def _transcribe(client: VideoClient, args: argparse.Namespace) -> int:
    task = await client.transcribe(args.video, kind=args.type)
    print(f"transcription {task} submitted; waiting…", file=sys.stderr)
    result = await client.wait_transcription(task, timeout_seconds=args.timeout)
    if args.json:
        print(
            json.dumps(
                {
                    "taskNo": task,
                    "videoNo": result.video_no,
                    "segments": [{"start": s, "end": e, "text": t} for s, e, t in result.segments],
                },
                indent=2,
            )
        )
    else:
        for s, e, t in result.segments:
            print(f"[{s:7.1f} - {e:7.1f}] {t}")
    return 0


async def _delete(client: VideoClient, args: argparse.Namespace) -> int:
    n = await client.delete(args.videos)
    print(json.dumps({"deleted": n}) if args.json else f"deleted {n} video(s)")
    return 0
