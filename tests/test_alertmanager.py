"""Alerts through a real Prometheus Alertmanager on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from streamwatch.alerts import Router
from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.alerts.sinks.alertmanager import AlertmanagerSink
from streamwatch.store import Location, Store
from tests.conftest import free_port, tool
from tests.test_alerts import event, rule

CONFIG = """
route:
  receiver: "null"
  group_by: ["alertname", "stream"]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


SHIPPED = Path(__file__).parent.parent / "deploy" / "alertmanager" / "alertmanager.yml"


@pytest.fixture
async def alertmanager(tmp_path: Path) -> AsyncIterator[str]:
    (tmp_path / "am.yml").write_text(CONFIG)
    async with running_alertmanager(tmp_path / "am.yml", tmp_path) as base:
        yield base


@contextlib.asynccontextmanager
async def running_alertmanager(config: Path, tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        tool("prometheus-alertmanager", "alertmanager"),
        f"--config.file={config}",
        f"--storage.path={tmp_path / 'am'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        stdout=PIPE,
        stderr=PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s, asyncio.timeout(20):
            while True:  # another process: poll its readiness endpoint
                try:
                    async with s.get(f"{base}/-/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        await proc.communicate()


async def active(base: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/api/v2/alerts") as resp:
        doc: list[dict[str, Any]] = await resp.json()
        return doc


async def test_alertmanager_receives_groups_and_resolves(alertmanager, location: Location):
    """A lasting condition stays active (and is re-posted) until resolved; a one-off event is
    listed too; amtool sees them; a resolution clears the condition."""
    async with aiohttp.ClientSession() as session, Store(location) as store:
        sink = AlertmanagerSink(
            name="am",
            url=SecretStr(alertmanager),
            session=session,
            timeout_seconds=5,
            repeat_seconds=0.01,
        )
        outbox = Outbox(
            store=store, sinks={"am": sink}, retry_initial=0.01, retry_max=0.05, poll_seconds=0.05
        )
        alerts = Alerts(router=Router([rule(sinks=["am"])]), outbox=outbox, store=store)
        async with outbox.running():

            async def flush() -> None:
                await alerts.settle()
                await outbox.deliver_due()
                await outbox.settle()

            now = time.time()  # Alertmanager compares startsAt/endsAt with its own clock
            alerts.emit(event(kind="stream_stalled", severity="warning", stream="cam", at=now))
            alerts.emit(
                event(
                    kind="unsafe_content", stream="cam", at=now, clip_url="https://cdn.test/1.mp4"
                )
            )
            await flush()
            listed = await active(alertmanager)
            names = sorted(a["labels"]["alertname"] for a in listed)
            assert names == ["streamwatch_stream_stalled", "streamwatch_unsafe_content"]
            stalled = next(a for a in listed if a["labels"]["alertname"].endswith("stalled"))
            assert stalled["labels"]["stream"] == "cam"
            assert stalled["labels"]["severity"] == "warning"
            assert stalled["labels"]["label_site"] == "paris"
            assert sink.active, "the lasting condition is kept for re-posting"
            await outbox.repost_due()
            assert (await sink.repost_active()) is not None

            amtool = tool("amtool")
            proc = await asyncio.create_subprocess_exec(
                amtool,
                "alert",
                "query",
                f"--alertmanager.url={alertmanager}",
                "-o",
                "json",
                stdout=PIPE,
                stderr=PIPE,
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert len(json.loads(out)) == 2

            async with session.get(f"{alertmanager}/api/v2/alerts/groups") as resp:
                groups = await resp.json()
            assert {tuple(sorted(g["labels"].items())) for g in groups} == {
                (("alertname", "streamwatch_stream_stalled"), ("stream", "cam")),
                (("alertname", "streamwatch_unsafe_content"), ("stream", "cam")),
            }

            alerts.emit(
                event(
                    kind="stream_stalled",
                    severity="info",
                    stream="cam",
                    resolved=True,
                    at=time.time(),
                )
            )
            await flush()
            names = [a["labels"]["alertname"] for a in await active(alertmanager)]
            assert names == ["streamwatch_unsafe_content"]
            assert not sink.active


async def test_shipped_config_pages_for_a_balance_halt_not_for_each_stream(tmp_path: Path):
    """deploy/alertmanager/alertmanager.yml: while the account is halted, the streams' "stopped"
    alerts (from the daemon's sink) and "down" alerts (from the Prometheus rules) are inhibited;
    the halt itself is not."""
    async with (
        running_alertmanager(SHIPPED, tmp_path) as base,
        aiohttp.ClientSession() as session,
        Store(tmp_path / "s.db") as store,
    ):
        sink = AlertmanagerSink(
            name="am", url=SecretStr(base), session=session, timeout_seconds=5, repeat_seconds=60
        )
        outbox = Outbox(
            store=store, sinks={"am": sink}, retry_initial=0.01, retry_max=0.05, poll_seconds=0.05
        )
        alerts = Alerts(router=Router([rule(sinks=["am"])]), outbox=outbox, store=store)
        async with outbox.running():
            now = time.time()
            alerts.emit(event(kind="balance_halt", stream=None, at=now))
            alerts.emit(event(kind="stream_stopped", severity="warning", stream="cam", at=now))
            await alerts.settle()
            await outbox.deliver_due()
            await outbox.settle()
        down = [{"labels": {"alertname": "StreamwatchStreamDown", "stream": "cam2"}}]
        async with session.post(f"{base}/api/v2/alerts", json=down) as resp:
            assert resp.status == 200
        states = {a["labels"]["alertname"]: a["status"]["state"] for a in await active(base)}
        assert states == {
            "streamwatch_balance_halt": "active",
            "streamwatch_stream_stopped": "suppressed",
            "StreamwatchStreamDown": "suppressed",
        }


async def test_active_conditions_outlive_the_process(alertmanager, location: Location):
    """What the sink keeps active is in the state file: the next process re-posts a condition
    that is still open and resolves it with the labels it was posted with (its severity
    included), so Alertmanager does not keep it firing until its resolve_timeout."""
    now = time.time()
    async with aiohttp.ClientSession() as session:

        def sink() -> AlertmanagerSink:
            return AlertmanagerSink(
                name="am", url=SecretStr(alertmanager), session=session, timeout_seconds=5
            )

        async with Store(location) as store:
            outbox = Outbox(
                store=store, sinks={"am": sink()}, retry_initial=1, retry_max=1, poll_seconds=1
            )
            alerts = Alerts(router=Router([rule(sinks=["am"])]), outbox=outbox, store=store)
            async with outbox.running():
                alerts.emit(event(kind="stream_stopped", severity="critical", stream="cam", at=now))
                await alerts.settle()
                await outbox.deliver_due()
                await outbox.settle()
        (firing,) = await active(alertmanager)
        assert firing["labels"]["severity"] == "critical"

        async with Store(location) as store:  # the next process
            again = sink()
            outbox = Outbox(
                store=store, sinks={"am": again}, retry_initial=1, retry_max=1, poll_seconds=1
            )
            alerts = Alerts(router=Router([rule(sinks=["am"])]), outbox=outbox, store=store)
            async with outbox.running():
                assert list(again.active) == ["stream_stopped:cam"]
                reposted = await again.repost_active()
                assert reposted is not None
                assert reposted.ok
                alerts.emit(
                    event(
                        kind="stream_stopped",
                        severity="info",
                        stream="cam",
                        resolved=True,
                        at=time.time(),
                    )
                )
                await alerts.settle()
                await outbox.deliver_due()
                await outbox.settle()
            assert again.active == {}
            assert await store.active_alerts("am") == {}
    assert await active(alertmanager) == [], "resolved: the same labels as the firing"
