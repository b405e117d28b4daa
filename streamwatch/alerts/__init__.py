"""Alerts: typed events, rules that route them, a durable outbox, and sinks that deliver.

Events (`AlertEvent`) come from what the store records: stored callbacks and the supervisor's
events. `Router` decides, as a pure function of the event, the time and the rule state
(cooldowns, open conditions, grouping windows), which rules and sinks an event goes to.
`Alerts` is the store's alert hook: it runs inside the transaction that records the event, so
each routed alert and the rule state it changed are committed with it, before any delivery is
tried. `Outbox` delivers due alerts, grouped per sink and grouping window, with per-sink
concurrency limits, retries with backoff that honour 429s, and a dead-letter state after the
last attempt.
"""

from streamwatch.alerts.events import SEVERITIES, AlertEvent, Severity
from streamwatch.alerts.rules import Routed, Router

__all__ = ["SEVERITIES", "AlertEvent", "Routed", "Router", "Severity"]
