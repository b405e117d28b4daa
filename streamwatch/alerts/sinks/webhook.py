"""Generic JSON webhooks signed per the Standard Webhooks spec (webhook-id, -timestamp,
-signature = v1,base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}"))), so receivers can verify
with any Standard Webhooks library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
from pydantic import SecretStr

from streamwatch.alerts.sinks import Alert, HttpSink, Sink, SinkSpec

__all__ = ["WebhookSink", "sign"]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value for a body. `secret` is ``whsec_`` + base64 key."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSink(HttpSink):
    kind = "webhook"

    def __init__(
        self,
        *,
        secret: SecretStr,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        **kwargs: Any,
    ) -> None:
        super().__init__(session=session, **kwargs)
        self._secret = secret
        self._clock = clock

    @classmethod
    def build(cls, spec: SinkSpec) -> Sink:
        assert spec.secret is not None, "config validation requires a webhook secret"
        return cls(secret=spec.secret, clock=spec.clock, **spec.http())

    def payload(self, alerts: list[Alert]) -> tuple[bytes, Mapping[str, str]]:
        ids = [a.alert_id for a in alerts]
        # One id per message, the same on every retry: receivers dedupe on it.
        msg_id = (
            ids[0]
            if len(ids) == 1
            else "grp_" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
        )
        ts = int(self._clock())
        doc = {
            "type": "streamwatch.alerts",
            "timestamp": datetime.fromtimestamp(ts, UTC).isoformat(),
            "data": {"alerts": [{"id": a.alert_id, **a.event.to_json()} for a in alerts]},
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        return body, {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(self._secret.get_secret_value(), msg_id, ts, body),
        }
