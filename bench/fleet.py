"""A fleet in one process: N streams on the emulator for a while, what the daemon costs.

Runs the daemon (`streamwatch run`, SQLite, the shipped defaults) as a process of its own, and
the load as `--emulators` emulator processes (`streamwatch emulator`), N streams at MAVI's rate
(a segment every 5 seconds each, N / 5 callbacks a second): one emulator process cannot send
2,000 callbacks a second here, so each owns a share of the streams and posts their callbacks
to the daemon itself. The daemon has one MAVI base URL: a small front in this process takes
its API calls and routes each to the emulator that owns the stream (a start by the stream's
URL, a stop by the task the start made), and adds up the emulators' state at the end.

Once every stream runs, it measures the daemon's process for `--seconds`: resident memory
(sampled, the peak), mean CPU (from /proc), false stalls and restarts (log lines; the emulator
never stops a task here, so every one is false), and at the end the segments the emulators
sent and had acknowledged against what the store holds (every acknowledged one must be
stored; a saturated emulator may still hold some). Prints the figures per 1,000 streams, for
the README's sizing table.

A benchmark, not a test: it asserts nothing about time. Its load generators (the emulators)
are on the same machine: on a small one, their CPU is shared.

    python -m bench.fleet [--streams 10000] [--seconds 600] [--scrape-every 15] [--emulators 4]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

SECRET = "fleet-bench-secret-0123456789abcdef"  # noqa: S105 - a loopback bench's own secret
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(n: int, port: int, base_url: str, db: Path) -> str:
    streams = "".join(
        f'[[streams]]\nname = "cam-{i:05d}"\nurl = "rtmp://fleet.invalid/{i}"\nfps = {1 + i % 2}\n'
        for i in range(n)
    )
    return f"""
[mavi]
backend = "mavi"
base_url = "{base_url}"
api_key = {{ env = "FLEET_KEY" }}
[server]
listen = "127.0.0.1:{port}"
callback_secret = {{ env = "FLEET_SECRET" }}
max_connections = 4000
[storage]
path = "{db}"
[logging]
level = "info"
format = "json"
{streams}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


async def lines(stream: asyncio.StreamReader, counts: dict[str, int], keep: Path | None) -> None:
    """Count the daemon's log events by name (and keep the lines in `keep`, if given)."""
    out = keep.open("ab") if keep is not None else None
    while line := await stream.readline():
        if out is not None:
            out.write(line)
        try:
            event = json.loads(line).get("event", "")
        except ValueError:
            sys.stderr.write(f"daemon: {line.decode(errors='replace')}")
            continue
        counts[event] = counts.get(event, 0) + 1


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[float, dict[str, float]]:
    """Seconds for one scrape as Prometheus makes it (gzip), and the per-name sums."""
    started = time.perf_counter()
    async with session.get(url, headers={"Accept-Encoding": "gzip"}) as resp:
        body = await resp.read()
    took = time.perf_counter() - started
    text = gzip.decompress(body).decode() if resp.headers.get("Content-Encoding") else body.decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line and line[0] != "#":
            name = line.split("{", 1)[0].split(" ", 1)[0]
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return took, sums


class Front:
    """The daemon's one MAVI base URL in front of several emulators: a start goes to the
    emulator that owns its stream (by the number its URL ends with), a stop to the one whose
    start made the task; anything else to the first."""

    def __init__(self, bases: list[str]) -> None:
        self.bases = bases  # each emulator's base_url (http://host:port/serve/api/v2)
        self.owner: dict[str, int] = {}  # task id -> emulator
        self.session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.route)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.session = aiohttp.ClientSession()
        prefix = "/" + self.bases[0].split("/", 3)[3]
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}{prefix}"
        return runner

    async def route(self, request: web.Request) -> web.Response:
        assert self.session is not None
        body = await request.read()
        which = 0
        doc = json.loads(body) if body and request.method == "POST" else {}
        if request.path.endswith("/stream/start"):
            which = int(str(doc.get("url", "0")).rsplit("/", 1)[-1]) % len(self.bases)
        elif request.path.endswith("/stream/stop"):
            which = self.owner.get(str(doc.get("task_id")), 0)
        target = self.bases[which].split("/serve/")[0] + request.path_qs
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        async with self.session.request(request.method, target, data=body, headers=headers) as resp:
            answer = await resp.read()
            if request.path.endswith("/stream/start") and resp.status == 200:
                task_id = json.loads(answer).get("task_id")
                if isinstance(task_id, str):
                    self.owner[task_id] = which
            return web.Response(body=answer, status=resp.status, content_type=resp.content_type)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def state(self) -> dict[str, object]:
        """The emulators' `/_emulator/state`, added up: their tasks, and the deliveries."""
        assert self.session is not None
        tasks: list[object] = []
        deliveries: dict[str, int] = {}
        for base in self.bases:
            async with self.session.get(f"{base.split('/serve/')[0]}/_emulator/state") as resp:
                one = await resp.json()
            tasks += one["tasks"]
            for key, value in one["deliveries"].items():
                deliveries[key] = deliveries.get(key, 0) + value
        return {"tasks": tasks, "deliveries": deliveries}


_FORWARDED = {"authorization", "content-type", "x-api-key", "accept"}


async def start_emulator(webhook: str) -> tuple[asyncio.subprocess.Process, str]:
    """An emulator process posting its streams' callbacks to `webhook`; its base_url."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamwatch", "emulator", "--listen", "127.0.0.1:0",
        "--balance-usd", "100000000", "--webhook", webhook,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    base_url = (await proc.stdout.readline()).decode().split("=", 1)[1].strip()
    return proc, base_url


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    n = args.streams
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/callbacks/mavi/{SECRET}"
    started_emulators = [await start_emulator(webhook) for _ in range(args.emulators)]
    emulators = [proc for proc, _ in started_emulators]
    front = Front([base for _, base in started_emulators])
    front_runner = await front.start()
    base_url = front.url
    cfg = workdir / "streams.toml"
    db = workdir / "fleet.db"
    cfg.write_text(config(n, port, base_url, db))
    env = {
        **os.environ,
        "STREAMWATCH_EVENT_LOOP": args.loop,
        "FLEET_KEY": "sk-fleet-bench",
        "FLEET_SECRET": SECRET,
    }
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamwatch", "run", "-c", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert daemon.stderr is not None
    events: dict[str, int] = {}
    reader = asyncio.create_task(lines(daemon.stderr, events, args.daemon_log))
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    scrapes: list[float] = []
    rss: list[int] = []
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            started = time.monotonic()
            while True:
                await asyncio.sleep(2)
                if daemon.returncode is not None:
                    raise SystemExit(f"the daemon exited ({daemon.returncode})")
                try:
                    _, sums = await scrape(session, metrics_url)
                except aiohttp.ClientError:
                    continue
                up = sums.get("streamwatch_stream_up", 0)
                print(f"  {time.monotonic() - started:5.0f} s: {up:.0f} of {n} streams up",
                      flush=True)  # fmt: skip
                if up >= n:
                    break
            ramp = time.monotonic() - started
            print(f"all {n} streams up after {ramp:.0f} s; measuring for {args.seconds:g} s",
                  flush=True)  # fmt: skip
            stalls_before = events.get("supervisor.stream_stalled", 0)
            starts_before = events.get("supervisor.task_started", 0)
            cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
            deadline = t0 + args.seconds
            next_scrape = t0
            while (now := time.monotonic()) < deadline:
                rss.append(rss_bytes(daemon.pid))
                if now >= next_scrape:
                    took, sums = await scrape(session, metrics_url)
                    scrapes.append(took)
                    next_scrape = now + args.scrape_every
                    print(
                        f"  {now - t0:5.0f} s: scrape {took * 1000:.0f} ms, RSS "
                        f"{rss[-1] / 2**20:.0f} MiB, stalls "
                        f"{events.get('supervisor.stream_stalled', 0) - stalls_before}, starts "
                        f"{events.get('supervisor.task_started', 0) - starts_before}, "
                        f"{sums.get('streamwatch_stream_segments_total', 0):.0f} segments stored",
                        flush=True,
                    )
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            cpu = (cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0)
            stalls = events.get("supervisor.stream_stalled", 0) - stalls_before
            restarts = events.get("supervisor.task_started", 0) - starts_before
            state = await front.state()
    finally:
        if daemon.returncode is None:
            daemon.terminate()
        await daemon.wait()
        await reader
        for emulator in emulators:
            emulator.terminate()
            await emulator.wait()
        await front.close()
        await front_runner.cleanup()
    tasks = state["tasks"]
    assert isinstance(tasks, list)
    sent = sum(t["segments_sent"] for t in tasks)
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(*) FROM segments").fetchone()[0]
    peak = max(rss)
    per = 1000 / n
    print(f"streams: {n}, measured {args.seconds:g} s after a {ramp:.0f} s ramp, "
          f"{n / 5:.0f} callbacks/s, loop {args.loop}, "
          f"{args.emulators} emulator processes")  # fmt: skip
    print(f"RSS: peak {peak / 2**20:.0f} MiB ({peak / 2**20 * per:.1f} MiB per 1,000 streams)")
    print(f"CPU: mean {cpu:.2f} cores ({cpu * per:.3f} per 1,000 streams)")
    if scrapes:
        print(f"/metrics (gzip): median {statistics.median(scrapes) * 1000:.0f} ms, "
              f"worst {max(scrapes) * 1000:.0f} ms over {len(scrapes)} scrapes")  # fmt: skip
    print(f"false stalls: {stalls}, restarts: {restarts}")
    deliveries = state["deliveries"]
    assert isinstance(deliveries, dict)
    acked, pending = deliveries["delivered"], deliveries["pending"]
    print(
        f"segments: {sent} sent by the emulator, {acked} acknowledged by the daemon "
        f"({pending} still in the emulator's queue when the run ended), {stored} stored"
        + ("" if stored >= acked else f": {acked - stored} ACKNOWLEDGED BUT NOT STORED")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--scrape-every", type=float, default=15.0)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--daemon-log", type=Path, help="keep the daemon's log lines in this file")
    parser.add_argument(
        "--emulators",
        type=int,
        default=0,
        help="emulator processes sharing the streams (default: one per 2,500 streams)",
    )
    args = parser.parse_args()
    args.emulators = args.emulators or max(1, -(-args.streams // 2500))
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    main()
