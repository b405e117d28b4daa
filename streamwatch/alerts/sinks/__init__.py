"""Alert sinks: one module per service, sharing the HTTP delivery and its answer handling."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import aiohttp
from pydantic import SecretStr

from streamwatch.alerts.events import AlertEvent
from streamwatch.mavi.streams import parse_retry_after

__all__ = ["Alert", "Delivery", "HttpSink", "Sink", "truncate"]


@dataclass(frozen=True, slots=True)
class Alert:
    """An event as it goes to one sink: `alert_id` is stable across redeliveries."""

    alert_id: str
    event: AlertEvent


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one delivery attempt went. Not `ok` and not `retry` means: give up (dead letter)."""

    ok: bool
    retry: bool = False
    retry_after: float | None = None
    detail: str = ""


class Sink(Protocol):
    """What the outbox needs of a sink."""

    name: str
    max_in_flight: int
    max_attempts: int

    async def deliver(self, alerts: list[Alert]) -> Delivery: ...


def truncate(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, marking the cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


class HttpSink:
    """Posts a JSON payload made by `payload()` and reads the answer the same way for every
    service. The URL is a secret: it never appears in errors or logs."""

    kind: ClassVar[str] = "http"

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

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        """The body and extra headers for these alerts (one message)."""
        raise NotImplementedError  # pragma: no cover - every sink defines it

    async def deliver(self, alerts: list[Alert]) -> Delivery:
        body, headers = self.payload(alerts)
        return await self._post(body, headers)

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
