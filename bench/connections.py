"""Callback latency while idle and slow connections are held open against the daemon.

Starts `streamwatch run` (built-in emulator, one stream) in its own process with its file
limit set to --nofile, then, from this process: times --n valid callbacks on fresh connections
with nothing else going on (the baseline); opens --idle connections that send nothing,
--slow that send half a request's headers, --trickle that send headers and one byte of a
body, and holds them; times --n callbacks again; and counts what the daemon logged.
A benchmark, not a test: it asserts nothing.

    python -m bench.connections [--nofile 1024] [--idle 800] [--slow 200] [--trickle 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

SECRET = "bench-secret-0123456789abcdef"  # noqa: S105 - a made-up secret on loopback
HEAD = f"POST /callbacks/mavi/{SECRET} HTTP/1.1\r\nHost: bench\r\n".encode()


def callback(index: int) -> bytes:
    body = json.dumps(
        {
            "code": 200,
            "message": "SUCCESS",
            "task_id": "bench-orphan",
            "data": {
                "status": 0,
                "message": "ok",
                "data": {
                    "segment_index": index,
                    "content_moderation": {"has_unsafe_content": False},
                },
            },
        }
    ).encode()
    return HEAD + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


async def post(port: int, index: int) -> float | None:
    """Seconds from connecting to the daemon's 200, or None if none came within 10 s."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(callback(index))
            answer = await reader.read()
            writer.close()
    except (TimeoutError, OSError):
        return None
    return time.perf_counter() - started if answer.startswith(b"HTTP/1.1 200") else None


async def hold(port: int, count: int, send: bytes) -> list[socket.socket]:
    loop = asyncio.get_running_loop()

    async def one() -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            async with asyncio.timeout(5):
                await loop.sock_connect(sock, ("127.0.0.1", port))
                if send:
                    await loop.sock_sendall(sock, send)
        except (TimeoutError, OSError):
            sock.close()
            return None
        return sock

    return [s for s in await asyncio.gather(*(one() for _ in range(count))) if s]


async def timed(port: int, n: int, first: int) -> list[float | None]:
    """Post `n` callbacks one after the other; stop after three that got no answer."""
    results: list[float | None] = []
    for i in range(n):
        results.append(await post(port, first + i))
        if results.count(None) >= 3:
            break
    return results


def summary(what: str, seconds: list[float | None]) -> str:
    ms = sorted(s * 1000 for s in seconds if s is not None)
    failed = len(seconds) - len(ms)
    timing = f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms" if ms else "-"
    return f"{what}: {len(ms)} acknowledged ({timing}), {failed} not within 10 s"


def event(line: bytes) -> str:
    """A log line's event name ("(not JSON)" for a stray line such as a traceback's)."""
    try:
        return str(json.loads(line)["event"])
    except (ValueError, KeyError, TypeError):
        return "(not JSON)"


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="sw-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = folder / "streams.toml"
    config.write_text(f"""
[server]
listen = "127.0.0.1:{port}"
callback_secret = {{ env = "SW_SECRET" }}
[storage]
path = "{folder / "state.db"}"
[logging]
format = "json"
[[streams]]
name = "cam"
url = "rtmp://cams.test/cam"
""")
    nofile = args.nofile
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "run",
        "-c",
        str(config),
        env={**os.environ, "SW_SECRET": SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
    )
    assert proc.stdout is not None
    output = bytearray()
    while b'"app.started"' not in (line := await proc.stdout.readline()):
        if not line:
            raise SystemExit(output.decode())
        output += line

    async def pump() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(1 << 16):
            output.extend(chunk)

    pumping = asyncio.create_task(pump())
    try:
        quiet = await timed(port, args.n, 0)
        started = time.perf_counter()
        held = await hold(port, args.idle, b"")
        held += await hold(port, args.slow, HEAD)
        held += await hold(port, args.trickle, HEAD + b"Content-Length: 1000\r\n\r\n{")
        opened = time.perf_counter() - started
        loaded = await timed(port, args.n, args.n)
        for sock in held:
            sock.close()
    finally:
        proc.terminate()
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            print("the daemon did not stop within 15 s of SIGTERM: killed")
            proc.kill()
            await proc.wait()
        await pumping
    lines = output.splitlines()
    events = Counter(event(line) for line in lines)
    print(f"file limit {nofile}; {len(held)} connections held open in {opened:.1f} s")
    print(summary("no other connections", quiet))
    print(summary("while they are held", loaded))
    print(f"log: {len(lines)} lines, {len(output)} bytes in all; {dict(events.most_common(6))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--idle", type=int, default=800)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--trickle", type=int, default=100)
    parser.add_argument("--n", type=int, default=50)
    asyncio.run(main(parser.parse_args()))
