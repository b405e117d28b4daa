"""HTTP helpers that the daemon, the emulator and the alert sinks share: listen on host:port,
stop a runner, read a JSON body, parse `Retry-After`, the local URL of a bound server.

A leaf: it imports nothing of streamwatch, so that any part may use it without pulling in
another (import-linter's contracts in pyproject.toml keep it so).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

from aiohttp import web

__all__ = [
    "BadBody",
    "bind",
    "close_runner",
    "local_url",
    "parse_retry_after",
    "read_json",
]


def local_url(host: str, port: int) -> str:
    """The http URL a local client uses for a server bound to host:port (a wildcard bind is
    reached on 127.0.0.1; IPv6 hosts get brackets)."""
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - naming the wildcard, not binding it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def bind(
    runner: web.AppRunner, host: str, port: int, *, what: str, backlog: int = 128
) -> int:
    """Listen with `runner` (already set up) and return the bound port. Any failure, including
    a socket family the sandbox forbids (asyncio then starts a server with no sockets), is an
    `OSError` naming `what` and the address; the runner is cleaned up first."""
    site = web.TCPSite(runner, host, port, backlog=backlog)
    address = f"{host}:{port}"
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"{what} cannot listen on {address}: {exc.strerror or exc}") from None
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    if not sockets:
        await runner.cleanup()
        raise OSError(f"{what} cannot listen on {address}: no socket could be opened")
    return int(sockets[0].getsockname()[1])


async def close_runner(runner: web.AppRunner) -> None:
    """Stop an aiohttp runner, including connections accepted while it was stopping.

    `AppRunner.cleanup()` closes the listener without waiting for accepts asyncio already
    began; such a connection can reach the handler after the shutdown pass and would be left
    open. A second pass over the same low-level server closes those as well."""
    low = runner.server
    await runner.cleanup()
    if low is not None:
        for _ in range(3):  # let started accepts finish creating their transports
            await asyncio.sleep(0)
        low.pre_shutdown()
        await low.shutdown(0)


class BadBody(Exception):
    """A request body that cannot be used; `response()` is the 4xx answer saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def response(self) -> web.Response:
        return web.json_response({"error": str(self)}, status=self.status)


_UTF8 = {"utf-8", "utf8", "us-ascii", "ascii"}


async def read_json(request: web.Request) -> Any:
    """The request's JSON body, which must be UTF-8 (RFC 8259): another declared charset is
    refused (415; an unknown one made aiohttp raise, a 500), and nesting too deep for the
    parser is "not JSON" (400), not a server error. Raises `BadBody` (413, 415 or 400)."""
    charset = request.charset
    if charset is not None and charset.lower() not in _UTF8:
        raise BadBody(415, "JSON bodies are UTF-8: send charset=utf-8 or none")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BadBody(413, "body too large") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadBody(400, "body is not JSON (UTF-8)") from None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
