"""Limits on the HTTP server's connections, so that idle or slow clients cannot starve it.

aiohttp closes a keep-alive connection that idles, but a connection that never completes a
request, or a body that trickles in, holds a file descriptor for as long as the client likes;
past the process's file limit every `accept()` fails and valid callbacks time out.
`ConnectionGuard`, attached to an aiohttp server:

- caps open connections at `limit`. At the cap a new connection takes the place of the oldest
  one not busy with a request: first those that never completed a request's headers, then
  those still receiving a request's body, then the longest-idle keep-alive ones; only if every
  connection is busy (its request received whole, its answer being made) is the new one
  closed at once;
- closes a connection that has not delivered a complete request's headers `header_timeout`
  seconds after it opened, or that waits longer than `idle_timeout` for its next request;
- fails a request whose body has not fully arrived `body_timeout` seconds after its headers
  (408, connection closed);
- counts all of it in metrics and reports it in one log line at most once a minute, and turns
  asyncio's "accept() out of system resource" (one traceback per attempt, thousands a second)
  into the same kind of line, shedding idle connections to make room.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from streamwatch.logs import Throttle
from streamwatch.metrics import Metrics

__all__ = [
    "BodyTimeout",
    "ConnectionGuard",
    "effective_limit",
    "listen_backlog",
    "raise_file_limit",
]

log = structlog.get_logger("streamwatch.server")

# File descriptors kept out of the connection cap besides a full accept burst (asyncio accepts
# up to the listen backlog before any of those connections can be turned away): the state
# file, the event loop, listening sockets, outbound HTTP (MAVI, sinks, clip downloads).
_OTHER_FILES = 64
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_QUIET = frozenset({"idle_timeout"})  # routine: counted, never reported


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (a container often
    starts with 1024 of 1048576) and return the soft limit now in force. Where it may not be
    raised (a sandbox), the current one stands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def listen_backlog(file_limit: int) -> int:
    """The listen backlog: 128 (asyncio's and aiohttp's default), less under a small file
    limit, since asyncio accepts that many at once before the cap can turn any away."""
    return max(8, min(128, file_limit // 4))


def effective_limit(configured: int, file_limit: int) -> int:
    """The connection cap that fits under the file limit with an accept burst and the
    daemon's other files."""
    reserve = listen_backlog(file_limit) + _OTHER_FILES
    return max(1, min(configured, file_limit - reserve))


class BodyTimeout(Exception):
    """The request body did not arrive in time, or its connection was evicted while it came
    (raised from the handler's read; `reason` is the metric's)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Conn:
    __slots__ = ("busy", "timer", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False


class ConnectionGuard:
    """Caps and deadlines for one or more aiohttp servers of this process (see module)."""

    def __init__(
        self,
        *,
        limit: int,
        header_timeout: float,
        body_timeout: float,
        idle_timeout: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self._metrics = metrics
        self._conns: dict[object, _Conn] = {}
        # Connections that may be evicted, oldest first: no complete request yet; a request
        # whose body is still arriving; keep-alive idle.
        self._fresh: OrderedDict[object, None] = OrderedDict()
        self._reading: OrderedDict[object, web.Request] = OrderedDict()
        self._idle: OrderedDict[object, None] = OrderedDict()
        self._dropped: dict[str, int] = {}
        self._report = Throttle(clock=clock)
        metrics.http_connections_limit.set(limit)

    @property
    def open(self) -> int:
        return len(self._conns)

    def attach(self, server: web.Server) -> None:
        """Follow every connection `server` (an aiohttp low-level server) opens and closes."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._opened(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._forget(handler)
            lost(handler, exc)

        # aiohttp has no hook for this; its RequestHandler calls these two on its server.
        server.connection_made = connection_made  # type: ignore[method-assign]  # see above
        server.connection_lost = connection_lost  # type: ignore[method-assign]  # see above

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Marks the connection busy while a request runs, and enforces the body deadline."""
        key = request.protocol
        conn = self._conns.get(key)
        if conn is not None:
            self._fresh.pop(key, None)
            self._idle.pop(key, None)
            self._cancel(conn)
            conn.busy = True
        body_timer = None
        if not request.content.is_eof():
            if conn is not None:
                self._reading[key] = request
            loop = asyncio.get_running_loop()
            body_timer = loop.call_later(self.body_timeout, self._body_late, request)
        try:
            return await handler(request)
        except BodyTimeout as exc:
            self._count(exc.reason)
            response = web.json_response(
                {"error": f"request body not received within {self.body_timeout:g} s"},
                status=408,
            )
            response.force_close()
            return response
        finally:
            self._reading.pop(key, None)
            if body_timer is not None:
                body_timer.cancel()
            if self._conns.get(key) is conn and conn is not None:
                conn.busy = False
                self._idle[key] = None
                self._arm(key, conn, self.idle_timeout, "idle_timeout")

    def accept_failed(self, exc: OSError) -> None:
        """asyncio could not accept a connection (out of file descriptors or memory): report
        it (rate-limited) and close some idle connections so that the next accept succeeds."""
        self._metrics.http_accept_errors.inc()
        self._shed(max(1, len(self._conns) // 10))
        held = self._report.allow("accept")
        if held is not None:
            log.error(
                "server.accept_failed",
                error=os.strerror(exc.errno) if exc.errno else str(exc),
                suppressed=held,
                open=len(self._conns),
                limit=self.limit,
                file_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                hint="raise the file limit (LimitNOFILE=, ulimit -n) or lower "
                "[server] max_connections",
            )

    @staticmethod
    def out_of_resources(context: dict[str, Any]) -> OSError | None:
        """The error, if a loop exception context is asyncio failing to accept for lack of
        file descriptors or memory."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            return exc
        return None

    # -- internals -------------------------------------------------------------------------

    def _opened(self, key: object, transport: asyncio.Transport) -> None:
        if len(self._conns) >= self.limit and not self._evict():
            transport.abort()
            self._count("over_limit")
            return
        conn = _Conn(transport)
        self._conns[key] = conn
        self._fresh[key] = None
        self._metrics.http_connections.inc()
        self._arm(key, conn, self.header_timeout, "header_timeout")

    def _arm(self, key: object, conn: _Conn, seconds: float, reason: str) -> None:
        self._cancel(conn)
        conn.timer = asyncio.get_running_loop().call_later(seconds, self._expire, key, reason)

    @staticmethod
    def _cancel(conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _expire(self, key: object, reason: str) -> None:
        conn = self._conns.get(key)
        if conn is not None and not conn.busy:
            self._drop(key, reason)

    def _body_late(self, request: web.Request) -> None:
        if not request.content.is_eof():
            request.content.set_exception(BodyTimeout("body_timeout"))

    def _evict(self) -> bool:
        """Close the connection that matters least (see module); False if all are busy."""
        if self._fresh:
            self._drop(next(iter(self._fresh)), "evicted")
            return True
        while self._reading:
            key, request = self._reading.popitem(last=False)
            if not request.content.is_eof():
                # The handler's read ends with BodyTimeout; the middleware answers and counts.
                request.content.set_exception(BodyTimeout("evicted"))
                conn = self._forget(key)
                if conn is not None:
                    conn.transport.abort()
                return True
        if self._idle:
            self._drop(next(iter(self._idle)), "evicted")
            return True
        return False

    def _shed(self, count: int) -> None:
        for _ in range(count):
            if not self._evict():
                return

    def _drop(self, key: object, reason: str) -> None:
        conn = self._forget(key)
        if conn is not None:
            conn.transport.abort()
            self._count(reason)

    def _forget(self, key: object) -> _Conn | None:
        conn = self._conns.pop(key, None)
        if conn is None:
            return None
        self._fresh.pop(key, None)
        self._reading.pop(key, None)
        self._idle.pop(key, None)
        self._cancel(conn)
        self._metrics.http_connections.dec()
        return conn

    def _count(self, reason: str) -> None:
        self._metrics.http_connections_closed.labels(reason).inc()
        if reason in _QUIET:
            return
        self._dropped[reason] = self._dropped.get(reason, 0) + 1
        held = self._report.allow("dropped")
        if held is not None:
            dropped, self._dropped = self._dropped, {}
            log.warning(
                "server.connections_dropped",
                open=len(self._conns),
                limit=self.limit,
                **dropped,
            )
