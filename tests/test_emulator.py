"""The emulator keeps to MAVI's contract: auth, validation, charges, redelivery, state."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from streamwatch.emulator import Emulator, EmulatorScript, Script
from streamwatch.pricing import segment_cost_ticks
from tests.conftest import until
from tests.fakes.serve import serve
from tests.media import Pattern

KEY = "sk-mai-emu"


class Receiver:
    """A webhook on loopback that fails the first `fail_first` deliveries with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.bodies: list[dict[str, Any]] = []
        self.attempts = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            return web.Response(status=500)
        self.bodies.append(await request.json())
        return web.json_response({"ok": True})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    async with serve(app) as base:
        rec.url = f"{base}/hook"
        yield rec


@pytest.fixture
async def emu(receiver: Receiver) -> AsyncIterator[Emulator]:
    e = Emulator(
        segment_seconds=0.02,
        api_key=KEY,
        webhook=receiver.url,
        redelivery_initial_seconds=0.01,
        redelivery_attempts=10,
        balance_ticks=10_000,
    )
    async with e.running():
        yield e


async def call(emu: Emulator, verb: str, body: Any, key: str = KEY) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{emu.base_url}/stream/{verb}", json=body, headers={"Authorization": key}) as resp,
    ):
        return resp.status, await resp.json()


START = {"url": "rtmp://h/x", "enable_content_moderation": True, "fps": 2}


async def test_wrong_key_is_401(emu):
    """Requests without the account's bare key are refused."""
    status, body = await call(emu, "start", START, key=f"Bearer {KEY}")
    assert status == 401
    assert body["code"] == 401


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://h/x", "enable_content_moderation": True},
        {"url": "rtmp://h/x", "enable_content_moderation": True, "fps": 0},
        {"url": "rtmp://h/x", "enable_content_moderation": True, "max_logos": 51},
        {"url": "rtmp://h/x", "enable_content_moderation": "yes"},
        {"url": "rtmp://h/x"},
    ],
)
async def test_invalid_start_bodies_are_400(emu, body):
    """Start validates the documented fields and their ranges."""
    status, _ = await call(emu, "start", body)
    assert status == 400


async def test_charges_follow_the_formula_and_end_with_402(emu, receiver):
    """Pre-charge at start, one charge per segment, then 402 when the balance runs out."""
    per = segment_cost_ticks(fps=2, content_moderation=True, logo_detection=False)
    emu.balance_ticks = per * 4  # the pre-charge and three segments
    status, body = await call(emu, "start", START)
    assert status == 200
    task_id = body["data"]["task_id"]
    await until(emu, lambda: emu.tasks[task_id].end_status == 402)
    assert [c.kind for c in emu.charges] == ["precharge", "segment", "segment", "segment"]
    assert emu.charged_ticks(task_id) == 4 * per
    assert emu.balance_ticks == 0
    await until(emu, lambda: any(b["data"]["status"] == 402 for b in receiver.bodies))
    last = receiver.bodies[-1]
    assert last["data"]["data"] is None
    assert last["data"]["token"] is None
    status, _ = await call(emu, "start", START)
    assert status == 402, "a start the balance cannot pre-charge is refused"


async def test_failed_deliveries_are_redelivered(emu, receiver):
    """Callbacks answered with 500 are sent again with backoff until a 2xx."""
    receiver.fail_first = 3
    _, body = await call(emu, "start", START)
    await until(emu, lambda: len(receiver.bodies) >= 2)
    await call(emu, "stop", {"task_id": body["data"]["task_id"]})
    await until(emu, lambda: all(d.delivered for d in emu.deliveries))
    assert emu.deliveries[0].attempts > 1, "the first callback was retried"
    assert sum(d.attempts for d in emu.deliveries) == receiver.attempts
    assert receiver.attempts == len(receiver.bodies) + 3
    assert 0 in {b["data"]["data"]["segment_index"] for b in receiver.bodies[:-1]}


async def test_stop_sends_a_final_14_and_refuses_a_second_stop(emu, receiver):
    """Stop ends the task with one 14 callback; stopping again is HTTP 400."""
    _, body = await call(emu, "start", START)
    task_id = body["data"]["task_id"]
    status, stopped = await call(emu, "stop", {"task_id": task_id})
    assert status == 200
    assert stopped["data"]["task_id"] == task_id
    await until(emu, lambda: any(b["data"]["status"] == 14 for b in receiver.bodies))
    status, _ = await call(emu, "stop", {"task_id": task_id})
    assert status == 400
    status, _ = await call(emu, "stop", {"task_id": "no-such-task"})
    assert status == 400


async def test_scripts_shape_the_callbacks(emu, receiver):
    """Scripted outcomes produce unsafe, logo and -1 callbacks, then the scripted end."""
    emu.scripts["rtmp://h/s"] = Script(outcomes=["unsafe", "logo:Brand", "error"], then="end:16")
    body = {"url": "rtmp://h/s", "enable_content_moderation": True, "enable_logo_detection": True}
    _, started = await call(emu, "start", body)
    task_id = started["data"]["task_id"]
    await until(emu, lambda: emu.tasks[task_id].end_status == 16)
    await until(emu, lambda: len(receiver.bodies) == 4)
    statuses = [b["data"]["status"] for b in receiver.bodies]
    assert statuses == [0, 0, -1, 16]
    unsafe, logo = receiver.bodies[0]["data"]["data"], receiver.bodies[1]["data"]["data"]
    assert unsafe["content_moderation"]["has_unsafe_content"] is True
    assert logo["logo_detection"]["logos"][0]["name"] == "Brand"
    assert isinstance(unsafe["start_time"], str)
    assert isinstance(unsafe["processing_time_ms"], str)


async def test_capacity_refuses_extra_starts(emu):
    """Beyond the configured capacity, starts are refused with a 4xx."""
    emu.capacity = 1
    assert (await call(emu, "start", START))[0] == 200
    assert (await call(emu, "start", START))[0] == 409


async def test_string_codes_option(emu):
    """With string_codes, `code` is sent as a string as the reference table types it."""
    emu.string_codes = True
    _, body = await call(emu, "start", START)
    assert body["code"] == "200"


async def test_state_endpoint(emu):
    """GET /_emulator/state shows tasks, charges and deliveries for tests and demos."""
    await call(emu, "start", START)
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{emu.port}/_emulator/state") as resp,
    ):
        state = await resp.json()
    assert len(state["tasks"]) == 1
    assert state["charged_ticks"] == segment_cost_ticks(
        fps=2, content_moderation=True, logo_detection=False
    )
    assert {"total", "delivered", "attempts", "pending"} <= set(state["deliveries"])
    await asyncio.sleep(0)


async def test_state_endpoint_masks_stream_credentials(emu):
    """The unauthenticated state route shows stream URLs without their passwords or tokens."""
    url = "rtsp://admin:RtspSecret987@cam.test/live?token=abcdef"
    await call(emu, "start", {**START, "url": url})
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{emu.port}/_emulator/state") as resp,
    ):
        text = await resp.text()
    state = json.loads(text)
    shown = "rtsp://admin:***@cam.test/live?token=***"
    assert [t["url"] for t in state["tasks"]] == [s["url"] for s in state["starts"]] == [shown]
    assert "RtspSecret987" not in text
    assert "abcdef" not in text


async def follow(emu: Emulator, url: str) -> str:
    """Start a task on `url` scripted (as in a config file) to follow its real source."""
    emu.balance_ticks = 10**9
    emu.scripts[url] = Script.from_config(EmulatorScript(url=url, follow_source=True))
    status, started = await call(emu, "start", {**START, "url": url})
    assert status == 200
    task_id: str = started["data"]["task_id"]
    return task_id


async def test_a_task_following_its_source_ends_with_15_when_the_source_stops(
    emu, receiver, live_sources
):
    """With follow_source, a task sends segments while its real RTMP source is live; when the
    feed stops mid-task, the task ends with status 15 (no video), its last callback."""
    source = await live_sources.rtmp(Pattern(width=320, height=240, fps=15, audio=False))
    task = emu.tasks[await follow(emu, source.url)]
    await until(emu, lambda: task.segments_sent >= 3, within=30)
    assert task.state == "running"
    await source.stop()
    await until(emu, lambda: task.state == "ended", within=30)
    assert task.end_status == 15
    await until(emu, lambda: all(d.delivered for d in emu.deliveries))
    assert [d.status for d in emu.deliveries][-1] == 15
    assert {d.status for d in emu.deliveries[:-1]} == {0}


async def test_a_task_whose_source_is_down_at_start_pays_the_precharge_and_ends_with_15(
    emu, live_sources
):
    """A following task whose source is offline when it starts sends no segment: the
    pre-charge, then status 15 (what a look before starting would have saved)."""
    source = await live_sources.rtsp(Pattern(width=320, height=240, fps=15, audio=False))
    await source.stop()  # the server is up, nothing publishes
    task = emu.tasks[await follow(emu, source.url)]
    await until(emu, lambda: task.state == "ended", within=30)
    assert task.end_status == 15
    assert task.segments_sent == 0
    assert [c.kind for c in emu.charges if c.task_id == task.task_id] == ["precharge"]
