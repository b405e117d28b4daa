"""Async client of MAVI's v1 batch video API (upload, search, clips, chat, transcription,
delete). Every answer is HTTP 200 with a string `code` inside; this client turns codes into
exceptions (`BatchError` families), retries `0429` with backoff, keeps to the published
per-minute limits with a client-side limiter, and streams uploads from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import aiohttp
import structlog
from aiolimiter import AsyncLimiter
from pydantic import SecretStr

from streamwatch.config import RetryConfig
from streamwatch.mavi.hooks import RequestHook

__all__ = [
    "AccountDisabled",
    "BadRequest",
    "BatchAuthError",
    "BatchBusy",
    "BatchError",
    "Clip",
    "DuplicateOperation",
    "NoCredits",
    "Page",
    "Transcription",
    "TranscriptionTimeout",
    "Video",
    "VideoClient",
]

log = structlog.get_logger("streamwatch.mavi")

# Published limits per minute (MAVI-CONTRACT.md); delete has none published. The limiter keeps
# a client under them.
PER_MINUTE = {
    "upload": 10,
    "searchDB": 200,
    "searchAI": 20,
    "searchVideoFragment": 10,
    "chat": 10,
    "subTranscription": 20,
    "getTranscription": 50,
}
CLIP_SEARCH_MAX_VIDEOS = 50
DELETE_MAX = 500


class BatchError(Exception):
    """A batch API call failed; `code` is MAVI's string code, `status` the HTTP status of an
    answer that had none."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class BadRequest(BatchError):
    """0001/0003: the parameters were refused; fix the call."""


class BatchAuthError(BatchError):
    """0401: the API key is wrong or expired."""


class NoCredits(BatchError):
    """0402: the account has no credits left."""


class AccountDisabled(BatchError):
    """0403: the account is disabled."""


class DuplicateOperation(BatchError):
    """0409: the operation was already done (e.g. deleting twice)."""


class BatchBusy(BatchError):
    """0429, HTTP 5xx or a broken connection: retried with backoff."""


class TranscriptionTimeout(BatchError):
    """The transcription did not finish within the wait."""


_CODES: dict[str, type[BatchError]] = {
    "0001": BadRequest,
    "0003": BadRequest,
    "0401": BatchAuthError,
    "0402": NoCredits,
    "0403": AccountDisabled,
    "0409": DuplicateOperation,
    "0429": BatchBusy,
}

VideoStatus = Literal["PARSE", "UNPARSE", "FAIL", "PARSE_ERROR"]


@dataclass(frozen=True, slots=True)
class Video:
    video_no: str
    name: str | None
    status: str | None
    upload_time_ms: int | None

    @classmethod
    def from_wire(cls, d: dict[str, object]) -> Video:
        upload = d.get("uploadTime")
        return cls(
            video_no=str(d["videoNo"]),
            name=_text(d.get("videoName")),
            status=_text(d.get("videoStatus")),
            upload_time_ms=_millis(upload),
        )


@dataclass(frozen=True, slots=True)
class Page:
    videos: list[Video]
    current: int
    pages: int
    total: int


@dataclass(frozen=True, slots=True)
class Clip:
    video_no: str
    name: str | None
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Transcription:
    task_no: str
    video_no: str | None
    finished: bool
    kind: str | None
    segments: list[tuple[float, float, str]]


def _retry_busy(exc: Exception) -> bool:
    return isinstance(exc, BatchBusy)


class VideoClient:
    """One client per account; share it (it reuses connections and keeps the rate limits)."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: SecretStr,
        retry: RetryConfig | None = None,
        timeout_seconds: float = 60.0,
        limits: dict[str, int] | None = None,
        on_request: RequestHook | None = None,
    ) -> None:
        """`on_request` is told of each single request (endpoint, outcome, seconds)."""
        self._on_request = on_request
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._retry = retry or RetryConfig()
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._limiters = {
            name: AsyncLimiter(per_minute, 60)
            for name, per_minute in (limits or PER_MINUTE).items()
        }

    # -- the calls ------------------------------------------------------------------------------

    async def upload(self, path: Path, *, callback_uri: str | None = None) -> Video:
        """Upload a file, streamed from disk (never read whole into memory)."""

        async def send() -> Any:
            # quote_fields=False: send the file name as it is, not percent-encoded.
            form = aiohttp.FormData(quote_fields=False)
            with path.open("rb") as handle:
                form.add_field(
                    "file", handle, filename=path.name, content_type="application/octet-stream"
                )
                params = {"callBackUri": callback_uri} if callback_uri else None
                return await self._request(
                    "POST",
                    "upload",
                    data=form,
                    params=params,
                    # No total for big files, but a stalled connection still times out.
                    client_timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=30, sock_read=300
                    ),
                )

        return Video.from_wire(await self._call("upload", send))

    async def page(
        self,
        *,
        page: int = 1,
        page_size: int = 200,
        status: str | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> Page:
        """One page of the library's metadata (pages count from 1)."""
        params: dict[str, object] = {"page": page, "pageSize": page_size}
        if status:
            params["videoStatus"] = status
        if start_ms is not None:
            params["startTime"] = start_ms
        if end_ms is not None:
            params["endTime"] = end_ms
        data = await self._call("searchDB", lambda: self._request("GET", "searchDB", params=params))
        videos = [Video.from_wire(v) for v in data.get("videoData") or []]
        return Page(
            videos,
            int(data.get("current", page)),
            int(data.get("page", 1) or 1),
            int(data.get("total", len(videos))),
        )

    async def videos(self, **filters: Any) -> AsyncIterator[Video]:
        """Every video matching the filters, across all pages."""
        number = 1
        while True:
            page = await self.page(page=number, **filters)
            for video in page.videos:
                yield video
            if number >= page.pages or not page.videos:
                return
            number += 1

    async def search(self, query: str) -> list[Video]:
        """Videos most relevant to an English prompt."""
        data = await self._call(
            "searchAI", lambda: self._request("POST", "searchAI", json={"searchValue": query})
        )
        return [Video.from_wire(v) for v in data.get("videos") or []]

    async def clips(self, video_nos: Sequence[str], query: str) -> list[Clip]:
        """The clips most relevant to a prompt, across any number of videos (chunked)."""
        clips: list[Clip] = []
        for chunk in _chunks(video_nos, CLIP_SEARCH_MAX_VIDEOS):
            body = {"videoNos": chunk, "searchValue": query}
            data = await self._call(
                "searchVideoFragment",
                partial(self._request, "POST", "searchVideoFragment", json=body),
            )
            for v in data.get("videos") or []:
                clips.append(
                    Clip(
                        str(v["videoNo"]),
                        v.get("videoName"),
                        float(v.get("fragmentStartTime", 0)),
                        float(v.get("fragmentEndTime", 0)),
                    )
                )
        return clips

    async def chat(
        self, video_nos: Sequence[str], message: str, *, history: Iterable[tuple[str, str]] = ()
    ) -> str:
        """Ask about videos; the whole answer. `history` is (user, robot) pairs."""
        body = _chat_body(video_nos, message, history, stream=False)
        data = await self._call("chat", lambda: self._request("POST", "chat", json=body))
        return str(data.get("msg", "")) if isinstance(data, dict) else str(data)

    async def chat_stream(
        self, video_nos: Sequence[str], message: str, *, history: Iterable[tuple[str, str]] = ()
    ) -> AsyncIterator[str]:
        """Ask about videos; the answer as text deltas while it is written."""
        body = _chat_body(video_nos, message, history, stream=True)
        async with (
            self._limiters.get("chat") or contextlib.nullcontext(),
            self._session.post(
                f"{self._base}/chat", json=body, headers=self._headers(), timeout=self._timeout
            ) as resp,
        ):
            if resp.status >= 500 or resp.status == 429:
                raise BatchBusy(f"chat: HTTP {resp.status}")
            if resp.content_type == "application/json":
                # A plain answer instead of a stream: a refusal (raised here), or the whole text.
                data = _data(await resp.json(content_type=None), "chat")
                if isinstance(data, dict) and data.get("msg"):
                    yield str(data["msg"])
                return
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line.removeprefix("data:").strip()
                if not payload or payload == "[DONE]":
                    continue
                data = _data(json.loads(payload), "chat")
                delta = data.get("msg") if isinstance(data, dict) else None
                if delta:
                    yield str(delta)

    async def transcribe(
        self,
        video_no: str,
        *,
        kind: Literal["AUDIO", "VIDEO", "AUDIO/VIDEO"] = "AUDIO",
        callback_uri: str | None = None,
    ) -> str:
        """Submit a transcription; returns its task number."""
        body: dict[str, object] = {"videoNo": video_no, "type": kind}
        if callback_uri:
            body["callBackUri"] = callback_uri
        data = await self._call(
            "subTranscription", lambda: self._request("POST", "subTranscription", json=body)
        )
        return str(data["taskNo"])

    async def transcription(self, task_no: str) -> Transcription:
        data = await self._call(
            "getTranscription",
            lambda: self._request("GET", "getTranscription", params={"taskNo": task_no}),
        )
        segments = [
            (float(t.get("startTime", 0)), float(t.get("endTime", 0)), str(t.get("content", "")))
            for t in data.get("transcriptions") or []
        ]
        return Transcription(
            task_no, data.get("videoNo"), data.get("status") == "FINISH", data.get("type"), segments
        )

    async def wait_transcription(
        self, task_no: str, *, timeout_seconds: float = 600, poll_seconds: float = 5
    ) -> Transcription:
        """Poll until the transcription is finished, or raise `TranscriptionTimeout`."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            result = await self.transcription(task_no)
            if result.finished:
                return result
            if time.monotonic() >= deadline:
                raise TranscriptionTimeout(f"transcription {task_no} not finished in time")
            await asyncio.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())))

    async def delete(self, video_nos: Sequence[str]) -> int:
        """Delete videos (in chunks of 500). Returns how many were asked for."""
        for chunk in _chunks(video_nos, DELETE_MAX):
            await self._call("delete", partial(self._request, "DELETE", "delete", json=chunk))
        return len(video_nos)

    # -- plumbing -------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._key.get_secret_value()}

    async def _call(self, endpoint: str, send: Callable[[], Awaitable[Any]]) -> Any:
        async for attempt in self._retry.context(_retry_busy):
            with attempt:
                if attempt.num > 1:
                    log.info("mavi.request_retry", endpoint=endpoint, attempt=attempt.num)
                limiter = self._limiters.get(endpoint)
                async with limiter if limiter is not None else contextlib.nullcontext():
                    return await self._timed(endpoint, send)
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    async def _timed(self, endpoint: str, send: Callable[[], Awaitable[Any]]) -> Any:
        """One request, told to `on_request` with its outcome and duration."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await send()
        except BatchError as exc:
            outcome = _outcome(exc)
            raise
        finally:
            if self._on_request is not None:
                self._on_request(endpoint, outcome, time.perf_counter() - started)

    async def _request(
        self,
        method: str,
        endpoint: str,
        *,
        client_timeout: aiohttp.ClientTimeout | None = None,
        **kwargs: Any,
    ) -> Any:
        try:
            async with self._session.request(
                method,
                f"{self._base}/{endpoint}",
                headers=self._headers(),
                timeout=client_timeout or self._timeout,
                **kwargs,
            ) as resp:
                if resp.status >= 500 or resp.status == 429:
                    raise BatchBusy(f"{endpoint}: HTTP {resp.status}", status=resp.status)
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise BatchBusy(f"{endpoint}: {type(exc).__name__} talking to MAVI") from None
        try:
            doc = json.loads(text)
        except ValueError:
            raise BatchError(f"{endpoint}: the answer is not JSON") from None
        return _data(doc, endpoint)


def _outcome(exc: BatchError) -> str:
    """The `outcome` label of a failed request, in the stream API's words."""
    if isinstance(exc, BatchBusy):
        if exc.code == "0429" or exc.status == 429:
            return "rate_limited"
        return "server_error" if exc.status else "unreachable"
    for kind, name in (
        (BatchAuthError, "auth"),
        (AccountDisabled, "auth"),
        (NoCredits, "balance"),
        (BadRequest, "refused"),
        (DuplicateOperation, "refused"),
    ):
        if isinstance(exc, kind):
            return name
    return "bad_answer"


def _data(doc: object, endpoint: str) -> Any:
    if not isinstance(doc, dict):
        raise BatchError(f"{endpoint}: the answer is not an object")
    code = str(doc.get("code", ""))
    if code != "0000":
        kind = _CODES.get(code, BatchError)
        raise kind(f"{endpoint}: code {code}: {str(doc.get('msg', ''))[:200]}", code=code)
    return doc.get("data") or {}


def _chat_body(
    video_nos: Sequence[str], message: str, history: Iterable[tuple[str, str]], *, stream: bool
) -> dict[str, object]:
    return {
        "videoNos": list(video_nos),
        "message": message,
        "stream": stream,
        "history": [{"user": u, "robot": r} for u, r in history],
    }


def _chunks(items: Sequence[str], size: int) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def _text(value: object) -> str | None:
    """A string field of a video, or None when MAVI sent none (or something else)."""
    return value if isinstance(value, str) else None


def _millis(value: object) -> int | None:
    """`uploadTime` in milliseconds, sent as a number or a numeric string; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str) or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return None
