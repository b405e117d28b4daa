"""Sinks by kind: each `[[alerts.sinks]]` entry is built by the sink class its `type` names,
from one `SinkSpec` (every kind takes what it needs of it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import aiohttp
from pydantic import SecretStr

from streamwatch.alerts.sinks import Sink, SinkSpec
from streamwatch.alerts.sinks.alertmanager import AlertmanagerSink
from streamwatch.alerts.sinks.apprise import AppriseSink
from streamwatch.alerts.sinks.discord import DiscordSink
from streamwatch.alerts.sinks.slack import SlackSink
from streamwatch.alerts.sinks.teams import TeamsSink
from streamwatch.alerts.sinks.webhook import WebhookSink
from streamwatch.config import AlertSink

__all__ = ["KINDS", "build_sinks"]

KINDS: Mapping[str, Callable[[SinkSpec], Sink]] = {
    kind.kind: kind.build
    for kind in (SlackSink, DiscordSink, TeamsSink, WebhookSink, AlertmanagerSink, AppriseSink)
}
"""The factory of each kind of sink, by the `type` that names it in the config."""


def build_sinks(
    sinks: Iterable[AlertSink],
    secrets: Mapping[str, tuple[SecretStr, SecretStr | None]],
    *,
    session: aiohttp.ClientSession,
    clock: Callable[[], float],
) -> dict[str, Sink]:
    """One sink object per configured sink, with its secrets (`Secrets.sinks`)."""
    built: dict[str, Sink] = {}
    for sink in sinks:
        url, signing = secrets[sink.name]
        spec = SinkSpec(
            name=sink.name,
            url=url,
            session=session,
            timeout_seconds=sink.timeout_seconds,
            max_in_flight=sink.max_in_flight,
            max_attempts=sink.max_attempts,
            clock=clock,
            repeat_seconds=sink.repeat_seconds,
            secret=signing,
        )
        built[sink.name] = KINDS[sink.type](spec)
    return built
