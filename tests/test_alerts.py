"""Alerts: routing rules, the durable outbox, and delivery to fake chat services."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
from pydantic import SecretStr

from streamwatch.alerts import AlertEvent, Router
from streamwatch.alerts.events import LIMITS
from streamwatch.alerts.outbox import Alerts, Outbox
from streamwatch.alerts.rules import Condition, Routed, RuleState, Window
from streamwatch.alerts.sinks import HttpSink, safe_link
from streamwatch.alerts.sinks.alertmanager import AlertmanagerSink
from streamwatch.alerts.sinks.apprise import AppriseSink
from streamwatch.alerts.sinks.discord import DiscordSink
from streamwatch.alerts.sinks.registry import KINDS, build_sinks
from streamwatch.alerts.sinks.slack import SlackSink
from streamwatch.alerts.sinks.teams import TeamsSink
from streamwatch.alerts.sinks.webhook import WebhookSink
from streamwatch.background import hosted
from streamwatch.config import AlertRule, AlertSink
from streamwatch.store import Location, Store
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
    assert len(routed.event.logos) == LIMITS.logos == 20


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
        # A fixture's set-up and teardown are two tasks: the outbox's group lives in its own.
        async with hosted(outbox.running()):
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


async def test_pending_alerts_survive_a_restart(location: Location):
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
        async with Store(location) as store:
            fakes.script["slack"] = [Answer(503)]
            outbox = Outbox(
                store=store,
                sinks={"slack": sink},
                retry_initial=60,
                retry_max=60,
                poll_seconds=0.05,
            )
            alerts = Alerts(router=Router([rule(sinks=["slack"])]), outbox=outbox, store=store)
            async with outbox.running():
                alerts.emit(event())
                await alerts.settle()
                await outbox.deliver_due()
                await outbox.settle()
        assert fakes.received["slack"] == []
        async with Store(location) as store:  # the next process, an hour later
            outbox = Outbox(
                store=store,
                sinks={"slack": sink},
                retry_initial=0.01,
                retry_max=0.01,
                poll_seconds=0.05,
                clock=lambda: 4e9,
            )
            async with outbox.running():
                await outbox.deliver_due()
                await outbox.settle()
            rows = await store.recent_alerts()
    assert len(fakes.received["slack"]) == 1
    assert rows[0].state == "delivered"


async def test_apprise_sink_delivers_through_apprise(location: Location):
    """An Apprise URL (here its generic json:// notifier, pointed at loopback) gets the alert."""
    from streamwatch.alerts.sinks.apprise import AppriseSink

    fakes = ChatFakes(SECRET, services=("apprise",))
    async with serve(fakes.app) as base, Store(location) as store:
        target = base.replace("http://", "json://") + "/apprise"
        sink = AppriseSink(name="many", url=SecretStr(target), max_attempts=3)
        outbox = Outbox(
            store=store, sinks={"many": sink}, retry_initial=0.01, retry_max=0.05, poll_seconds=0.05
        )
        alerts = Alerts(router=Router([rule(sinks=["many"])]), outbox=outbox, store=store)
        async with outbox.running():
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


# -- hostile text, links, sizes -------------------------------------------------------------------

HOSTILE = (
    "<!channel> <!here> <!everyone> <@U024BE7LH> <#C024BE7LR> <https://evil.test|your bank>"
    " @everyone @here [click](https://evil.test) [js](javascript:alert(1)) **bold** _it_"
    " {{DATE(2017-02-14T06:00:00Z)}} & done\n- item\n1. item"
)


def strings(doc: Any) -> list[str]:
    """Every string in a JSON document."""
    if isinstance(doc, str):
        return [doc]
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return []


async def test_hostile_text_is_shown_not_obeyed(rig):
    """Logo names and texts from callbacks cannot mention, link or format in chat: Slack gets
    &, <, > escaped everywhere, Discord allows no mentions and escapes markdown, Teams escapes
    card markdown; a javascript: clip URL gives no button; the webhook carries the raw text."""
    rig.alerts.emit(
        event(
            title=f"Logo on lobby: {HOSTILE}",
            text=HOSTILE,
            logos=(HOSTILE, "<!subteam^S123>"),
            labels={"site": "<!here>"},
            clip_url="javascript:alert(1)",
        )
    )
    await delivered(rig)
    assert rig.fakes.invalid == []
    slack = rig.fakes.received["slack"][0]["doc"]
    for text in strings(slack):
        assert "<" not in text, text
        assert ">" not in text, text
    assert any("&lt;!channel&gt;" in t for t in strings(slack))
    assert any("&lt;https://evil.test|your bank&gt;" in t for t in strings(slack))
    assert not [b for b in slack["blocks"] if b["type"] == "actions"]

    discord = rig.fakes.received["discord"][0]["doc"]
    assert discord["allowed_mentions"] == {"parse": []}
    embed = discord["embeds"][0]
    assert "url" not in embed
    for text in [embed["title"], embed["description"], *(f["value"] for f in embed["fields"])]:
        assert "@everyone" not in text.replace("\\@everyone", "")
        assert "[click](" not in text
        assert "**bold**" not in text
        assert "<@" not in text
    assert "\\[click\\]\\(https\\://evil.test\\)" in embed["description"]

    card = rig.fakes.received["teams"][0]["doc"]["attachments"][0]["content"]
    assert "actions" not in card
    for text in strings(card["body"]):
        assert "[click](" not in text
        assert "**bold**" not in text
        assert "{{DATE(" not in text
        assert "\n- item" not in text
    assert any("\\[click\\]\\(https://evil.test\\)" in t for t in strings(card["body"]))

    hook = rig.fakes.received["webhook"][0]["doc"]["data"]["alerts"][0]
    assert hook["text"] == HOSTILE
    assert hook["clip_url"] is None


async def test_links_are_http_only_and_carry_no_credentials(rig):
    """A clip link keeps to http(s) and loses any user:password before it reaches a chat."""
    rig.alerts.emit(event(clip_url="https://user:s3cret@cdn.test/12.mp4?sig=abc"))
    await delivered(rig)
    slack = rig.fakes.received["slack"][0]["doc"]
    button = next(b for b in slack["blocks"] if b["type"] == "actions")["elements"][0]
    assert button["url"] == "https://cdn.test/12.mp4?sig=abc"
    assert rig.fakes.received["discord"][0]["doc"]["embeds"][0]["url"] == button["url"]
    card = rig.fakes.received["teams"][0]["doc"]["attachments"][0]["content"]
    assert card["actions"][0]["url"] == button["url"]
    assert (
        rig.fakes.received["webhook"][0]["doc"]["data"]["alerts"][0]["clip_url"] == (button["url"])
    )
    for service in ("slack", "discord", "teams", "webhook"):
        assert "s3cret" not in json.dumps(rig.fakes.received[service][0]["doc"])


def burst(rig: Rig, n: int, **fields: Any) -> None:
    """Emit `n` alerts that fold into one group per sink."""
    rig.alerts.router = Router([rule(name="all", sinks=list(rig.sinks), group_seconds=0.3)])
    for i in range(n):
        rig.alerts.emit(event(stream=f"cam-{i}", **fields))


async def states(rig: Rig) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in await rig.store.recent_alerts(limit=1000):
        out.setdefault(row.sink, []).append(row.state)
    return out


async def until_final(rig: Rig, sink: str, n: int) -> list[str]:
    """The states of `sink`'s alerts once `n` of them are delivered or dead."""
    async with asyncio.timeout(10):
        while True:
            changed = rig.fakes.changed
            await rig.alerts.settle()
            found = (await states(rig)).get(sink, [])
            if len([s for s in found if s != "pending"]) >= n:
                return found
            await changed.wait()


async def test_one_huge_alert_does_not_sink_its_group(rig):
    """Every field is cut to its documented limit before sending, so one enormous alert in a
    group of small ones still goes out with the rest (the receiver takes 64 KB)."""
    rig.fakes.max_body["webhook"] = 64_000
    burst(rig, 40)
    rig.alerts.emit(
        event(
            stream="cam-huge",
            title="T" * 100_000,
            text="x" * 1_000_000,
            logos=tuple(f"logo-{i}-" + "n" * 5000 for i in range(500)),
            labels={f"k{i}": "v" * 5000 for i in range(200)},
            clip_url="https://cdn.test/" + "p" * 10_000,
        )
    )
    assert set(await until_final(rig, "hook", 41)) == {"delivered"}
    assert rig.fakes.invalid == []
    (message,) = rig.fakes.received["webhook"]
    sent = message["doc"]["data"]["alerts"]
    assert len(sent) == 41
    huge = next(a for a in sent if a["stream"] == "cam-huge")
    assert len(huge["title"]) == 300
    assert len(huge["text"]) == 4000
    assert len(huge["logos"]) == 20
    assert max(len(n) for n in huge["logos"]) == 128
    assert len(huge["labels"]) == 30
    assert huge["clip_url"] is None, "a link longer than 2,000 characters is dropped, not cut"


async def test_a_group_refused_as_too_large_is_split_and_all_delivered(rig):
    """A 413 for the whole group makes the sink send halves until each fits; every alert
    arrives once, each message is signed and under the receiver's limit."""
    rig.fakes.max_body["webhook"] = 8_000
    burst(rig, 40, text="y" * 400)
    assert set(await until_final(rig, "hook", 40)) == {"delivered"}
    assert rig.fakes.invalid == []
    ids = [a["id"] for m in rig.fakes.received["webhook"] for a in m["doc"]["data"]["alerts"]]
    assert len(ids) == len(set(ids)) == 40
    assert len(rig.fakes.received["webhook"]) > 1


async def test_an_alert_too_large_even_cut_short_is_dead_alone(rig):
    """When one alert does not fit even cut to the hard limits, it alone is dead-lettered;
    the rest of its group is delivered."""
    rig.fakes.max_body["webhook"] = 1_500
    burst(rig, 6)
    rig.alerts.emit(event(stream="cam-big", labels={f"key{i:02}": "v" * 300 for i in range(30)}))
    await until_final(rig, "hook", 7)
    rows = [r for r in await rig.store.recent_alerts(limit=100) if r.sink == "hook"]
    dead = [r for r in rows if r.state == "dead"]
    assert len(dead) == 1
    assert dead[0].event["stream"] == "cam-big"
    assert dead[0].last_error is not None
    assert dead[0].last_error.startswith("too large even cut short")
    assert sorted(r.state for r in rows) == ["dead"] + ["delivered"] * 6


async def test_slack_groups_over_its_size_are_split_before_sending(rig):
    """A Slack group whose message would pass Slack's practical size limit is sent in parts
    that each pass, instead of being refused with msg_blocks_too_long."""
    burst(rig, 10, logos=tuple(f"brand-{i}-" + "z" * 190 for i in range(30)), text="t" * 900)
    assert set(await until_final(rig, "slack", 10)) == {"delivered"}
    assert rig.fakes.invalid == []
    assert len(rig.fakes.received["slack"]) > 1


@pytest.mark.parametrize(
    ("url", "link"),
    [
        ("https://cdn.test/a.mp4", "https://cdn.test/a.mp4"),
        ("http://cdn.test/a.mp4?x=1", "http://cdn.test/a.mp4?x=1"),
        ("https://u:p@cdn.test/a", "https://cdn.test/a"),
        ("javascript:alert(1)", None),
        ("JavaScript:alert(1)", None),
        ("data:text/html,<script>", None),
        ("vbscript:x", None),
        ("ftp://cdn.test/a", None),
        ("//cdn.test/a", None),
        ("https://cdn.test/a b", None),
        ("https://cdn.test/a>", None),
        ("https://cdn.test/" + "p" * 2000, None),
        ("", None),
        (None, None),
    ],
)
def test_only_http_links_reach_a_chat(url, link):
    """A clip link is kept only as an absolute http(s) URL without credentials, whitespace or
    angle brackets, and not cut (a cut link would point elsewhere)."""
    assert safe_link(url) == link


async def test_every_sink_type_the_config_accepts_is_built_by_its_kind():
    """The registry has a factory for each `type` a `[[alerts.sinks]]` entry may name, and
    `build_sinks` builds that kind's class with the entry's limits and secrets."""
    allowed = set(get_args(AlertSink.model_fields["type"].annotation))
    assert set(KINDS) == allowed
    configured = [
        AlertSink.model_validate(
            {
                "name": f"to-{kind}",
                "type": kind,
                "url": {"env": "URL"},
                "max_attempts": 3,
                **({"secret": {"env": "SECRET"}} if kind == "webhook" else {}),
            }
        )
        for kind in sorted(allowed)
    ]
    secrets = {
        s.name: (
            SecretStr("json://127.0.0.1:9/hook"),
            SecretStr("whsec_" + base64.b64encode(b"k" * 24).decode())
            if s.type == "webhook"
            else None,
        )
        for s in configured
    }
    async with aiohttp.ClientSession() as session:
        built = build_sinks(configured, secrets, session=session, clock=lambda: 0.0)
    assert {name: type(sink) for name, sink in built.items()} == {
        "to-alertmanager": AlertmanagerSink,
        "to-apprise": AppriseSink,
        "to-discord": DiscordSink,
        "to-slack": SlackSink,
        "to-teams": TeamsSink,
        "to-webhook": WebhookSink,
    }
    assert {sink.max_attempts for sink in built.values()} == {3}
