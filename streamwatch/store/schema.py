"""The state file's schema: versioned migrations, applied in order, each in its own
transaction; and the check of a file's version against this streamwatch's.

SQLite-specific (the version is `PRAGMA user_version`; the SQL is SQLite's).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

from streamwatch.store.types import SchemaError, StoreError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "check_version", "migrate", "split_sql"]

log = structlog.get_logger("streamwatch.store")

# Each entry moves the schema from version i to i+1. Never edit a released entry: add one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE streams (
        name        TEXT PRIMARY KEY,
        held_reason TEXT,
        held_at     REAL
    );
    CREATE TABLE tasks (
        task_id            TEXT PRIMARY KEY,
        stream             TEXT NOT NULL,
        spec_hash          TEXT NOT NULL,
        fps                INTEGER NOT NULL,
        content_moderation INTEGER NOT NULL,
        logo_detection     INTEGER NOT NULL,
        max_logos          INTEGER NOT NULL,
        started_at         REAL NOT NULL,
        stop_requested     INTEGER NOT NULL DEFAULT 0,
        ended_at           REAL,
        end_status         INTEGER,
        end_reason         TEXT,
        last_callback_at   REAL,
        segments           INTEGER NOT NULL DEFAULT 0,
        unsafe_segments    INTEGER NOT NULL DEFAULT 0,
        logo_segments      INTEGER NOT NULL DEFAULT 0,
        failed_segments    INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX tasks_by_stream ON tasks (stream, started_at);
    CREATE INDEX tasks_running ON tasks (stream) WHERE ended_at IS NULL;
    CREATE TABLE segments (
        task_id       TEXT NOT NULL,
        segment_index INTEGER NOT NULL,
        stream        TEXT NOT NULL,
        received_at   REAL NOT NULL,
        start_time    REAL,
        end_time      REAL,
        unsafe        INTEGER,
        has_logo      INTEGER,
        logos         TEXT,
        frames        INTEGER,
        processing_ms REAL,
        tokens        TEXT,
        video_url     TEXT,
        PRIMARY KEY (task_id, segment_index)
    ) WITHOUT ROWID;
    CREATE INDEX segments_by_stream ON segments (stream, received_at);
    CREATE TABLE segment_failures (
        id          INTEGER PRIMARY KEY,
        task_id     TEXT NOT NULL,
        stream      TEXT NOT NULL,
        status      INTEGER NOT NULL,
        message     TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE orphan_callbacks (
        id            INTEGER PRIMARY KEY,
        task_id       TEXT NOT NULL,
        segment_index INTEGER,
        status        INTEGER NOT NULL,
        received_at   REAL NOT NULL,
        body          TEXT NOT NULL
    );
    CREATE UNIQUE INDEX orphans_dedupe ON orphan_callbacks (task_id, segment_index)
        WHERE segment_index IS NOT NULL;
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        at      REAL NOT NULL,
        stream  TEXT,
        task_id TEXT,
        kind    TEXT NOT NULL,
        status  INTEGER,
        detail  TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_by_stream ON events (stream, at);
    """,
    # 2: the cost ledger. Every charge MAVI makes, in ticks of 1/2880 USD, written in the same
    # transaction as the start or segment it pays for.
    """
    ALTER TABLE tasks ADD COLUMN segment_ticks INTEGER NOT NULL DEFAULT 0;
    UPDATE tasks SET segment_ticks =
        (CASE WHEN content_moderation AND logo_detection THEN 4 ELSE 3 END) * (fps + 1);
    CREATE TABLE charges (
        id            INTEGER PRIMARY KEY,
        at            REAL NOT NULL,
        stream        TEXT NOT NULL,
        task_id       TEXT NOT NULL,
        kind          TEXT NOT NULL,
        segment_index INTEGER,
        ticks         INTEGER NOT NULL
    );
    CREATE INDEX charges_by_time ON charges (at);
    CREATE INDEX charges_by_stream ON charges (stream, at);
    INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)
        SELECT started_at, stream, task_id, 'precharge', NULL, segment_ticks FROM tasks;
    INSERT INTO charges (at, stream, task_id, kind, segment_index, ticks)
        SELECT s.received_at, s.stream, s.task_id, 'segment', s.segment_index, t.segment_ticks
        FROM segments s JOIN tasks t ON t.task_id = s.task_id;
    """,
    # 3: the alert outbox. An alert is here before any delivery is tried; `alert_id` is stable
    # across redeliveries so receivers can deduplicate.
    """
    CREATE TABLE alert_outbox (
        id           INTEGER PRIMARY KEY,
        alert_id     TEXT NOT NULL UNIQUE,
        sink         TEXT NOT NULL,
        rule         TEXT NOT NULL,
        grp          TEXT NOT NULL,
        event        TEXT NOT NULL,
        state        TEXT NOT NULL DEFAULT 'pending',
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_at      REAL NOT NULL,
        last_error   TEXT,
        created_at   REAL NOT NULL,
        delivered_at REAL
    );
    CREATE INDEX alert_outbox_due ON alert_outbox (state, next_at);
    """,
    # 4: library videos as their upload callbacks report them.
    """
    CREATE TABLE library_videos (
        video_no   TEXT PRIMARY KEY,
        status     TEXT NOT NULL,
        client_id  TEXT,
        updated_at REAL NOT NULL
    );
    """,
    # 5: the evidence archive's clips.
    """
    CREATE TABLE evidence (
        id            INTEGER PRIMARY KEY,
        stream        TEXT NOT NULL,
        task_id       TEXT NOT NULL,
        segment_index INTEGER NOT NULL,
        path          TEXT NOT NULL,
        size          INTEGER NOT NULL,
        video_no      TEXT,
        error         TEXT,
        created_at    REAL NOT NULL
    );
    CREATE INDEX evidence_by_age ON evidence (created_at);
    """,
    # 6: segment retention. The highest segment index pruned from each task: a redelivery of a
    # pruned segment is a duplicate, never stored or charged again.
    """
    ALTER TABLE tasks ADD COLUMN pruned_through INTEGER;
    """,
    # 7: alert rule state, kept with what raises alerts so that it survives restarts: per rule
    # and subject the last firing sent and whether it is open, per rule and sink the grouping
    # window, per stream the unsafe and logo streaks (a row only while one is non-zero).
    # Orphan tasks are counted here; only the first few small bodies of each are kept.
    """
    CREATE TABLE alert_conditions (
        rule      TEXT NOT NULL,
        subject   TEXT NOT NULL,
        last_sent REAL,
        open      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (rule, subject)
    ) WITHOUT ROWID;
    CREATE TABLE alert_windows (
        rule  TEXT NOT NULL,
        sink  TEXT NOT NULL,
        grp   TEXT NOT NULL,
        until REAL NOT NULL,
        PRIMARY KEY (rule, sink)
    ) WITHOUT ROWID;
    CREATE TABLE alert_streaks (
        stream TEXT PRIMARY KEY,
        unsafe INTEGER NOT NULL DEFAULT 0,
        logo   INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE orphan_tasks (
        task_id   TEXT PRIMARY KEY,
        first_at  REAL NOT NULL,
        last_at   REAL NOT NULL,
        callbacks INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    INSERT INTO orphan_tasks (task_id, first_at, last_at, callbacks)
        SELECT task_id, min(received_at), max(received_at), count(*)
        FROM orphan_callbacks GROUP BY task_id;
    DELETE FROM orphan_callbacks WHERE length(CAST(body AS BLOB)) > 8192 OR id IN (
        SELECT id FROM (
            SELECT id, row_number() OVER (PARTITION BY task_id ORDER BY id) AS n
            FROM orphan_callbacks
        ) WHERE n > 5
    );
    """,
    # 8: what must outlive the process. Per stream, the supervisor's memory of it: the restart
    # backoff (attempts, next retry), how its last task ended and why it does not run, and
    # its recent restarts (restart-loop detection); existing streams take their last task's
    # end. Events by task, so that per-task flags (`billing_unreported`) are found after a
    # restart. Per Alertmanager sink, the lasting conditions it re-posts (as posted).
    """
    ALTER TABLE streams ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE streams ADD COLUMN retry_at REAL;
    ALTER TABLE streams ADD COLUMN last_end_status INTEGER;
    ALTER TABLE streams ADD COLUMN last_error TEXT;
    ALTER TABLE streams ADD COLUMN restart_times TEXT NOT NULL DEFAULT '[]';
    INSERT INTO streams (name) SELECT DISTINCT stream FROM tasks WHERE true
        ON CONFLICT(name) DO NOTHING;
    UPDATE streams SET last_end_status = (
        SELECT end_status FROM tasks WHERE tasks.stream = streams.name
        ORDER BY started_at DESC, rowid DESC LIMIT 1
    );
    CREATE INDEX events_by_task ON events (task_id, kind) WHERE task_id IS NOT NULL;
    CREATE TABLE alert_active (
        sink    TEXT NOT NULL,
        subject TEXT NOT NULL,
        posted  TEXT NOT NULL,
        PRIMARY KEY (sink, subject)
    ) WITHOUT ROWID;
    """,
    # 9: start intents, written before each start call and closed by its answer, a refusal,
    # the adoption of the unknown task that matches it, or none matching in time (state:
    # open, started, failed, adopted, unmatched). Orphan tasks: what their callbacks show
    # (features, fps, NULL until a segment shows them) and their estimated charges, one row
    # per segment (-1: the pre-charge), apart from the confirmed ledger.
    """
    CREATE TABLE start_intents (
        attempt_id         TEXT PRIMARY KEY,
        stream             TEXT NOT NULL,
        url_hash           TEXT NOT NULL,
        spec_hash          TEXT NOT NULL,
        fps                INTEGER NOT NULL,
        content_moderation INTEGER NOT NULL,
        logo_detection     INTEGER NOT NULL,
        max_logos          INTEGER NOT NULL,
        created_at         REAL NOT NULL,
        state              TEXT NOT NULL DEFAULT 'open',
        task_id            TEXT,
        closed_at          REAL,
        detail             TEXT
    );
    CREATE INDEX start_intents_open ON start_intents (stream, created_at) WHERE state = 'open';
    CREATE TABLE orphan_charges (
        task_id       TEXT NOT NULL,
        segment_index INTEGER NOT NULL,
        at            REAL NOT NULL,
        ticks         INTEGER NOT NULL,
        uncertain     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (task_id, segment_index)
    ) WITHOUT ROWID;
    CREATE INDEX orphan_charges_by_time ON orphan_charges (at);
    ALTER TABLE orphan_tasks ADD COLUMN segments INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE orphan_tasks ADD COLUMN content_moderation INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN logo_detection INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN fps INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN uncertain INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE orphan_tasks ADD COLUMN reported INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE orphan_tasks ADD COLUMN end_status INTEGER;
    ALTER TABLE orphan_tasks ADD COLUMN stopped_at REAL;
    CREATE INDEX orphan_tasks_by_first ON orphan_tasks (first_at);
    CREATE INDEX orphan_tasks_unreported ON orphan_tasks (task_id) WHERE reported = 0;
    """,
    # 10: preflight. Per stream: since when its source is offline (probes found it down), its
    # probes by outcome (a JSON object), and the starts not made because of it: pre-charges
    # avoided and what they would have cost, in ticks.
    """
    ALTER TABLE streams ADD COLUMN offline_since REAL;
    ALTER TABLE streams ADD COLUMN probes TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE streams ADD COLUMN precharges_avoided INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE streams ADD COLUMN ticks_saved INTEGER NOT NULL DEFAULT 0;
    """,
    # 11: `[cluster]`'s replicas, stream leases and callback feed, PostgreSQL's only
    # (pg_schema): nothing here.
    "",
    # 12: `[cluster]`'s fleet budget spend and fired budget events, PostgreSQL's only: nothing
    # here.
    "",
)

SCHEMA_VERSION = len(MIGRATIONS)


def check_version(path: Path | str, version: int, *, migrating: bool) -> None:
    """Refuse a file whose schema this streamwatch cannot use: a newer one always; an older one
    unless it is about to be migrated (a read-only open never migrates)."""
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{path} has schema version {version}, newer than this streamwatch "
            f"understands ({SCHEMA_VERSION}); upgrade streamwatch or restore a backup"
        )
    if version < SCHEMA_VERSION and not migrating:
        if version == 0:
            raise StoreError(
                f"{path} holds no streamwatch state yet; start the daemon once to create it"
            )
        raise SchemaError(
            f"{path} was written by an older streamwatch (schema {version}; this one reads "
            f"{SCHEMA_VERSION}); start the daemon once to upgrade it, or use the streamwatch "
            "that wrote it"
        )


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to `SCHEMA_VERSION`, one migration per transaction."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    check_version(path, version, migrating=True)
    for target in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in split_sql(MIGRATIONS[target - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("store.migrated", path=str(path), version=target)


def split_sql(script: str) -> list[str]:
    """A migration's statements (none of them holds a `;` of its own)."""
    return [s.strip() for s in script.split(";") if s.strip()]
