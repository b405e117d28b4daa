"""How long a stream start takes while many clip downloads are stuck on a slow host.

A slow clip host runs in another process: it sends response headers and then one byte every
few seconds, for ever. The daemon (built-in emulator) runs one stream; the script queues
`--clips` captures pointed at the slow host, then adds a second stream by reload and times
until MAVI has started it. The same is timed with no clips queued as the baseline. Before the
archive had its own connection pool, 150 such clips held MAVI's connections and a start waited
until downloads timed out (measured on the previous code: 14.5 s with a 30 s download timeout
and 16 s idle, against 7.5 ms). A benchmark, not a test: it asserts nothing about time.

    python -m bench.evidence_starvation [--clips 150] [--idle 16]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from pathlib import Path

from streamwatch.app import App
from streamwatch.config import parse_config
from streamwatch.logs import configure_logging
from streamwatch.mavi.callbacks import SegmentReport

SLOW_HOST = """
import asyncio, sys
from aiohttp import web

async def slow(request):
    resp = web.StreamResponse()
    await resp.prepare(request)
    try:
        while True:
            await resp.write(b"x")
            await asyncio.sleep(5)
    except ConnectionError:  # the daemon gave up on the clip
        return resp

app = web.Application()
app.router.add_get("/clip/{n}", slow)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def config(db: Path, archive: Path, streams: list[str]) -> str:
    entries = "".join(
        f'[[streams]]\nname = "{s}"\nurl = "rtmp://bench.invalid/{s}"\n' for s in streams
    )
    return f"""
[mavi]
backend = "emulator"
segment_seconds = 1.0
[server]
listen = "127.0.0.1:0"
[storage]
path = "{db}"
[evidence]
path = "{archive}"
allow_hosts = ["127.0.0.1"]
download_timeout_seconds = 120
[logging]
level = "error"
{entries}
"""


def clip(base: str, i: int) -> SegmentReport:
    return SegmentReport(
        task_id="bench",
        segment_index=i,
        start_time=None,
        end_time=None,
        video_url=f"{base}/clip/{i}",
        unsafe=True,
        has_logo=None,
        logos=(),
        frames_processed=None,
        processing_ms=None,
        tokens=None,
    )


async def start_latency(workdir: Path, base: str, clips: int, idle: float) -> float:
    path = workdir / f"streams-{clips}.toml"
    db, archive = workdir / f"s{clips}.db", workdir / f"archive{clips}"
    path.write_text(config(db, archive, ["first"]))
    app = App(parse_config(path.read_text(), environ={}), config_path=path, environ={})
    serving = asyncio.create_task(app.serve())
    await app.started.wait()
    assert app.supervisor is not None
    assert app.evidence is not None
    sup = app.supervisor
    await sup.wait_until(lambda: sup.running_count() == 1)
    for i in range(clips):
        app.evidence.capture("first", clip(base, i))
    # Let the downloads connect and stall, and the idle connection of the first start lapse
    # (aiohttp keeps one 15 s): the next start needs a new connection, as it would in production.
    await asyncio.sleep(idle)
    path.write_text(config(db, archive, ["first", "second"]))
    started = time.perf_counter()
    await app.reload()
    await sup.wait_until(lambda: (s := sup.streams.get("second")) is not None and bool(s.task_id))
    took = time.perf_counter() - started
    app.request_stop()  # stuck captures are abandoned after a short grace
    await serving
    return took


async def main(clips: int, idle: float) -> None:
    configure_logging(level="error", fmt="console")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = await asyncio.create_subprocess_exec(sys.executable, "-c", SLOW_HOST, str(port))
    try:
        await asyncio.sleep(1.0)
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as tmp:
            baseline = await start_latency(Path(tmp), base, 0, idle)
            loaded = await start_latency(Path(tmp), base, clips, idle)
    finally:
        host.terminate()
        await host.wait()
    print(f"stream start, no clip downloads:      {baseline * 1000:8.1f} ms")
    print(f"stream start, {clips} stuck downloads: {loaded * 1000:8.1f} ms")
    print(f"ratio: {loaded / baseline:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=150)
    parser.add_argument("--idle", type=float, default=16.0, help="seconds before the start")
    args = parser.parse_args()
    asyncio.run(main(args.clips, args.idle))
