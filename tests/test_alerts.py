"""Alerts: routing rules, the durable outbox, and delivery to fake chat services."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from streamwatch.alerts import AlertEvent, Router
from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.alerts.rules import Condition, Routed, RuleState, Window
from streamwatch.alerts.sinks import HttpSink
from streamwatch.alerts.sinks.discord import DiscordSink
from streamwatch.alerts.sinks.slack import SlackSink
from streamwatch.alerts.sinks.teams import TeamsSink
from streamwatch.alerts.sinks.webhook import WebhookSink
from streamwatch.config import AlertRule
from streamwatch.store import Store
from tests.fakes.chat import Answer, ChatFakes
from tests.fakes.serve import serve

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def event(kind: str = "unsafe_content", stream: str | None = "lobby", **kw: object) -> AlertEvent:
    fields: dict[str, object] = {
        "severity": "critical",
        "title": f"Unsafe content on {stream}",
        "text": "segment 12",
        "at": 1_800_000_000.0,
        "stream": stream,
        "labels": {"site": "paris"},
    }
    fields.update(kw)
    return AlertEvent(kind=kind, **fields)  # type: ignore[arg-type]


def rule(**kw: object) -> AlertRule:
    fields: dict[str, object] = {
        "name": "r",
        "sinks": ["s"],
        "cooldown_seconds": 0,
        "group_seconds": 0,
    }
    fields.update(kw)
    return AlertRule.model_validate(fields)


# -- routing ------------------------------------------------------------------------------------


class Routing:
    """The pure router with its state carried from call to call, as the store carries it."""

    def __init__(self, rules: list[AlertRule]) -> None:
        self.router = Router(rules)
        self.state = RuleState()
        self.suppressed = 0
        self._ids = itertools.count(1)

    def route(self, ev: AlertEvent, now: float) -> list[Routed]:
        decision = self.router.route(ev, now, self.state, new_id=lambda: f"a{next(self._ids)}")
        self.state = self.state.updated(decision)
        self.suppressed += decision.suppressed
        return decision.routed


@pytest.mark.parametrize(
    ("rule_fields", "ev", "routed"),
    [
        ({}, event(), True),
        ({"events": ["logo_detected"]}, event(), False),
        ({"streams": ["lob*"]}, event(), True),
        ({"streams": ["hall-*"]}, event(), False),
        ({"streams": ["lob*"]}, event(stream=None), False),
        ({"labels": {"site": "paris"}}, event(), True),
        ({"labels": {"site": "oslo"}}, event(), False),
        ({"min_severity": "critical"}, event(severity="warning"), False),
        ({"min_severity": "warning"}, event(severity="critical"), True),
        ({"min_consecutive": 3}, event(consecutive=2), False),
        ({"min_consecutive": 3}, event(consecutive=3), True),
    ],
)
def test_rules_match(rule_fields, ev, routed):
    """A rule selects events by kind, stream glob, labels, severity and streak length."""
    assert bool(Routing([rule(**rule_fields)]).route(ev, 0.0)) == routed


def test_cooldown_per_rule_and_subject():
    """Within the cooldown the same subject is not sent again; another stream is."""
    router = Routing([rule(cooldown_seconds=60)])
    assert router.route(event(), 0.0)
    assert not router.route(event(), 30.0)
    assert router.route(event(stream="hall"), 30.0)
    assert router.route(event(), 61.0)
    assert router.suppressed == 1


def test_resolution_only_after_a_firing_and_only_if_wanted():
    """A resolution goes out once, only for what was alerted, only with send_resolved."""
    router = Routing([rule()])
    assert not router.route(event(kind="stream_stalled", resolved=True), 0.0)
    assert router.route(event(kind="stream_stalled"), 1.0)
    assert router.route(event(kind="stream_stalled", resolved=True), 2.0)
    assert not router.route(event(kind="stream_stalled", resolved=True), 3.0)
    quiet = Routing([rule(send_resolved=False)])
    quiet.route(event(kind="stream_stalled"), 0.0)
    assert not quiet.route(event(kind="stream_stalled", resolved=True), 1.0)


def test_grouping_window_folds_a_burst():
    """Events within group_seconds share one group and wait until the window closes."""
    router = Routing([rule(group_seconds=10)])
    a = router.route(event(stream="a"), 100.0)[0]
    b = router.route(event(stream="b"), 105.0)[0]
    c = router.route(event(stream="c"), 111.0)[0]
    assert a.group == b.group != c.group
    assert a.send_after == b.send_after == 110.0


def test_routing_is_a_pure_function_of_event_time_and_state():
    """route() reads only the state it is given (the keys keys() names) and changes nothing:
    the same inputs give the same decision, and the changes come back to be stored."""
    router = Router([rule(name="r", cooldown_seconds=60, group_seconds=10, sinks=["s", "t"])])
    ev = event()
    assert router.keys(ev) == ([("r", "unsafe_content:lobby")], [("r", "s"), ("r", "t")])
    state = RuleState(
        {("r", "unsafe_content:lobby"): Condition(last_sent=0.0, open=True)},
        {("r", "s"): Window("r:s:old", 75.0)},
    )
    ids = itertools.count()
    first = router.route(ev, 70.0, state, new_id=lambda: f"x{next(ids)}")
    ids = itertools.count()
    again = router.route(ev, 70.0, state, new_id=lambda: f"x{next(ids)}")
    assert first == again
    assert state.conditions == {("r", "unsafe_content:lobby"): Condition(0.0, True)}
    assert [(r.sink, r.group, r.send_after) for r in first.routed] == [
        ("s", "r:s:old", 75.0),
        ("t", "r:t:x1", 80.0),
    ]
    assert first.conditions == {("r", "unsafe_content:lobby"): Condition(70.0, True)}
    assert first.windows == {("r", "t"): Window("r:t:x1", 80.0)}
    held = router.route(ev, 30.0, state, new_id=lambda: "y")
    assert (held.routed, held.conditions, held.suppressed) == ([], {}, 1)


def test_routed_events_are_bounded_in_size():
    """Whatever a callback or an error carried, the event written to the outbox stays small."""
    huge = event(
        title="T" * 100_000,
        text="x" * 5_000_000,
        logos=tuple("L" * 10_000 + str(i) for i in range(5_000)),
        clip_url="https://cdn.test/" + "c" * 100_000,
    )
    (routed,) = Routing([rule()]).route(huge, 0.0)
    assert len(json.dumps(routed.event.to_json())) < 10_000
    assert routed.event.clip_url is None
    assert len(routed.event.logos) == 20


# -- delivery -------------------------------------------------------------------------------------


@dataclass
class Rig:
    fakes: ChatFakes
    store: Store
    outbox: Outbox
    alerts: Alerts
    sinks: dict[str, HttpSink]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    fakes = ChatFakes(SECRET)
    async with (
        serve(fakes.app) as base,
        aiohttp.ClientSession() as session,
        Store(tmp_path / "s.db") as store,
    ):
        common: dict[str, Any] = {"session": session, "timeout_seconds": 0.5, "max_attempts": 4}
        sinks: dict[str, HttpSink] = {
            "slack": SlackSink(name="slack", url=SecretStr(f"{base}/slack"), **common),
            "discord": DiscordSink(name="discord", url=SecretStr(f"{base}/discord"), **common),
            "teams": TeamsSink(name="teams", url=SecretStr(f"{base}/teams"), **common),
            "hook": WebhookSink(
                name="hook", url=SecretStr(f"{base}/webhook"), secret=SecretStr(SECRET), **common
            ),
        }
        outbox = Outbox(
            store=store, sinks=sinks, retry_initial=0.01, retry_max=0.05, poll_seconds=0.05
        )
        router = Router([rule(name="all", sinks=list(sinks))])
        alerts = Alerts(router=router, outbox=outbox, store=store)
        worker = asyncio.create_task(outbox.run())
        yield Rig(fakes, store, outbox, alerts, sinks)
        await outbox.stop()
        await worker


async def delivered(rig: Rig, n: int = 1) -> None:
    async with asyncio.timeout(10):
        await rig.fakes.wait(lambda: all(len(v) >= n for v in rig.fakes.received.values()))
        await rig.alerts.settle()


async def test_each_sink_gets_a_valid_native_message(rig):
    """Slack blocks, Discord embeds and a signed webhook arrive within the services' limits."""
    rig.alerts.emit(
        event(logos=("Acme",), start_time=60.0, end_time=65.0, clip_url="https://cdn.test/12.mp4")
    )
    await delivered(rig)
    assert rig.fakes.invalid == []
    slack = rig.fakes.received["slack"][0]["doc"]
    assert slack["blocks"][0]["type"] == "header"
    assert any("Acme" in f["text"] for b in slack["blocks"] for f in b.get("fields", []))
    discord = rig.fakes.received["discord"][0]["doc"]["embeds"][0]
    assert discord["color"] == 0xD93025
    hook = rig.fakes.received["webhook"][0]
    assert hook["doc"]["data"]["alerts"][0]["logos"] == ["Acme"]
    assert hook["headers"]["webhook-id"] == hook["doc"]["data"]["alerts"][0]["id"]


async def test_failures_are_retried_until_delivered_exactly_once(rig):
    """500s, a timeout and a 429 with Retry-After are retried; each sink gets it once."""
    rig.fakes.script["slack"] = [Answer(500), Answer(429, headers={"Retry-After": "0"})]
    rig.fakes.script["discord"] = [Answer(429, body={"retry_after": 0.01, "global": False})]
    rig.fakes.script["webhook"] = [Answer(200, delay=1.0)]  # times out at 0.5 s
    rig.alerts.emit(event())
    await delivered(rig)
    await asyncio.sleep(0)
    assert {k: len(v) for k, v in rig.fakes.received.items()} == {
        "slack": 1,
        "discord": 1,
        "teams": 1,
        "webhook": 1,
    }
    rows = await rig.store.recent_alerts()
    assert {r.sink: r.attempts for r in rows} == {"slack": 3, "discord": 2, "teams": 1, "hook": 2}
    assert {r.state for r in rows} == {"delivered"}


async def test_retry_after_is_honoured(rig):
    """A 429's Retry-After pushes the next attempt at least that far out."""
    rig.fakes.script["slack"] = [Answer(429, headers={"Retry-After": "30"})]
    rig.alerts.emit(event())
    async with asyncio.timeout(10):
        await rig.fakes.wait(lambda: rig.fakes.attempts["slack"] >= 1)
        await rig.alerts.settle()
    row = next(r for r in await rig.store.recent_alerts() if r.sink == "slack")
    assert row.state == "pending"
    assert row.next_at - row.created_at >= 29


async def test_permanent_refusal_and_exhaustion_dead_letter(rig):
    """410 is final at once; repeated 500s end in the dead-letter state after max_attempts."""
    rig.fakes.script["slack"] = [Answer(410)]
    rig.fakes.script["discord"] = [Answer(500)] * 10
    rig.alerts.emit(event())
    async with asyncio.timeout(10):
        await rig.fakes.wait(lambda: rig.fakes.attempts["discord"] >= 4)
        await rig.alerts.settle()
        while {r.sink: r.state for r in await rig.store.recent_alerts()}.get("discord") != "dead":
            await rig.alerts.settle()
            await asyncio.sleep(0.01)
    rows = {r.sink: r for r in await rig.store.recent_alerts()}
    assert rows["teams"].state == "delivered", "a Workflows 202 with an empty body is success"
    assert (rows["slack"].state, rows["slack"].attempts) == ("dead", 1)
    assert (rows["discord"].state, rows["discord"].attempts) == ("dead", 4)
    assert rows["discord"].last_error is not None
    assert "/discord" not in rows["discord"].last_error, "sink URLs are secrets"
    assert rows["hook"].state == "delivered"


async def test_a_burst_is_one_message_per_sink(rig):
    """A grouping window folds many alerts into one message, within each service's limits."""
    rig.alerts.router = Router([rule(name="all", sinks=list(rig.sinks), group_seconds=0.3)])
    for i in range(40):
        rig.alerts.emit(event(stream=f"cam-{i}", text="x" * 3000))
    await delivered(rig)
    assert rig.fakes.invalid == []
    assert {k: len(v) for k, v in rig.fakes.received.items()} == {
        "slack": 1,
        "discord": 1,
        "teams": 1,
        "webhook": 1,
    }
    assert len(rig.fakes.received["webhook"][0]["doc"]["data"]["alerts"]) == 40
    assert "more" in rig.fakes.received["discord"][0]["doc"]["content"]


async def test_pending_alerts_survive_a_restart(tmp_path: Path):
    """Alerts written to the outbox while every sink is down are delivered by the next
    process's worker."""
    fakes = ChatFakes(SECRET)
    async with serve(fakes.app) as base, aiohttp.ClientSession() as session:
        sink = SlackSink(
            name="slack",
            url=SecretStr(f"{base}/slack"),
            session=session,
            timeout_seconds=0.5,
            max_attempts=10,
        )
        async with Store(tmp_path / "s.db") as store:
            fakes.script["slack"] = [Answer(503)]
            outbox = Outbox(
                store=store,
                sinks={"slack": sink},
                retry_initial=60,
                retry_max=60,
                poll_seconds=0.05,
            )
            alerts = Alerts(router=Router([rule(sinks=["slack"])]), outbox=outbox, store=store)
            alerts.emit(event())
            await alerts.settle()
            await outbox.deliver_due()
            await outbox.settle()
        assert fakes.received["slack"] == []
        async with Store(tmp_path / "s.db") as store:  # the next process, an hour later
            outbox = Outbox(
                store=store,
                sinks={"slack": sink},
                retry_initial=0.01,
                retry_max=0.01,
                poll_seconds=0.05,
                clock=lambda: 4e9,
            )
            await outbox.deliver_due()
            await outbox.settle()
            rows = await store.recent_alerts()
    assert len(fakes.received["slack"]) == 1
    assert rows[0].state == "delivered"


async def test_apprise_sink_delivers_through_apprise(tmp_path: Path):
    """An Apprise URL (here its generic json:// notifier, pointed at loopback) gets the alert."""
    from streamwatch.alerts.sinks.apprise import AppriseSink

    fakes = ChatFakes(SECRET, services=("apprise",))
    async with serve(fakes.app) as base, Store(tmp_path / "s.db") as store:
        target = base.replace("http://", "json://") + "/apprise"
        sink = AppriseSink(name="many", url=SecretStr(target), max_attempts=3)
        outbox = Outbox(
            store=store, sinks={"many": sink}, retry_initial=0.01, retry_max=0.05, poll_seconds=0.05
        )
        alerts = Alerts(router=Router([rule(sinks=["many"])]), outbox=outbox, store=store)
        alerts.emit(event(clip_url="https://cdn.test/9.mp4"))
        await alerts.settle()
        await outbox.deliver_due()
        await outbox.settle()
        rows = await store.recent_alerts()
    assert rows[0].state == "delivered"
    doc = fakes.received["apprise"][0]["doc"]
    assert doc["title"] == "Unsafe content on lobby"
    assert "https://cdn.test/9.mp4" in doc["message"]
    assert rows[0].alert_id in doc["message"]


def test_apprise_rejects_urls_it_does_not_know():
    """A misspelt Apprise URL fails at start, not at the first alert."""
    from streamwatch.alerts.sinks.apprise import AppriseSink

    with pytest.raises(ValueError, match="does not understand"):
        AppriseSink(name="x", url=SecretStr("nosuchscheme://whatever"))
