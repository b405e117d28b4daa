"""Library videos as their upload callbacks report them, and the evidence archive's records.

The SQL is the portable subset both backends run (`streamwatch.store.sql`).
"""

from __future__ import annotations

from streamwatch.store.reader import ReadSide
from streamwatch.store.types import ArchivedClip, EvidenceRecord, LibraryVideo
from streamwatch.store.writer import Context, WriteSide

__all__ = ["VideoReads", "VideoWrites"]


class VideoReads(ReadSide):
    async def library_videos(self) -> list[LibraryVideo]:
        """Every library video reported, by number."""
        return await self._read(
            lambda c: [
                LibraryVideo(*r)
                for r in c.execute(
                    "SELECT video_no, status, client_id, updated_at FROM library_videos"
                    " ORDER BY video_no"
                )
            ]
        )

    async def evidence(self) -> list[EvidenceRecord]:
        """Every evidence record, oldest first."""
        return await self._read(
            lambda c: [
                EvidenceRecord(*r)
                for r in c.execute(
                    "SELECT stream, task_id, segment_index, path, size, video_no, error,"
                    " created_at FROM evidence ORDER BY id"
                )
            ]
        )


class VideoWrites(WriteSide):
    async def evidence_rows(self) -> list[ArchivedClip]:
        """The archived clips (not the failed captures), oldest first. Read by the writer, in
        order with the captures recording clips (the archive counts a download either as in
        flight or as recorded, never as neither)."""
        return await self._write(
            lambda ctx: [
                ArchivedClip(*r)
                for r in ctx.conn.execute(
                    "SELECT path, created_at, size FROM evidence WHERE error IS NULL"
                    " ORDER BY created_at, id"
                )
            ]
        )

    async def record_library_video(
        self, video_no: str, status: str, client_id: str | None, *, at: float | None = None
    ) -> bool:
        """Store a library video's reported status. True if it changed."""
        when = self._clock() if at is None else at

        def op(ctx: Context) -> bool:
            old = ctx.conn.execute(
                "SELECT status FROM library_videos WHERE video_no = ?", (video_no,)
            ).fetchone()
            ctx.conn.execute(
                "INSERT INTO library_videos (video_no, status, client_id, updated_at)"
                " VALUES (?,?,?,?) ON CONFLICT(video_no) DO UPDATE SET status = excluded.status,"
                " client_id = excluded.client_id, updated_at = excluded.updated_at",
                (video_no, status, client_id, when),
            )
            return old is None or old[0] != status

        return await self._write(op)

    async def record_evidence(
        self,
        *,
        stream: str,
        task_id: str,
        segment_index: int,
        path: str,
        size: int,
        video_no: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record a capture: the clip archived at `path`, or why it was not (`error`)."""
        now = self._clock()
        await self._write(
            lambda ctx: ctx.conn.execute(
                "INSERT INTO evidence (stream, task_id, segment_index, path, size, video_no,"
                " error, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (stream, task_id, segment_index, path, size, video_no, error, now),
            )
        )

    async def forget_evidence(self, paths: list[str]) -> None:
        """Drop the records of clips removed from the archive."""
        await self._write(
            lambda ctx: ctx.conn.executemany(
                "DELETE FROM evidence WHERE path = ?", [(p,) for p in paths]
            )
        )
