"""Alerts: typed events, rules that route them, a durable outbox, and sinks that deliver.

Events (`AlertEvent`) come from the supervisor and the callback path. `Router` (pure, apart
from its cooldown and grouping memory) decides which rules and sinks an event goes to. Each
routed alert is written to the store's `alert_outbox` before any delivery is tried; `Outbox`
delivers due alerts, grouped per sink and grouping window, with per-sink concurrency limits,
retries with backoff that honour 429s, and a dead-letter state after the last attempt.
"""

from streamwatch.alerts.events import SEVERITIES, AlertEvent, Severity
from streamwatch.alerts.rules import Routed, Router

__all__ = ["SEVERITIES", "AlertEvent", "Routed", "Router", "Severity"]
