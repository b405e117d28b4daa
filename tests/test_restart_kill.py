"""State that survives `kill -9`: a real `streamwatch run` process is killed and started again
against an emulator that outlives it (as MAVI does), and what it knew before still holds: a
task is flagged `billing_unreported` once, a stream's restart backoff goes on where it was, a
held stream keeps its last end status, restart loops are counted across processes, and alert
cooldowns and open conditions hold, with the resolution sent by the next process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from streamwatch.emulator import Emulator, Script
from streamwatch.store import Location, PgTarget
from tests import pg
from tests.conftest import (
    ENV,
    SECRET,
    Located,
    config_text,
    free_port,
    spawn_daemon,
    stream_toml,
    until,
)
from tests.fakes.chat import ChatFakes
from tests.fakes.serve import serve
from tests.test_alerts import SECRET as WHSEC


class Process(Located):
    """`streamwatch run` on one state file and port, started and killed as a test says."""

    def __init__(self, tmp_path: Path, emulator: Emulator, env: dict[str, str] | None = None):
        self.db = tmp_path / "state.db"
        self.path = tmp_path / "streams.toml"
        self.port = free_port()
        self.env = {**ENV, **(env or {})}
        self.emulator = emulator
        self.proc: asyncio.subprocess.Process | None = None
        self.storage = ""  # more [storage] lines (a PostgreSQL url)
        self.location: Location = self.db

    def write(self, streams: str, *, supervisor: dict[str, str], extra: str = "") -> None:
        text = config_text(
            self.db,
            base_url=self.emulator.base_url,
            streams=streams,
            extra=extra,
            storage=self.storage,
        )
        text = text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{self.port}"')
        for key, value in supervisor.items():
            text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
            if not found:
                text = text.replace("[supervisor]\n", f"[supervisor]\n{key} = {value}\n")
        self.path.write_text(text)

    @property
    def webhook(self) -> str:
        return f"http://127.0.0.1:{self.port}/callbacks/mavi/{SECRET}"

    async def start(self) -> None:
        self.proc = await spawn_daemon(self.path, self.env)

    async def kill(self) -> None:
        """SIGKILL: nothing is drained, nothing is written on the way out."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.proc = None

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = await self.proc.wait()
        self.proc = None
        return code

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows from the state (read-only, beside the running daemon); none before it
        exists."""
        if isinstance(self.location, PgTarget):
            try:
                return pg.rows(self.location, sql, args)
            except asyncpg.UndefinedTableError:  # not created yet
                return []
        if not self.db.exists():
            return []
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as conn:
            try:
                return conn.execute(sql, args).fetchall()
            except sqlite3.OperationalError:  # not created yet
                return []

    def events(self, kind: str, stream: str | None = None) -> list[tuple[Any, ...]]:
        if stream is None:
            return self.query(
                "SELECT stream, task_id, detail FROM events WHERE kind = ? ORDER BY id", kind
            )
        return self.query(
            "SELECT stream, task_id, detail FROM events WHERE kind = ? AND stream = ? ORDER BY id",
            kind,
            stream,
        )

    def stream(self, name: str) -> tuple[Any, ...] | None:
        rows = self.query(
            "SELECT failures, retry_at, last_end_status, held_reason FROM streams WHERE name = ?",
            name,
        )
        return rows[0] if rows else None

    async def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/status"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert resp.status == 200
            return dict(await resp.json())


@pytest.fixture
async def process(tmp_path: Path, emulator: Emulator, location: Location) -> AsyncIterator[Process]:
    """`streamwatch run` in its own process, its state in SQLite, then in PostgreSQL."""
    p = Process(tmp_path, emulator).on(location)
    yield p
    emulator.webhook = None
    if p.proc is not None:
        await p.kill()


async def test_billing_unreported_is_flagged_once_per_task_across_kill_9(
    process: Process, emulator: Emulator
):
    """A task that bills without reporting is flagged once; killed and started again, the
    daemon adopts the task and does not flag it a second time."""
    emulator.webhook = None  # MAVI processes and bills; no callback reaches the daemon
    supervisor = {"on_stall": '"wait"'}
    process.write(stream_toml("quiet"), supervisor=supervisor)
    await process.start()
    await until(emulator, lambda: len(process.events("billing_unreported")) == 1, within=30)
    await process.kill()
    (task_id,) = [t.task_id for t in emulator.running_tasks()]

    # The next process also starts a new stream: once its start is recorded, the plan that
    # started it has looked at the adopted task's billing too.
    process.write(stream_toml("quiet") + stream_toml("later"), supervisor=supervisor)
    await process.start()
    await until(emulator, lambda: bool(process.events("task_started", "later")), within=30)
    assert await process.stop() == 0
    assert process.events("task_adopted", "quiet") == [("quiet", task_id, "")]
    flagged = process.events("billing_unreported", "quiet")
    assert [(stream, task) for stream, task, _ in flagged] == [("quiet", task_id)]


async def test_backoff_hold_and_restart_loop_survive_kill_9(process: Process, emulator: Emulator):
    """Killed while a stream backs off, the next process waits for the same retry time and
    counts the next failure on top of the earlier ones; a held stream still shows why it
    stopped (its last end status); restarts before the kill count toward a restart loop."""
    emulator.scripts["rtmp://cams.test/flaky"] = Script(outcomes=["safe"], then="end:15")
    emulator.scripts["rtmp://cams.test/held"] = Script(outcomes=["safe"], then="end:14")
    emulator.webhook = process.webhook
    supervisor = {
        "restart_initial_seconds": "0.3",
        "restart_max_seconds": "60",
        "restart_loop_count": "3",
    }
    streams = stream_toml("flaky") + stream_toml("held") + stream_toml("steady")
    process.write(streams, supervisor=supervisor)
    await process.start()

    def failures(n: int) -> bool:
        row = process.stream("flaky")
        return row is not None and row[0] == n

    await until(emulator, lambda: failures(3), within=30)
    await process.kill()
    failed, retry_at, last_end, _ = process.stream("flaky") or ()
    assert (failed, last_end) == (3, 15)
    held = process.stream("held")
    assert held is not None
    assert held[2:] == (14, "stopped outside streamwatch")
    assert process.events("restart_loop") == [], "two restarts so far"

    await process.start()
    await until(emulator, lambda: failures(4), within=30)
    doc = await process.status()
    assert await process.stop() == 0
    flaky = sorted(
        (t for t in emulator.tasks.values() if t.url.endswith("/flaky")), key=lambda t: t.started_at
    )
    assert len(flaky) == 4
    assert flaky[3].started_at >= retry_at, "the retry time survived the kill"
    assert (process.stream("flaky") or ())[1] > retry_at
    (shown,) = [s for s in doc["streams"] if s["name"] == "held"]
    assert (shown["state"], shown["last_end_status"]) == ("held", 14)
    loops = process.events("restart_loop", "flaky")
    assert len(loops) == 1, "the third restart, the first after the kill, makes a loop"


def hook_alerts(fakes: ChatFakes) -> list[tuple[str, bool]]:
    return [
        (a["kind"], a["resolved"])
        for m in fakes.received["webhook"]
        for a in m["doc"]["data"]["alerts"]
    ]


def am_posts(fakes: ChatFakes) -> list[dict[str, Any]]:
    return [a for m in fakes.received["alertmanager"] for a in m["doc"]]


async def test_alert_memory_survives_kill_9(tmp_path: Path, emulator: Emulator, location: Location):
    """Killed after a stream stopped and its alerts went out, the next process re-posts the
    open condition to Alertmanager, sends its resolution (with the labels it was posted
    with) once the stream runs again, and sends nothing twice: the new task's unsafe
    segments are inside the cooldown."""
    fakes = ChatFakes(WHSEC, services=("webhook", "alertmanager"))
    flaky = "rtmp://cams.test/flaky"
    emulator.scripts[flaky] = Script(outcomes=["unsafe"], then="end:15")
    async with serve(fakes.app) as base:
        env = {
            "HOOK_URL": f"{base}/webhook",
            "HOOK_SECRET": WHSEC,
            "AM_URL": f"{base}/alertmanager",
        }
        process = Process(tmp_path, emulator, env).on(location)
        extra = """
[alerts]
retry_initial_seconds = 0.05
retry_max_seconds = 0.1
poll_seconds = 0.05
[[alerts.sinks]]
name = "hook"
type = "webhook"
url = { env = "HOOK_URL" }
secret = { env = "HOOK_SECRET" }
[[alerts.sinks]]
name = "am"
type = "alertmanager"
url = { env = "AM_URL" }
repeat_seconds = 3600
[[alerts.rules]]
name = "unsafe"
events = ["unsafe_content"]
streams = ["flaky"]
sinks = ["hook"]
cooldown_seconds = 3600
group_seconds = 0
[[alerts.rules]]
name = "stops"
events = ["stream_stopped"]
sinks = ["hook", "am"]
cooldown_seconds = 3600
group_seconds = 0
"""
        # The first restart waits 5 s: the kill, and the next process's start, come before it.
        supervisor = {"restart_initial_seconds": "5", "restart_max_seconds": "60"}
        process.write(stream_toml("flaky", flaky) + stream_toml("steady"), supervisor=supervisor)
        text = process.path.read_text()
        process.path.write_text(text.replace("\n[[streams]]", extra + "\n[[streams]]", 1))
        emulator.webhook = process.webhook
        try:
            await process.start()
            async with asyncio.timeout(30):
                await fakes.wait(
                    lambda: (
                        {("unsafe_content", False), ("stream_stopped", False)}
                        <= set(hook_alerts(fakes))
                        and len(am_posts(fakes)) >= 1
                    )
                )
            # Delivered and recorded as such (a kill before that would mean a redelivery:
            # at least once, by design).
            await until(
                emulator,
                lambda: (
                    process.query("SELECT count(*) FROM alert_outbox WHERE state = 'delivered'")
                    == [(3,)]
                ),
            )
            await process.kill()
            (firing,) = am_posts(fakes)
            assert "endsAt" not in firing, "a lasting condition"
            emulator.scripts[flaky] = Script(outcomes=["unsafe"] * 1000)

            await process.start()
            async with asyncio.timeout(30):
                await fakes.wait(lambda: ("stream_stopped", True) in hook_alerts(fakes))
                await fakes.wait(lambda: any("endsAt" in a for a in am_posts(fakes)))
            tasks = sorted(
                (t for t in emulator.tasks.values() if t.url == flaky), key=lambda t: t.started_at
            )
            second = tasks[-1].task_id
            await until(
                emulator,
                lambda: bool(
                    process.query(
                        "SELECT 1 FROM segments WHERE task_id = ? AND segment_index >= 2", second
                    )
                ),
                within=30,
            )
            assert await process.stop() == 0
        finally:
            emulator.webhook = None
            if process.proc is not None:
                await process.kill()
    assert sorted(hook_alerts(fakes)) == [
        ("stream_stopped", False),
        ("stream_stopped", True),
        ("unsafe_content", False),
    ], "nothing repeats: the firing is not sent again, the new unsafe segments are in cooldown"
    posts = am_posts(fakes)
    assert [("endsAt" in a) for a in posts] == [False, False, True], (
        "posted, re-posted by the next process, resolved"
    )
    assert posts[1]["labels"] == posts[0]["labels"]
    assert posts[2]["labels"] == posts[0]["labels"], "resolved with the labels it was posted with"
    assert posts[2]["startsAt"] == posts[0]["startsAt"]
