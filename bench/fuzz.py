"""Fuzz a running daemon's callback endpoint with mutated bodies and malformed HTTP.

Starts `streamwatch run` in its own process on the built-in emulator (three streams with
evidence and an alert rule to a sink served here, so real segments, alerts and clips flow
while the fuzz runs), reads the running task ids from the status API, then posts N bodies
mutated from MAVI's documented callbacks (known and unknown task ids; wrong types, strings
for booleans, NaN/Infinity, numbers too big for a float or for SQLite, negative counters, lone
surrogates, deep nesting, a UTF-8 BOM, UTF-16, invalid UTF-8, truncation, byte flips, long
strings, many logos, path-like task ids) with C in flight, plus a share of malformed HTTP
requests on raw sockets (bad request lines and headers, broken chunking, garbage gzip).

Prints the counts by status (there must be no 5xx), the tracebacks the daemon logged, the log
lines per rejection, the daemon's RSS and the state file's size before and after. Exits 1 if
any request got a 5xx or the daemon logged a traceback. A benchmark, not a test: it asserts
nothing about time.

    python -m bench.fuzz [--n 100000] [--concurrency 32] [--seed 1] [--raw-share 0.02]
                         [--keep-log FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["RAW_REQUESTS", "Mutator", "documented"]

SECRET = "fuzz-secret-0123456789abcdef"  # noqa: S105 - for the daemon this script runs
HOOK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # base64 of 24 bytes, test only
MAX_BODY = 1024 * 1024  # the daemon's default [server] max_body_bytes

# Raw JSON number tokens no float or SQLite integer holds, and the non-standard constants.
NASTY_NUMBERS = (
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "123456789012345678901234567890123456789",
    "1" * 5000,
    "1.7976931348623157e309",
    "-0",
    "1e-400",
    "0.1e1",
)
NASTY_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    -(2**31),
    2**31,
    2**53 + 1,
    -(2**63),
    2**63 - 1,
    1.5,
    -0.5,
    1e308,
    "",
    " ",
    "0",
    "-1",
    "false",
    "true",
    "null",
    "NaN",
    "inf",
    "-inf",
    "1e999",
    "1_000",
    "0x10",
    "12abc",
    "\u0000",
    "\ufeff",
    "\u202e",
    "日本語",
    "💥",
    [],
    {},
    [1, 2, 3],
    {"a": 1},
    [[[[[]]]]],
)
NASTY_TASK_IDS = (
    "",
    ".",
    "..",
    "../../../../tmp/streamwatch-fuzz-escape",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    "task id with spaces",
    "é" * 10,
    "x" * 129,
    "x" * 10_000,
    "%2e%2e%2f",
    "-leading-dash",
    "CON",
)
SURROGATE_ESCAPES = ('"\\ud800"', '"\\udfff"', '"a\\ud83dz"', '"\\udc00\\ud800"')


def documented(task_id: str, index: int, *, unsafe: bool = False) -> dict[str, Any]:
    """The contract's example callback for a processed segment."""
    return {
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
                "video_url": f"http://127.0.0.1:9/{task_id}/segment_{index}.mp4",
                "content_moderation": {"has_unsafe_content": unsafe, "frames_processed": 5},
                "logo_detection": {
                    "has_logo": True,
                    "logos": [{"name": "Acme", "confidence": 0.91, "box": [1, 2, 30, 40]}],
                    "frames_processed": 5,
                },
                "processing_time_ms": "812",
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


def _ended(task_id: str, status: int) -> dict[str, Any]:
    return {
        "code": "200",
        "message": "SUCCESS",
        "task_id": task_id,
        "data": {"status": status, "message": "stream ended", "data": None, "token": None},
    }


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into a JSON document (the root is the empty path)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _delete(doc: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return doc


class Mutator:
    """Deterministic (per seed) stream of `(mutation, body)` from documented callbacks."""

    def __init__(self, rng: random.Random, task_ids: list[str]) -> None:
        self.rng = rng
        self.task_ids = task_ids or ["fuzz-known-task"]
        self.orphans = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(8)]
        self._index = 10_000
        self._mutations = [
            (self.valid, 10),
            (self.replace, 25),
            (self.drop, 6),
            (self.raw_number, 10),
            (self.surrogate, 4),
            (self.strict_bool, 4),
            (self.negative, 5),
            (self.deep, 5),
            (self.encoding, 5),
            (self.byte_level, 8),
            (self.big, 4),
            (self.task_id, 4),
            (self.status, 4),
            (self.add_key, 2),
        ]
        self._weights = [w for _, w in self._mutations]

    def seed(self) -> dict[str, Any]:
        r = self.rng.random()
        task = self.rng.choice(self.task_ids if r < 0.6 else self.orphans)
        if r < 0.9:
            self._index += 1
            index = self._index if self.rng.random() < 0.8 else self.rng.randrange(self._index)
            return documented(task, index, unsafe=self.rng.random() < 0.3)
        if r < 0.95:
            return {
                "task_id": task,
                "data": {"status": -1, "message": "decode error", "data": None, "token": None},
            }
        return _ended(self.rng.choice(self.orphans), self.rng.choice([14, 15, 16, 402]))

    def body(self) -> tuple[str, bytes]:
        (mutate,) = self.rng.choices([m for m, _ in self._mutations], self._weights)
        return mutate.__name__, mutate(self.seed())

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while True:
            yield self.body()

    # -- mutations: each returns the bytes to post --------------------------------------------

    def _dump(self, doc: Any) -> bytes:
        return json.dumps(doc).encode()

    def _pick(self, doc: Any, *, leaves_only: bool = False) -> tuple[Any, ...]:
        paths = [
            p for p in _paths(doc) if not leaves_only or not isinstance(_get(doc, p), (dict, list))
        ]
        return self.rng.choice(paths)

    def valid(self, doc: dict[str, Any]) -> bytes:
        return self._dump(doc)

    def replace(self, doc: dict[str, Any]) -> bytes:
        path = self._pick(doc)
        return self._dump(_set(doc, path, copy.deepcopy(self.rng.choice(NASTY_VALUES))))

    def drop(self, doc: dict[str, Any]) -> bytes:
        path = self._pick(doc)
        return self._dump(_delete(doc, path))

    def add_key(self, doc: dict[str, Any]) -> bytes:
        objects = [p for p in _paths(doc) if isinstance(_get(doc, p), dict)]
        target = _get(doc, self.rng.choice(objects))
        target[self.rng.choice(["new_field", "", "\u00e9", "__proto__", "x" * 300])] = (
            self.rng.choice(NASTY_VALUES)
        )
        return self._dump(doc)

    def _raw(self, doc: dict[str, Any], path: tuple[Any, ...], raw: str) -> bytes:
        marker = f"@@raw{self.rng.getrandbits(32)}@@"
        text = json.dumps(_set(doc, path, marker))
        return text.replace(json.dumps(marker), raw, 1).encode()

    def raw_number(self, doc: dict[str, Any]) -> bytes:
        return self._raw(doc, self._pick(doc, leaves_only=True), self.rng.choice(NASTY_NUMBERS))

    def surrogate(self, doc: dict[str, Any]) -> bytes:
        if self.rng.random() < 0.3:
            return self._dump(doc).replace(b'"message"', b'"mess\xed\xa0\x80age"', 1)
        path = self._pick(doc, leaves_only=True)
        return self._raw(doc, path, self.rng.choice(SURROGATE_ESCAPES))

    def strict_bool(self, doc: dict[str, Any]) -> bytes:
        seg = doc.get("data", {}).get("data")
        if not isinstance(seg, dict):
            return self.replace(doc)
        block, key = self.rng.choice(
            [("content_moderation", "has_unsafe_content"), ("logo_detection", "has_logo")]
        )
        seg[block][key] = self.rng.choice(["false", "true", 0, 1, "", "no", None, [], {}])
        return self._dump(doc)

    def negative(self, doc: dict[str, Any]) -> bytes:
        seg = doc.get("data", {}).get("data")
        token = doc.get("data", {}).get("token")
        choices: list[tuple[Any, ...]] = [("data", "status")]
        if isinstance(seg, dict):
            choices += [
                ("data", "data", "segment_index"),
                ("data", "data", "start_time"),
                ("data", "data", "processing_time_ms"),
                ("data", "data", "content_moderation", "frames_processed"),
            ]
        if isinstance(token, dict):
            choices += [("data", "token", k) for k in token]
        path = self.rng.choice(choices)
        value = self.rng.choice([-1, -5000, -(2**62), "-1", "-0.5", -1e300])
        return self._dump(_set(doc, path, value))

    def deep(self, doc: dict[str, Any]) -> bytes:
        depth = self.rng.choice([40, 200, 990, 1500, 5000, 100_000, 400_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        nested = opener * depth + "1" + closer * depth
        if self.rng.random() < 0.3:
            return nested.encode()
        return self._raw(doc, self._pick(doc), nested)

    def encoding(self, doc: dict[str, Any]) -> bytes:
        text = json.dumps(doc, ensure_ascii=False).replace("Acme", "Acmé ☃")
        kind = self.rng.choice(["bom", "utf-16", "utf-16-le", "utf-32", "latin-1", "invalid"])
        if kind == "bom":
            return b"\xef\xbb\xbf" + text.encode()
        if kind == "latin-1":
            return text.encode("latin-1", "replace")
        if kind == "invalid":
            data = bytearray(text.encode())
            data.insert(self.rng.randrange(len(data)), self.rng.choice([0xFF, 0xC0, 0x80, 0xF8]))
            return bytes(data)
        return text.encode(kind)

    def byte_level(self, doc: dict[str, Any]) -> bytes:
        data = bytearray(self._dump(doc))
        how = self.rng.choice(["truncate", "flip", "insert", "duplicate"])
        at = self.rng.randrange(len(data))
        if how == "truncate":
            return bytes(data[:at])
        if how == "flip":
            for _ in range(self.rng.randint(1, 4)):
                data[self.rng.randrange(len(data))] = self.rng.randrange(256)
            return bytes(data)
        if how == "insert":
            data[at:at] = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 8)))
            return bytes(data)
        return bytes(data[:at] + data[at // 2 :])

    def big(self, doc: dict[str, Any]) -> bytes:
        size = self.rng.choice([300, 5000, 70_000, 900_000, MAX_BODY + 10])
        seg = doc.get("data", {}).get("data")
        what = self.rng.choice(["message", "logo_name", "logos", "video_url", "task"])
        if isinstance(seg, dict) and what == "logos":
            count = max(1, size // 40)
            seg["logo_detection"]["logos"] = [{"name": f"L{i}", "score": 0.5} for i in range(count)]
        elif isinstance(seg, dict) and what == "logo_name":
            seg["logo_detection"]["logos"] = [{"name": "N" * size}]
        elif isinstance(seg, dict) and what == "video_url":
            seg["video_url"] = "http://127.0.0.1:9/" + "v" * size
        elif what == "task":
            doc["task_id"] = "t" * size
        else:
            doc["data"]["message"] = "m" * size
        return self._dump(doc)

    def task_id(self, doc: dict[str, Any]) -> bytes:
        doc["task_id"] = self.rng.choice(NASTY_TASK_IDS)
        return self._dump(doc)

    def status(self, doc: dict[str, Any]) -> bytes:
        doc["data"]["status"] = self.rng.choice(
            [14, 15, 16, 402, -1, 7, "0", "14", 0.0, 1e20, 2**40, -(2**40), "x", None]
        )
        return self._dump(doc)


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _gzip_garbage() -> bytes:
    good = zlib.compress(b'{"task_id": "x"}')
    return good[:4] + b"\x00garbage" + good[4:]


# Malformed HTTP that aiohttp's parser or the handler must refuse with a 4xx (or by closing).
RAW_REQUESTS: tuple[tuple[str, bytes], ...] = (
    ("bad-method", b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bad-version", b"POST {path} HTTP/9.9\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"),
    ("not-http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
    ("bad-header", b"POST {path} HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"),
    ("header-nul", b"POST {path} HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    ("long-header", b"POST {path} HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n"),
    ("bad-length", b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}"),
    ("huge-length", b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}"),
    (
        "length-and-chunked",
        b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "bad-chunk",
        b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n",
    ),
    (
        "chunk-too-long",
        b"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}}}}}\r\n0\r\n\r\n",
    ),
    (
        "gzip-garbage",
        b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: "
        + str(len(_gzip_garbage())).encode()
        + b"\r\n\r\n"
        + _gzip_garbage(),
    ),
    (
        "deflate-garbage",
        b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Encoding: deflate\r\n"
        b"Content-Length: 8\r\n\r\nnotzlib!",
    ),
    (
        "short-body",
        b"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}",
    ),
    ("no-host-http10", b"POST {path} HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}"),
    ("lf-only", b"POST {path} HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"),
)


# -- running the daemon ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(work: Path, port: int) -> str:
    streams = "".join(
        f'[[streams]]\nname = "cam-{i}"\nurl = "rtmp://fuzz.invalid/{i}"\n'
        f"logo_detection = true\nevidence = true\n"
        for i in range(3)
    )
    return f"""
[mavi]
backend = "emulator"
segment_seconds = 0.5
[server]
listen = "127.0.0.1:{port}"
callback_secret = {{ env = "FUZZ_SECRET" }}
[storage]
path = "{work / "state.db"}"
[logging]
level = "info"
format = "json"
[emulator]
unsafe_every = 3
[evidence]
path = "{work / "evidence"}"
[[alerts.sinks]]
name = "hook"
type = "webhook"
url = {{ env = "FUZZ_HOOK" }}
secret = {{ env = "FUZZ_HOOK_SECRET" }}
[[alerts.rules]]
name = "everything"
sinks = ["hook"]
cooldown_seconds = 0
group_seconds = 1
{streams}
"""


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """The process's resident set size (or another /proc status field) in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def _escaped() -> list[Path]:
    """Files a path-like task id managed to create outside the evidence archive."""
    return list(Path(tempfile.gettempdir()).glob("streamwatch-fuzz-escape*"))


def state_bytes(work: Path) -> int:
    """The state file with its WAL and shared-memory files."""
    return sum(p.stat().st_size for p in work.glob("state.db*"))


async def _wait_ready(session: aiohttp.ClientSession, base: str, proc: Any) -> list[str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{base}/api/v1/status") as resp:
                if resp.status == 200:
                    doc = await resp.json()
                    ids = [s["task_id"] for s in doc["streams"] if s["task_id"]]
                    if len(ids) == len(doc["streams"]) and ids:
                        return ids
        await asyncio.sleep(0.1)
    raise RuntimeError("the daemon did not start its streams within 30 s")


async def _raw(port: int, path: str, name: str, request: bytes) -> str:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "connect-failed"
    try:
        writer.write(request.replace(b"{path}", path.encode()))
        await writer.drain()
        if name == "short-body":
            writer.write_eof()
        async with asyncio.timeout(10):
            line = await reader.readline()
    except (OSError, TimeoutError):
        return "closed"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line.split()
    return parts[1].decode() if len(parts) > 1 and parts[1].isdigit() else "closed"


def _count_log(path: Path) -> tuple[int, int, collections.Counter[str]]:
    """(tracebacks, lines, events by name) in the daemon's output."""
    tracebacks = 0
    lines = 0
    events: collections.Counter[str] = collections.Counter()
    with path.open("rb") as f:
        for raw in f:
            lines += 1
            if b"Traceback (most recent call last)" in raw:
                tracebacks += 1
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if doc.get("exception") or doc.get("exc_info"):
                tracebacks += 1
            events[str(doc.get("event"))] += 1
    return tracebacks, lines, events


async def fuzz(
    n: int, concurrency: int, seed: int, raw_share: float, keep_log: Path | None = None
) -> int:
    rng = random.Random(seed)
    port, hook_port = _free_port(), _free_port()
    hooked = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal hooked
        await request.read()
        hooked += 1
        return web.Response(status=204)

    sink = web.Application()
    sink.router.add_post("/hook", hook)
    sink_runner = web.AppRunner(sink, access_log=None)
    await sink_runner.setup()
    await web.TCPSite(sink_runner, "127.0.0.1", hook_port).start()

    with tempfile.TemporaryDirectory(prefix="streamwatch-fuzz-") as tmp:
        work = Path(tmp)
        config = work / "streams.toml"
        config.write_text(_config(work, port))
        log_path = work / "daemon.log"
        env = {
            **os.environ,
            "FUZZ_SECRET": SECRET,
            "FUZZ_HOOK": f"http://127.0.0.1:{hook_port}/hook",
            "FUZZ_HOOK_SECRET": HOOK_SECRET,
        }
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "streamwatch",
                "run",
                "-c",
                str(config),
                env=env,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        path = f"/callbacks/mavi/{SECRET}"
        statuses: collections.Counter[str] = collections.Counter()
        by_mutation: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        try:
            connector = aiohttp.TCPConnector(limit=concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                try:
                    task_ids = await _wait_ready(session, base, proc)
                except RuntimeError:
                    sys.stderr.write(log_path.read_text(errors="replace")[-4000:])
                    raise
                await asyncio.sleep(2)  # let the first segments, alerts and clips flow
                rss_before, db_before = rss_kib(proc.pid), state_bytes(work)
                mutator = Mutator(rng, task_ids)
                raw_rng = random.Random(seed + 1)
                jobs = iter(range(n))
                started = time.perf_counter()

                async def worker() -> None:
                    for _ in jobs:
                        if raw_rng.random() < raw_share:
                            name, request = raw_rng.choice(RAW_REQUESTS)
                            status = await _raw(port, path, name, request)
                            statuses[status] += 1
                            by_mutation[f"http:{name}"][status] += 1
                            continue
                        name, body = mutator.body()
                        try:
                            async with session.post(
                                base + path,
                                data=body,
                                headers={"Content-Type": "application/json"},
                            ) as resp:
                                await resp.read()
                                status = str(resp.status)
                        except aiohttp.ClientError as exc:
                            status = f"error:{type(exc).__name__}"
                        statuses[status] += 1
                        by_mutation[name][status] += 1

                await asyncio.gather(*(worker() for _ in range(concurrency)))
                elapsed = time.perf_counter() - started
                await asyncio.sleep(3)  # let deliveries and clip downloads settle
                rss_after, db_after = rss_kib(proc.pid), state_bytes(work)
                peak = rss_kib(proc.pid, "VmHWM")
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(30):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            await sink_runner.cleanup()
        tracebacks, lines, events = _count_log(log_path)
        if keep_log is not None:
            shutil.copyfile(log_path, keep_log)
        escaped = _escaped()

    total = sum(statuses.values())
    five = sum(c for s, c in statuses.items() if s.startswith("5"))
    four = sum(c for s, c in statuses.items() if s.startswith("4"))
    rate = total / elapsed
    print(f"requests: {total} in {elapsed:.1f} s ({rate:.0f}/s), {concurrency} in flight")
    print("by status: " + ", ".join(f"{s}: {c}" for s, c in sorted(statuses.items())))
    print(f"5xx: {five}")
    print("by mutation:")
    for name in sorted(by_mutation):
        counts = by_mutation[name]
        print(f"  {name:24} " + ", ".join(f"{s}: {c}" for s, c in sorted(counts.items())))
    rejections = events["callback.rejected"] + events["http.bad_request"]
    print(f"tracebacks logged: {tracebacks}  (log lines: {lines})")
    print(f"rejection log lines: {rejections} for {four} 4xx answers")
    print(f"alert deliveries received by the sink: {hooked}")
    print(
        f"daemon RSS: before {rss_before / 1024:.1f} MiB, after {rss_after / 1024:.1f} MiB"
        f" (peak {peak / 1024:.1f} MiB)"
    )
    print(
        f"state file: before {db_before / 1024**2:.1f} MiB, after {db_after / 1024**2:.1f} MiB"
        f" (+{(db_after - db_before) / 1024**2:.1f} MiB)"
    )
    print(f"files written outside the archive: {len(escaped)}")
    return 1 if five or tracebacks or escaped else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--raw-share", type=float, default=0.02)
    parser.add_argument("--keep-log", type=Path, help="copy the daemon's log here")
    args = parser.parse_args()
    sys.exit(asyncio.run(fuzz(args.n, args.concurrency, args.seed, args.raw_share, args.keep_log)))


if __name__ == "__main__":
    main()
