"""Whole lifecycles: daemon and emulator on loopback, real SQLite, real HTTP."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from streamwatch.config import BudgetsConfig, StreamConfig, SupervisorConfig
from streamwatch.emulator import Script
from streamwatch.intent import Shape, price_orphan
from streamwatch.ledger import Spending, usd
from streamwatch.mavi.callbacks import parse_callback
from streamwatch.policy import Phase, Policy, Start
from streamwatch.pricing import segment_cost_ticks
from streamwatch.store import Location, Store
from streamwatch.supervisor import Supervisor
from tests.conftest import Daemon, stream_toml, until


def phase(d: Daemon, name: str) -> Phase | None:
    state = d.sup.streams.get(name)
    return state.phase if state else None


async def test_segments_are_stored_once_despite_duplicates_and_reordering(daemon, emulator):
    """Every segment MAVI delivers twice and out of order is stored exactly once (on either
    backend)."""
    daemon = daemon
    url = "rtmp://cams.test/busy"
    emulator.scripts[url] = Script(
        outcomes=["safe", "unsafe", "logo:Acme", "safe", "error", "safe"],
        duplicate=True,
        reorder=True,
    )
    await daemon.start(stream_toml("busy", url, logo_detection=True))
    await daemon.wait(
        lambda: (s := daemon.sup.streams.get("busy")) is not None and s.run_segments >= 10
    )
    task_id = daemon.state("busy").task_id
    await daemon.stop()  # on_shutdown = keep: the task goes on at the emulator
    emu_task = emulator.tasks[task_id]
    emulator_stop = aiohttp.ClientSession()
    async with emulator_stop:
        await emulator_stop.post(
            f"{emulator.base_url}/stream/stop",
            json={"task_id": task_id},
            headers={"Authorization": emulator.api_key},
        )
    await daemon.start()
    await until(
        emulator, lambda: all(d.delivered for d in emulator.deliveries if d.task_id == task_id)
    )
    indexes = await daemon.store.segment_indexes(task_id)
    sent = emu_task.segments_sent
    deliveries = [d for d in emulator.deliveries if d.task_id == task_id and d.status == 0]
    assert len(deliveries) == 2 * sent, "every segment was delivered twice"
    assert indexes == sorted({d.segment_index for d in deliveries})
    assert len(indexes) == sent
    row = await daemon.store.task(task_id)
    assert row.segments == sent
    totals = (await daemon.store.stream_totals())["busy"]
    assert totals.unsafe_segments >= 1
    assert totals.logo_segments >= 1
    assert totals.failed_segments >= 1


async def test_status_15_restarts_with_backoff(daemon, emulator):
    """A task that ends with 15 (no video) is restarted after a backoff, and counted."""
    url = "rtmp://cams.test/flaky"
    emulator.scripts[url] = Script(outcomes=["safe"], then="end:15")
    await daemon.start(stream_toml("flaky", url))
    await until(emulator, lambda: len(emulator.accepted_starts(url)) >= 3)
    await daemon.wait(lambda: daemon.state("flaky").restarts >= 2)
    events = await daemon.events(stream="flaky")
    ended = [e for e in events if e.kind == "task_ended"]
    assert ended
    assert {e.status for e in ended} == {15}
    assert phase(daemon, "flaky") in (Phase.BACKOFF, Phase.RUNNING, Phase.STARTING)


async def test_status_16_capacity_restarts_later(daemon, emulator):
    """Provider capacity (16) ends the task; the stream is retried, not given up."""
    url = "rtmp://cams.test/busy-provider"
    emulator.scripts[url] = Script(outcomes=["safe", "safe"], then="end:16")
    await daemon.start(stream_toml("cap", url))
    await until(emulator, lambda: len(emulator.accepted_starts(url)) >= 2)
    statuses = [e.status for e in await daemon.events(stream="cap") if e.kind == "task_ended"]
    assert 16 in statuses


async def test_operator_stop_holds_the_stream_until_resumed(daemon, emulator):
    """A 14 that streamwatch did not ask for holds the stream, across restarts, until resume."""
    url = "rtmp://cams.test/held"
    await daemon.start(stream_toml("held", url))
    await daemon.wait(lambda: phase(daemon, "held") is Phase.RUNNING)
    task_id = daemon.state("held").task_id
    async with aiohttp.ClientSession() as console:  # a person presses "stop" in the console
        resp = await console.post(
            f"{emulator.base_url}/stream/stop",
            json={"task_id": task_id},
            headers={"Authorization": emulator.api_key},
        )
        assert resp.status == 200
    await daemon.wait(lambda: phase(daemon, "held") is Phase.HELD)
    assert not [a for a in daemon.sup.step() if isinstance(a, Start)]
    await daemon.stop()
    await daemon.start()
    assert phase(daemon, "held") is Phase.HELD, "the hold survives a daemon restart"
    assert not [a for a in daemon.sup.step() if isinstance(a, Start)]
    assert len(emulator.accepted_starts(url)) == 1
    released = await daemon.sup.resume(["held"])
    assert released == ["held"]
    await daemon.wait(lambda: phase(daemon, "held") is Phase.RUNNING)
    assert len(emulator.accepted_starts(url)) == 2


async def test_balance_exhausted_halts_the_account_until_resume(daemon, emulator):
    """402 mid-stream halts every start account-wide; after a top-up, resume restarts."""
    await daemon.start(stream_toml("a") + stream_toml("b", fps=3))
    await daemon.wait(lambda: daemon.sup.running_count() == 2)
    emulator.balance_ticks = 10  # less than any segment: both tasks end with 402
    await daemon.wait(lambda: daemon.sup.halt is not None and daemon.sup.running_count() == 0)
    assert daemon.sup.halt.reason == "balance"
    starts_before = len(emulator.accepted_starts())
    assert not [a for a in daemon.sup.step() if isinstance(a, Start)]
    await daemon.stop()
    await daemon.start()
    assert daemon.sup.halt is not None, "the halt survives a daemon restart"
    emulator.balance_ticks = 100_000
    await daemon.sup.resume()
    await daemon.wait(lambda: daemon.sup.running_count() == 2)
    assert len(emulator.accepted_starts()) == starts_before + 2
    assert emulator.balance_ticks >= 0


async def test_start_refused_for_balance_halts(daemon, emulator):
    """A start answered HTTP 402 halts the account instead of retrying in a loop."""
    emulator.balance_ticks = 0
    await daemon.start(stream_toml("poor"))
    await daemon.wait(lambda: daemon.sup.halt is not None)
    assert [s.http_status for s in emulator.starts] == [402], "402 is never retried"
    status = await _status(daemon)
    assert status["account"]["halted"] is True
    assert status["streams"][0]["state"] == "halted"


async def test_failed_segments_in_a_row_raise_a_stream_problem(daemon, emulator):
    """N consecutive -1 segments are counted and recorded as one stream problem event."""
    url = "rtmp://cams.test/broken"
    emulator.scripts[url] = Script(outcomes=["error"])
    await daemon.start(stream_toml("broken", url), supervisor="error_threshold = 3")
    await daemon.wait(lambda: daemon.state("broken").consecutive_errors >= 5)
    events = [e for e in await daemon.events(stream="broken") if e.kind == "segment_errors"]
    assert len(events) == 1
    assert phase(daemon, "broken") is Phase.RUNNING, "-1 does not stop the stream"
    totals = (await daemon.store.stream_totals())["broken"]
    assert totals.failed_segments >= 5
    assert totals.segments == 0


async def test_daemon_restart_adopts_the_running_task(daemon, emulator):
    """After a crash, the new daemon adopts the task: one start, segments keep flowing to it
    (on either backend)."""
    daemon = daemon
    url = "rtmp://cams.test/adopt"
    await daemon.start(stream_toml("adopt", url))
    await daemon.wait(lambda: daemon.state("adopt").run_segments >= 2)
    task_id = daemon.state("adopt").task_id
    await daemon.crash()
    await daemon.start()
    assert daemon.state("adopt").task_id == task_id
    before = (await daemon.store.task(task_id)).segments
    await daemon.wait(lambda: daemon.state("adopt").run_segments >= before + 3)
    assert len(emulator.accepted_starts(url)) == 1
    assert len(emulator.charges) == 1 + emulator.tasks[task_id].segments_sent
    assert [e.kind for e in await daemon.events(stream="adopt")].count("task_adopted") == 1


async def test_reload_adds_removes_and_restarts_changed_streams(daemon, emulator):
    """SIGHUP's reload starts added streams, stops removed ones, restarts changed ones."""
    await daemon.start(stream_toml("keep") + stream_toml("gone") + stream_toml("change"))
    await daemon.wait(lambda: daemon.sup.running_count() == 3)
    tasks = {n: daemon.state(n).task_id for n in ("keep", "gone", "change")}
    daemon.write(stream_toml("keep") + stream_toml("change", fps=2) + stream_toml("new"))
    assert await daemon.app.reload()
    await daemon.wait(
        lambda: (
            "gone" not in daemon.sup.streams
            and phase(daemon, "new") is Phase.RUNNING
            and phase(daemon, "change") is Phase.RUNNING
            and daemon.state("change").task_id != tasks["change"]
        )
    )
    assert daemon.state("keep").task_id == tasks["keep"], "unchanged stream untouched"
    assert emulator.tasks[tasks["gone"]].end_status == 14
    assert emulator.tasks[tasks["change"]].end_status == 14
    new_change = emulator.tasks[daemon.state("change").task_id]
    assert new_change.fps == 2
    assert len(emulator.accepted_starts()) == 5


async def test_a_reload_prices_orphans_against_the_streams_it_brings(daemon):
    """An orphan segment whose fps cannot be read is priced at the fps the configured streams
    with its features run at: the streams as configured now, so a reload changes it."""
    await daemon.start(stream_toml("cam", fps=1, content_moderation=True, logo_detection=False))
    assert daemon.app is not None
    seen = Shape(content_moderation=True, logo_detection=False, fps=None)
    assert daemon.app.pricer(seen) == price_orphan(seen, [Shape(True, False, 1)])
    daemon.write(stream_toml("cam", fps=3, content_moderation=True, logo_detection=False))
    assert await daemon.app.reload()
    assert daemon.app.pricer(seen) == price_orphan(seen, [Shape(True, False, 3)])
    assert daemon.app.pricer(seen).fps == 3


async def test_reload_with_a_bad_file_changes_nothing(daemon, emulator):
    """A reload that fails validation keeps the running config and streams."""
    await daemon.start(stream_toml("one"))
    await daemon.wait(lambda: daemon.sup.running_count() == 1)
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n[bogus]\n")
    assert not await daemon.app.reload()
    assert set(daemon.sup.desired) == {"one"}
    assert phase(daemon, "one") is Phase.RUNNING


async def test_on_shutdown_stop_stops_tasks_and_stores_their_final_callbacks(daemon, emulator):
    """With on_shutdown = stop, a graceful stop ends every task and drains their 14s."""
    await daemon.start(stream_toml("x") + stream_toml("y"), supervisor='on_shutdown = "stop"')
    await daemon.wait(lambda: daemon.sup.running_count() == 2)
    ids = [daemon.state(n).task_id for n in ("x", "y")]
    await daemon.stop()
    assert not emulator.running_tasks()
    await daemon.start()
    for task_id in ids:
        row = await daemon.store.task(task_id)
        assert row.ended_at is not None
        assert row.end_status == 14
    await daemon.wait(lambda: daemon.sup.running_count() == 2)
    assert len(emulator.accepted_starts()) == 4, "stopped tasks are started afresh, not adopted"


async def test_on_shutdown_keep_leaves_tasks_running(daemon, emulator):
    """With on_shutdown = keep, a graceful stop leaves MAVI tasks running for adoption."""
    await daemon.start(stream_toml("k"))
    await daemon.wait(lambda: daemon.sup.running_count() == 1)
    await daemon.stop()
    assert len(emulator.running_tasks()) == 1


async def test_stalled_task_is_restarted(daemon, emulator):
    """A running task with no callbacks for the stall window is stopped and started again."""
    url = "rtmp://cams.test/silent"
    await daemon.start(stream_toml("silent", url), stall_after_segments=6)
    await daemon.wait(lambda: phase(daemon, "silent") is Phase.RUNNING)
    first = daemon.state("silent").task_id
    emulator.webhook = "http://127.0.0.1:9/nowhere"  # callbacks stop arriving
    await daemon.wait(lambda: daemon.state("silent").task_id not in (None, first))
    assert daemon.app.server is not None
    emulator.webhook = daemon.app.server.callback_url()
    kinds = [e.kind for e in await daemon.events(stream="silent")]
    assert "stream_stalled" in kinds
    assert emulator.tasks[first].end_status == 14


async def test_stalled_task_waits_and_recovers_when_policy_is_wait(daemon, emulator):
    """With on_stall = wait, a stalled stream is flagged, kept, and recovers on its own."""
    await daemon.start(
        stream_toml("patient"), supervisor='on_stall = "wait"', stall_after_segments=6
    )
    await daemon.wait(lambda: phase(daemon, "patient") is Phase.RUNNING)
    task_id = daemon.state("patient").task_id
    emulator.webhook = "http://127.0.0.1:9/nowhere"
    await daemon.wait(lambda: phase(daemon, "patient") is Phase.STALLED)
    assert daemon.app.server is not None
    emulator.webhook = daemon.app.server.callback_url()
    await daemon.wait(lambda: phase(daemon, "patient") is Phase.RUNNING)
    assert daemon.state("patient").task_id == task_id
    kinds = [e.kind for e in await daemon.events(stream="patient")]
    assert kinds.count("stream_stalled") == 1
    assert "stream_recovered" in kinds


async def test_transient_start_failures_are_retried(daemon, emulator):
    """429 and 5xx at start are retried; the stream ends up running with one task."""
    url = "rtmp://cams.test/shaky"
    emulator.scripts[url] = Script(start_failures=[429, 503, 500, 502])
    await daemon.start(stream_toml("shaky", url))
    await daemon.wait(lambda: phase(daemon, "shaky") is Phase.RUNNING)
    assert [s.http_status for s in emulator.starts] == [429, 503, 500, 502, 200]
    kinds = [e.kind for e in await daemon.events(stream="shaky")]
    assert kinds.count("start_failed") == 1, "three tries in one start, the fourth after backoff"


async def test_callbacks_from_unknown_tasks_are_kept_as_orphans(daemon, emulator):
    """A callback for a task this daemon never started is acknowledged and reported (on either
    backend)."""
    daemon = daemon
    await daemon.start(stream_toml("mine"))
    assert daemon.app.server is not None
    body = {
        "code": 200,
        "message": "SUCCESS",
        "task_id": "someone-elses-task",
        "data": {"status": 0, "message": "ok", "data": {"segment_index": 3}, "token": None},
    }
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            resp = await s.post(daemon.app.server.callback_url(), json=body)
            assert resp.status == 200
    status = await _status(daemon)
    orphans = status["orphans"]
    # No feature block: priced as both features at the configured fps, marked uncertain; its
    # pre-charge once and its one segment (the repeat is a duplicate).
    estimate = usd(2 * segment_cost_ticks(fps=1, content_moderation=True, logo_detection=True))
    assert {k: v for k, v in orphans.items() if not k.startswith(("live", "estimated_burn"))} == {
        "tasks": 1,
        "callbacks": 1,
        "uncertain_tasks": 1,
        "stopped_tasks": 0,
        "estimated_today_usd": estimate,
        "estimated_month_usd": estimate,
    }
    assert {"live_tasks", "estimated_burn_usd_per_hour"} < set(orphans)


async def test_max_running_limits_concurrent_tasks(daemon, emulator):
    """With [mavi] max_running, no more tasks run at once; a freed slot goes to a waiter."""
    await daemon.start("".join(stream_toml(f"s{i}") for i in range(4)), mavi="max_running = 2")
    await daemon.wait(lambda: daemon.sup.running_count() == 2)
    assert not [a for a in daemon.sup.step() if isinstance(a, Start)]
    assert len(emulator.accepted_starts()) == 2
    waiting = {n for n in ("s0", "s1", "s2", "s3") if phase(daemon, n) is not Phase.RUNNING}
    running = next(n for n in ("s0", "s1", "s2", "s3") if phase(daemon, n) is Phase.RUNNING)
    emulator._end(emulator.tasks[daemon.state(running).task_id], 15)
    await daemon.wait(lambda: any(phase(daemon, n) is Phase.RUNNING for n in waiting))
    assert daemon.sup.running_count() == 2


async def _status(d: Daemon) -> dict[str, Any]:
    assert d.app is not None
    assert d.app.server is not None
    async with aiohttp.ClientSession() as s:
        resp = await s.get(d.app.server.base_url + "/api/v1/status")
        assert resp.status == 200
        doc: dict[str, Any] = await resp.json()
        return doc


class Stops:
    """A MAVI client that only stops tasks, and says which."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def start(self, request: Any) -> str:
        raise AssertionError("no start expected")

    async def stop(self, task_id: str) -> bool:
        self.stopped.append(task_id)
        return True


def ended(task_id: str) -> bytes:
    doc = {"task_id": task_id, "data": {"status": 14, "message": "Stream stopped by user"}}
    return json.dumps(doc).encode()


async def test_the_tasks_stopped_at_shutdown_are_ending_until_their_final_callback(
    location: Location,
):
    """`shutdown()` says which stopped tasks still owe their final callback (`ending`, what the
    drain waits on) and tells waiters as each one is stored, or shows up as stored already (a
    redelivery of one stored before), instead of anyone polling the store."""
    cams = [
        StreamConfig(
            name=n,
            url=f"rtmp://h/{n}",
            fps=1,
            content_moderation=True,
            logo_detection=False,
            max_logos=5,
        )
        for n in ("a", "b")
    ]
    async with Store(location, clock=lambda: 100.0) as store:
        for n, spec in enumerate(cams):
            await store.record_task_started(
                task_id=f"T{n}",
                stream=spec.name,
                spec_hash=spec.spec_hash(),
                fps=1,
                content_moderation=True,
                logo_detection=False,
                max_logos=5,
                started_at=100.0,
            )
        client = Stops()
        sup = Supervisor(
            client=client,
            store=store,
            policy=Policy.from_config(SupervisorConfig(), segment_seconds=5, max_running=None),
            tick_seconds=1,
            spending=Spending(budgets=BudgetsConfig(), streams=cams, segment_seconds=5),
            clock=lambda: 100.0,
        )

        async def final(task_id: str) -> str:
            raw = ended(task_id)
            outcome = await store.apply_callback(parse_callback(raw), body=raw)
            sup.observe(outcome)
            return outcome.kind

        async with sup.running():
            await sup.load(cams)
            raw = ended("T0")  # stored, but not yet seen by the supervisor
            await store.apply_callback(parse_callback(raw), body=raw)
            assert sup.ending == frozenset()
            stopped = await sup.shutdown(stop_tasks=True)
            assert sorted(stopped) == sorted(client.stopped) == ["T0", "T1"]
            assert sup.ending == {"T0", "T1"}
            drained = asyncio.create_task(sup.wait_until(lambda: not sup.ending))
            assert await final("T0") == "duplicate"
            assert sup.ending == {"T1"}
            assert await final("T1") == "stored"
            assert sup.ending == frozenset()
            async with asyncio.timeout(5):
                await drained
