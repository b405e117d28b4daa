"""Which rule sends which event to which sink, and when.

A rule matches by event kind, stream name (glob), labels and minimum severity; it may require
`min_consecutive` segments in a row (to ride out one false positive), keeps a cooldown per
rule and subject, folds what arrives within `group_seconds` into one message per sink, and
sends a resolution only if the firing went out and `send_resolved` is on.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass

from streamwatch.alerts.events import SEVERITIES, AlertEvent
from streamwatch.config import AlertRule

__all__ = ["Routed", "Router"]


@dataclass(frozen=True, slots=True)
class Routed:
    """One event for one sink: deliver with the rest of `group` once `send_after` has come."""

    rule: str
    sink: str
    event: AlertEvent
    group: str
    send_after: float


class Router:
    """Routes events by the configured rules. Its memory (cooldowns, open alerts, grouping
    windows) is in this object: a restarted daemon starts with none."""

    def __init__(self, rules: list[AlertRule]) -> None:
        self.rules = rules
        self._last_sent: dict[tuple[str, str], float] = {}
        self._open: set[tuple[str, str]] = set()
        self._windows: dict[tuple[str, str], tuple[str, float]] = {}
        self._seq = itertools.count(1)
        self.suppressed = 0

    def matches(self, rule: AlertRule, event: AlertEvent) -> bool:
        """Does the rule select this event (before cooldown and streak checks)?"""
        if rule.events and event.kind not in rule.events:
            return False
        if rule.streams:
            if event.stream is None:
                return False
            if not any(fnmatch.fnmatchcase(event.stream, g) for g in rule.streams):
                return False
        if any(event.labels.get(k) != v for k, v in rule.labels.items()):
            return False
        return SEVERITIES[event.severity] >= SEVERITIES[rule.min_severity]

    def route(self, event: AlertEvent, now: float) -> list[Routed]:
        out: list[Routed] = []
        for rule in self.rules:
            if not self.matches(rule, event):
                continue
            key = (rule.name, event.subject)
            if event.resolved:
                if not rule.send_resolved or key not in self._open:
                    continue
                self._open.discard(key)
            else:
                if event.consecutive < rule.min_consecutive:
                    continue
                last = self._last_sent.get(key)
                if last is not None and now - last < rule.cooldown_seconds:
                    self.suppressed += 1
                    continue
                self._last_sent[key] = now
                self._open.add(key)
            for sink in rule.sinks:
                group, send_after = self._window(rule, sink, now)
                out.append(Routed(rule.name, sink, event, group, send_after))
        return out

    def _window(self, rule: AlertRule, sink: str, now: float) -> tuple[str, float]:
        if rule.group_seconds <= 0:
            return f"{rule.name}:{sink}:{next(self._seq)}", now
        current = self._windows.get((rule.name, sink))
        if current is not None and now < current[1]:
            return current
        window = (f"{rule.name}:{sink}:{next(self._seq)}", now + rule.group_seconds)
        self._windows[(rule.name, sink)] = window
        return window
