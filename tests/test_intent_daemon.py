"""Starts that end in a known state and orphans that cost money, in a running daemon against
the emulator: orphan spend estimated and counted against the account cap, orphans stopped,
failed starts adopting their task, claimed early segments treated like live ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from streamwatch.config import BudgetsConfig, StreamConfig, SupervisorConfig
from streamwatch.emulator import Emulator, Script
from streamwatch.intent import Intent
from streamwatch.ledger import Spending, usd
from streamwatch.mavi.streams import StreamClient
from streamwatch.policy import Phase, Policy
from streamwatch.pricing import segment_cost_ticks, usd_to_ticks
from streamwatch.store import Location, Store, StreamRecord
from streamwatch.supervisor import Supervisor
from tests import pg
from tests.conftest import API_KEY, Daemon, cli, stream_toml, until
from tests.fakes.serve import serve
from tests.test_alerts import SECRET as WHSEC

ORPHAN_URL = "rtmp://elsewhere.test/not-ours"


async def start_elsewhere(emulator: Emulator, **fields: Any) -> str:
    """Start a task at the emulator as another tool sharing the account would."""
    body = {"url": ORPHAN_URL, "enable_content_moderation": True, **fields}
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{emulator.base_url}/stream/start", json=body, headers={"Authorization": API_KEY}
        ) as resp,
    ):
        assert resp.status == 200
        task_id: str = (await resp.json())["data"]["task_id"]
        return task_id


async def quiesce(daemon: Daemon, emulator: Emulator) -> None:
    """No more segments, every callback delivered and everything it set off done."""
    emulator.paused = True
    await until(
        emulator, lambda: all(d.delivered for d in emulator.deliveries) and not emulator.posting
    )
    await daemon.sup.settle()


async def status(daemon: Daemon) -> dict[str, Any]:
    assert daemon.app is not None
    assert daemon.app.server is not None
    async with aiohttp.ClientSession() as s:
        resp = await s.get(daemon.app.server.base_url + "/api/v1/status")
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_orphan_spend_counts_against_the_account_cap_and_shows_apart(
    daemon: Daemon, emulator: Emulator, tmp_path: Path
):
    """A task started elsewhere on the account is priced from its callbacks (fps from
    frames_processed) as estimated orphan spend equal to what the provider charged; it counts
    against the account's daily cap, so a stream whose pre-charge would cross it is not
    started; status, metrics and `cost` show it apart from the confirmed ledger."""
    per_segment = segment_cost_ticks(fps=3, content_moderation=True, logo_detection=True)  # 16
    cap = "0.035"  # 100 ticks: the pre-charge and five segments leave less than a start's 6
    assert usd_to_ticks(cap) == 100
    await daemon.start("", extra=f'[budgets]\ndaily_usd = "{cap}"')
    orphan = await start_elsewhere(emulator, fps=3, enable_logo_detection=True)
    await daemon.wait(lambda: daemon.sup.spending.orphan_spent("day", daemon.clock()) >= 96)

    daemon.write(stream_toml("cam"), extra=f'[budgets]\ndaily_usd = "{cap}"')
    assert daemon.app is not None
    assert await daemon.app.reload()
    daemon.sup.step()
    assert daemon.sup.display_state("cam", daemon.clock()) == "over_budget"
    assert "account daily budget" in daemon.sup.gate.reasons["cam"]
    assert emulator.accepted_starts("rtmp://cams.test/cam") == [], "the cap held, orphans in"

    await quiesce(daemon, emulator)
    charged = emulator.charged_ticks(orphan)
    assert charged == per_segment * (1 + emulator.tasks[orphan].segments_sent)
    doc = await status(daemon)
    assert doc["orphans"]["estimated_today_usd"] == usd(charged)
    assert (doc["orphans"]["tasks"], doc["orphans"]["uncertain_tasks"]) == (1, 0)
    assert doc["cost"]["today_usd"] == usd(0), "confirmed spend is the daemon's own only"
    assert doc["cost"]["budget"]["daily_used_percent"] == charged * 100 // 100
    assert daemon.app.server is not None
    async with aiohttp.ClientSession() as s:
        scrape = await (await s.get(daemon.app.server.base_url + "/metrics")).text()
    assert f'streamwatch_orphan_spend_usd{{period="day"}} {charged / 2880}' in scrape
    await daemon.stop()

    shown = cli("cost", "-c", str(daemon.config_path), "--json", env=daemon.env)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert (doc["groups"], doc["total_usd"]) == ([], usd(0))
    assert doc["orphans"] == {
        "tasks": 1,
        "precharges": 1,
        "segments": emulator.tasks[orphan].segments_sent,
        "estimated_usd": usd(charged),
        "uncertain_tasks": 0,
    }
    assert doc["total_with_orphans_usd"] == usd(charged)
    text = cli("cost", "-c", str(daemon.config_path), env=daemon.env).stdout
    assert "ORPHANS (estimated)" in text


async def test_on_orphan_stop_stops_an_orphan_after_n_segments(daemon: Daemon, emulator: Emulator):
    """With on_orphan = "stop", a task nobody here started is stopped through MAVI once it
    has called back orphan_stop_after_segments times, with an orphan_task and an
    orphan_stopped event; the daemon's own task runs on."""
    await daemon.start(
        stream_toml("mine"), supervisor='on_orphan = "stop"\norphan_stop_after_segments = 3'
    )
    await daemon.wait(lambda: daemon.state("mine").phase is Phase.RUNNING)
    orphan = await start_elsewhere(emulator)
    await until(emulator, lambda: emulator.tasks[orphan].end_status == 14)
    await daemon.sup.settle()
    assert (orphan, 200) in emulator.stop_calls
    assert emulator.tasks[orphan].segments_sent >= 3
    mine = daemon.state("mine").task_id
    assert mine is not None
    assert emulator.tasks[mine].state == "running"
    events = [(e.kind, e.task_id) for e in await daemon.events()]
    assert ("orphan_task", orphan) in events
    assert ("orphan_stopped", orphan) in events
    assert events.count(("orphan_stopped", orphan)) == 1
    assert (await status(daemon))["orphans"]["stopped_tasks"] == 1


async def test_a_start_that_raises_after_mavi_created_the_task_adopts_it(
    daemon: Daemon, emulator: Emulator, monkeypatch
):
    """Any exception around a start (here after MAVI created the task, as a malformed
    answer once made int() raise) leaves no stream `starting`: it adopts for the window,
    takes the task when its callbacks come, and MAVI runs exactly one task for it."""
    real = StreamClient.start
    calls = 0

    async def created_then_raised(self: StreamClient, request: Any) -> str:
        nonlocal calls
        calls += 1
        task_id = await real(self, request)
        if calls == 1:
            raise ValueError("invalid literal for int() with base 10: 'abc'")
        return task_id

    monkeypatch.setattr(StreamClient, "start", created_then_raised)
    await daemon.start(stream_toml("cam"), supervisor="adopt_wait_segments = 40")
    await daemon.wait(lambda: daemon.state("cam").phase is Phase.ADOPTING)
    assert "ValueError" in (daemon.state("cam").last_error or "")
    await daemon.wait(lambda: daemon.state("cam").phase is Phase.RUNNING)
    (only,) = emulator.accepted_starts("rtmp://cams.test/cam")
    assert daemon.state("cam").task_id == only.task_id
    kinds = [e.kind for e in await daemon.events(stream="cam")]
    assert kinds[:2] == ["start_failed", "intent_adopted"]
    assert await daemon.store.intent_states() == {"adopted": 1}
    assert calls == 1


async def test_a_malformed_start_answer_leaves_the_intent_open_and_the_task_is_adopted(
    daemon: Daemon, emulator: Emulator, tmp_path: Path
):
    """A 200 without a usable task id, from a gateway in front of MAVI that created the task,
    is not a refusal: the stream adopts the task its callbacks show instead of starting a
    second one."""

    async def start(request: web.Request) -> web.Response:
        body = await request.json()
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"{emulator.base_url}/stream/start", json=body, headers=dict(request.headers)
            ) as resp,
        ):
            await resp.read()
        return web.json_response({"code": 200, "message": "success", "data": {"task_id": 12}})

    async def stop(request: web.Request) -> web.Response:
        raise AssertionError("nothing to stop")

    gateway = web.Application()
    gateway.router.add_post("/stream/start", start)
    gateway.router.add_post("/stream/stop", stop)
    async with serve(gateway) as base:
        daemon.write(stream_toml("cam"), supervisor="adopt_wait_segments = 40")
        daemon.config_path.write_text(
            daemon.config_path.read_text().replace(emulator.base_url, base)
        )
        await daemon.start()
        await daemon.wait(lambda: daemon.state("cam").phase is Phase.RUNNING)
        (only,) = emulator.accepted_starts("rtmp://cams.test/cam")
        assert daemon.state("cam").task_id == only.task_id
        (failed,) = [e for e in await daemon.events(stream="cam") if e.kind == "start_failed"]
        assert "without a task_id" in failed.detail
        assert "may have started the task" in failed.detail
        emulator.webhook = None
        await daemon.stop()


async def test_a_refused_start_closes_its_intent(daemon: Daemon, emulator: Emulator):
    """A 4xx refusal means no task was created: the intent closes as failed and the stream
    backs off and starts again (no adopting wait)."""
    url = "rtmp://cams.test/refused"
    emulator.scripts[url] = Script(start_failures=[409])
    await daemon.start(stream_toml("refused", url))
    await daemon.wait(lambda: daemon.state("refused").phase is Phase.RUNNING)
    assert await daemon.store.intent_states() == {"failed": 1, "started": 1}


async def test_early_segments_claimed_at_the_answer_go_the_way_of_live_ones(
    daemon: Daemon, emulator: Emulator, tmp_path: Path
):
    """Segments that arrive before the start answer, claimed when the task is recorded, get
    what any stored segment gets: their alert, their evidence clip and their metrics."""
    url = "rtmp://cams.test/early"
    emulator.scripts[url] = Script(outcomes=["unsafe"])
    emulator.answer_delay_seconds = 0.3  # six segment periods
    archive = tmp_path / "archive"
    extra = (
        '[[alerts.sinks]]\nname = "hook"\ntype = "webhook"\nurl = { env = "HOOK_URL" }\n'
        'secret = { env = "HOOK_SECRET" }\nmax_attempts = 1\n'
        '[[alerts.rules]]\nname = "unsafe"\nevents = ["unsafe_content"]\nsinks = ["hook"]\n'
        "cooldown_seconds = 0\ngroup_seconds = 0\n"
        f'[evidence]\npath = "{archive}"\nallow_hosts = ["127.0.0.1"]\n'
    )
    daemon.env.update({"HOOK_URL": "http://127.0.0.1:9/hook", "HOOK_SECRET": WHSEC})
    await daemon.start(stream_toml("early", url) + "evidence = true\n", extra=extra)
    await daemon.wait(lambda: daemon.state("early").run_segments >= 8)
    await quiesce(daemon, emulator)
    assert daemon.app is not None
    assert daemon.app.evidence is not None
    await daemon.app.evidence.settle()
    task_id = daemon.state("early").task_id
    assert task_id is not None
    task = await daemon.store.task(task_id)
    assert task is not None
    # The first segments came before the answer and were claimed with the task.
    assert emulator.starts[0].task_id == task_id
    ((early,),) = pg.rows(
        daemon.location,
        "SELECT count(*) FROM segments WHERE task_id = ? AND received_at < ?",
        (task_id, task.started_at),
    )
    assert early >= 1
    indexes = await daemon.store.segment_indexes(task_id)
    archived = {r.segment_index for r in await daemon.store.evidence()}
    assert set(indexes) == archived, "every unsafe segment archived, the claimed ones too"
    alerted = {r.event["segment_index"] for r in await daemon.store.recent_alerts(limit=1000)}
    assert set(indexes) == alerted
    seen = daemon.app.registry.get_sample_value(  # the only stream: the fleet's count is its
        "streamwatch_segment_processing_seconds_count"
    )
    assert seen == task.segments == len(indexes)


class NoCalls:
    """A MAVI client for a supervisor that must not call MAVI."""

    async def start(self, request: Any) -> str:
        raise AssertionError("no start expected")

    async def stop(self, task_id: str) -> bool:
        raise AssertionError("no stop expected")


async def test_an_open_intent_at_load_adopts_unless_the_stream_is_held(location: Location):
    """After a restart an open intent makes its stream `adopting` until the window ends; one of
    a held stream is closed instead (a task it made is then an orphan, reported)."""
    cams = [
        StreamConfig(
            name=n,
            url=f"rtmp://cams.test/{n}",
            fps=1,
            content_moderation=True,
            logo_detection=False,
            max_logos=5,
        )
        for n in ("cam", "held")
    ]
    async with Store(location) as store:
        for n, spec in enumerate(cams):
            await store.begin_start(
                Intent(f"a{n}", spec.name, "u", spec.spec_hash(), 1, True, False, 5, 100.0)
            )
        await store.save_streams([StreamRecord("held", "stopped outside streamwatch")])
        sup = Supervisor(
            client=NoCalls(),
            store=store,
            policy=Policy.from_config(
                SupervisorConfig(adopt_wait_segments=3), segment_seconds=5, max_running=None
            ),
            tick_seconds=1,
            spending=Spending(budgets=BudgetsConfig(), streams=cams, segment_seconds=5),
            clock=lambda: 200.0,
        )
        async with sup.running():
            await sup.load(cams)
            cam, held = sup.streams["cam"], sup.streams["held"]
            assert (cam.phase, cam.intent, cam.retry_at) == (Phase.ADOPTING, "a0", 215.0)
            assert held.phase is Phase.HELD
            assert [i.attempt_id for i in await store.open_intents()] == ["a0"]
            assert sup.step() == [], "nothing starts while the window runs"
