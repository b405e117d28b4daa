"""A small HTTP/1.1 load generator, run as its own process by the benchmarks.

POSTs segment callbacks (every request a new segment index) over keep-alive connections and
prints one JSON line: requests, non-2xx answers, seconds, and latency percentiles in ms.

Two modes:
- closed loop (default): `--connections` clients each send the next request as soon as the
  previous one is answered, for `--seconds` (what wrk does; the fallback when it is absent);
- fixed rate (`--rate R`): request i is due at start + i/R, whoever is free sends it, and its
  latency counts from when it was due, not from when it was sent, so a server that falls
  behind shows it (no coordinated omission, as wrk2 measures).

It speaks just enough HTTP for a server that answers with a Content-Length (aiohttp does):
a raw asyncio stream, no client library between the clock and the socket.

    python -m bench.loadgen URL [--connections 32] [--seconds 8] [--rate R] [--first 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

from bench.payload import segment_body

__all__ = ["main"]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


class Client:
    """One keep-alive connection that posts bodies and reads each answer."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self._host, self._port = host, port
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> int:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        assert self._reader is not None
        self._writer.write(self._head + str(len(body)).encode() + b"\r\n\r\n" + body)
        status_line = await self._reader.readline()
        length = 0
        while True:
            line = await self._reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await self._reader.readexactly(length)
        return int(status_line.split()[1])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def run(
    url: str, *, connections: int, seconds: float, rate: float | None, first: int, task_id: str
) -> dict[str, object]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    clients = [Client(parts.hostname, parts.port, parts.path) for _ in range(connections)]
    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}
    next_index = first
    started = time.perf_counter()
    deadline = started + seconds

    async def closed_loop(client: Client) -> None:
        nonlocal next_index, errors
        while time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            sent = time.perf_counter()
            status = await client.post(segment_body(task_id, index))
            latencies.append(time.perf_counter() - sent)
            errors += not 200 <= status < 300
            statuses[status] = statuses.get(status, 0) + 1

    async def paced(client: Client, due: asyncio.Queue[tuple[int, float]]) -> None:
        nonlocal errors
        while True:
            index, at = await due.get()
            status = await client.post(segment_body(task_id, index))
            latencies.append(time.perf_counter() - at)
            errors += not 200 <= status < 300
            statuses[status] = statuses.get(status, 0) + 1
            due.task_done()

    if rate is None:
        await asyncio.gather(*(closed_loop(c) for c in clients))
    else:
        due: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
        workers = [asyncio.create_task(paced(c, due)) for c in clients]
        total = int(rate * seconds)
        for i in range(total):
            at = started + i / rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            due.put_nowait((first + i, at))
        await due.join()
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    elapsed = time.perf_counter() - started
    for c in clients:
        c.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "p50_ms": _percentile(latencies, 50) * 1000,
        "p99_ms": _percentile(latencies, 99) * 1000,
        "max_ms": (latencies[-1] if latencies else 0.0) * 1000,
        "statuses": statuses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=None, help="requests a second (paced)")
    parser.add_argument("--first", type=int, default=0, help="the first segment index")
    parser.add_argument("--task-id", default="bench-task")
    args = parser.parse_args()
    result = asyncio.run(
        run(
            args.url,
            connections=args.connections,
            seconds=args.seconds,
            rate=args.rate,
            first=args.first,
            task_id=args.task_id,
        )
    )
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
