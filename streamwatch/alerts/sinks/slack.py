"""Slack incoming webhooks: Block Kit, kept far below Slack's limits (50 blocks, 3,000
characters a section, whole messages rejected well under the documented 40k).

Every text from an event is escaped for Slack (``&``, ``<``, ``>``), so a logo named
``<!channel>`` or ``<https://evil|click>`` shows as written and pings or links nobody; the
clip button appears only for an http(s) URL."""

from __future__ import annotations

import json
from collections.abc import Mapping

from streamwatch.alerts.events import AlertEvent
from streamwatch.alerts.sinks import Alert, HttpSink, escape_event, truncate

__all__ = ["SlackSink"]

ICON = {
    "critical": ":red_circle:",
    "warning": ":large_orange_circle:",
    "info": ":information_source:",
}
MAX_ALERTS = 10  # 4 blocks each plus header and footer stays under 50
SECTION_LIMIT = 2900
# Slack rejects whole messages far below its documented 40k (reports say ~13k): share a
# budget across the sections.
TEXT_BUDGET = 9000
FIELD_LIMIT = 1900


def mrkdwn(text: str) -> str:
    """`text` escaped as Slack asks: control sequences (mentions, links) start with ``<``."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fields(event: AlertEvent) -> list[str]:
    out = []
    if event.stream:
        out.append(f"*Stream*\n{event.stream}")
    if event.start_time is not None and event.end_time is not None:
        out.append(f"*Segment*\n{event.start_time:g} to {event.end_time:g} s")
    if event.logos:
        out.append(f"*Logos*\n{', '.join(event.logos)}")
    out.append(f"*Severity*\n{event.severity}")
    return [truncate(f, FIELD_LIMIT) for f in out]


class SlackSink(HttpSink):
    kind = "slack"
    max_body = 12_000  # Slack refuses whole messages from about 13k
    too_large_markers = ("msg_too_long", "msg_blocks_too_long")

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        alerts = [Alert(a.alert_id, escape_event(a.event, mrkdwn)) for a in alerts]
        first = alerts[0].event
        state = "resolved" if first.resolved else first.severity
        title = first.title if len(alerts) == 1 else f"{len(alerts)} alerts: {first.title}"
        blocks: list[dict[str, object]] = [
            {
                "type": "header",
                "text": {"type": "plain_text", "text": truncate(f"{title} ({state})", 150)},
            }
        ]
        shown = alerts[:MAX_ALERTS]
        per_section = min(SECTION_LIMIT, TEXT_BUDGET // len(shown))
        for alert in shown:
            e = alert.event
            icon = ":large_green_circle:" if e.resolved else ICON[e.severity]
            blocks.append(
                {
                    "type": "section",
                    "text": {
                        "type": "mrkdwn",
                        "text": truncate(f"{icon} *{e.title}*\n{e.text}", per_section),
                    },
                    "fields": [{"type": "mrkdwn", "text": f} for f in _fields(e)],
                }
            )
            if e.clip_url:
                blocks.append(
                    {
                        "type": "actions",
                        "elements": [
                            {
                                "type": "button",
                                "text": {"type": "plain_text", "text": "Open clip"},
                                "url": e.clip_url,  # http(s) only, <= 2,000: clamp()
                            }
                        ],
                    }
                )
            if e.labels:
                labels = ", ".join(f"{k}={v}" for k, v in sorted(e.labels.items()))
                blocks.append(
                    {
                        "type": "context",
                        "elements": [{"type": "mrkdwn", "text": truncate(labels, 2000)}],
                    }
                )
        if len(alerts) > MAX_ALERTS:
            blocks.append(
                {
                    "type": "context",
                    "elements": [
                        {"type": "mrkdwn", "text": f"…and {len(alerts) - MAX_ALERTS} more"}
                    ],
                }
            )
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"alert {alerts[0].alert_id}"}],
            }
        )
        doc = {"text": truncate(title, 500), "blocks": blocks}
        return json.dumps(doc, ensure_ascii=False).encode(), {}
