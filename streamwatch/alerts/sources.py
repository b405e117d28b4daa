"""Turn what the daemon records into alert events. Pure: the same record, the same event.

Event kinds (stable; rules match on them): `unsafe_content`, `logo_detected`,
`stream_stopped` (resolved when the stream's next task starts), `stream_stalled` (resolved on
recovery), `restart_loop`, `segment_errors`, `start_failed`, `balance_halt` (resolved on
resume or when the recheck lifts it), `budget_threshold`, `budget_forecast`,
`billing_unreported`, `orphan_task`, `orphan_stopped`, `source_offline` (preflight found the
source down; resolved when a probe finds it again), `fps_above_source`, and `test` (from
`streamwatch alerts test`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from streamwatch.alerts.events import AlertEvent, Severity
from streamwatch.mavi.callbacks import SegmentReport

__all__ = ["KINDS", "from_record", "from_segment", "logo_hit"]

KINDS = (
    "unsafe_content",
    "logo_detected",
    "stream_stopped",
    "stream_stalled",
    "restart_loop",
    "segment_errors",
    "start_failed",
    "balance_halt",
    "budget_threshold",
    "budget_forecast",
    "billing_unreported",
    "orphan_task",
    "orphan_stopped",
    "source_offline",
    "fps_above_source",
    "test",
)

STOP_REASONS = {
    14: "was stopped outside streamwatch (console or API); it stays stopped until resumed",
    15: "has no video (source offline or unreachable); restarting with backoff",
    16: "hit MAVI's capacity limit; restarting with backoff",
    402: "stopped: the MAVI balance is exhausted",
}

# record kind -> (alert kind, severity, resolves?)
_RECORDS: dict[str, tuple[str, Severity, bool]] = {
    "stream_stalled": ("stream_stalled", "warning", False),
    "stream_recovered": ("stream_stalled", "info", True),
    "task_started": ("stream_stopped", "info", True),
    "intent_adopted": ("stream_stopped", "info", True),
    "restart_loop": ("restart_loop", "warning", False),
    "segment_errors": ("segment_errors", "warning", False),
    "start_failed": ("start_failed", "warning", False),
    "account_halted": ("balance_halt", "critical", False),
    "account_resumed": ("balance_halt", "info", True),
    "halt_expired": ("balance_halt", "info", True),
    "budget_threshold": ("budget_threshold", "warning", False),
    "budget_forecast": ("budget_forecast", "warning", False),
    "billing_unreported": ("billing_unreported", "warning", False),
    "orphan_task": ("orphan_task", "warning", False),
    "orphan_stopped": ("orphan_stopped", "warning", False),
    "source_offline": ("source_offline", "warning", False),
    "source_online": ("source_offline", "info", True),
    "fps_above_source": ("fps_above_source", "warning", False),
}

_TITLES = {
    "stream_stalled": "Stream {s} stopped sending results",
    "restart_loop": "Stream {s} keeps restarting",
    "segment_errors": "MAVI fails to process {s}",
    "start_failed": "Stream {s} could not be started",
    "balance_halt": "MAVI account halted: no stream can start",
    "budget_threshold": "Budget threshold crossed",
    "budget_forecast": "Budget projected to be exceeded",
    "billing_unreported": "Stream {s} bills without reporting",
    "stream_stopped": "Stream {s} stopped",
    "orphan_task": "A task streamwatch did not start is billing the account",
    "orphan_stopped": "A task streamwatch did not start was stopped",
    "source_offline": "The source of stream {s} is offline",
    "fps_above_source": "Stream {s} pays for more frames than its source has",
}


def from_record(
    kind: str,
    *,
    at: float,
    stream: str | None = None,
    task_id: str | None = None,
    status: int | None = None,
    detail: str = "",
    labels: Mapping[str, str] | None = None,
) -> AlertEvent | None:
    """The alert for a supervisor record, or None for records nobody is alerted about."""
    labels = dict(labels or {})
    if kind == "task_ended":
        if status not in STOP_REASONS:
            return None
        return AlertEvent(
            kind="stream_stopped",
            severity="critical" if status == 402 else "warning",
            title=f"Stream {stream} stopped ({status})",
            text=f"Stream {stream} {STOP_REASONS[status]}.",
            at=at,
            stream=stream,
            labels=labels,
            task_id=task_id,
        )
    if kind not in _RECORDS:
        return None
    alert_kind, severity, resolves = _RECORDS[kind]
    if kind == "budget_threshold" and "100%" in detail:
        severity = "critical"
    scoped = stream if alert_kind not in ("balance_halt", "orphan_task", "orphan_stopped") else None
    title = _TITLES[alert_kind].format(s=stream or "")
    if resolves:
        title = f"Resolved: {title}"
    return AlertEvent(
        kind=alert_kind,
        severity=severity,
        title=title,
        text=detail or title,
        at=at,
        stream=scoped,
        labels=labels if scoped else {},
        task_id=task_id,
        resolved=resolves,
    )


def logo_hit(report: SegmentReport, watched: Collection[str]) -> bool:
    """Does the segment show a logo that counts: a watch-listed one, or any when there is no
    watch list?"""
    names = {logo.name for logo in report.logos if logo.name}
    return bool(names & set(watched)) if watched else bool(names)


def from_segment(
    report: SegmentReport,
    *,
    stream: str,
    at: float,
    unsafe_streak: int,
    logo_streak: int,
    watched: tuple[str, ...],
    labels: Mapping[str, str],
    evidence: str | None = None,
) -> list[AlertEvent]:
    """Alerts for one stored segment: unsafe content, and logos (only the watched names when
    the stream has a watch list)."""
    events = []
    segment = AlertEvent(
        kind="segment",
        severity="info",
        title="",
        text="",
        at=at,
        stream=stream,
        labels=dict(labels),
        task_id=report.task_id,
        segment_index=report.segment_index,
        start_time=report.start_time,
        end_time=report.end_time,
        clip_url=report.video_url,
        evidence=evidence,
    )
    if report.unsafe:
        events.append(
            replace(
                segment,
                kind="unsafe_content",
                severity="critical",
                title=f"Unsafe content on {stream}",
                text=f"Segment {report.segment_index} of {stream} has unsafe content"
                f" ({unsafe_streak} in a row).",
                consecutive=unsafe_streak,
            )
        )
    names = tuple(n for n in (logo.name for logo in report.logos) if n)
    if watched:
        names = tuple(n for n in names if n in watched)
    if names:
        events.append(
            replace(
                segment,
                kind="logo_detected",
                severity="warning",
                title=f"Logo on {stream}: {', '.join(names)}",
                text=f"Segment {report.segment_index} of {stream} shows {', '.join(names)}.",
                logos=names,
                consecutive=logo_streak,
            )
        )
    return events
