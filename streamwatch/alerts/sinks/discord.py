"""Discord webhooks: embeds coloured by severity, within Discord's limits (10 embeds; title
256, description 4,096, 25 fields of 1,024; 6,000 characters across all embeds).

Messages allow no mentions at all (``allowed_mentions: {"parse": []}``) and every text from an
event has Discord's markdown escaped, so ``@everyone``, ``<@id>`` and ``[text](url)`` show as
written; the embed links only to an http(s) clip URL."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from streamwatch.alerts.sinks import Alert, HttpSink, escape_event, truncate

__all__ = ["DiscordSink"]

COLOUR = {"critical": 0xD93025, "warning": 0xF29900, "info": 0x1A73E8}
RESOLVED = 0x188038
TOTAL_LIMIT = 5800  # under Discord's 6,000 across embeds, with room for the footer
_MARKDOWN = re.compile(r"([\\*_~|`>#\-\[\]()<@:])")


def escape_markdown(text: str) -> str:
    """`text` with Discord's markdown, mention and link syntax escaped by backslashes."""
    return _MARKDOWN.sub(r"\\\1", text)


def _embed(alert: Alert, budget: int) -> dict[str, Any]:
    e = alert.event
    fields: list[dict[str, Any]] = []
    if e.stream:
        fields.append({"name": "Stream", "value": e.stream, "inline": True})
    if e.start_time is not None and e.end_time is not None:
        fields.append(
            {"name": "Segment", "value": f"{e.start_time:g} to {e.end_time:g} s", "inline": True}
        )
    if e.logos:
        fields.append({"name": "Logos", "value": truncate(", ".join(e.logos), 1024)})
    if e.labels:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(e.labels.items()))
        fields.append({"name": "Labels", "value": truncate(labels, 1024)})
    used = sum(len(f["name"]) + len(f["value"]) for f in fields)
    title = truncate(("Resolved: " if e.resolved else "") + e.title, 256)
    embed: dict[str, Any] = {
        "title": title,
        "description": truncate(e.text, max(0, min(4096, budget - used - len(title)))),
        "color": RESOLVED if e.resolved else COLOUR[e.severity],
        "timestamp": datetime.fromtimestamp(e.at, UTC).isoformat(),
        "fields": fields[:25],
        "footer": {"text": f"alert {alert.alert_id}"},
    }
    if e.clip_url:  # http(s) only: clamp()
        embed["url"] = e.clip_url
    return embed


def _size(embed: dict[str, Any]) -> int:
    return (
        len(embed["title"])
        + len(embed["description"])
        + len(embed["footer"]["text"])
        + sum(len(f["name"]) + len(f["value"]) for f in embed["fields"])
    )


class DiscordSink(HttpSink):
    kind = "discord"

    too_large_markers = ("BASE_TYPE_MAX_LENGTH", "MAX_EMBED_SIZE_EXCEEDED")

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        alerts = [Alert(a.alert_id, escape_event(a.event, escape_markdown)) for a in alerts]
        embeds: list[dict[str, Any]] = []
        left = TOTAL_LIMIT
        for alert in alerts[:10]:
            embed = _embed(alert, left // max(1, min(10, len(alerts)) - len(embeds)))
            if _size(embed) > left:
                break
            embeds.append(embed)
            left -= _size(embed)
        content = ""
        if len(alerts) > len(embeds):
            content = f"…and {len(alerts) - len(embeds)} more alert(s)"
        doc = {"content": content, "embeds": embeds, "allowed_mentions": {"parse": []}}
        return json.dumps(doc, ensure_ascii=False).encode(), {}
