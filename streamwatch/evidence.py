"""The evidence archive: clips of flagged segments kept on local disk.

For streams with `evidence = true`, a segment with unsafe content or a watch-listed logo has its
clip downloaded from the callback's `video_url` into `[evidence] path`
(``<stream>/<task_id>/segment_<n>.mp4``), streamed to a ``.part`` file and renamed when
complete. Folders are created 0700 and clips 0600 whatever the umask. Retention is enforced
after every capture: clips older than `retention_days` go, then the oldest until the archive,
counting the bytes of downloads in flight, is under `max_bytes`. With `upload = true` each clip
is also uploaded to the MAVI library. Every capture is a row in the store's `evidence` table
(path, size, library video number, or the error).

The URL comes from a callback, so it is fetched through `Egress` (public addresses only unless
`allow_hosts` says otherwise, on every redirect and at connection time; no credentials, no
cookies), with a size cap and a timeout, on the archive's own connection pool with at most
`max_downloads` captures at once: slow clip hosts never hold connections MAVI's API needs.
A failed download removes its ``.part`` file; ``.part`` files older than the download timeout
(left by a crash) are removed at start and by retention. Captures run in the archive's task
group (`running()`); at stop, those under way get `STOP_GRACE_SECONDS`, then the rest are
cancelled (abandoned), each recorded as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import structlog
from yarl import URL

from streamwatch.background import Failures, TaskGroup
from streamwatch.config import EvidenceConfig
from streamwatch.egress import Egress, Refused, shown
from streamwatch.mavi.callbacks import SegmentReport
from streamwatch.mavi.videos import BatchError, VideoClient
from streamwatch.store import StateStore

__all__ = ["MAX_REDIRECTS", "STOP_GRACE_SECONDS", "DownloadError", "Evidence"]

log = structlog.get_logger("streamwatch.evidence")

MAX_REDIRECTS = 5
STOP_GRACE_SECONDS = 2.0  # captures under way at stop get this long, then are abandoned
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 256 * 1024
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class DownloadError(Exception):
    """A clip could not be archived; the message is safe to store and log."""


def _scrub(text: str) -> str:
    """`text` with every URL in it cut to what `shown()` keeps (no user info, no query)."""
    return _URL_RE.sub(lambda m: shown(m.group(0)), text)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"clip download timed out after {timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error)
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, Refused | DownloadError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot write the clip: {exc.strerror}"
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _make_dirs(folder: Path) -> None:
    """Create `folder` and missing parents as 0700, whatever the umask."""
    missing: list[Path] = []
    here = folder
    while not here.exists():
        missing.append(here)
        here = here.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)


def _open_private(path: Path) -> int:
    """A new file for writing, 0600 whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _remove_stale_parts(root: Path, cutoff: float, busy: set[Path]) -> list[Path]:
    """Delete ``*.part`` files under `root` last written before `cutoff`, except `busy` ones."""
    removed: list[Path] = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".part"):
                continue
            path = Path(folder) / name
            try:
                if path in busy or path.lstat().st_mtime >= cutoff:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("evidence.remove_failed", path=str(path), error=exc.strerror)
                continue
            removed.append(path)
    return removed


class Evidence:
    """Captures clips in the background; `settle()` waits for captures under way.

    `running()` opens the archive's own connection pool (and sweeps what a crash left); a
    capture outside it is refused."""

    def __init__(
        self,
        *,
        config: EvidenceConfig,
        store: StateStore,
        videos: VideoClient | None = None,
        clock: Callable[[], float] = time.time,
        trusted_prefixes: Iterable[str] = (),
        failures: Failures | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._videos = videos
        self._clock = clock
        self._egress = Egress(allow_hosts=config.allow_hosts, trusted_prefixes=trusted_prefixes)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(config.max_downloads)
        self._tasks = TaskGroup("evidence", failures)
        self._queued = 0  # captures waiting for a slot
        self._partial: dict[Path, int] = {}  # .part files being written -> bytes so far
        self._swept_at = float("-inf")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Evidence]:
        """Open the archive's connection pool and apply retention (stale ``.part`` files
        included); on exit, refuse new captures, give those under way `STOP_GRACE_SECONDS`,
        abandon the rest, then close the pool."""
        session = self._egress.session(
            limit=self.config.max_downloads, limit_per_host=self.config.max_downloads_per_host
        )
        async with session, self._tasks:
            self._session = session
            try:
                await self.prune()
                yield self
            finally:
                self._session = None  # no new captures
                await self._stop_captures()

    @property
    def partial_bytes(self) -> int:
        """Bytes written so far by downloads in flight (they count toward `max_bytes`)."""
        return sum(self._partial.values())

    def path_for(self, stream: str, report: SegmentReport) -> Path:
        return self.config.path / stream / report.task_id / f"segment_{report.segment_index}.mp4"

    def capture(self, stream: str, report: SegmentReport) -> Path | None:
        """Start archiving the segment's clip; returns where it will be, or None when it will
        not be archived (no URL, a refused URL, a full queue: the refusal is recorded)."""
        raw = report.video_url
        if not raw:
            return None
        path = self.path_for(stream, report)
        try:
            url = self._egress.check_url(raw)
            if self._session is None:
                raise DownloadError("the evidence archive is not running")
            if self._queued >= self.config.max_queued_downloads:
                raise DownloadError(
                    f"{self._queued} clips already wait for a download slot"
                    " ([evidence] max_queued_downloads)"
                )
        except (Refused, DownloadError) as exc:
            self._spawn(self._refused(stream, report, path, str(exc)))
            return None
        self._queued += 1
        self._spawn(self._capture(stream, report, url, path))
        return path

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn("evidence.capture", coro)

    async def settle(self) -> None:
        await self._tasks.settle()

    async def _stop_captures(self) -> None:
        """Give captures under way `STOP_GRACE_SECONDS`, then abandon the rest (each records
        that it was abandoned and removes its ``.part``)."""
        with anyio.move_on_after(STOP_GRACE_SECONDS):
            await self._tasks.settle()
        if self._tasks.pending:
            self._tasks.cancel()

    async def _refused(self, stream: str, report: SegmentReport, path: Path, error: str) -> None:
        log.warning("evidence.refused", stream=stream, segment=report.segment_index, error=error)
        await self._record(stream, report, path, size=0, error=error)

    async def _record(
        self,
        stream: str,
        report: SegmentReport,
        path: Path,
        *,
        size: int,
        video_no: str | None = None,
        error: str | None = None,
    ) -> None:
        await self._store.record_evidence(
            stream=stream,
            task_id=report.task_id,
            segment_index=report.segment_index,
            path=str(path),
            size=size,
            video_no=video_no,
            error=None if error is None else error[:300],
        )

    async def _capture(self, stream: str, report: SegmentReport, url: URL, path: Path) -> None:
        size: int | None = None
        video_no: str | None = None
        error: str | None = None
        waiting = True
        try:
            async with self._slots:
                self._queued -= 1
                waiting = False
                try:
                    size = await self._download(url, path)
                except (OSError, aiohttp.ClientError, TimeoutError, Refused, DownloadError) as exc:
                    error = _scrub(_describe(exc, self.config.download_timeout_seconds))
                    log.warning("evidence.download_failed", stream=stream, error=error)
                except Exception as exc:  # a background task's edge: record it and go on
                    error = f"unexpected {type(exc).__name__} while downloading"
                    log.error("evidence.download_failed", stream=stream, error=error, exc_info=True)
                if size is not None and self.config.upload and self._videos is not None:
                    try:
                        video_no = (await self._videos.upload(path)).video_no
                    except BatchError as exc:
                        log.warning("evidence.upload_failed", stream=stream, error=str(exc))
        except anyio.get_cancelled_exc_class():
            # Stopping: say what became of the clip (kept if it was downloaded), then stop.
            if size is None:
                error = "abandoned: streamwatch stopped before the clip was downloaded"
            with anyio.CancelScope(shield=True):
                await self._record(
                    stream, report, path, size=size or 0, video_no=video_no, error=error
                )
            raise
        finally:
            if waiting:
                self._queued -= 1
        # Shielded: a clip on disk always gets its row, or retention would never see it.
        with anyio.CancelScope(shield=True):
            await self._record(stream, report, path, size=size or 0, video_no=video_no, error=error)
        if error is None:
            log.info("evidence.captured", stream=stream, segment=report.segment_index, bytes=size)
            await self.prune()

    async def _download(self, url: URL, path: Path) -> int:
        partial = path.with_suffix(".part")
        await asyncio.to_thread(_make_dirs, path.parent)
        self._partial[partial] = 0
        try:
            async with asyncio.timeout(self.config.download_timeout_seconds):
                size = await self._fetch(url, partial)
            await asyncio.to_thread(partial.replace, path)
            return size
        except BaseException:
            partial.unlink(missing_ok=True)  # one quick call: safe under cancellation too
            raise
        finally:
            self._partial.pop(partial, None)

    async def _fetch(self, url: URL, partial: Path) -> int:
        """Follow up to MAX_REDIRECTS redirects, each checked, then stream the body."""
        assert self._session is not None, "capture() refuses when not running"
        for _ in range(MAX_REDIRECTS + 1):
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS:
                    url = self._next_hop(url, resp)
                    continue
                if resp.status != 200:
                    raise DownloadError(f"{shown(url)} answered HTTP {resp.status}")
                if (resp.content_length or 0) > self.config.max_clip_bytes:
                    raise DownloadError("clip larger than max_clip_bytes")
                return await self._save(resp, partial)
        raise DownloadError(f"{shown(url)}: more than {MAX_REDIRECTS} redirects")

    def _next_hop(self, url: URL, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise DownloadError(f"{shown(url)} answered HTTP {resp.status} without a Location")
        try:
            target = url.join(URL(location))
        except ValueError:
            raise DownloadError(f"{shown(url)} redirects to an unparsable URL") from None
        return self._egress.check_url(target)

    async def _save(self, resp: aiohttp.ClientResponse, partial: Path) -> int:
        size = 0
        with os.fdopen(await asyncio.to_thread(_open_private, partial), "wb") as out:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > self.config.max_clip_bytes:
                    raise DownloadError("clip larger than max_clip_bytes")
                self._partial[partial] = size
                if self.partial_bytes > self.config.max_bytes:
                    raise DownloadError("downloads in flight would exceed max_bytes")
                out.write(chunk)
        return size

    async def sweep(self) -> list[Path]:
        """Remove ``.part`` files not written to for longer than the download timeout: no
        download of this process is that old, so a crash left them."""
        self._swept_at = now = self._clock()
        cutoff = now - self.config.download_timeout_seconds
        removed = await asyncio.to_thread(
            _remove_stale_parts, self.config.path, cutoff, set(self._partial)
        )
        if removed:
            log.info("evidence.partials_removed", files=len(removed))
        return removed

    async def prune(self) -> list[str]:
        """Apply retention: stale ``.part`` files (at most once per download timeout), then
        clips by age, then the oldest until the archive plus the bytes of downloads in flight
        is under `max_bytes`. Returns the clips removed."""
        if self._clock() - self._swept_at >= self.config.download_timeout_seconds:
            await self.sweep()
        now = self._clock()
        rows = await self._store.evidence_rows()
        removed: list[str] = []
        total = sum(r.size for r in rows) + self.partial_bytes
        for clip in rows:  # oldest first
            path, size = clip.path, clip.size
            too_old = now - clip.created_at > self.config.retention_days * 86_400
            if not too_old and total <= self.config.max_bytes:
                continue
            try:
                await asyncio.to_thread(Path(path).unlink, missing_ok=True)
            except OSError as exc:
                log.warning("evidence.remove_failed", path=path, error=exc.strerror)
                continue
            total -= size
            removed.append(path)
        if removed:
            await self._store.forget_evidence(removed)
            log.info("evidence.pruned", clips=len(removed))
        return removed
