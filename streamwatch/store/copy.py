"""`streamwatch store copy`: the whole state from one backend to another (SQLite file ⇄
PostgreSQL database), into an empty target, verified before it is committed.

The source is read in one read transaction (one consistent snapshot, the daemon may run), a
chunk of rows at a time; the target is migrated to the current schema and filled in one
transaction, which commits only once every table's row count and each stream's ledger tick
total match the source's. A target that holds any row is refused, untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamwatch.store.connection import ReadConnection, connect_writer
from streamwatch.store.postgres import DbLoop, PgReadConnection, PgTarget, connect_writer_pg
from streamwatch.store.sql import Connection
from streamwatch.store.types import StoreError

__all__ = ["COPY_TABLES", "CopyResult", "copy_state"]

Location = Path | PgTarget

# Every table of the schema, its columns, and an order on a unique key (parents first).
# A migration that adds a table or a column adds it here too (tests/test_store_copy.py checks).
COPY_TABLES: dict[str, tuple[str, str]] = {
    "settings": ("key, value", "key"),
    "streams": (
        "name, held_reason, held_at, failures, retry_at, last_end_status, last_error,"
        " restart_times, offline_since, probes, precharges_avoided, ticks_saved",
        "name",
    ),
    "tasks": (
        "task_id, stream, spec_hash, fps, content_moderation, logo_detection, max_logos,"
        " started_at, stop_requested, ended_at, end_status, end_reason, last_callback_at,"
        " segments, unsafe_segments, logo_segments, failed_segments, segment_ticks,"
        " pruned_through",
        "rowid",  # SQLite's rowid, PostgreSQL's column of that name: the order of starts
    ),
    "segments": (
        "task_id, segment_index, stream, received_at, start_time, end_time, unsafe, has_logo,"
        " logos, frames, processing_ms, tokens, video_url",
        "task_id, segment_index",
    ),
    "segment_failures": ("id, task_id, stream, status, message, received_at", "id"),
    "orphan_callbacks": ("id, task_id, segment_index, status, received_at, body", "id"),
    "events": ("id, at, stream, task_id, kind, status, detail", "id"),
    "charges": ("id, at, stream, task_id, kind, segment_index, ticks", "id"),
    "alert_outbox": (
        "id, alert_id, sink, rule, grp, event, state, attempts, next_at, last_error,"
        " created_at, delivered_at",
        "id",
    ),
    "library_videos": ("video_no, status, client_id, updated_at", "video_no"),
    "evidence": (
        "id, stream, task_id, segment_index, path, size, video_no, error, created_at",
        "id",
    ),
    "alert_conditions": ("rule, subject, last_sent, open", "rule, subject"),
    "alert_windows": ("rule, sink, grp, until", "rule, sink"),
    "alert_streaks": ("stream, unsafe, logo", "stream"),
    "orphan_tasks": (
        "task_id, first_at, last_at, callbacks, segments, content_moderation, logo_detection,"
        " fps, uncertain, reported, end_status, stopped_at",
        "task_id",
    ),
    "alert_active": ("sink, subject, posted", "sink, subject"),
    "start_intents": (
        "attempt_id, stream, url_hash, spec_hash, fps, content_moderation, logo_detection,"
        " max_logos, created_at, state, task_id, closed_at, detail",
        "attempt_id",
    ),
    "orphan_charges": ("task_id, segment_index, at, ticks, uncertain", "task_id, segment_index"),
}
# PostgreSQL's identities, set past the copied ids once the rows are in.
_IDENTITIES = (
    ("tasks", "rowid"),
    ("segment_failures", "id"),
    ("orphan_callbacks", "id"),
    ("events", "id"),
    ("charges", "id"),
    ("alert_outbox", "id"),
    ("evidence", "id"),
)
_CHUNK = 5000
_LEDGER = "SELECT stream, sum(ticks) FROM charges GROUP BY stream ORDER BY stream"


@dataclass(frozen=True)
class CopyResult:
    """What was copied: rows per table, and the ledger's ticks per stream (both verified)."""

    rows: dict[str, int]
    ledger: dict[str, int]


def copy_state(
    source: Location, target: Location, *, progress: Callable[[str, int], None] | None = None
) -> CopyResult:
    """Copy everything at `source` into the empty `target` (see the module's docstring).
    Blocking: run it in a thread. `progress(table, rows)` after each table."""
    if str(source) == str(target):
        raise StoreError("the source and the target are the same")
    created = isinstance(target, Path) and not target.exists()
    if isinstance(target, Path) and target.exists() and target.stat().st_size > 0:
        raise StoreError(f"{target} exists and is not empty: the target must be empty")
    loop = DbLoop()
    loop.start()
    # Beside a writer even if none runs: a read that found one appearing is not done again.
    reader = (
        PgReadConnection(source, loop)
        if isinstance(source, PgTarget)
        else ReadConnection(source, beside_writer=True)
    )
    writer: Connection | None = None
    try:
        reader.open()
        writer = (
            connect_writer_pg(target, loop)
            if isinstance(target, PgTarget)
            else connect_writer(target)
        )
        out = writer
        result = reader.run(lambda conn: _copy(conn, out, target, progress), own_errors=True)
    except BaseException:
        if created and isinstance(target, Path):
            with contextlib.suppress(OSError):
                if writer is not None:
                    writer.close()
                    writer = None
                for suffix in ("", "-wal", "-shm"):
                    target.with_name(target.name + suffix).unlink(missing_ok=True)
        raise
    finally:
        reader.close()
        if writer is not None:
            writer.close()
        loop.stop()
    return result


def _copy(
    src: Connection,
    dst: Connection,
    target: Location,
    progress: Callable[[str, int], None] | None,
) -> CopyResult:
    for table in COPY_TABLES:
        (count,) = dst.execute(f"SELECT count(*) FROM {table}").fetchone()
        if count:
            raise StoreError(
                f"{target} is not empty ({table} has {count} rows): the target must be empty"
            )
    rows: dict[str, int] = {}
    dst.execute("BEGIN IMMEDIATE")
    try:
        for table, (columns, order) in COPY_TABLES.items():
            marks = ",".join("?" * (columns.count(",") + 1))
            insert = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
            done = 0
            while True:
                chunk = src.execute(
                    f"SELECT {columns} FROM {table} ORDER BY {order} LIMIT ? OFFSET ?",
                    (_CHUNK, done),
                ).fetchall()
                dst.executemany(insert, chunk)
                done += len(chunk)
                if len(chunk) < _CHUNK:
                    break
            rows[table] = done
            if progress is not None:
                progress(table, done)
        if isinstance(target, PgTarget):
            for table, column in _IDENTITIES:
                dst.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                    f" coalesce((SELECT max({column}) FROM {table}), 0) + 1, false)"
                )
        ledger = _verify(src, dst, rows)
        dst.execute("COMMIT")
    except BaseException:
        if dst.in_transaction:
            dst.execute("ROLLBACK")
        raise
    return CopyResult(rows, ledger)


def _verify(src: Connection, dst: Connection, rows: dict[str, int]) -> dict[str, int]:
    """Row counts and each stream's ledger ticks, the target's against the source's."""
    for table, copied in rows.items():
        (there,) = dst.execute(f"SELECT count(*) FROM {table}").fetchone()
        (here,) = src.execute(f"SELECT count(*) FROM {table}").fetchone()
        if not here == there == copied:
            raise StoreError(
                f"{table}: {here} rows in the source, {there} in the target: nothing copied"
            )
    ledger = {s: int(t) for s, t in src.execute(_LEDGER).fetchall()}
    copied_ledger = {s: int(t) for s, t in dst.execute(_LEDGER).fetchall()}
    if ledger != copied_ledger:
        raise StoreError("the ledger's ticks per stream differ after the copy: nothing copied")
    return ledger
