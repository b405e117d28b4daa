"""The daemon's HTTP surface: MAVI callbacks, health probes, and the status API.

Routes (stable; see README):
- ``POST /callbacks/mavi/{secret}``: segment callbacks. Wrong secret → 404, body over the
  limit → 413, not a callback → 400 with the reason, store failure → 503 (MAVI retries); 200
  only once stored, together with the alerts it raises. What follows the commit (evidence,
  the supervisor, metrics) cannot turn a stored callback into an error.
- ``POST /callbacks/mavi-video/{secret}``: batch upload callbacks (library video status).
- ``GET /healthz``: the process is alive.
- ``GET /readyz``: the store takes writes and the daemon is serving ([cluster]: and its lease
  rounds succeed); 503 with reasons if not.
- ``GET /api/v1/status``: streams, tasks and the account, as JSON (bearer token if configured).
- ``POST /api/v1/resume``: lift a balance halt and release held streams (bearer token).
- ``GET /metrics``: Prometheus metrics (here, or on ``[metrics] listen`` when that is set).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hmac
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.exposition import gzip_accepted
from pydantic import SecretStr

from streamwatch.alerts.sources import logo_hit
from streamwatch.config import Config
from streamwatch.evidence import Evidence
from streamwatch.guard import ConnectionGuard, effective_limit, listen_backlog
from streamwatch.http import BadBody, bind, close_runner, local_url, read_json
from streamwatch.logs import Throttle, enabled
from streamwatch.mavi.callbacks import CallbackError, SegmentReport, decode_body, parse_callback
from streamwatch.metrics import Metrics, StateCollector, render_page
from streamwatch.status import build_status, snapshot
from streamwatch.store import CallbackOutcome, StateStore, StoreError
from streamwatch.supervisor import Supervisor

__all__ = [
    "CALLBACK_PREFIX",
    "Server",
]

log = structlog.get_logger("streamwatch.server")

CALLBACK_PREFIX = "/callbacks/mavi/"
# A note on a request error a handler has answered and logged (see HttpLog).
ANSWERED = "streamwatch: answered and logged by the handler"
VIDEO_CALLBACK_PREFIX = "/callbacks/mavi-video/"


def _raw(text: str) -> bytes:
    """A path segment or header value as the bytes the client sent: aiohttp decodes them with
    surrogateescape, and a plain `encode()` of invalid UTF-8 raised (a 500)."""
    return text.encode("utf-8", "surrogateescape")


def _is_text(value: object, *, limit: int = 256) -> bool:
    """True for a non-empty string of at most `limit` characters that is valid Unicode (a
    JSON "\\udc80" escape gives a lone surrogate, which no UTF-8 store or log accepts)."""
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class HttpLog(logging.Logger):
    """aiohttp's server logger, as one structlog line per event. A request aiohttp refuses
    as malformed (bad request line or headers, broken chunking or compression) is a client's
    error: one warning, `http.bad_request`, with the exception's type and no traceback (its
    message may quote the request line, which holds the callback secret). Anything else keeps
    its traceback: it is a bug. Either line is written once a minute per kind at most, the next
    one with `suppressed` (how many were held back): a flood of bad requests is not a flood of
    log lines."""

    def __init__(self) -> None:
        super().__init__("aiohttp.server", logging.INFO)
        self._repeats = Throttle()

    def handle(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError | ConnectionError):
            if record.levelno < logging.WARNING or ANSWERED in getattr(exc, "__notes__", ()):
                log.debug("http.bad_request", error=type(exc).__name__)
                return
            held = self._repeats.allow(("bad_request", type(exc).__name__))
            if held is not None:
                log.warning("http.bad_request", error=type(exc).__name__, **_suppressed(held))
        elif record.levelno >= logging.WARNING:
            held = self._repeats.allow(("server_error", type(exc).__name__, str(record.msg)))
            if held is not None:
                log.error(
                    "http.server_error",
                    message=record.getMessage(),
                    exc_info=record.exc_info,
                    **_suppressed(held),
                )


def _suppressed(held: int) -> dict[str, int]:
    return {"suppressed": held} if held else {}


class Server:
    """The aiohttp application and its runner. `callback_url` is known once bound."""

    def __init__(
        self,
        *,
        config: Config,
        store: StateStore,
        supervisor: Supervisor,
        callback_secret: SecretStr,
        status_token: SecretStr | None,
        metrics: Metrics,
        collector: StateCollector,
        evidence: Evidence | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._evidence = evidence
        self._metrics = metrics
        self._collector = collector
        self._config = config
        self._store = store
        self._supervisor = supervisor
        self._secret = callback_secret.get_secret_value().encode()
        self._token = status_token
        self._clock = clock
        self.port: int | None = None
        self.ready = False
        # More that readiness needs ([cluster]: lease rounds that succeed): each says what is
        # wrong, or None.
        self.readiness: list[Callable[[], str | None]] = []
        file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._backlog = listen_backlog(file_limit)
        limit = effective_limit(config.server.max_connections, file_limit)
        if limit < config.server.max_connections:
            log.warning(
                "server.connection_limit_lowered",
                max_connections=config.server.max_connections,
                limit=limit,
                file_limit=file_limit,
                hint="raise the file limit (LimitNOFILE=, ulimit -n) to allow more",
            )
        self.guard = ConnectionGuard(
            limit=limit,
            header_timeout=config.server.header_timeout_seconds,
            body_timeout=config.server.body_timeout_seconds,
            idle_timeout=config.server.idle_timeout_seconds,
            metrics=metrics,
        )
        app = web.Application(
            client_max_size=config.server.max_body_bytes, middlewares=[self.guard.middleware]
        )
        app.router.add_post(CALLBACK_PREFIX + "{secret}", self._callback)
        app.router.add_post(VIDEO_CALLBACK_PREFIX + "{secret}", self._video_callback)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/api/v1/status", self._status)
        app.router.add_post("/api/v1/resume", self._resume)
        self.metrics_app: web.Application | None = None
        self.metrics_port: int | None = None
        if config.metrics.listen:
            self.metrics_app = web.Application(middlewares=[self.guard.middleware])
            self.metrics_app.router.add_get("/metrics", self._metrics_page)
        else:
            app.router.add_get("/metrics", self._metrics_page)
        self.app = app

    @property
    def collector(self) -> StateCollector:
        """The state series' collector (its snapshot is taken at each scrape)."""
        return self._collector

    def set_config(self, config: Config) -> None:
        self._config = config

    @property
    def base_url(self) -> str:
        assert self.port is not None, "known once bound"
        return local_url(self._config.server.host, self.port)

    def callback_url(self, *, public: bool = False) -> str:
        """The URL MAVI must post to. Contains the secret: never log it."""
        base = (
            self._config.server.public_url
            if public and self._config.server.public_url
            else (self.base_url)
        )
        return base.rstrip("/") + CALLBACK_PREFIX + self._secret.decode()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Server]:
        """Bind and serve; on exit, stop accepting and let in-flight requests finish."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=10.0, logger=HttpLog())
        await runner.setup()
        assert runner.server is not None
        self.guard.attach(runner.server)
        self.port = await bind(
            runner,
            self._config.server.host,
            self._config.server.port,
            what="the server",
            backlog=self._backlog,
        )
        log.info(
            "server.listening",
            address=self._config.server.host,
            port=self.port,
            max_connections=self.guard.limit,
        )
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(close_runner, runner)
            stack.enter_context(self._accept_errors_reported())
            if self.metrics_app is not None:
                listen = self._config.metrics.listen
                assert listen is not None
                host, _, port = listen.rpartition(":")
                metrics_runner = web.AppRunner(self.metrics_app, access_log=None, logger=HttpLog())
                await metrics_runner.setup()
                assert metrics_runner.server is not None
                self.guard.attach(metrics_runner.server)
                self.metrics_port = await bind(
                    metrics_runner,
                    host.strip("[]"),
                    int(port),
                    what="[metrics] listen",
                    backlog=self._backlog,
                )
                stack.push_async_callback(close_runner, metrics_runner)
                log.info("server.metrics_listening", address=host, port=self.metrics_port)
            self.ready = True
            try:
                yield self
            finally:
                self.ready = False

    @contextlib.contextmanager
    def _accept_errors_reported(self) -> Iterator[None]:
        """While serving, asyncio's failures to accept for lack of file descriptors go to the
        guard (one rate-limited line, idle connections shed) instead of one traceback each;
        every other loop error goes where it went before."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = self.guard.out_of_resources(context)
            if exc is not None:
                self.guard.accept_failed(exc)
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        try:
            yield
        finally:
            loop.set_exception_handler(previous)

    # -- handlers ------------------------------------------------------------------------------

    async def _callback(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            return await self._handle_callback(request)
        finally:
            self._metrics.callback_seconds.observe(time.perf_counter() - started)

    async def _handle_callback(self, request: web.Request) -> web.Response:
        given = request.match_info["secret"].encode()
        if not hmac.compare_digest(given, self._secret):
            self._metrics.rejected("secret")
            return web.json_response({"error": "not found"}, status=404)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject("too_large", "body too large", status=413)
        except (HttpProcessingError, web.RequestPayloadError, ConnectionError) as exc:
            # Broken chunking or compression, or the client left mid-body. aiohttp meets the
            # same error again when it drains the body after the answer: logged here only.
            exc.add_note(ANSWERED)
            return self._reject("unreadable", "the body could not be read")
        try:
            text = decode_body(body)
            callback = parse_callback(text)
        except CallbackError as exc:
            return self._reject(exc.reason, str(exc))
        try:
            outcome = await self._store.apply_callback(callback, body=text)
        except Exception as exc:  # noqa: BLE001 - not stored, whatever the cause: MAVI retries
            log.error("callback.store_failed", error=str(exc), error_type=type(exc).__name__)
            self._metrics.callbacks.labels("failed").inc()
            return web.json_response({"error": "not stored, retry"}, status=503)
        self.after_commit(outcome)
        return web.Response(body=_ANSWERS[outcome.kind], content_type="application/json")

    def _reject(self, reason: str, detail: str, *, status: int = 400) -> web.Response:
        """One log line and one count per refused callback; the reason goes back to MAVI."""
        log.warning("callback.rejected", reason=reason, detail=detail, status=status)
        self._metrics.rejected(reason)
        return web.json_response({"error": detail}, status=status)

    def after_commit(self, outcome: CallbackOutcome) -> None:
        """What follows a committed callback: its clip, the supervisor, metrics, the log. The
        callback and its alerts are stored: a failing step is logged and counted, and the
        answer stays 200 (MAVI's retry would only be a duplicate). Callbacks that arrived
        before their task was recorded, claimed when it is, come this way too."""
        steps: tuple[tuple[str, Callable[[CallbackOutcome], None]], ...] = (
            ("evidence", self._capture),
            ("supervisor", self._supervisor.observe),
            ("metrics", self._metrics.callback),
            ("log", _log_outcome),
        )
        for name, step in steps:
            try:
                step(outcome)
            except Exception:  # the edge of the callback path: log with traceback, count, go on
                log.exception("callback.after_commit_failed", step=name)
                self._metrics.callback_errors.labels(name).inc()

    def _capture(self, outcome: CallbackOutcome) -> None:
        """Start archiving the clip of a flagged segment of a stream with evidence on."""
        cb, stream = outcome.callback, outcome.stream
        if self._evidence is None or outcome.kind != "stored" or stream is None:
            return
        if not isinstance(cb, SegmentReport):
            return
        spec = self._supervisor.desired.get(stream)
        if spec is not None and spec.evidence and (cb.unsafe or logo_hit(cb, spec.watch_logos)):
            self._evidence.capture(stream, cb)

    async def _video_callback(self, request: web.Request) -> web.Response:
        """Upload callbacks of the batch API: {"videoNo", "clientId", "status"}."""
        if not hmac.compare_digest(_raw(request.match_info["secret"]), self._secret):
            self._metrics.rejected("secret")
            return web.json_response({"error": "not found"}, status=404)
        try:
            doc = await read_json(request)
        except BadBody as exc:
            return exc.response()
        if (
            not isinstance(doc, dict)
            or not _is_text(doc.get("videoNo"))
            or not _is_text(doc.get("status"))
        ):
            return web.json_response(
                {"error": "videoNo and status are required, as text of up to 256 characters"},
                status=400,
            )
        client_id = doc.get("clientId") if _is_text(doc.get("clientId")) else None
        try:
            changed = await self._store.record_library_video(
                doc["videoNo"], doc["status"], client_id
            )
        except StoreError:
            return web.json_response({"error": "not stored, retry"}, status=503)
        if changed:
            log.info("library.video_status", video=doc["videoNo"], status=doc["status"])
        return web.json_response({"ok": True})

    async def _metrics_page(self, request: web.Request) -> web.Response:
        """Text 0.0.4, or OpenMetrics when asked; gzip when accepted (level 1, in a thread:
        a large fleet's page is megabytes, and the callbacks keep flowing meanwhile)."""
        self._collector.snapshot = await snapshot(
            supervisor=self._supervisor, store=self._store, now=self._clock()
        )
        families = self._collector.stream_families(self._metrics.tokens)
        body, content_type = render_page(
            self._metrics.registry, families, request.headers.get("Accept", "")
        )
        headers = {"Content-Type": content_type}
        if gzip_accepted(request.headers.get("Accept-Encoding", "")):
            body = await asyncio.get_running_loop().run_in_executor(None, _gzip, body)
            headers["Content-Encoding"] = "gzip"
        headers["Vary"] = "Accept-Encoding"
        return web.Response(body=body, headers=headers)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        problems = []
        if not self.ready:
            problems.append("server is not serving")
        try:
            await self._store.check_writable()
        except Exception as exc:  # noqa: BLE001 - any store failure means not ready; say why
            problems.append(f"store is not writable: {exc}")
        problems += [p for check in self.readiness if (p := check()) is not None]
        if problems:
            return web.json_response({"ready": False, "problems": problems}, status=503)
        return web.json_response({"ready": True, "problems": []})

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        header = _raw(request.headers.get("Authorization", ""))
        expected = f"Bearer {self._token.get_secret_value()}"
        return hmac.compare_digest(header, expected.encode())

    async def _status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        doc = await build_status(
            config=self._config, supervisor=self._supervisor, store=self._store, clock=self._clock
        )
        return web.json_response(doc)

    async def _resume(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        try:
            doc = await read_json(request) if request.can_read_body else {}
        except BadBody as exc:
            return exc.response()
        names = doc.get("streams", []) if isinstance(doc, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return web.json_response({"error": '"streams" must be a list of names'}, status=400)
        unknown = [n for n in names if n not in self._supervisor.streams]
        if unknown:
            return web.json_response({"error": f"unknown streams: {unknown}"}, status=404)
        halt = self._supervisor.halt
        released = await self._supervisor.resume(names)
        log.info("supervisor.resumed", streams=released)
        lifted = halt.reason if halt is not None else None
        return web.json_response({"ok": True, "released": released, "halt_lifted": lifted})


# The answer to a stored callback, by outcome: made once (json.dumps of {"ok", "outcome"}).
_ANSWERS = {
    kind: json.dumps({"ok": True, "outcome": kind}).encode()
    for kind in ("stored", "duplicate", "orphan")
}


def _gzip(body: bytes) -> bytes:
    return gzip.compress(body, compresslevel=1, mtime=0)


def _log_outcome(outcome: CallbackOutcome) -> None:
    """One line per stored callback: a flagged segment (unsafe content or a logo) at info
    (warning when unsafe), any other segment at debug (at fleet scale, a line per segment was
    the journal's biggest writer and a tenth of the callback path's CPU)."""
    callback = outcome.callback
    if outcome.kind == "orphan":
        log.warning("callback.orphan", task_id=callback.task_id)
    elif isinstance(callback, SegmentReport) and outcome.kind == "stored":
        if callback.unsafe:
            write = log.warning
        elif callback.logos or callback.has_logo:
            write = log.info
        elif enabled(logging.DEBUG):
            write = log.debug
        else:
            return
        write(
            "segment.stored",
            stream=outcome.stream,
            segment=callback.segment_index,
            unsafe=callback.unsafe,
            logos=[logo.name for logo in callback.logos] or None,
        )
    elif outcome.kind == "stored":
        log.info(
            "callback.stored",
            stream=outcome.stream,
            task_id=callback.task_id,
            status=getattr(callback, "status", 0),
        )
