"""Client for MAVI's v2 live-stream API: start and stop a moderation task.

`start` returns the task id; `stop` returns False when MAVI says the task is unknown or already
stopped. Transient failures (429, 5xx, timeouts, broken connections) are retried with bounded
exponential backoff and jitter, honouring `Retry-After`; 401 and 402 raise at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from pydantic import SecretStr

from streamwatch.config import RetryConfig
from streamwatch.http import parse_retry_after
from streamwatch.mavi.errors import (
    AuthError,
    CapacityError,
    InsufficientBalance,
    MaviError,
    RateLimited,
    RejectedRequest,
    TransientError,
)
from streamwatch.mavi.hooks import RequestHook
from streamwatch.mavi.ids import TASK_ID_MAX, is_task_id
from streamwatch.redact import Redactor

__all__ = ["StartRequest", "StreamClient"]

log = structlog.get_logger("streamwatch.mavi")


@dataclass(frozen=True, slots=True)
class StartRequest:
    """What MAVI is asked to watch, exactly the documented body fields."""

    url: str
    content_moderation: bool
    logo_detection: bool
    fps: int
    max_logos: int

    def body(self) -> dict[str, object]:
        return {
            "url": self.url,
            "enable_content_moderation": self.content_moderation,
            "enable_logo_detection": self.logo_detection,
            "fps": self.fps,
            "max_logos": self.max_logos,
        }


def _retry_hook(exc: Exception) -> bool | float:
    if isinstance(exc, TransientError):
        return exc.retry_after if exc.retry_after is not None else True
    return False


def _code_ok(code: object) -> bool:
    return code in (200, "200", 0, "0", "0000", None)


def _inner_status(code: object) -> int:
    """The HTTP status a gateway put in a 200 answer's `code` (an int, or up to three ASCII
    digits), or 0 if `code` is not one. `str.isdigit()` is no test: it accepts "²"."""
    if isinstance(code, bool):
        return 0
    if isinstance(code, int):
        return code
    if isinstance(code, str) and 0 < len(code) <= 3 and code.isascii() and code.isdigit():
        return int(code)
    return 0


class StreamClient:
    """Async client of `POST /stream/start` and `POST /stream/stop`."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: SecretStr,
        retry: RetryConfig,
        timeout_seconds: float,
        on_request: RequestHook | None = None,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        """`redact` masks secrets in MAVI's error text before it goes into an error (and from
        there into `last_error`, events, alerts and logs); this client's own key always is.
        `on_request` is told of each single request (endpoint, outcome, seconds)."""
        self._on_request = on_request
        self._redact = redact or Redactor([api_key])
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._retry = retry
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def start(self, request: StartRequest) -> str:
        """Start a task and return its id."""
        data = await self._call("start", request.body())
        task_id = data.get("task_id") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise RejectedRequest("MAVI answered the start without a task_id")
        if not is_task_id(task_id):
            # It names files and rows: never let an answer choose a path.
            raise RejectedRequest(
                f"MAVI answered the start with a task_id that is not an id ({len(task_id)}"
                f" characters; expected 1 to {TASK_ID_MAX} letters, digits, '-' or '_')"
            )
        return task_id

    async def stop(self, task_id: str) -> bool:
        """Stop a task. True if MAVI stopped it now, False if it was unknown or already stopped."""
        try:
            await self._call("stop", {"task_id": task_id})
        except _AlreadyStopped:
            return False
        return True

    async def _call(self, endpoint: str, body: dict[str, object]) -> Any:
        async for attempt in self._retry.context(_retry_hook):
            with attempt:
                if attempt.num > 1:
                    log.info("mavi.request_retry", endpoint=endpoint, attempt=attempt.num)
                return await self._once(endpoint, body)
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    async def _once(self, endpoint: str, body: dict[str, object]) -> Any:
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await self._request(endpoint, body)
        except MaviError as exc:
            outcome = _outcome(exc)
            raise
        finally:
            if self._on_request is not None:
                self._on_request(endpoint, outcome, time.perf_counter() - started)

    async def _request(self, endpoint: str, body: dict[str, object]) -> Any:
        url = f"{self._base}/stream/{endpoint}"
        headers = {"Authorization": self._key.get_secret_value()}
        try:
            async with self._session.post(
                url, json=body, headers=headers, timeout=self._timeout
            ) as resp:
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransientError(f"{endpoint}: {type(exc).__name__} talking to MAVI") from None
        return _interpret(endpoint, status, text, retry_after, redact=self._redact)


class _AlreadyStopped(MaviError):
    pass


def _outcome(exc: MaviError) -> str:
    """The `outcome` label of a failed request."""
    for kind, name in (
        (_AlreadyStopped, "already_stopped"),
        (AuthError, "auth"),
        (InsufficientBalance, "balance"),
        (RateLimited, "rate_limited"),
        (CapacityError, "refused"),
        (RejectedRequest, "bad_answer"),
    ):
        if isinstance(exc, kind):
            return name
    return "server_error" if exc.status else "unreachable"


def _interpret(
    endpoint: str,
    status: int,
    text: str,
    retry_after: float | None,
    *,
    redact: Callable[[str], str],
) -> Any:
    try:
        doc = json.loads(text) if text else None
    except (ValueError, RecursionError):
        doc = None
    message = ""
    if isinstance(doc, dict):
        # Masked before it is cut: cut first, a secret could leave its beginning behind.
        message = redact(str(doc.get("message") or doc.get("msg") or ""))[:200]
    where = f"{endpoint}: HTTP {status}" + (f" ({message})" if message else "")
    if status == 401:
        raise AuthError(f"{where}: the API key was refused; check [mavi] api_key", status=status)
    if status == 402:
        raise InsufficientBalance(f"{where}: balance too low; top up the account", status=status)
    if status == 429:
        raise RateLimited(f"{where}: rate limited", status=status, retry_after=retry_after)
    if status >= 500 or status == 408:
        raise TransientError(where, status=status, retry_after=retry_after)
    if endpoint == "stop" and status in (400, 404):
        raise _AlreadyStopped(where, status=status)
    if status >= 400:
        raise CapacityError(f"{where}: MAVI refused the request", status=status)
    if not isinstance(doc, dict):
        raise RejectedRequest(f"{where}: body is not a JSON object", status=status)
    code = doc.get("code")
    if not _code_ok(code):
        # Some gateways answer 200 with the real status inside: map it the same way.
        inner = _inner_status(code)
        if not 300 <= inner < 600:
            shown = redact(repr(code))[:40]
            raise RejectedRequest(f"{where}: unexpected code {shown}", status=status)
        return _interpret(
            endpoint, inner, json.dumps({"message": message}), retry_after, redact=redact
        )
    return doc.get("data")
