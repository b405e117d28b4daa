"""Microsoft Teams through a Workflows webhook: one Adaptive Card per message. The retired
Office 365 connectors are not supported. A Workflows webhook answers 202 with an empty body
(accepted, not yet delivered); the payload must stay under about 28 KB.

Adaptive Card text is a CommonMark subset (bold, italic, lists, ``[title](url)`` links) with
``{{DATE()}}`` functions: every text from an event has those escaped with backslashes, so a
logo name cannot make a link or format the card; the clip button appears only for an http(s)
URL."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from streamwatch.alerts.sinks import Alert, HttpSink, escape_event, truncate

__all__ = ["TeamsSink"]

COLOUR = {"critical": "attention", "warning": "warning", "info": "accent"}
TEXT_BUDGET = 18_000  # characters of text across the card, far under the ~28 KB limit
MAX_ALERTS = 10
_MARKDOWN = re.compile(r"([\\*_~`\[\]()<>{}!#|])")
_LIST_START = re.compile(r"^(\s*)(\d+\.|[-+])(?=\s)", re.MULTILINE)


def escape_markdown(text: str) -> str:
    """`text` shown as written in an Adaptive Card TextBlock or Fact: markdown and template
    syntax escaped, list markers at a line start too."""
    return _LIST_START.sub(
        lambda m: m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1], _MARKDOWN.sub(r"\\\1", text)
    )


def _facts(alert: Alert) -> list[dict[str, str]]:
    e = alert.event
    facts = []
    if e.stream:
        facts.append({"title": "Stream", "value": e.stream})
    if e.start_time is not None and e.end_time is not None:
        facts.append({"title": "Segment", "value": f"{e.start_time:g} to {e.end_time:g} s"})
    if e.logos:
        facts.append({"title": "Logos", "value": truncate(", ".join(e.logos), 500)})
    if e.labels:
        facts.append(
            {
                "title": "Labels",
                "value": truncate(", ".join(f"{k}={v}" for k, v in sorted(e.labels.items())), 500),
            }
        )
    facts.append({"title": "Alert", "value": alert.alert_id})
    return facts


class TeamsSink(HttpSink):
    kind = "teams"
    max_body = 27_000  # a Workflows webhook takes about 28 KB
    too_large_markers = ("RequestEntityTooLarge",)

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        alerts = [Alert(a.alert_id, escape_event(a.event, escape_markdown)) for a in alerts]
        shown = alerts[:MAX_ALERTS]
        per_alert = TEXT_BUDGET // len(shown)
        body: list[dict[str, Any]] = []
        actions: list[dict[str, Any]] = []
        for alert in shown:
            e = alert.event
            body.append(
                {
                    "type": "TextBlock",
                    "size": "Medium",
                    "weight": "Bolder",
                    "wrap": True,
                    "color": "good" if e.resolved else COLOUR[e.severity],
                    "text": truncate(("Resolved: " if e.resolved else "") + e.title, 300),
                }
            )
            body.append({"type": "TextBlock", "wrap": True, "text": truncate(e.text, per_alert)})
            body.append({"type": "FactSet", "facts": _facts(alert)})
            if e.clip_url and len(actions) < 5:  # http(s) only, <= 2,000: clamp()
                actions.append({"type": "Action.OpenUrl", "title": "Open clip", "url": e.clip_url})
        if len(alerts) > len(shown):
            body.append(
                {
                    "type": "TextBlock",
                    "wrap": True,
                    "isSubtle": True,
                    "text": f"…and {len(alerts) - len(shown)} more",
                }
            )
        card: dict[str, Any] = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": body,
        }
        if actions:
            card["actions"] = actions
        doc = {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": card,
                }
            ],
        }
        return json.dumps(doc, ensure_ascii=False).encode(), {}
