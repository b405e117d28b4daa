"""Callback ingestion against bare aiohttp, driven from another process.

Starts, in this process, two servers on loopback:
- bare aiohttp: one handler that parses the JSON body and answers (what a callback
  receiver cannot be faster than);
- the daemon: the real server and store (SQLite, `synchronous=FULL`, acknowledged only after
  commit), with one configured stream whose task it started on the built-in emulator (whose
  own segments are 5 minutes apart, so that only the load generator posts).

Then drives both, alternately, from a load generator in its own process: wrk (`-t1`, a Lua
script giving every request a new segment index of the stream's task) when it is installed,
else `bench.loadgen`. Prints callbacks/s, p50 and p99 of each run and the medians, and the
ratio daemon/bare. Then the fixed-rate mode: `bench.loadgen --rate` (wrk2 is not packaged
here) posts `--rate` callbacks/s to each server and prints the p99 acknowledgement, counted
from when each callback was due. Last, it checks that every acknowledged segment is stored.

Both servers run on the same event loop (`--loop`; `auto` is what `streamwatch run` picks:
uvloop when installed), so the ratio compares handlers, not loops.

A benchmark, not a test: it asserts nothing about time. Figures on a shared 2-core machine are
noisy: compare the daemon with the bare handler of the same run, and look at the medians.

    python -m bench.ingest [--seconds 8] [--connections 32] [--runs 3] [--rate 1000]
                           [--loop auto|asyncio|uvloop] [--generator auto|wrk|python]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from aiohttp import web
from prometheus_client import disable_created_metrics

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
path = "{db}"
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


async def bench(args: argparse.Namespace, workdir: Path) -> None:
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
    config = parse_config(DAEMON_CONFIG.format(db=workdir / "ingest.db"), environ={})
    app = App(config, environ={})
    serving = asyncio.create_task(app.serve())
    await app.started.wait()
    assert app.supervisor is not None
    assert app.server is not None
    assert app.store is not None
    sup = app.supervisor
    try:
        async with asyncio.timeout(30):
            await sup.wait_until(lambda: getattr(sup.streams.get("bench"), "task_id", None))
    except TimeoutError:
        app.request_stop()
        await serving
        raise SystemExit("the bench stream did not start") from None
    task_id = sup.streams["bench"].task_id
    assert task_id is not None
    daemon_url = app.server.callback_url()
    first = 1  # the emulator's own first segment (in 5 minutes) is index 0
    bare: list[Result] = []
    daemon: list[Result] = []
    acknowledged = 0

    async def one_run(url: str, rate: float | None) -> Result:
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

    try:
        print("throughput (closed loop):", flush=True)
        for _ in range(args.runs):
            bare.append(await one_run(bare_url, None))
            show("bare", bare[-1])
            daemon.append(await one_run(daemon_url, None))
            show("daemon", daemon[-1])
            acknowledged += int(daemon[-1]["requests"] - daemon[-1]["errors"])
        fixed: dict[str, Result] = {}
        if args.rate:
            print(
                f"fixed rate, {args.rate:g} callbacks/s for {args.rate_seconds:g} s "
                "(latency from when each was due):",
                flush=True,
            )
            for label, url in (("bare", bare_url), ("daemon", daemon_url)):
                fixed[label] = await one_run(url, args.rate)
                show(label, fixed[label])
            acknowledged += int(fixed["daemon"]["requests"] - fixed["daemon"]["errors"])
        stored = await app.store.segment_count(task_id=task_id)
    finally:
        app.request_stop()
        await serving
        await bare_runner.cleanup()

    def rate_of(r: Result) -> float:
        return r["requests"] / r["seconds"]

    b = statistics.median(rate_of(r) for r in bare)
    d = statistics.median(rate_of(r) for r in daemon)
    print("medians:")
    for label, rs, rate in (("bare", bare, b), ("daemon", daemon, d)):
        print(
            f"  {label:<7} {rate:8.0f} callbacks/s   p50 "
            f"{statistics.median(r['p50_ms'] for r in rs):6.2f} ms   p99 "
            f"{statistics.median(r['p99_ms'] for r in rs):6.2f} ms"
        )
    print(f"ratio daemon/bare: {d / b:.2f}x")
    if fixed:
        print(
            f"fixed rate p99 acknowledgement: daemon {fixed['daemon']['p99_ms']:.2f} ms, "
            f"bare {fixed['bare']['p99_ms']:.2f} ms"
        )
    print(f"stored {stored} segments of {acknowledged} acknowledged")
    if stored < acknowledged:
        raise SystemExit("acknowledged segments are missing from the store")


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
    args = parser.parse_args()
    # What a daemon logs at the default level, rendered as in production, thrown away.
    configure_logging(level="info", fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    disable_created_metrics()  # as `streamwatch run` does

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            await bench(args, Path(tmp))

    environ = {} if args.loop == "auto" else {ENV: args.loop}
    run(go(), environ=environ)


if __name__ == "__main__":
    main()
