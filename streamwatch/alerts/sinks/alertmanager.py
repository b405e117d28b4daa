"""Prometheus Alertmanager (`POST /api/v2/alerts`): teams that route alerts through it get
grouping, silences, inhibition and on-call routing for free.

Alertmanager identifies an alert by its label set. Conditions that last (`stream_stopped`,
`stream_stalled`, `balance_halt`, `source_offline`) are kept active here and re-posted every
`repeat_seconds` until their resolution is posted with `endsAt`; one-off events (unsafe
content, logos, budget thresholds, …) are posted once with `endsAt` `one_off_seconds` later.
The outbox writes the active set to the store as deliveries change it and gives it back to
the next process, which goes on re-posting those conditions and resolves each with the labels
it was posted with.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from streamwatch.alerts.events import AlertEvent
from streamwatch.alerts.sinks import Alert, Delivery, HttpSink, Sink, SinkSpec, truncate

__all__ = ["STATEFUL", "AlertmanagerSink"]

STATEFUL = frozenset({"stream_stopped", "stream_stalled", "balance_halt", "source_offline"})


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class AlertmanagerSink(HttpSink):
    kind = "alertmanager"

    def __init__(
        self,
        *,
        repeat_seconds: float = 60.0,
        one_off_seconds: float = 3600.0,
        clock: Callable[[], float] = time.time,
        url: SecretStr,
        **kwargs: Any,
    ) -> None:
        # Take Alertmanager's base URL as well as the full endpoint.
        endpoint = url.get_secret_value().rstrip("/")
        if not endpoint.endswith("/api/v2/alerts"):
            endpoint += "/api/v2/alerts"
        super().__init__(url=SecretStr(endpoint), **kwargs)
        self.repeat_seconds = repeat_seconds
        self.one_off_seconds = one_off_seconds
        self._clock = clock
        self.active: dict[str, dict[str, Any]] = {}  # subject -> the posted alert

    @classmethod
    def build(cls, spec: SinkSpec) -> Sink:
        return cls(repeat_seconds=spec.repeat_seconds, clock=spec.clock, **spec.http())

    @staticmethod
    def labels(event: AlertEvent) -> dict[str, str]:
        out = {f"label_{k}": v for k, v in event.labels.items()}
        out["alertname"] = "streamwatch_" + event.kind
        if event.stream:
            out["stream"] = event.stream
        return out

    def _alert(self, alert: Alert) -> tuple[str, dict[str, Any]]:
        e = alert.event
        subject = e.subject
        now = self._clock()
        if e.resolved:
            firing = self.active.get(subject)
            labels = dict(firing["labels"]) if firing else self.labels(e)
            starts = firing["startsAt"] if firing else _iso(e.at)
            return subject, {
                "labels": labels,
                "annotations": {"summary": truncate(e.title, 500)},
                "startsAt": starts,
                "endsAt": _iso(max(now, e.at)),
            }
        labels = {**self.labels(e), "severity": e.severity}
        annotations = {
            "summary": truncate(e.title, 500),
            "description": truncate(e.text, 4000),
            "alert_id": alert.alert_id,
        }
        if e.clip_url:
            annotations["clip_url"] = e.clip_url
        posted: dict[str, Any] = {
            "labels": labels,
            "annotations": annotations,
            "startsAt": _iso(e.at),
        }
        if e.kind not in STATEFUL:
            posted["endsAt"] = _iso(e.at + self.one_off_seconds)
        return subject, posted

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        return json.dumps([self._alert(a)[1] for a in alerts]).encode(), {}

    def accepted(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            subject, posted = self._alert(alert)
            if alert.event.resolved:
                self.active.pop(subject, None)
            elif alert.event.kind in STATEFUL:
                self.active[subject] = posted

    async def repost_active(self) -> Delivery | None:
        """Re-send every active alert, as Alertmanager expects of a live source."""
        if not self.active:
            return None
        return await self._post(json.dumps(list(self.active.values())).encode(), {})
