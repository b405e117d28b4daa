"""The evidence archive: clips of flagged segments kept on local disk.

For streams with `evidence = true`, a segment with unsafe content or a watch-listed logo has its
clip downloaded from the callback's `video_url` into `[evidence] path`
(``<stream>/<task_id>/segment_<n>.mp4``), streamed to a temporary file and renamed when
complete. Retention is enforced after every capture: clips older than `retention_days` go,
then the oldest until the archive is under `max_bytes`. With `upload = true` each clip is also
uploaded to the MAVI library. Every capture is a row in the store's `evidence` table (path,
size, library video number, or the error).

Only http(s) URLs are fetched, with a size cap and a timeout: the URL comes from a callback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import structlog

from streamwatch.config import EvidenceConfig
from streamwatch.mavi.callbacks import SegmentReport
from streamwatch.mavi.videos import BatchError, VideoClient
from streamwatch.store import Store

__all__ = ["Evidence"]

log = structlog.get_logger("streamwatch.evidence")


class Evidence:
    """Captures clips in the background; `settle()` waits for captures under way."""

    def __init__(
        self,
        *,
        config: EvidenceConfig,
        store: Store,
        session: aiohttp.ClientSession,
        videos: VideoClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._store = store
        self._session = session
        self._videos = videos
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    def path_for(self, stream: str, report: SegmentReport) -> Path:
        return self.config.path / stream / report.task_id / f"segment_{report.segment_index}.mp4"

    def capture(self, stream: str, report: SegmentReport) -> Path | None:
        """Start archiving the segment's clip; returns where it will be, or None."""
        url = report.video_url
        if not url or not url.startswith(("http://", "https://")):
            return None
        path = self.path_for(stream, report)
        task = asyncio.create_task(self._capture(stream, report, url, path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return path

    async def settle(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _capture(self, stream: str, report: SegmentReport, url: str, path: Path) -> None:
        try:
            size = await self._download(url, path)
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("evidence.download_failed", stream=stream, error=str(exc))
            await self._store.record_evidence(
                stream=stream,
                task_id=report.task_id,
                segment_index=report.segment_index,
                path=str(path),
                size=0,
                error=str(exc)[:300],
            )
            return
        video_no = None
        if self.config.upload and self._videos is not None:
            try:
                video_no = (await self._videos.upload(path)).video_no
            except BatchError as exc:
                log.warning("evidence.upload_failed", stream=stream, error=str(exc))
        await self._store.record_evidence(
            stream=stream,
            task_id=report.task_id,
            segment_index=report.segment_index,
            path=str(path),
            size=size,
            video_no=video_no,
        )
        log.info("evidence.captured", stream=stream, segment=report.segment_index, bytes=size)
        await self.prune()

    async def _download(self, url: str, path: Path) -> int:
        timeout = aiohttp.ClientTimeout(total=self.config.download_timeout_seconds)
        partial = path.with_suffix(".part")
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        size = 0
        async with self._session.get(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"clip download answered HTTP {resp.status}")
            with partial.open("wb") as out:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    size += len(chunk)
                    if size > self.config.max_clip_bytes:
                        raise ValueError("clip larger than max_clip_bytes")
                    out.write(chunk)
        await asyncio.to_thread(partial.replace, path)
        return size

    async def prune(self) -> list[str]:
        """Apply retention: by age, then by total size (oldest first). Returns removed paths."""
        now = self._clock()
        rows = await self._store.evidence_rows()
        removed: list[str] = []
        total = sum(r[2] for r in rows)
        for path, created_at, size in rows:  # oldest first
            too_old = now - created_at > self.config.retention_days * 86_400
            if not too_old and total <= self.config.max_bytes:
                continue
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)
            total -= size
            removed.append(path)
        if removed:
            await self._store.forget_evidence(removed)
            log.info("evidence.pruned", clips=len(removed))
        return removed
