"""Callback throughput through the real server and store, group commit against a baseline.

Runs the daemon (no streams) on loopback, registers one task, and posts N segment callbacks
with C in flight at once. It runs twice in the same process: the baseline with
`batch_max = 1` (one commit, one fsync per callback) and the shipped default. Prints
callbacks/s, commits and the ratio. With `--storage postgresql://…` it also runs the default
on that PostgreSQL database (its schema created if missing; each run's task is new), printed
beside SQLite. A benchmark, not a test: it asserts nothing about time.

    python -m bench.callbacks [--n 5000] [--concurrency 64] [--storage postgresql://…]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from streamwatch.app import App
from streamwatch.config import StorageConfig, parse_config
from streamwatch.logs import configure_logging

ENV = {"SECRET": "bench-secret-0123456789abcdef", "KEY": "sk-mai-bench"}


def body(index: int, task_id: str = "bench-task") -> bytes:
    return json.dumps(
        {
            "code": 200,
            "message": "SUCCESS",
            "task_id": task_id,
            "data": {
                "status": 0,
                "message": "Segment processed successfully",
                "data": {
                    "segment_index": index,
                    "start_time": f"{index * 5}.0",
                    "end_time": f"{index * 5 + 5}.0",
                    "video_url": f"https://cdn.invalid/{index}.mp4",
                    "content_moderation": {
                        "has_unsafe_content": index % 9 == 0,
                        "frames_processed": 5,
                    },
                    "processing_time_ms": "800",
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
    ).encode()


async def run(
    n: int, concurrency: int, batch_max: int, workdir: Path, url: str | None = None
) -> tuple[float, int]:
    where = f'url = "{url}"' if url else f'path = "{workdir / f"bench-{batch_max}.db"}"'
    task_id = f"bench-task-{uuid.uuid4()}"
    text = f"""
[mavi]
backend = "mavi"
base_url = "http://127.0.0.1:9"
api_key = {{ env = "KEY" }}
[server]
listen = "127.0.0.1:0"
callback_secret = {{ env = "SECRET" }}
[storage]
{where}
batch_max = {batch_max}
[logging]
level = "warning"
"""
    config = parse_config(text, environ=ENV)
    app = App(config, environ=ENV)
    serving = asyncio.create_task(app.serve())
    await app.started.wait()
    assert app.store is not None
    assert app.server is not None
    await app.store.record_task_started(
        task_id=task_id,
        stream="bench",
        spec_hash="h",
        fps=1,
        content_moderation=True,
        logo_detection=False,
        max_logos=5,
        started_at=time.time(),
    )
    url = app.server.callback_url()
    bodies = [body(i, task_id) for i in range(n)]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    commits_before = app.store.commits
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                data = queue.get_nowait()
                async with session.post(url, data=data) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"callback answered {resp.status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    commits = app.store.commits - commits_before
    stored = await app.store.segment_count(task_id=task_id)
    app.request_stop()
    await serving
    if stored != n:
        raise RuntimeError(f"stored {stored} of {n}")
    return n / elapsed, commits


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--storage", metavar="URL", help="also run on this PostgreSQL database (postgresql://…)"
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    default_batch = StorageConfig().batch_max
    with tempfile.TemporaryDirectory() as tmp:
        base_rate, base_commits = await run(args.n, args.concurrency, 1, Path(tmp))
        rate, commits = await run(args.n, args.concurrency, default_batch, Path(tmp))
        if args.storage:
            pg_rate, pg_commits = await run(
                args.n, args.concurrency, default_batch, Path(tmp), args.storage
            )
    print(f"callbacks: {args.n}, in flight: {args.concurrency}")
    print(f"baseline  batch_max=1   : {base_rate:8.0f} callbacks/s, {base_commits} commits")
    print(f"default   batch_max={default_batch:<4}: {rate:8.0f} callbacks/s, {commits} commits")
    print(f"ratio default/baseline  : {rate / base_rate:.2f}x")
    if args.storage:
        print(
            f"postgresql batch_max={default_batch:<4}: {pg_rate:8.0f} callbacks/s, "
            f"{pg_commits} commits (SQLite: {rate:.0f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
