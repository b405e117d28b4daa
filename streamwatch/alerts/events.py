"""The typed events alerts are made of."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from yarl import URL

__all__ = [
    "HARD_LIMITS",
    "LIMITS",
    "SEVERITIES",
    "AlertEvent",
    "Limits",
    "Severity",
    "clamp",
    "safe_link",
    "truncate",
]

Severity = Literal["info", "warning", "critical"]
SEVERITIES: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """Something notable the daemon knows. `subject` names what it is about (stable across
    firing and resolution, e.g. ``stream_stalled:lobby``); a resolution has `resolved` set."""

    kind: str
    severity: Severity
    title: str
    text: str
    at: float
    stream: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    task_id: str | None = None
    segment_index: int | None = None
    start_time: float | None = None
    end_time: float | None = None
    clip_url: str | None = None
    logos: tuple[str, ...] = ()
    consecutive: int = 1
    resolved: bool = False
    evidence: str | None = None  # where the segment's clip is archived

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.stream or '*'}"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["labels"] = dict(self.labels)
        doc["logos"] = list(self.logos)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AlertEvent:
        data = dict(doc)
        data["logos"] = tuple(data.get("logos", ()))
        return cls(**data)


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, marking the cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


@dataclass(frozen=True, slots=True)
class Limits:
    """The most of each alert field any sink is given (characters; counts for lists)."""

    title: int
    text: int
    stream: int
    task_id: int
    label_key: int
    label_value: int
    labels: int
    logo: int
    logos: int
    evidence: int
    link: int


LIMITS = Limits(
    title=300,
    text=4000,
    stream=200,
    task_id=200,
    label_key=100,
    label_value=300,
    labels=30,
    logo=128,
    logos=20,
    evidence=1000,
    link=2000,
)
# For a single alert its service refused as too large even so.
HARD_LIMITS = Limits(
    title=150,
    text=500,
    stream=100,
    task_id=100,
    label_key=50,
    label_value=100,
    labels=10,
    logo=100,
    logos=10,
    evidence=300,
    link=1000,
)


def safe_link(url: str | None, limit: int = LIMITS.link) -> str | None:
    """`url` as a link a chat message may carry: absolute http(s) with a host, user info
    removed, at most `limit` characters; None for anything else (javascript:, data:, …)."""
    if not url:
        return None
    try:
        parsed = URL(url)
    except ValueError:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.absolute or not parsed.host:
        return None
    if any(c.isspace() or c in '<>"' for c in url):
        return None
    shown = str(parsed.with_user(None)) if parsed.user or parsed.password else url
    return shown if len(shown) <= limit else None


def clamp(event: AlertEvent, limits: Limits = LIMITS) -> AlertEvent:
    """`event` with every field within `limits`, and its clip link only if it is safe."""
    labels = {
        truncate(k, limits.label_key): truncate(v, limits.label_value)
        for k, v in list(event.labels.items())[: limits.labels]
    }
    return replace(
        event,
        title=truncate(event.title, limits.title),
        text=truncate(event.text, limits.text),
        stream=None if event.stream is None else truncate(event.stream, limits.stream),
        task_id=None if event.task_id is None else truncate(event.task_id, limits.task_id),
        labels=labels,
        logos=tuple(truncate(n, limits.logo) for n in event.logos[: limits.logos]),
        evidence=None if event.evidence is None else truncate(event.evidence, limits.evidence),
        clip_url=safe_link(event.clip_url, limits.link),
    )
