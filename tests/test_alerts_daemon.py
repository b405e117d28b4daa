"""Alerts from a running daemon to fake chat services: what fires, once, and resolves."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from streamwatch.emulator import Script
from tests.conftest import SECRET, Daemon, stream_toml
from tests.fakes.chat import Answer, ChatFakes
from tests.fakes.serve import serve
from tests.test_alerts import SECRET as WHSEC


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[ChatFakes, str]]:
    f = ChatFakes(WHSEC)
    async with serve(f.app) as base:
        yield f, base


def alerting(daemon: Daemon, base: str, rules: str) -> str:
    daemon.env.update(
        {"SLACK_URL": f"{base}/slack", "HOOK_URL": f"{base}/webhook", "HOOK_SECRET": WHSEC}
    )
    return f"""
[alerts]
retry_initial_seconds = 0.01
retry_max_seconds = 0.05
poll_seconds = 0.05
[[alerts.sinks]]
name = "chat"
type = "slack"
url = {{ env = "SLACK_URL" }}
[[alerts.sinks]]
name = "hook"
type = "webhook"
url = {{ env = "HOOK_URL" }}
secret = {{ env = "HOOK_SECRET" }}
{rules}
"""


def texts(f: ChatFakes) -> list[str]:
    return [m["doc"]["text"] for m in f.received["slack"]]


async def hook_alerts(f: ChatFakes) -> list[dict[str, Any]]:
    return [a for m in f.received["webhook"] for a in m["doc"]["data"]["alerts"]]


async def test_unsafe_content_needs_the_configured_streak(daemon, emulator, fakes):
    """With min_consecutive = 2, a lone unsafe segment is ridden out; two in a row alert once
    (cooldown), with the clip link and the stream's labels."""
    f, base = fakes
    url = "rtmp://cams.test/lobby"
    emulator.scripts[url] = Script(
        outcomes=["unsafe", "safe", "unsafe", "unsafe", "unsafe", "safe"]
    )
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "unsafe"
events = ["unsafe_content"]
sinks = ["chat", "hook"]
min_consecutive = 2
cooldown_seconds = 3600
group_seconds = 0
""",
    )
    await daemon.start(stream_toml("lobby", url) + 'labels = { site = "paris" }\n', extra=extra)
    await daemon.wait(lambda: daemon.state("lobby").run_segments >= 12)
    async with asyncio.timeout(10):
        await f.wait(lambda: f.received["webhook"] and f.received["slack"])
    assert daemon.app is not None
    assert daemon.app.alerts is not None
    await daemon.app.alerts.settle()
    alerts = await hook_alerts(f)
    assert len(alerts) == 1, "two in a row fire once; the cooldown holds the rest"
    assert alerts[0]["kind"] == "unsafe_content"
    assert alerts[0]["segment_index"] == 3
    assert alerts[0]["labels"] == {"site": "paris"}
    assert alerts[0]["clip_url"].endswith("segment_3.mp4")
    assert len(f.received["slack"]) == 1
    assert f.invalid == []


async def test_stream_stop_alerts_and_resolves_on_restart(daemon, emulator, fakes):
    """A 15 (no video) alerts once; the next task's start sends the resolution."""
    f, base = fakes
    url = "rtmp://cams.test/flaky"
    emulator.scripts[url] = Script(outcomes=["safe", "safe"], then="end:15")
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "stops"
events = ["stream_stopped"]
sinks = ["hook"]
cooldown_seconds = 3600
group_seconds = 0
""",
    )
    await daemon.start(stream_toml("flaky", url), extra=extra)
    await daemon.wait(lambda: daemon.state("flaky").restarts >= 2)
    async with asyncio.timeout(10):
        await f.wait(lambda: len(f.received["webhook"]) >= 2)
    alerts = await hook_alerts(f)
    assert [(a["kind"], a["resolved"]) for a in alerts[:2]] == [
        ("stream_stopped", False),
        ("stream_stopped", True),
    ]
    assert "no video" in alerts[0]["text"]
    ids = [a["id"] for a in alerts]
    assert len(set(ids)) == len(ids), "every alert has its own stable id"


async def test_watch_list_and_orphans(daemon, emulator, fakes):
    """Only watch-listed logos alert; a callback from an unknown task alerts once."""
    f, base = fakes
    url = "rtmp://cams.test/brands"
    emulator.scripts[url] = Script(outcomes=["logo:Other", "logo:Acme"])
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "brands"
events = ["logo_detected", "orphan_task"]
sinks = ["hook"]
cooldown_seconds = 3600
group_seconds = 0
""",
    )
    await daemon.start(
        stream_toml("brands", url, logo_detection=True) + 'watch_logos = ["Acme"]\n', extra=extra
    )
    await daemon.wait(lambda: daemon.state("brands").run_segments >= 4)
    assert daemon.app is not None
    assert daemon.app.server is not None
    body = {"task_id": "stranger", "data": {"status": 0, "data": {"segment_index": 1}}}
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            await s.post(f"{daemon.app.server.callback_url()}", json=body)
    async with asyncio.timeout(10):
        await f.wait(lambda: len(f.received["webhook"]) >= 2)
    assert daemon.app.alerts is not None
    await daemon.app.alerts.settle()
    alerts = await hook_alerts(f)
    kinds = sorted(a["kind"] for a in alerts)
    assert kinds == ["logo_detected", "orphan_task"]
    logo = next(a for a in alerts if a["kind"] == "logo_detected")
    assert logo["logos"] == ["Acme"]
    assert SECRET not in str(f.received)


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamwatch",
        *args,
        stdout=PIPE,
        stderr=PIPE,
        env={**os.environ, **env},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_alerts_test_and_list_commands(daemon, emulator, fakes, tmp_path):
    """`alerts test` sends a sample through the real outbox and sinks; `alerts list` shows it."""
    f, base = fakes
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "all"
sinks = ["chat", "hook"]
""",
    )
    daemon.write(stream_toml("cam"), extra=extra)
    config = str(daemon.config_path)
    code, out, err = await run_cli("alerts", "test", "-c", config, env=daemon.env)
    assert code == 0, err
    assert out.splitlines() == ["chat: delivered", "hook: delivered"]
    assert [a["kind"] for a in await hook_alerts(f)] == ["test"]
    assert f.invalid == []
    code, out, err = await run_cli("alerts", "list", "-c", config, "--json", env=daemon.env)
    assert code == 0, err
    assert {(a["sink"], a["state"]) for a in json.loads(out)} == {
        ("chat", "delivered"),
        ("hook", "delivered"),
    }
    code, _, err = await run_cli("alerts", "test", "--sink", "nope", "-c", config, env=daemon.env)
    assert code == 2  # a bad argument
    assert "no sink named 'nope'" in err


async def test_dead_letters_show_in_status_and_metrics(daemon, emulator, fakes):
    """An alert no sink could take is counted as dead in the status API and in /metrics."""
    f, base = fakes
    f.script["webhook"] = [Answer(410)]  # the receiver says: gone for good
    url = "rtmp://cams.test/bad"
    emulator.scripts[url] = Script(outcomes=["unsafe", "safe"])
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "unsafe"
events = ["unsafe_content"]
sinks = ["hook"]
cooldown_seconds = 3600
group_seconds = 0
""",
    )
    await daemon.start(stream_toml("bad", url), extra=extra)
    assert daemon.app is not None
    assert daemon.app.alerts is not None
    assert daemon.app.server is not None
    async with asyncio.timeout(10):
        await f.wait(lambda: f.attempts["webhook"] >= 1)
    await daemon.app.alerts.settle()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{daemon.app.server.base_url}/api/v1/status") as resp:
            status = await resp.json()
        async with s.get(f"{daemon.app.server.base_url}/metrics") as resp:
            metrics = await resp.text()
    assert status["alerts"]["dead"] == 1
    assert 'streamwatch_alert_outbox{state="dead"} 1.0' in metrics
    assert 'streamwatch_alert_deliveries_total{outcome="dead",sink="hook"} 1.0' in metrics


async def test_own_stops_at_shutdown_raise_no_alert(daemon, emulator, fakes):
    """Stopping the daemon with on_shutdown = stop ends every task with a 14 it asked for:
    nobody is told a stream was 'stopped outside streamwatch'."""
    f, base = fakes
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "stops"
events = ["stream_stopped"]
sinks = ["hook"]
group_seconds = 0
""",
    )
    await daemon.start(
        stream_toml("a") + stream_toml("b"), extra=extra, supervisor='on_shutdown = "stop"'
    )
    await daemon.wait(lambda: daemon.sup.running_count() == 2)
    await daemon.stop()
    assert all(t.end_status == 14 for t in emulator.tasks.values())
    assert f.attempts["webhook"] == 0


async def test_a_failure_after_the_commit_keeps_the_alert_and_answers_200(
    daemon, emulator, fakes, monkeypatch
):
    """A step after the commit that raises (here the metrics, as negative token counts once
    did) loses neither the segment's alert nor the answer: 200, the alert is delivered, and
    the failure is one logged, counted line."""
    f, base = fakes
    url = "rtmp://cams.test/quiet"
    emulator.scripts[url] = Script(outcomes=["safe"] * 1000)
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "unsafe"
events = ["unsafe_content"]
sinks = ["hook"]
group_seconds = 0
""",
    )
    app = await daemon.start(stream_toml("quiet", url), extra=extra)
    await daemon.wait(lambda: daemon.state("quiet").task_id is not None)
    task_id = daemon.state("quiet").task_id

    def broken(outcome: object) -> None:
        raise ValueError("Counters can only be incremented by non-negative amounts.")

    monkeypatch.setattr(app.metrics, "callback", broken)
    body = {
        "task_id": task_id,
        "data": {
            "status": 0,
            "data": {"segment_index": 90_000, "content_moderation": {"has_unsafe_content": True}},
        },
    }
    assert app.server is not None
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            resp = await s.post(app.server.callback_url(), json=body)
    assert resp.status == 200
    async with asyncio.timeout(10):
        await f.wait(lambda: bool(f.received["webhook"]))
    alerts = await hook_alerts(f)
    assert [(a["kind"], a["segment_index"]) for a in alerts] == [("unsafe_content", 90_000)]
    failed = [e for e in logs if e["event"] == "callback.after_commit_failed"]
    assert failed
    assert failed[0]["step"] == "metrics"
    errors = app.registry.get_sample_value("streamwatch_callback_errors_total", {"step": "metrics"})
    assert errors is not None
    assert errors >= 1


async def test_an_open_condition_is_resolved_after_a_restart_and_nothing_repeats(
    daemon, emulator, fakes
):
    """A stream that stopped (15) before a daemon restart is resolved when the next process
    starts its next task, and the firing is not sent again: alert memory is in the state file,
    not in the process."""
    f, base = fakes
    url = "rtmp://cams.test/flaky"
    emulator.scripts[url] = Script(outcomes=["safe", "safe"], then="end:15")
    extra = alerting(
        daemon,
        base,
        """
[[alerts.rules]]
name = "stops"
events = ["stream_stopped"]
sinks = ["hook"]
cooldown_seconds = 3600
group_seconds = 0
""",
    )
    daemon.write(stream_toml("flaky", url), extra=extra)
    # A long backoff: the stopped stream waits for the restart instead of restarting itself.
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(
        text.replace("restart_initial_seconds = 0.05", "restart_initial_seconds = 600").replace(
            "restart_max_seconds = 0.2", "restart_max_seconds = 600"
        )
    )
    await daemon.start()
    await daemon.wait(lambda: daemon.state("flaky").last_end_status == 15)
    async with asyncio.timeout(10):
        await f.wait(lambda: bool(f.received["webhook"]))
    await daemon.stop()
    emulator.scripts[url] = Script(outcomes=["safe"] * 1000)
    await daemon.start()
    # The backoff survives the restart too: release the stream as an operator would.
    assert await daemon.sup.resume(["flaky"]) == ["flaky"]
    await daemon.wait(lambda: daemon.state("flaky").run_segments >= 3)
    async with asyncio.timeout(10):
        await f.wait(lambda: len(f.received["webhook"]) >= 2)
    assert daemon.app is not None
    assert daemon.app.alerts is not None
    await daemon.app.alerts.settle()
    alerts = await hook_alerts(f)
    assert [(a["kind"], a["resolved"]) for a in alerts] == [
        ("stream_stopped", False),
        ("stream_stopped", True),
    ]
