"""How long a /metrics scrape takes with many streams, against a small baseline.

Runs the daemon twice in this process — a baseline fleet and a large one — against
emulators in processes of their own (`streamwatch emulator`, one per 2,500 streams behind
bench.fleet's front, a segment every 5 seconds per stream, as MAVI), lets segments flow so
that every per-stream series exists, then times rendering alone and repeated scrapes over
HTTP, plain and as Prometheus scrapes (OpenMetrics, gzip) while the callbacks keep arriving.
Prints the median and worst scrape, the payload size and series count, and the ratios
large/baseline. The scrapes follow each other closely: between two, only the streams that
sent a segment meanwhile are rendered again (at Prometheus' 15 s, every stream has: see
`--synthetic --changed 1` and bench.fleet's scrapes). A benchmark, not a test: it asserts
nothing about time.

    python -m bench.metrics [--streams 1000] [--baseline 10] [--scrapes 20] [--settle 600]
    python -m bench.metrics --synthetic --streams 10000 [--scrapes 20] [--changed 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, disable_created_metrics

from bench.fleet import Front, start_emulator
from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.ledger import Spending
from streamwatch.logs import configure_logging
from streamwatch.metrics import Metrics, Snapshot, StateCollector, StreamView, render_page
from streamwatch.status import snapshot
from streamwatch.store import StreamTotals

ENV = {"KEY": "sk-bench", "SECRET": "metrics-bench-secret-0123456789abcdef"}


def config(n: int, db: Path, port: int, base_url: str) -> str:
    streams = "".join(
        f'[[streams]]\nname = "cam-{i:05d}"\nurl = "rtmp://bench.invalid/{i}"\n'
        f"fps = {1 + i % 3}\nlogo_detection = {'true' if i % 2 else 'false'}\n"
        f'labels = {{ site = "site-{i % 7}", team = "team-{i % 3}" }}\n'
        for i in range(n)
    )
    return f"""
[mavi]
backend = "mavi"
base_url = "{base_url}"
api_key = {{ env = "KEY" }}
[server]
listen = "127.0.0.1:{port}"
callback_secret = {{ env = "SECRET" }}
max_connections = 4000
[storage]
path = "{db}"
[budgets]
daily_usd = "1000000.00"
[logging]
level = "warning"
{streams}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What Prometheus 2.x/3.x sends when it scrapes.
PROMETHEUS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


@dataclass
class Scrape:
    median: float
    worst: float
    size: int
    series: int
    render: float
    gz_median: float
    gz_worst: float
    gz_size: int


async def measure(n: int, scrapes: int, workdir: Path, settle: float) -> Scrape:
    # The emulators in processes of their own (one per 2,500 streams, behind bench.fleet's
    # front), at MAVI's rate: n / 5 callbacks a second keep arriving while the page is
    # scraped (in this process they would take the daemon's CPU).
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/callbacks/mavi/{ENV['SECRET']}"
    started = [await start_emulator(webhook) for _ in range(max(1, -(-n // 2500)))]
    front = Front([base for _, base in started])
    front_runner = await front.start()
    app = App(
        parse_config(config(n, workdir / f"m{n}.db", port, front.url), environ=ENV), environ=ENV
    )
    serving = asyncio.create_task(app.serve())
    try:
        return await scrape_all(app, n, scrapes, settle)
    finally:
        app.request_stop()
        await serving
        for emulator, _ in started:
            emulator.terminate()
            await emulator.wait()
        await front.close()
        await front_runner.cleanup()


async def scrape_all(app: App, n: int, scrapes: int, settle: float) -> Scrape:
    await app.started.wait()
    assert app.supervisor is not None
    assert app.server is not None
    sup = app.supervisor

    def reporting() -> int:
        return sum(s.run_segments > 0 for s in sup.streams.values())

    # Every stream's series exist once it has sent a segment; a loaded emulator may take long
    # to send the first of each, so after `settle` seconds the scrapes go ahead (the count of
    # streams reporting is printed with the figures).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(settle):
            await sup.wait_until(lambda: reporting() == n)
    print(f"  {n} streams: {reporting()} reporting when the scrapes began", flush=True)
    url = f"{app.server.base_url}/metrics"
    times: list[float] = []
    gzipped: list[float] = []
    size = series = gz_size = 0
    render = []
    collector, metrics = app.server.collector, app.metrics
    assert app.store is not None
    for _ in range(scrapes):
        started = time.perf_counter()
        collector.snapshot = await snapshot(supervisor=sup, store=app.store, now=time.time())
        render_page(metrics.registry, collector.stream_families(metrics.tokens), "")
        render.append(time.perf_counter() - started)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for _ in range(scrapes):
            started = time.perf_counter()
            async with session.get(url, headers={"Accept-Encoding": "identity"}) as resp:
                body = await resp.read()
            times.append(time.perf_counter() - started)
            started = time.perf_counter()
            async with session.get(url, headers=PROMETHEUS) as resp:
                gz_size = len(await resp.read())
            gzipped.append(time.perf_counter() - started)
        size = len(body)
        series = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
    return Scrape(
        statistics.median(times),
        max(times),
        size,
        series,
        statistics.median(render),
        statistics.median(gzipped),
        max(gzipped),
        gz_size,
    )


def synthetic(n: int, scrapes: int, changed: float) -> None:
    """Rendering alone for `n` streams that all run and report, from a snapshot made here
    (no emulator): the per-stream families, the page, and gzip as the server does it. Before
    each scrape, the counts of a `changed` share of the streams move on (1: every stream sent
    a segment since the last scrape, as at Prometheus' 15 s with a segment every 5 s)."""
    text = config(n, Path("/nonexistent/state.db"), 0, "http://127.0.0.1:9")
    cfg = parse_config(text, environ=ENV)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    spending = Spending(budgets=cfg.budgets, streams=cfg.streams, segment_seconds=5)
    collector = StateCollector(registry, spending)
    now = time.time()
    snap = Snapshot(now=now)
    for i, spec in enumerate(cfg.streams):
        snap.streams[spec.name] = StreamView(
            "running", True, i % 3, dict(spec.labels), spec.fps, True, spec.logo_detection
        )
        snap.totals[spec.name] = StreamTotals(1 + i % 2, 700 + i, i % 9, i % 5, i % 4, now - i % 5)
        snap.all_time_ticks[spec.name] = 8 * (700 + i)
        metrics.tokens[spec.name] = [1200 * i, 40 * i, 1100 * i, 140 * i]
    collector.snapshot = snap
    collector.stream_families(metrics.tokens)  # the first scrape renders every line
    moving = [spec.name for spec in cfg.streams[: int(n * changed)]]
    timings = []
    for _ in range(scrapes):
        for name in moving:
            t = snap.totals[name]
            snap.totals[name] = StreamTotals(
                t.tasks, t.segments + 1, t.unsafe_segments, t.logo_segments,
                t.failed_segments, now,
            )  # fmt: skip
            snap.all_time_ticks[name] += 8
            metrics.tokens[name][0] += 1200
        started = time.perf_counter()
        families = collector.stream_families(metrics.tokens)
        made = time.perf_counter()
        body, _ = render_page(registry, families, PROMETHEUS["Accept"])
        paged = time.perf_counter()
        packed = gzip.compress(body, compresslevel=1, mtime=0)
        timings.append((made - started, paged - made, time.perf_counter() - paged))
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    fam, page, gz = (statistics.median(t[k] for t in timings) for k in range(3))
    print(
        f"synthetic {n} streams, {changed:.0%} changed a scrape: per-stream series "
        f"{fam * 1000:.0f} ms, page "
        f"{page * 1000:.0f} ms, gzip {gz * 1000:.0f} ms (medians of {scrapes}); "
        f"{len(body) / 2**20:.1f} MiB, {len(packed) / 2**20:.2f} MiB gzipped, {series} series"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=10)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument(
        "--settle",
        type=float,
        default=600.0,
        help="seconds to wait for every stream's first segment before scraping anyway",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="time rendering alone from a made-up snapshot of --streams streams (no emulator)",
    )
    parser.add_argument(
        "--changed",
        type=float,
        default=1.0,
        help="--synthetic: the share of streams whose counts change between scrapes",
    )
    args = parser.parse_args()
    configure_logging(level="error")
    disable_created_metrics()  # as `streamwatch run` does
    if args.synthetic:
        synthetic(args.streams, args.scrapes, args.changed)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = await measure(args.baseline, args.scrapes, Path(tmp), args.settle)
        big = await measure(args.streams, args.scrapes, Path(tmp), args.settle)
    for label, n, m in (("baseline", args.baseline, base), ("large", args.streams, big)):
        print(
            f"{label:<8} {n:>5} streams: scrape median {m.median * 1000:7.1f} ms, worst "
            f"{m.worst * 1000:7.1f} ms (rendering alone {m.render * 1000:6.1f} ms), "
            f"{m.size / 1024:8.1f} KiB, {m.series} series ({m.series / n:.1f} per stream)"
        )
        print(
            f"{'':<8} {'':>5}  as Prometheus scrapes (OpenMetrics, gzip): median "
            f"{m.gz_median * 1000:7.1f} ms, worst {m.gz_worst * 1000:7.1f} ms, "
            f"{m.gz_size / 1024:8.1f} KiB"
        )
    print(
        f"ratio large/baseline: time {big.median / base.median:.1f}x for "
        f"{args.streams / args.baseline:.0f}x the streams and {big.series / base.series:.1f}x "
        "the series"
    )


if __name__ == "__main__":
    asyncio.run(main())
