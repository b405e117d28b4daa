"""A fleet under fire: replicas as real processes on one PostgreSQL, one killed with SIGKILL
every 10-20 s and restarted, while the emulator (its own process) posts every callback
through a proxy that spreads them over the replicas.

At the end (the emulator paused, its deliveries settled) it prints: callbacks the emulator
had acknowledged against those stored (each once by construction: `(task_id,
segment_index)` is unique), each stream's URL started how many times at the emulator (1: no
double start), the ledger against the emulator's charged total (to the tick), kills, and the
longest time any stream had no valid lease (no owner). A benchmark, not a test: it asserts
nothing; the exit code is 1 when a figure is wrong.

With `--throughput N`, it measures instead how many callbacks per second one replica and then
`--replicas` replicas take through the proxy (N segment callbacks of one recorded task,
`--concurrency` in flight, from this process), and prints both figures side by side; with
`--budgets`, under account caps (each charge then counts itself in the fleet's spend rows).

Without `--storage`, a throwaway PostgreSQL cluster is made as the tests make theirs
(tests/pg.py, Debian's binaries).

With `--mavi-url`, the trial runs against a MAVI stand-in already running instead of the
emulator it would start: the replicas call its stream API (MAVI-CONTRACT.md) with the key in
`$MAVI_KEY` (default sk-mai-bench), and the bench steers and reads it through three control
endpoints under `--control-url` (default: the stand-in's origin + `/_emulator`, which our
emulator serves), none of them MAVI's:
- `PUT /webhook {"url"}`: post every callback there from now on (the bench's proxy);
- `PUT /paused {"paused": true}`: no task makes, or is charged for, another segment;
- `GET /state`: `{"deliveries": {"delivered", "posting", "pending"}, "starts": [{"url",
  "task_id"}], "charged_ticks"}`: callbacks answered 2xx (each once, however many attempts it
  took), callbacks on the wire, callbacks waiting to be posted again; every start request
  with the task id it was given (null when refused); everything charged, in ticks of 1/2880
  USD (the pre-charge at each accepted start and one per processed segment).
The stand-in posts one segment callback per running task every `--segment-seconds` (the
replicas' `[mavi] segment_seconds`; 0.5), retries a callback until answered 2xx, and holds
enough balance for the run (no 402).

    python -m bench.cluster [--replicas 3] [--streams 50] [--seconds 120]
                            [--kill-every 10:20] [--storage postgresql://…]
                            [--mavi-url http://…/serve/api/v2 [--control-url http://…]]
    python -m bench.cluster --throughput 5000 [--replicas 3] [--concurrency 64] [--budgets]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
from aiohttp import web

SECRET = "bench-cluster-secret-0123456789"  # noqa: S105 - a loopback-only test secret
KEY = os.environ.get("MAVI_KEY") or "sk-mai-bench"
ENV = {"SW_SECRET": SECRET, "MAVI_KEY": KEY}
SEGMENT = 0.5  # seconds between a task's callbacks (MAVI: 5), unless --segment-seconds


def origin(url: str) -> str:
    """scheme://host:port of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# `--budgets`: account caps no callback reaches, so each charge counts itself in the fleet's
# spend rows (day and month) in its own transaction (`streamwatch.store.budget`).
BUDGETS = '[budgets]\ndaily_usd = "1000000"\nmonthly_usd = "10000000"\naction = "alert-only"\n'


def config(
    url: str,
    replica: str,
    port: int,
    mavi: str,
    streams: int,
    lease: float,
    segment: float = SEGMENT,
    budgets: str = "",
) -> str:
    """A replica's streams.toml: `mavi` is the v2 API's base URL; `budgets` a [budgets]
    section or nothing."""
    entries = "".join(
        f'[[streams]]\nname = "cam{i:03d}"\nurl = "rtmp://cams.test/cam{i:03d}"\n'
        for i in range(streams)
    )
    return f"""
[mavi]
backend = "mavi"
base_url = "{mavi}"
api_key = {{ env = "MAVI_KEY" }}
segment_seconds = {segment}
[server]
listen = "127.0.0.1:{port}"
callback_secret = {{ env = "SW_SECRET" }}
[storage]
url = "{url}"
[supervisor]
tick_seconds = 0.5
stall_after_segments = 20
adopt_wait_segments = 10
[cluster]
replica_id = "{replica}"
lease_seconds = {lease}
renew_seconds = {lease / 3}
[logging]
level = "warning"
{budgets}
{entries}"""


class Proxy:
    """Spreads each callback over the live replicas (round robin), trying the next one when a
    replica does not answer: what nginx in front of the fleet does."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._next = itertools.count()
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert self.session is not None
        body = await request.read()
        start = next(self._next)
        for i in range(len(self.ports)):
            port = self.ports[(start + i) % len(self.ports)]
            try:
                async with self.session.post(
                    f"http://127.0.0.1:{port}{request.path}",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    return web.Response(status=resp.status, body=await resp.read())
            except (aiohttp.ClientError, TimeoutError):
                continue
        return web.Response(status=502)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            yield port
        finally:
            await self.session.close()
            await runner.cleanup()


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        *args,
        env={**os.environ, **ENV},
        stdout=asyncio.subprocess.PIPE if args[0] == "emulator" else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class Figures:
    """What a run found (see the module's docstring)."""

    kills: int
    acknowledged: int
    stored: int
    starts: dict[str, int]  # URL -> accepted starts at the emulator
    ledger: int
    orphan_estimates: int
    charged: int
    longest_unowned: float
    longest_adoption: float

    @property
    def ok(self) -> bool:
        twice = any(n > 1 for n in self.starts.values())
        return self.acknowledged == self.stored and not twice and self.ledger == self.charged


async def run(args: argparse.Namespace, url: str, work: Path) -> Figures:
    rng = random.Random(args.seed)
    ports = [free_port() for _ in range(args.replicas)]
    proxy = Proxy(ports)
    async with proxy.running() as proxy_port, aiohttp.ClientSession() as http:
        emu: asyncio.subprocess.Process | None = None
        if args.mavi_url:  # a stand-in someone else runs
            api = args.mavi_url.rstrip("/")
        else:
            emu = await spawn(
                "emulator",
                "--listen",
                "127.0.0.1:0",
                "--segment-seconds",
                str(args.segment_seconds),
                "--api-key-env",
                "MAVI_KEY",
                "--balance-usd",
                "100000",
            )
            assert emu.stdout is not None
            line = (await emu.stdout.readline()).decode()
            api = line.split("base_url = ", 1)[1].strip()
        control = (args.control_url or f"{origin(api)}/_emulator").rstrip("/")
        webhook = f"http://127.0.0.1:{proxy_port}/callbacks/mavi/{SECRET}"
        async with http.put(f"{control}/webhook", json={"url": webhook}) as resp:
            resp.raise_for_status()

        def replica_config(replica: str, port: int) -> str:
            return config(
                url, replica, port, api, args.streams, args.lease_seconds, args.segment_seconds
            )

        paths = []
        for i, port in enumerate(ports):
            path = work / f"r{i}.toml"
            path.write_text(replica_config(f"r{i}", port))
            paths.append(path)
        procs = [await spawn("run", "-c", str(p)) for p in paths]
        db = await asyncpg.connect(url)
        while not await db.fetchval("SELECT to_regclass('stream_leases') IS NOT NULL"):  # noqa: ASYNC110 - another process's schema
            await asyncio.sleep(0.2)  # the first replica is migrating the schema
        longest = 0.0
        adoption = 0.0  # the longest from a kill until all its streams had a new owner
        orphaned: dict[int, tuple[str, list[str], float]] = {}
        replica_ids = [f"r{i}" for i in range(len(ports))]
        since: dict[str, float] = {}
        kills = 0
        low, high = (float(x) for x in args.kill_every.split(":"))
        began = time.monotonic()
        next_kill = began + args.settle + rng.uniform(low, high)  # the fleet settles first
        names = [f"cam{i:03d}" for i in range(args.streams)]
        try:
            while time.monotonic() - began < args.seconds:
                await asyncio.sleep(0.25)
                now_db = await db.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
                owners = {
                    r["stream"]: r["owner"]
                    for r in await db.fetch(
                        "SELECT stream, owner FROM stream_leases WHERE owner IS NOT NULL"
                        " AND expires_at > $1",
                        now_db,
                    )
                }
                held = set(owners)
                for killed in list(orphaned):
                    dead, streams, at = orphaned[killed]
                    if all(owners.get(n) not in (None, dead) for n in streams):
                        adoption = max(adoption, time.monotonic() - at)
                        del orphaned[killed]
                if time.monotonic() - began > args.settle:  # everything has started once
                    for name in names:
                        if name in held:
                            since.pop(name, None)
                        else:
                            start = since.setdefault(name, time.monotonic())
                            longest = max(longest, time.monotonic() - start)
                if time.monotonic() >= next_kill:
                    victim = rng.randrange(len(procs))
                    dead = replica_ids[victim]
                    mine = [n for n, o in owners.items() if o == dead]
                    orphaned[kills] = (dead, mine, time.monotonic())
                    procs[victim].send_signal(signal.SIGKILL)
                    await procs[victim].wait()
                    kills += 1
                    await asyncio.sleep(1.0)
                    # Restarted as a new replica (as a new pod is): its streams wait for their
                    # leases to expire and are adopted by the others meanwhile.
                    replica_ids[victim] = f"r{victim}-{kills}"
                    paths[victim].write_text(replica_config(replica_ids[victim], ports[victim]))
                    procs[victim] = await spawn("run", "-c", str(paths[victim]))
                    next_kill = time.monotonic() + rng.uniform(low, high)
            # Settle: no more segments, every delivery answered (or given up).
            async with http.put(f"{control}/paused", json={"paused": True}) as resp:
                resp.raise_for_status()
            for _ in range(240):
                async with http.get(f"{control}/state") as resp:
                    resp.raise_for_status()
                    state: dict[str, Any] = await resp.json()
                deliveries = state["deliveries"]
                if deliveries["posting"] == 0 and deliveries["pending"] == 0:
                    break
                await asyncio.sleep(0.5)
            stored = await db.fetchval(
                "SELECT (SELECT count(*) FROM segments) + (SELECT count(*) FROM segment_failures)"
                " + (SELECT count(*) FROM tasks WHERE end_reason = 'callback')"
                " + (SELECT count(*) FROM orphan_callbacks)"
            )
            ledger = await db.fetchval("SELECT coalesce(sum(ticks), 0) FROM charges")
            orphan = await db.fetchval("SELECT coalesce(sum(ticks), 0) FROM orphan_charges")
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()
            if emu is not None:
                emu.send_signal(signal.SIGINT)
                await emu.wait()
            await db.close()
    return Figures(
        kills=kills,
        acknowledged=deliveries["delivered"],
        stored=stored,
        starts=dict(Counter(s["url"] for s in state["starts"] if s["task_id"])),
        ledger=ledger,
        orphan_estimates=orphan,
        charged=state["charged_ticks"],
        longest_unowned=longest,
        longest_adoption=adoption,
    )


async def throughput(
    url: str, replicas: int, n: int, concurrency: int, work: Path, *, budgets: bool = False
) -> float:
    """Callbacks per second `replicas` replicas take through the proxy (see the docstring)."""
    from bench.callbacks import body
    from streamwatch.store import PgTarget, Store

    ports = [free_port() for _ in range(replicas)]
    procs = []
    for i, port in enumerate(ports):
        path = work / f"t{replicas}-{i}.toml"
        path.write_text(
            config(
                url,
                f"t{replicas}-{i}",
                port,
                "http://127.0.0.1:9/serve/api/v2",
                0,
                3.0,
                budgets=BUDGETS if budgets else "",
            )
        )
        procs.append(await spawn("run", "-c", str(path)))
    task_id = f"bench-{replicas}-{time.time_ns()}"
    try:
        async with aiohttp.ClientSession() as http:
            for port in ports:  # each replica serves (migrated, first lease round run)
                for _ in range(600):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.1)
        async with Store(PgTarget(url)) as store:
            await store.record_task_started(
                task_id=task_id,
                stream="bench",
                spec_hash="h",
                fps=1,
                content_moderation=True,
                logo_detection=False,
                max_logos=5,
                started_at=time.time(),
            )
        proxy = Proxy(ports)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(body(i, task_id))
        async with proxy.running() as proxy_port:
            target = f"http://127.0.0.1:{proxy_port}/callbacks/mavi/{SECRET}"
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def worker() -> None:
                    while not queue.empty():
                        data = queue.get_nowait()
                        async with session.post(target, data=data) as resp:
                            if resp.status != 200:
                                raise RuntimeError(f"callback answered {resp.status}")

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - started
        async with Store(PgTarget(url)) as store:
            stored = await store.segment_count(task_id=task_id)
        if stored != n:
            raise RuntimeError(f"stored {stored} of {n}")
        return n / elapsed
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await proc.wait()


def report(args: argparse.Namespace, fig: Figures) -> int:
    twice = {u: n for u, n in fig.starts.items() if n > 1}
    print(f"replicas: {args.replicas}, streams: {args.streams}, seconds: {args.seconds}")
    print(f"kills (SIGKILL, then restarted): {fig.kills}")
    print(f"callbacks acknowledged by the emulator: {fig.acknowledged}, stored: {fig.stored}")
    print(f"streams started: {len(fig.starts)}, started more than once: {len(twice)} {twice or ''}")
    print(
        f"ledger: {fig.ledger} ticks (+ {fig.orphan_estimates} estimated for orphans),"
        f" emulator charged: {fig.charged} ticks"
    )
    print(f"longest time a stream had no valid lease: {fig.longest_unowned:.2f} s")
    print(
        f"longest from a kill until all its streams had a new owner: {fig.longest_adoption:.2f} s"
        f" (lease_seconds = {args.lease_seconds:g})"
    )
    print("OK" if fig.ok else "MISMATCH")
    return 0 if fig.ok else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--kill-every", default="10:20", help="seconds between kills, lo:hi")
    p.add_argument("--settle", type=float, default=5, help="seconds before the first kill")
    p.add_argument("--lease-seconds", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--storage", help="postgresql://… of an empty database")
    p.add_argument(
        "--mavi-url",
        help="the v2 stream API of a MAVI stand-in already running (default: start the emulator)",
    )
    p.add_argument(
        "--control-url",
        help="the stand-in's webhook, paused and state endpoints (default: its origin/_emulator)",
    )
    p.add_argument(
        "--segment-seconds",
        type=float,
        default=SEGMENT,
        help="seconds between a task's callbacks (default %(default)s)",
    )
    p.add_argument("--throughput", type=int, metavar="N", help="measure callbacks/s instead")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--budgets",
        action="store_true",
        help="throughput: with account caps, so each charge counts in the fleet's spend rows",
    )
    return p


async def measure(args: argparse.Namespace, url: str, work: Path) -> int:
    if not args.throughput:
        return report(args, await run(args, url, work))
    caps = args.budgets
    one = await throughput(url, 1, args.throughput, args.concurrency, work, budgets=caps)
    many = await throughput(
        url, args.replicas, args.throughput, args.concurrency, work, budgets=caps
    )
    print(
        f"callbacks/s through the proxy, {args.throughput} callbacks, {args.concurrency} in flight"
        + (", account caps (day, month) counted per charge:" if caps else ":")
    )
    print(f"  1 replica: {one:.0f}   {args.replicas} replicas: {many:.0f}   ratio {many / one:.2f}")
    return 0


async def main() -> int:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="streamwatch-cluster-") as tmp:
        if args.storage:
            return await measure(args, args.storage, Path(tmp))
        from tests import pg  # a throwaway cluster, as the tests make theirs

        cluster = pg.Cluster(free_port())
        cluster.start()
        try:
            url = cluster.url(cluster.new_database())
            return await measure(args, url, Path(tmp))
        finally:
            cluster.stop("immediate")
            cluster.remove()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
