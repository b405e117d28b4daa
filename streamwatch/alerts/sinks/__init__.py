"""Alert sinks: one module per service, sharing the HTTP delivery and its answer handling.

Every alert is cut to `LIMITS` (`clamp`) before a sink formats it, so no field can make a
message too large by itself; each sink then escapes the text for its service in one place
(`escape_event`) and links only to http(s) URLs (`safe_link`). A group the service refuses as
too large (or that is over the sink's own `max_body`) is split in halves and each half sent;
a single alert still too large is cut harder (`HARD_LIMITS`) and, if refused again,
dead-lettered alone: `Delivery.parts` says how each part went.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol, TypedDict

import aiohttp
from pydantic import SecretStr

from streamwatch.alerts.events import (
    HARD_LIMITS,
    LIMITS,
    AlertEvent,
    Limits,
    clamp,
    safe_link,
    truncate,
)
from streamwatch.http import parse_retry_after

__all__ = [
    "HARD_LIMITS",
    "LIMITS",
    "Alert",
    "Delivery",
    "HttpSink",
    "Limits",
    "Sink",
    "SinkSpec",
    "clamp",
    "escape_event",
    "safe_link",
    "truncate",
]


@dataclass(frozen=True, slots=True)
class Alert:
    """An event as it goes to one sink: `alert_id` is stable across redeliveries."""

    alert_id: str
    event: AlertEvent


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one delivery attempt went. Not `ok` and not `retry` means: give up (dead letter).

    When the sink had to split the group, `parts` holds each part's alert ids and outcome, and
    the fields above summarise them."""

    ok: bool
    retry: bool = False
    retry_after: float | None = None
    detail: str = ""
    too_large: bool = False
    parts: tuple[tuple[tuple[str, ...], Delivery], ...] = ()

    def outcomes(self, alert_ids: Sequence[str]) -> list[tuple[tuple[str, ...], Delivery]]:
        """(alert ids, outcome) for every part of the group `alert_ids` was sent as."""
        return list(self.parts) if self.parts else [(tuple(alert_ids), self)]

    @staticmethod
    def split(parts: Sequence[tuple[Sequence[str], Delivery]]) -> Delivery:
        """One outcome for a group sent as several messages."""
        leaves = tuple(
            leaf for ids, result in parts for leaf in (result.parts or ((tuple(ids), result),))
        )
        sent = sum(1 for _, r in leaves if r.ok)
        waits = [r.retry_after for _, r in leaves if r.retry_after is not None]
        failed = [r.detail for _, r in leaves if not r.ok]
        return Delivery(
            ok=not failed,
            retry=any(r.retry for _, r in leaves),
            retry_after=max(waits) if waits else None,
            detail=f"split into {len(leaves)} messages, {sent} accepted"
            + (f"; {failed[0]}" if failed else ""),
            parts=leaves,
        )


class HttpArgs(TypedDict):
    """What every `HttpSink` is built with."""

    name: str
    url: SecretStr
    session: aiohttp.ClientSession
    timeout_seconds: float
    max_in_flight: int
    max_attempts: int


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """What every kind of sink is built from (`[[alerts.sinks]]` with its secrets resolved);
    each kind takes what it needs."""

    name: str
    url: SecretStr
    session: aiohttp.ClientSession
    timeout_seconds: float
    max_in_flight: int = 1
    max_attempts: int = 8
    clock: Callable[[], float] = time.time
    repeat_seconds: float = 60.0  # alertmanager
    secret: SecretStr | None = None  # webhook

    def http(self) -> HttpArgs:
        """The keyword arguments `HttpSink` takes."""
        return HttpArgs(
            name=self.name,
            url=self.url,
            session=self.session,
            timeout_seconds=self.timeout_seconds,
            max_in_flight=self.max_in_flight,
            max_attempts=self.max_attempts,
        )


class Sink(Protocol):
    """What the outbox needs of a sink."""

    name: str
    max_in_flight: int
    max_attempts: int

    async def deliver(self, alerts: list[Alert]) -> Delivery: ...


def escape_event(event: AlertEvent, escape: Callable[[str], str]) -> AlertEvent:
    """`event` with every free text a message shows passed through a service's `escape`."""
    return replace(
        event,
        title=escape(event.title),
        text=escape(event.text),
        stream=None if event.stream is None else escape(event.stream),
        labels={escape(k): escape(v) for k, v in event.labels.items()},
        logos=tuple(escape(n) for n in event.logos),
        evidence=None if event.evidence is None else escape(event.evidence),
    )


class HttpSink:
    """Posts a JSON payload made by `payload()` and reads the answer the same way for every
    service. The URL is a secret: it never appears in errors or logs."""

    kind: ClassVar[str] = "http"
    # A body over this many bytes is not sent: it is treated as refused for its size.
    max_body: ClassVar[int | None] = None
    # Text in a 400 answer that means "too large" (besides HTTP 413).
    too_large_markers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        *,
        name: str,
        url: SecretStr,
        session: aiohttp.ClientSession,
        timeout_seconds: float,
        max_in_flight: int = 1,
        max_attempts: int = 8,
    ) -> None:
        self.name = name
        self._url = url
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts

    @classmethod
    def build(cls, spec: SinkSpec) -> Sink:
        """The sink `spec` describes (the registry's factory; see `sinks.registry`)."""
        return cls(**spec.http())

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        """The body and extra headers for these alerts (one message)."""
        raise NotImplementedError  # pragma: no cover - every sink defines it

    def accepted(self, alerts: list[Alert]) -> None:
        """Called with the alerts of every message the service accepted."""

    async def deliver(self, alerts: list[Alert]) -> Delivery:
        return await self._deliver([Alert(a.alert_id, clamp(a.event)) for a in alerts])

    async def _deliver(self, alerts: list[Alert]) -> Delivery:
        """Send; if refused as too large, send the halves; one alert is cut harder once."""
        result = await self._send(alerts)
        if not result.too_large:
            return result
        if len(alerts) == 1:
            alert = alerts[0]
            result = await self._send([Alert(alert.alert_id, clamp(alert.event, HARD_LIMITS))])
            if result.too_large:
                return replace(result, detail="too large even cut short: " + result.detail)
            return result
        half = len(alerts) // 2
        first = await self._deliver(alerts[:half])
        if first.retry:
            # The service asks us to slow down or is failing: do not send the rest now.
            second = Delivery(
                False, retry=True, retry_after=first.retry_after, detail="not sent: " + first.detail
            )
        else:
            second = await self._deliver(alerts[half:])
        return Delivery.split(
            [
                ([a.alert_id for a in alerts[:half]], first),
                ([a.alert_id for a in alerts[half:]], second),
            ]
        )

    async def _send(self, alerts: list[Alert]) -> Delivery:
        body, headers = self.payload(alerts)
        if self.max_body is not None and len(body) > self.max_body:
            return Delivery(
                False, too_large=True, detail=f"message of {len(body)} bytes over {self.max_body}"
            )
        result = await self._post(body, headers)
        if result.ok:
            self.accepted(alerts)
        return result

    async def _post(self, body: bytes, headers: Mapping[str, str]) -> Delivery:
        try:
            async with self._session.post(
                self._url.get_secret_value(),
                data=body,
                headers={"Content-Type": "application/json", **headers},
                timeout=self._timeout,
            ) as resp:
                status = resp.status
                text = await resp.text()
                header_wait = parse_retry_after(resp.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Delivery(False, retry=True, detail=f"{type(exc).__name__} reaching {self.name}")
        if 200 <= status < 300:
            return Delivery(True, detail=f"HTTP {status}")
        detail = f"HTTP {status}: {truncate(text.strip(), 200)}"
        if status == 413 or (status == 400 and any(m in text for m in self.too_large_markers)):
            return Delivery(False, too_large=True, detail=detail)
        if status == 429:
            return Delivery(
                False, retry=True, retry_after=_body_wait(text) or header_wait, detail=detail
            )
        if status in (408, 425) or status >= 500:
            return Delivery(False, retry=True, retry_after=header_wait, detail=detail)
        return Delivery(False, retry=False, detail=detail)  # 410 gone, 400 bad payload, 404 …


def _body_wait(text: str) -> float | None:
    """Discord puts the wait in the 429 body: {"retry_after": seconds, "global": bool}."""
    try:
        doc: Any = json.loads(text)
    except ValueError:
        return None
    value = doc.get("retry_after") if isinstance(doc, dict) else None
    return float(value) if isinstance(value, int | float) and value >= 0 else None
