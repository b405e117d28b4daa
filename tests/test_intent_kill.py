"""`kill -9` of a real daemon between MAVI creating a task and the daemon recording it, round
after round, against a real emulator process: afterwards every stream has exactly one live task
and the ledger is what the provider charged, to the tick."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from streamwatch.store import Location
from tests import pg
from tests.conftest import ENV, SECRET, free_port, spawn_daemon, storage_toml

PERIOD = 0.2  # the emulator's segment period, and the daemon's
ROUNDS = 6
DELAY = 30.0  # the emulator holds each start's answer this long after creating the task


def url(i: int) -> str:
    return f"rtmp://cams.test/kill{i}"


def config(tmp_path: Path, location: Location, *, base_url: str, port: int, streams: int) -> Path:
    # Each stream its own fps, so that each task's callbacks show whose it is.
    entries = "".join(
        f'[[streams]]\nname = "s{i}"\nurl = "{url(i)}"\nfps = {i + 1}\n' for i in range(streams)
    )
    path = tmp_path / "streams.toml"
    path.write_text(f"""
[mavi]
backend = "mavi"
base_url = "{base_url}"
api_key = {{ env = "MAVI_KEY" }}
segment_seconds = {PERIOD}
request_timeout_seconds = {DELAY * 2}
[mavi.retry]
attempts = 2
initial_seconds = 0.01
max_seconds = 0.05
[server]
listen = "127.0.0.1:{port}"
callback_secret = {{ env = "SW_SECRET" }}
[storage]
{storage_toml(location)}
[supervisor]
tick_seconds = 0.05
stall_after_segments = 1000
adopt_wait_segments = 15
restart_initial_seconds = 0.1
restart_max_seconds = 0.5
{entries}""")
    return path


@contextlib.asynccontextmanager
async def emulator_process(webhook: str) -> AsyncIterator[str]:
    """`streamwatch emulator` in its own process; yields the URL it serves on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--segment-seconds",
        str(PERIOD),
        "--answer-delay-seconds",
        str(DELAY),
        "--api-key-env",
        "MAVI_KEY",
        "--webhook",
        webhook,
        env={**os.environ, **ENV},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        assert "base_url = " in line, line
        yield line.split("base_url = ", 1)[1].strip().removesuffix("/serve/api/v2")
    finally:
        proc.send_signal(signal.SIGINT)
        await proc.wait()


async def poll(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    """Ask `check()` until it holds, failing after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while not await check():  # noqa: ASYNC110 - state of other processes: polled, bounded
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not within {within}s: {what}")


def ledger(location: Location) -> tuple[dict[str, str], int, int]:
    """(the live task recorded per stream, confirmed ticks, estimated orphan ticks)."""
    live = dict(pg.rows(location, "SELECT stream, task_id FROM tasks WHERE ended_at IS NULL"))
    ((confirmed,),) = pg.rows(location, "SELECT coalesce(sum(ticks), 0) FROM charges")
    ((orphans,),) = pg.rows(location, "SELECT coalesce(sum(ticks), 0) FROM orphan_charges")
    return live, int(confirmed), int(orphans)


@pytest.mark.timeout(180)
async def test_kill_9_between_start_and_record_never_double_starts(
    tmp_path: Path, location: Location
):
    """Killed with SIGKILL right after the emulator created each new stream's task (its answer
    held back), the restarted daemon adopts that task from its open intent instead of starting
    the stream again: each stream ends with one live task, the one the daemon records for it,
    and the ledger equals the emulator's charged total."""
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/callbacks/mavi/{SECRET}"
    async with emulator_process(webhook) as emu, aiohttp.ClientSession() as http:

        async def state() -> dict[str, Any]:
            async with http.get(f"{emu}/_emulator/state") as resp:
                doc: dict[str, Any] = await resp.json()
                return doc

        async def tasks_of(i: int) -> list[dict[str, Any]]:
            return [t for t in (await state())["tasks"] if t["url"] == url(i)]

        for i in range(ROUNDS):
            path = config(
                tmp_path, location, base_url=f"{emu}/serve/api/v2", port=port, streams=i + 1
            )
            daemon = await spawn_daemon(path, ENV)

            async def created(i: int = i) -> bool:
                return bool(await tasks_of(i))

            await poll(created, within=30, what=f"the emulator creates s{i}'s task")
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait()
            live, _, _ = ledger(location)
            assert f"s{i}" not in live, "killed before the answer: the task is not recorded"

        async with http.put(f"{emu}/_emulator/answer_delay", json={"seconds": 0}) as resp:
            assert resp.status == 200
        daemon = await spawn_daemon(path, ENV)
        try:

            async def settled() -> bool:
                doc = await state()
                running = [t for t in doc["tasks"] if t["state"] == "running"]
                by_url = {t["url"]: t["task_id"] for t in running}
                if len(running) != ROUNDS or len(by_url) != ROUNDS:
                    return False
                live, _, _ = ledger(location)
                return live == {f"s{i}": by_url[url(i)] for i in range(ROUNDS)}

            await poll(settled, within=60, what="one live task per stream, recorded for it")
            async with http.put(f"{emu}/_emulator/paused", json={"paused": True}) as resp:
                assert resp.status == 200

            async def quiet() -> bool:
                deliveries: dict[str, int] = (await state())["deliveries"]
                return deliveries["pending"] == 0 and deliveries["posting"] == 0

            await poll(quiet, within=60, what="every callback delivered")
            doc = await state()
        finally:
            daemon.send_signal(signal.SIGTERM)
            await daemon.wait()

    starts = [s for s in doc["starts"] if s["task_id"]]
    assert sorted(s["url"] for s in starts) == sorted(url(i) for i in range(ROUNDS)), (
        "one task per stream, ever: no stream was started twice"
    )
    live, confirmed, orphans = ledger(location)
    assert orphans == 0, "every task was claimed by its stream"
    assert confirmed == doc["charged_ticks"]
