"""Query latency while the store's writer is busy: the read connection against a baseline.

Keeps the writer saturated with segment callbacks (C in flight, so every transaction is a
large batch with its fsync) and meanwhile times Q status-style queries (`stream_totals`,
`orphan_totals`, `alert_counts`, one after another) twice in the same run: on the read
connection beside the writer (how the store reads), and queued as writer operations (the
baseline: how every read went before the read connection). Prints p50, p95 and max per path
and the ratio. A benchmark, not a test: it asserts nothing about time.

    python -m bench.reads [--queries 200] [--concurrency 512]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from streamwatch.mavi.callbacks import Callback, parse_callback
from streamwatch.store import Store
from streamwatch.store.writer import Context


def callback(index: int) -> tuple[bytes, Callback]:
    body = json.dumps(
        {
            "task_id": "bench-task",
            "data": {
                "status": 0,
                "data": {
                    "segment_index": index,
                    "content_moderation": {"has_unsafe_content": False},
                },
            },
        }
    ).encode()
    return body, parse_callback(body)


async def load(store: Store, concurrency: int, stop: asyncio.Event) -> int:
    """Apply callbacks with `concurrency` in flight until `stop`; returns how many."""
    counter = iter(range(10**9))

    async def worker() -> int:
        done = 0
        while not stop.is_set():
            body, cb = callback(next(counter))
            await store.apply_callback(cb, body=body)
            done += 1
        return done

    return sum(await asyncio.gather(*(worker() for _ in range(concurrency))))


def query(ctx: Context, *, sql: str) -> list[tuple[object, ...]]:
    return ctx.conn.execute(sql).fetchall()


async def timed(query: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await query()
        out.append((time.perf_counter() - started) * 1000)
    return out


async def main(queries: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with Store(Path(tmp) / "bench.db") as store:
            await store.record_task_started(
                task_id="bench-task",
                stream="bench",
                spec_hash="h",
                fps=1,
                content_moderation=True,
                logo_detection=False,
                max_logos=5,
                started_at=time.time(),
            )

            async def on_reader() -> None:
                await store.stream_totals()
                await store.orphan_totals()
                await store.alert_counts()

            async def in_writer() -> None:
                for sql in (
                    "SELECT stream, count(*), sum(segments) FROM tasks GROUP BY stream",
                    "SELECT count(*), coalesce(sum(callbacks), 0) FROM orphan_tasks",
                    "SELECT state, count(*) FROM alert_outbox GROUP BY state",
                ):
                    await store._write(functools.partial(query, sql=sql))

            stop = asyncio.Event()
            loading = asyncio.create_task(load(store, concurrency, stop))
            await asyncio.sleep(0.5)  # the writer is saturated by now
            commits = store.commits
            reader = await timed(on_reader, queries)
            writer = await timed(in_writer, queries)
            commits = store.commits - commits
            stop.set()
            applied = await loading
    print(f"queries: {queries} x 3 statements, writer load: {concurrency} callbacks in flight")
    print(f"callbacks applied meanwhile: {applied}, commits during the timed part: {commits}")
    for name, ms in (("read connection", reader), ("baseline (writer)", writer)):
        p95 = statistics.quantiles(ms, n=20)[18]
        print(
            f"{name:18}: p50 {statistics.median(ms):7.2f} ms  p95 {p95:7.2f} ms"
            f"  max {max(ms):7.2f} ms"
        )
    ratio = statistics.median(writer) / statistics.median(reader)
    print(f"ratio p50 baseline/read connection: {ratio:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=512)
    args = parser.parse_args()
    asyncio.run(main(args.queries, args.concurrency))
