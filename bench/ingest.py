"""Callback ingestion against bare aiohttp, driven from another process.

Starts, in this process, two servers on loopback:
- bare aiohttp: one handler that parses the JSON body and answers (what a callback
  receiver cannot be faster than);
- the daemon: the real server and store (SQLite, `synchronous=FULL`, acknowledged only after
  commit), with one configured stream whose task it started on the built-in emulator (whose
  own segments are 5 minutes apart, so that only the load generator posts);
- with `--store postgresql`, a second daemon beside it, its state in PostgreSQL: a throwaway
  cluster (tests/pg.py's, with fsync and full-page writes on, `synchronous_commit` on) or the
  empty database of `--pg-url`.

Then drives them, in turn, from a load generator in its own process: wrk (`-t1`, a Lua
script giving every request a new segment index of the stream's task) when it is installed,
else `bench.loadgen`. Prints callbacks/s, p50 and p99 of each run and the medians, and the
ratio of each daemon to bare. Then the fixed-rate mode: `bench.loadgen --rate` (wrk2 is not packaged
here) posts `--rate` callbacks/s to each server and prints the p99 acknowledgement, counted
from when each callback was due. Last, it checks that every acknowledged segment is stored.

All servers run on the same event loop (`--loop`; `auto` is what `streamwatch run` picks:
uvloop when installed), so the ratio compares handlers, not loops.

A benchmark, not a test: it asserts nothing about time. Figures on a shared 2-core machine are
noisy: compare the daemon with the bare handler of the same run, and look at the medians.

    python -m bench.ingest [--seconds 8] [--connections 32] [--runs 3] [--rate 1000]
                           [--loop auto|asyncio|uvloop] [--generator auto|wrk|python]
                           [--store sqlite|postgresql] [--pg-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from aiohttp import web
from prometheus_client import disable_created_metrics

from bench.cluster import free_port
from bench.payload import wrk_script
from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.eventloop import ENV, run
from streamwatch.logs import configure_logging

Result = dict[str, float]


async def bare_server() -> tuple[web.AppRunner, str]:
    """The baseline: parse the JSON, answer."""

    async def handle(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/callbacks/mavi/{secret}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/callbacks/mavi/bench-secret-0123456789abcdef"


DAEMON_CONFIG = """
[mavi]
backend = "emulator"
segment_seconds = 300
[server]
listen = "127.0.0.1:0"
[storage]
{storage}
[emulator]
balance_usd = "1000000"
[logging]
level = "info"
[[streams]]
name = "bench"
url = "rtmp://bench.invalid/live"
fps = 1
logo_detection = true
"""


async def drive(
    url: str,
    *,
    generator: str,
    args: argparse.Namespace,
    task_id: str,
    first: int,
    rate: float | None,
    workdir: Path,
) -> Result:
    """One run of the load generator (its own process) against `url`."""
    seconds = args.rate_seconds if rate is not None else args.seconds
    if generator == "wrk" and rate is None:
        script = workdir / f"wrk-{first}.lua"
        script.write_text(wrk_script(task_id, first))
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{seconds:g}s", "-s", str(script), url]
    else:
        cmd = [
            sys.executable,
            "-m",
            "bench.loadgen",
            url,
            "--connections",
            str(args.connections),
            "--seconds",
            str(seconds),
            "--first",
            str(first),
            "--task-id",
            task_id,
        ]
        if rate is not None:
            cmd += ["--rate", str(rate)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {err.decode()[-500:]}")
    for line in out.decode().splitlines():
        if line.startswith("RESULT "):
            line = line[len("RESULT ") :]
        if line.startswith("{"):
            result: Result = json.loads(line)
            return result
    raise RuntimeError(f"no result from {cmd[0]}: {out.decode()[-500:]}")


def show(label: str, r: Result) -> None:
    print(
        f"  {label:<7} {r['requests'] / r['seconds']:8.0f} callbacks/s   p50 {r['p50_ms']:6.2f} ms"
        f"   p99 {r['p99_ms']:6.2f} ms   ({int(r['requests'])} requests, "
        f"{int(r['errors'])} errors)",
        flush=True,
    )


class Daemon:
    """One daemon under test: its app, the bench stream's task, its callback URL."""

    def __init__(self, label: str, app: App, serving: asyncio.Task[None]) -> None:
        self.label = label
        self.app = app
        self.serving = serving
        self.task_id = ""
        self.url = ""
        self.runs: list[Result] = []
        self.fixed: Result | None = None
        self.acknowledged = 0

    @classmethod
    async def start(cls, label: str, storage: str) -> Daemon:
        config = parse_config(DAEMON_CONFIG.format(storage=storage), environ={})
        app = App(config, environ={})
        daemon = cls(label, app, asyncio.create_task(app.serve()))
        await app.started.wait()
        sup = app.supervisor
        assert sup is not None
        assert app.server is not None
        try:
            async with asyncio.timeout(30):
                await sup.wait_until(lambda: getattr(sup.streams.get("bench"), "task_id", None))
        except TimeoutError:
            await daemon.stop()
            raise SystemExit(f"the bench stream did not start ({label})") from None
        task_id = sup.streams["bench"].task_id
        assert task_id is not None
        daemon.task_id = task_id
        daemon.url = app.server.callback_url()
        return daemon

    async def stop(self) -> None:
        self.app.request_stop()
        await self.serving

    def count(self, r: Result) -> None:
        self.acknowledged += int(r["requests"] - r["errors"])


async def bench(args: argparse.Namespace, workdir: Path, pg_url: str | None) -> None:
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(
        f"load: {generator} in its own process, {args.connections} connections, "
        f"{args.seconds:g} s a run, {args.runs} runs each; event loop: {loop}",
        flush=True,
    )
    bare_runner, bare_url = await bare_server()
    daemons = [await Daemon.start("sqlite", f'path = "{workdir / "ingest.db"}"')]
    if pg_url is not None:
        daemons.append(await Daemon.start("postgres", f'url = "{pg_url}"'))
    bare: list[Result] = []
    first = 1  # the emulator's own first segment (in 5 minutes) is index 0

    async def one_run(url: str, task_id: str, rate: float | None) -> Result:
        nonlocal first
        r = await drive(
            url,
            generator=generator,
            args=args,
            task_id=task_id,
            first=first,
            rate=rate,
            workdir=workdir,
        )
        first += 1_000_000  # more than one run sends
        return r

    fixed_bare: Result | None = None
    stored: dict[str, int] = {}
    try:
        print("throughput (closed loop):", flush=True)
        for _ in range(args.runs):
            bare.append(await one_run(bare_url, "bench-task", None))
            show("bare", bare[-1])
            for d in daemons:
                d.runs.append(await one_run(d.url, d.task_id, None))
                show(d.label, d.runs[-1])
                d.count(d.runs[-1])
        if args.rate:
            print(
                f"fixed rate, {args.rate:g} callbacks/s for {args.rate_seconds:g} s "
                "(latency from when each was due):",
                flush=True,
            )
            fixed_bare = await one_run(bare_url, "bench-task", args.rate)
            show("bare", fixed_bare)
            for d in daemons:
                d.fixed = await one_run(d.url, d.task_id, args.rate)
                show(d.label, d.fixed)
                d.count(d.fixed)
        for d in daemons:
            assert d.app.store is not None
            stored[d.label] = await d.app.store.segment_count(task_id=d.task_id)
    finally:
        for d in daemons:
            await d.stop()
        await bare_runner.cleanup()

    def rate_of(r: Result) -> float:
        return r["requests"] / r["seconds"]

    b = statistics.median(rate_of(r) for r in bare)
    print("medians:")
    for label, rs in (("bare", bare), *((d.label, d.runs) for d in daemons)):
        print(
            f"  {label:<8} {statistics.median(rate_of(r) for r in rs):8.0f} callbacks/s   p50 "
            f"{statistics.median(r['p50_ms'] for r in rs):6.2f} ms   p99 "
            f"{statistics.median(r['p99_ms'] for r in rs):6.2f} ms"
        )
    for d in daemons:
        print(f"ratio {d.label}/bare: {statistics.median(rate_of(r) for r in d.runs) / b:.2f}x")
    if fixed_bare is not None:
        print(
            "fixed rate p99 acknowledgement: "
            + ", ".join(f"{d.label} {d.fixed['p99_ms']:.2f} ms" for d in daemons if d.fixed)
            + f", bare {fixed_bare['p99_ms']:.2f} ms"
        )
    missing = False
    for d in daemons:
        print(f"{d.label}: stored {stored[d.label]} segments of {d.acknowledged} acknowledged")
        missing = missing or stored[d.label] < d.acknowledged
    if missing:
        raise SystemExit("acknowledged segments are missing from the store")


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A PostgreSQL cluster of its own (tests/pg.py's, Debian's binaries), durable as a real
    one (fsync and full-page writes on, unlike the tests'), removed afterwards; its URL."""
    from tests import pg  # the benchmarks run from a checkout, as bench/cluster.py does

    cluster = pg.Cluster(free_port(), durable=True)
    cluster.start()
    try:
        yield cluster.url(cluster.new_database())
    finally:
        cluster.stop("immediate")
        cluster.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of a closed-loop run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3, help="closed-loop runs of each server")
    parser.add_argument("--rate", type=float, default=1000.0, help="fixed rate; 0 to skip")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="auto: the loop `streamwatch run` uses (uvloop when installed)",
    )
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--store",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="postgresql: a daemon on PostgreSQL too, beside the one on SQLite",
    )
    parser.add_argument(
        "--pg-url",
        help="postgresql://... of an empty database (default: a throwaway cluster, fsync on)",
    )
    args = parser.parse_args()
    # What a daemon logs at the default level, rendered as in production, thrown away.
    configure_logging(level="info", fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    disable_created_metrics()  # as `streamwatch run` does

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if args.store == "sqlite":
                await bench(args, Path(tmp), None)
            elif args.pg_url:
                await bench(args, Path(tmp), args.pg_url)
            else:
                with throwaway_cluster() as url:
                    await bench(args, Path(tmp), url)

    environ = {} if args.loop == "auto" else {ENV: args.loop}
    run(go(), environ=environ)


if __name__ == "__main__":
    main()
