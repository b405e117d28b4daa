"""Which rule sends which event to which sink, and when: a pure decision.

A rule matches by event kind, stream name (glob), labels and minimum severity; it may require
`min_consecutive` segments in a row (to ride out one false positive), keeps a cooldown per
rule and subject, folds what arrives within `group_seconds` into one message per sink, and
sends a resolution only if the firing went out and `send_resolved` is on.

`Router.route(event, now, state)` returns a `Decision`: the alerts to write to the outbox and
the rule state that changed. The state (per rule and subject: when it last sent and whether a
firing is open; per rule and sink: the grouping window) is kept by the caller — the store, in
the same transaction as what raised the event — so it survives restarts. Every routed event
is cut to `LIMITS` (`events.clamp`) before it is written.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from streamwatch.alerts.events import SEVERITIES, AlertEvent, clamp
from streamwatch.config import AlertRule

__all__ = [
    "Condition",
    "Decision",
    "Routed",
    "Router",
    "RuleState",
    "Window",
]


@dataclass(frozen=True, slots=True)
class Routed:
    """One event for one sink: deliver with the rest of `group` once `send_after` has come."""

    alert_id: str
    rule: str
    sink: str
    event: AlertEvent
    group: str
    send_after: float


@dataclass(frozen=True, slots=True)
class Condition:
    """A rule's memory of one subject: when it last sent, and whether a firing is open."""

    last_sent: float | None = None
    open: bool = False


@dataclass(frozen=True, slots=True)
class Window:
    """A rule's grouping window for one sink: alerts in it share `group`, sent at `until`."""

    group: str
    until: float


@dataclass(frozen=True, slots=True)
class RuleState:
    """The rule state a decision reads: conditions by (rule, subject), windows by (rule,
    sink). Only the keys `Router.keys()` names need to be present."""

    conditions: Mapping[tuple[str, str], Condition] = field(default_factory=dict)
    windows: Mapping[tuple[str, str], Window] = field(default_factory=dict)

    def updated(self, decision: Decision) -> RuleState:
        """This state with a decision's changes applied."""
        return RuleState(
            {**self.conditions, **decision.conditions}, {**self.windows, **decision.windows}
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """What routing one event decided: alerts to write, and the state that changed."""

    routed: list[Routed]
    conditions: dict[tuple[str, str], Condition]
    windows: dict[tuple[str, str], Window]
    suppressed: int = 0  # firings held back by a cooldown


class Router:
    """Routes events by the configured rules. Holds no memory: see `RuleState`."""

    def __init__(self, rules: list[AlertRule]) -> None:
        self.rules = rules

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

    def keys(self, event: AlertEvent) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The condition and window keys that routing this event reads."""
        rules = [r for r in self.rules if self.matches(r, event)]
        return (
            [(r.name, event.subject) for r in rules],
            [(r.name, sink) for r in rules if r.group_seconds > 0 for sink in r.sinks],
        )

    def route(
        self, event: AlertEvent, now: float, state: RuleState, *, new_id: Callable[[], str]
    ) -> Decision:
        """Decide where `event` goes. `new_id()` names each alert (and each new group)."""
        out: list[Routed] = []
        conditions: dict[tuple[str, str], Condition] = {}
        windows: dict[tuple[str, str], Window] = {}
        suppressed = 0
        sent = clamp(event)
        for rule in self.rules:
            if not self.matches(rule, event):
                continue
            key = (rule.name, event.subject)
            cond = state.conditions.get(key, Condition())
            if event.resolved:
                if not rule.send_resolved or not cond.open:
                    continue
                conditions[key] = Condition(cond.last_sent, open=False)
            else:
                if event.consecutive < rule.min_consecutive:
                    continue
                if cond.last_sent is not None and now - cond.last_sent < rule.cooldown_seconds:
                    suppressed += 1
                    continue
                conditions[key] = Condition(now, open=True)
            for sink in rule.sinks:
                alert_id = new_id()
                if rule.group_seconds <= 0:
                    out.append(Routed(alert_id, rule.name, sink, sent, alert_id, now))
                    continue
                wkey = (rule.name, sink)
                window = windows.get(wkey) or state.windows.get(wkey)
                if window is None or now >= window.until:
                    window = Window(f"{rule.name}:{sink}:{alert_id}", now + rule.group_seconds)
                    windows[wkey] = window
                out.append(Routed(alert_id, rule.name, sink, sent, window.group, window.until))
        return Decision(out, conditions, windows, suppressed)
