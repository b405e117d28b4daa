"""The typed events alerts are made of."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["SEVERITIES", "AlertEvent", "Severity"]

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
