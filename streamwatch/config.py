"""Read `streams.toml` into frozen, validated objects.

`load_config(path)` returns a `Config` or raises `ConfigError` listing *every* problem, each
with its key path (``streams[2].fps``) and a hint. Strings may use ``${VAR}`` or
``${VAR:-default}`` to take values from the environment; ``$$`` is a literal dollar.
Why one module of this length: the whole schema (every section's model, with its bounds and
descriptions) and the one validation pass over it read in one place.
Secrets are never written inline: they name an environment variable or a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import stamina
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from streamwatch.egress import parse_allow_entry
from streamwatch.emulator.script import EmulatorScript
from streamwatch.redact import MIN_SECRET_LENGTH, looks_secret, redact_urls, url_secrets

__all__ = [
    "AlertRule",
    "AlertSink",
    "AlertsConfig",
    "BudgetCaps",
    "BudgetsConfig",
    "Check",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "EmulatorConfig",
    "EvidenceConfig",
    "LedgerConfig",
    "LoggingConfig",
    "MaviConfig",
    "MetricsConfig",
    "RetryConfig",
    "SecretSource",
    "Secrets",
    "ServerConfig",
    "StorageConfig",
    "StreamConfig",
    "SupervisorConfig",
    "check_host_port",
    "load_config",
    "parse_config",
    "public_value_problems",
    "read_secret",
    "resolve_secrets",
    "secret_problems",
    "secret_values",
]

_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_NO_FEATURE = "enable content_moderation, logo_detection or both"
_LABEL_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_INTERP_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Values published as they are: metric labels, the status API, alerts, log lines. No secret
# may be interpolated into them.
_PUBLIC_PATH_RE = re.compile(
    r"^streams\[\d+\]\.(name|labels\..+)$|^alerts\.(sinks|rules)\[\d+\]\.name$"
)


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the config: where, what, and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<file>'}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used; `problems` lists every reason, not just the first."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretSource(_Model):
    """Where a secret lives: an environment variable or a file (e.g. a systemd credential)."""

    env: str | None = Field(default=None, description="Name of the environment variable.")
    file: Path | None = Field(default=None, description="Path of a file holding the secret.")

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError('give exactly one of `env = "VAR"` or `file = "/path"`')
        return self

    def describe(self) -> str:
        """Say where the secret comes from, without the secret."""
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def read(self, environ: Mapping[str, str]) -> SecretStr | None:
        """The secret, or None if the variable is unset/empty or the file is missing."""
        if self.env is not None:
            value = environ.get(self.env, "")
        else:
            assert self.file is not None
            try:
                value = self.file.read_text(encoding="utf-8")
            except OSError:
                return None
        value = value.strip()
        return SecretStr(value) if value else None


def check_host_port(v: str) -> str:
    """`v` if it is "host:port" (port 0 to 65535), else ValueError saying the form."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError('must be "host:port", e.g. "127.0.0.1:8080"')
    return v


class RetryConfig(_Model):
    """Bounds for retrying transient MAVI API failures (429, 5xx, timeouts)."""

    def context(self, on: Any) -> Any:
        """A stamina retry context with these bounds: exponential backoff from
        `initial_seconds` (plus as much again as jitter) up to `max_seconds`, at most `attempts`
        tries within `timeout_seconds`. `on` says which exceptions retry (or how long)."""
        return stamina.retry_context(
            on=on,
            attempts=self.attempts,
            timeout=self.timeout_seconds,
            wait_initial=self.initial_seconds,
            wait_max=self.max_seconds,
            wait_jitter=self.initial_seconds,
        )

    attempts: int = Field(default=6, ge=1, le=100, description="Tries in all, the first included.")
    initial_seconds: float = Field(default=1.0, gt=0, description="First backoff.")
    max_seconds: float = Field(default=32.0, gt=0, description="Longest single backoff.")
    timeout_seconds: float = Field(default=120.0, gt=0, description="Give up after this long.")


class MaviConfig(_Model):
    """The MAVI account and how to reach it."""

    backend: Literal["mavi", "emulator"] = Field(
        default="emulator", description="`mavi` for the real service, `emulator` for the built-in."
    )
    base_url: str = Field(
        default="https://mavi-backend.memories.ai/serve/api/v2",
        description="Base URL of the v2 stream API.",
    )
    api_key: SecretSource = Field(
        default=SecretSource(env="MAVI_API_KEY"), description="Where the API key is read from."
    )
    segment_seconds: float = Field(
        default=5.0, gt=0, le=300, description="Length of one MAVI segment (5 s at MAVI)."
    )
    batch_base_url: str = Field(
        default="https://mavi-backend.openinterx.com/api/serve/video",
        description="Base URL of the v1 batch video API.",
    )
    request_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    max_running: int | None = Field(
        default=None, ge=1, description="Never run more tasks at once than this (account limit)."
    )
    retry: RetryConfig = RetryConfig()

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class ServerConfig(_Model):
    """The daemon's HTTP server: callbacks, status API, health."""

    listen: str = Field(default="127.0.0.1:8080", description="host:port to bind.")
    public_url: str | None = Field(
        default=None, description="How MAVI reaches this server (for `callback-url`)."
    )
    callback_secret: SecretSource | None = Field(
        default=None,
        description="Secret path segment of the callback URL. Required with backend = mavi; "
        "generated per run with the emulator when unset.",
    )
    status_token: SecretSource | None = Field(
        default=None, description="Bearer token for the status API; unset = no auth."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=64 * 1_048_576)
    max_connections: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="Open connections at most (lowered to fit the file limit).",
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="A new connection must send a complete request's headers within this.",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="A request's body must arrive in full within this after its headers.",
    )
    idle_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="A keep-alive connection waiting longer for its next request is closed.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        return check_host_port(v)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class StorageConfig(_Model):
    """Where state lives and how writes are batched."""

    url: str | SecretSource | None = Field(
        default=None,
        description="`sqlite:///path/to/streamwatch.db` (an SQLite file: the path after "
        "`sqlite://`) or `postgresql://user@host:5432/db` (TLS as its `sslmode`/`sslrootcert` "
        'parameters); or `{ env = "VAR" }` / `{ file = "/path" }` for a PostgreSQL URL held '
        "as a secret (it may hold the password). Unset: the SQLite file `path`.",
    )
    path: Path = Field(
        default=Path("streamwatch.db"),
        description='SQLite file (the same as `url = "sqlite://PATH"`).',
    )
    password: SecretSource | None = Field(
        default=None,
        description="PostgreSQL: where the password is read from (else the URL's secret, "
        "PGPASSWORD or ~/.pgpass, as libpq does).",
    )
    pool_size: int = Field(
        default=4, ge=1, le=100, description="PostgreSQL: read connections (the writer has one)."
    )
    statement_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="PostgreSQL: a statement running longer fails."
    )
    connect_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600, description="PostgreSQL: give up connecting after this long."
    )
    batch_max: int = Field(default=512, ge=1, le=100_000, description="Writes per commit, at most.")
    segment_retention_days: float | None = Field(
        default=None,
        gt=0,
        description="Delete segment records older than this (unset: keep them all). Task "
        "totals, charges and events are kept.",
    )

    @model_validator(mode="before")
    @classmethod
    def _sqlite_url_is_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            url = data["url"]
            if url.startswith("sqlite://"):
                if "path" in data:
                    raise ValueError("give `url` or `path`, not both")
                data = {**data, "path": url.removeprefix("sqlite://")}
        return data

    @field_validator("url")
    @classmethod
    def _known_url(cls, v: str | SecretSource | None) -> str | SecretSource | None:
        if isinstance(v, str):
            if not v.startswith(("sqlite://", "postgresql://", "postgres://")):
                raise ValueError(
                    'must be "sqlite:///path/to/streamwatch.db" or "postgresql://user@host:5432/db"'
                )
            if v.startswith("sqlite://") and not v.removeprefix("sqlite://"):
                raise ValueError('names no file: "sqlite:///path/to/streamwatch.db"')
            if not v.startswith("sqlite://") and urlsplit(v).password is not None:
                raise ValueError(
                    "holds a password: keep it out of the config, e.g. password = { env = "
                    '"STREAMWATCH_DB_PASSWORD" } (or the whole URL as url = { env = "…" })'
                )
        return v

    @property
    def postgresql(self) -> bool:
        """Is the state in PostgreSQL (else in the SQLite file `path`)?"""
        return self.url is not None and not (
            isinstance(self.url, str) and self.url.startswith("sqlite://")
        )


class ClusterConfig(_Model):
    """Several replicas on one PostgreSQL database (`streamwatch.cluster`): each stream owned
    by one replica at a time through a lease."""

    replica_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$",
        description="This replica's name, unique in the fleet (unset: `<host name>-<pid>`).",
    )
    lease_seconds: float = Field(
        default=15.0,
        ge=1,
        le=600,
        description="A stream's lease lasts this long unless renewed; a dead replica's "
        "streams are adopted after it (plus one renewal round).",
    )
    renew_seconds: float | None = Field(
        default=None,
        gt=0,
        description="How often leases are renewed and claimed (unset: lease_seconds / 3); "
        "below lease_seconds / 2.",
    )

    @model_validator(mode="after")
    def _renew_within_lease(self) -> ClusterConfig:
        if self.renew_seconds is not None and self.renew_seconds >= self.lease_seconds / 2:
            raise ValueError(
                f"renew_seconds ({self.renew_seconds:g}) must be below lease_seconds / 2 "
                f"({self.lease_seconds / 2:g}), so that one late round does not lose a lease"
            )
        return self

    @property
    def renew_every(self) -> float:
        return self.renew_seconds if self.renew_seconds is not None else self.lease_seconds / 3


class SupervisorConfig(_Model):
    """How streams are kept running."""

    tick_seconds: float = Field(default=1.0, gt=0, le=60, description="How often plans are made.")
    stall_after_segments: float = Field(
        default=6, gt=0, description="Segment periods without a callback before a task is stalled."
    )
    on_stall: Literal["wait", "restart"] = Field(
        default="restart", description="What to do with a stalled task."
    )
    restart_initial_seconds: float = Field(default=5.0, gt=0)
    restart_max_seconds: float = Field(default=600.0, gt=0)
    restart_jitter: float = Field(
        default=0.2, ge=0, le=1, description="Fraction of each backoff drawn at random."
    )
    stable_after_segments: int = Field(
        default=12, ge=1, description="Segments a task must deliver before its backoff resets."
    )
    restart_loop_count: int = Field(
        default=5, ge=2, description="Restarts within the window that make a restart loop."
    )
    restart_loop_window_seconds: float = Field(default=1800, gt=0)
    error_threshold: int = Field(
        default=3, ge=1, description="Consecutive -1 segments that make a stream problem event."
    )
    balance_recheck_seconds: float = Field(
        default=900.0, gt=0, description="After a 402, try starting again after this long."
    )
    on_shutdown: Literal["keep", "stop"] = Field(
        default="keep", description="Leave MAVI tasks running (and billing) while down, or stop."
    )
    drain_seconds: float = Field(
        default=5.0, ge=0, le=300, description="Keep receiving callbacks this long on shutdown."
    )
    adopt_wait_segments: float = Field(
        default=3,
        gt=0,
        le=1000,
        description="After a start whose answer was lost (a crash, a timeout), segment periods"
        " to wait for the callbacks of the task MAVI may have created before starting again.",
    )
    on_orphan: Literal["report", "stop"] = Field(
        default="report",
        description="A task this daemon did not start: only report it, or stop it once it has"
        " called back orphan_stop_after_segments times.",
    )
    orphan_stop_after_segments: int = Field(
        default=3,
        ge=1,
        le=1000,
        description='With on_orphan = "stop": segment callbacks of an orphan before it is stopped.',
    )

    @model_validator(mode="after")
    def _bounds(self) -> SupervisorConfig:
        if self.restart_max_seconds < self.restart_initial_seconds:
            raise ValueError("restart_max_seconds must be >= restart_initial_seconds")
        return self


class BudgetCaps(_Model):
    """Spending caps for one scope; either, both or neither."""

    daily_usd: Decimal | None = Field(default=None, gt=0, description="Cap per UTC day.")
    monthly_usd: Decimal | None = Field(default=None, gt=0, description="Cap per calendar month.")


class BudgetsConfig(_Model):
    """Account-wide caps and what crossing a cap does."""

    daily_usd: Decimal | None = Field(default=None, gt=0, description="Account cap per UTC day.")
    monthly_usd: Decimal | None = Field(
        default=None, gt=0, description="Account cap per calendar month."
    )
    thresholds: list[int] = Field(
        default_factory=lambda: [50, 80, 100], description="Percentages that raise an event."
    )
    action: Literal["stop", "alert-only"] = Field(
        default="stop", description="At 100 %: stop the affected streams, or only tell."
    )
    forecast_lead_minutes: float = Field(
        default=60, ge=0, description="Warn this long before the burn rate reaches a cap."
    )
    unreported_after_segments: int = Field(
        default=2,
        ge=0,
        description="Segments a task may be behind on callbacks before its billing is estimated.",
    )

    @field_validator("thresholds")
    @classmethod
    def _percentages(cls, v: list[int]) -> list[int]:
        if any(not 1 <= t <= 100 for t in v):
            raise ValueError("thresholds are percentages from 1 to 100")
        return sorted(set(v))


class LedgerConfig(_Model):
    """How charges are counted where MAVI's documentation is ambiguous."""

    precharge: Literal["separate", "first_segment"] = Field(
        default="separate",
        description="The start's pre-charge as its own charge (conservative), or as payment "
        "for the task's first processed segment.",
    )


class StreamDefaults(_Model):
    """Values a `[[streams]]` entry takes when it does not say."""

    fps: int = Field(default=1, ge=1, le=60)
    content_moderation: bool = True
    logo_detection: bool = False
    max_logos: int = Field(default=5, ge=1, le=50)
    preflight: bool = False
    preflight_timeout_seconds: float = Field(default=10.0, gt=0, le=120)


class StreamConfig(_Model):
    """One stream to watch."""

    name: Annotated[str, Field(pattern=_NAME_RE, description="Unique, stable name.")]
    url: str = Field(description="rtmp://, rtmps://, rtsp:// or rtsps:// source.")
    fps: int = Field(ge=1, le=60)
    content_moderation: bool
    logo_detection: bool
    max_logos: int = Field(ge=1, le=50)
    labels: dict[str, str] = Field(default_factory=dict)
    budget: BudgetCaps = Field(default_factory=BudgetCaps, description="This stream's caps.")
    evidence: bool = Field(default=False, description="Archive clips of flagged segments.")
    watch_logos: list[str] = Field(
        default_factory=list, description="Alert only on these logo names (empty: on any)."
    )
    preflight: bool = Field(
        default=False,
        description="Probe the source (ffprobe) before each start and restart; no start (and no"
        " pre-charge) while it is offline.",
    )
    preflight_timeout_seconds: float = Field(
        default=10.0, gt=0, le=120, description="How long a preflight probe may take."
    )

    @field_validator("url")
    @classmethod
    def _stream_url(cls, v: str) -> str:
        if not re.match(r"^(rtmp|rtmps|rtsp|rtsps)://[^/\s]+", v):
            raise ValueError("must be an rtmp://, rtmps://, rtsp:// or rtsps:// URL with a host")
        return v

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not _LABEL_KEY_RE.match(k)]
        if bad:
            raise ValueError(f"label keys must match [a-zA-Z_][a-zA-Z0-9_]*: {bad}")
        return v

    @model_validator(mode="after")
    def _a_feature(self) -> StreamConfig:
        if not (self.content_moderation or self.logo_detection):
            raise ValueError(_NO_FEATURE)
        return self

    def spec_hash(self) -> str:
        """A digest of what MAVI is asked to do; a change means the task must restart."""
        wire = [self.url, self.fps, self.content_moderation, self.logo_detection]
        wire.append(self.max_logos if self.logo_detection else 0)
        return hashlib.sha256(json.dumps(wire).encode()).hexdigest()[:16]


class EmulatorConfig(_Model):
    """The built-in MAVI emulator, used when `[mavi] backend = "emulator"`."""

    balance_usd: Decimal = Field(default=Decimal("100"), ge=0, description="Starting balance.")
    capacity: int | None = Field(default=None, ge=1, description="Concurrent task limit.")
    unsafe_every: int = Field(
        default=7, ge=0, description="Unscripted streams: every Nth segment is unsafe (0 = never)."
    )
    scripts: list[EmulatorScript] = Field(default_factory=list)
    listen: str = Field(
        default="127.0.0.1:0",
        description="host:port it serves both APIs on; port 0 = any free port (see the log).",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        return check_host_port(v)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AlertSink(_Model):
    """Where alerts go. The URL (and signing secret) are secrets: env or file, never inline."""

    name: Annotated[str, Field(pattern=_NAME_RE)]
    type: Literal["slack", "discord", "teams", "webhook", "alertmanager", "apprise"]
    url: SecretSource = Field(description="The endpoint, e.g. a Slack incoming-webhook URL.")
    secret: SecretSource | None = Field(
        default=None, description="webhook only: the whsec_… signing secret (Standard Webhooks)."
    )
    max_in_flight: int = Field(default=1, ge=1, le=64, description="Concurrent deliveries.")
    max_attempts: int = Field(default=8, ge=1, le=100, description="Tries before dead-letter.")
    timeout_seconds: float = Field(default=15.0, gt=0, le=120)
    repeat_seconds: float = Field(
        default=60, gt=0, le=3600, description="alertmanager: re-post active alerts this often."
    )

    @model_validator(mode="after")
    def _secret_for_webhooks(self) -> AlertSink:
        if self.type == "webhook" and self.secret is None:
            raise ValueError("a webhook sink needs `secret` (whsec_…) so receivers can verify")
        if self.type != "webhook" and self.secret is not None:
            raise ValueError("only webhook sinks sign their requests; remove `secret`")
        return self


class AlertRule(_Model):
    """Which events go to which sinks, and how often."""

    name: Annotated[str, Field(pattern=_NAME_RE)]
    events: list[str] = Field(default_factory=list, description="Event kinds; empty = all.")
    streams: list[str] = Field(default_factory=list, description="Stream name globs; empty = all.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels that must match.")
    min_severity: Literal["info", "warning", "critical"] = "info"
    sinks: list[str] = Field(min_length=1)
    min_consecutive: int = Field(
        default=1, ge=1, description="Unsafe/logo segments in a row before firing."
    )
    cooldown_seconds: float = Field(default=300, ge=0, description="Per rule and subject.")
    group_seconds: float = Field(default=10, ge=0, description="Fold a burst into one message.")
    send_resolved: bool = Field(default=True, description="Say when the condition clears.")


class AlertsConfig(_Model):
    """Alert sinks, rules, and the delivery worker's retry bounds."""

    sinks: list[AlertSink] = Field(default_factory=list)
    rules: list[AlertRule] = Field(default_factory=list)
    retry_initial_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0, le=60, description="Outbox scan interval.")

    @model_validator(mode="after")
    def _names(self) -> AlertsConfig:
        sinks = [s.name for s in self.sinks]
        if len(set(sinks)) != len(sinks):
            raise ValueError("sink names must be unique")
        rules = [r.name for r in self.rules]
        if len(set(rules)) != len(rules):
            raise ValueError("rule names must be unique")
        for rule in self.rules:
            unknown = sorted(set(rule.sinks) - set(sinks))
            if unknown:
                raise ValueError(f"rule {rule.name!r} names unknown sinks: {', '.join(unknown)}")
        return self


class EvidenceConfig(_Model):
    """Where flagged segments' clips are archived, and for how long."""

    path: Path = Field(default=Path("evidence"), description="Archive folder.")
    retention_days: float = Field(default=30, gt=0, description="Delete clips older than this.")
    max_bytes: int = Field(default=10 * 1024**3, ge=1, description="Keep the archive under this.")
    max_clip_bytes: int = Field(default=512 * 1024**2, ge=1, description="Refuse larger clips.")
    download_timeout_seconds: float = Field(
        default=120, gt=0, description="Per clip, redirects included; older .part files are stale."
    )
    upload: bool = Field(default=False, description="Also upload each clip to the MAVI library.")
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, addresses or CIDR networks clips may come from although they"
        " are internal (loopback, private, link-local); everything public is allowed anyway.",
    )
    max_downloads: int = Field(
        default=4, ge=1, le=256, description="Clips downloaded (and uploaded) at once."
    )
    max_downloads_per_host: int = Field(
        default=4, ge=1, le=256, description="Connections to one clip host at once."
    )
    max_queued_downloads: int = Field(
        default=1000, ge=1, description="Captures waiting for a slot; beyond it, refused."
    )

    @field_validator("allow_hosts")
    @classmethod
    def _allow_entries(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_allow_entry(entry)  # raises ValueError with a hint
        return v


class MetricsConfig(_Model):
    """The Prometheus endpoint."""

    listen: str | None = Field(
        default=None, description="host:port for /metrics alone; unset = on the main server."
    )
    max_logo_names: int = Field(
        default=20, ge=1, le=1000, description="Distinct logo names per stream before __other__."
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        return None if v is None else check_host_port(v)


class LoggingConfig(_Model):
    """Log output."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: readable on a terminal, JSON otherwise."
    )


class Config(_Model):
    """The whole validated config."""

    mavi: MaviConfig = MaviConfig()
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    defaults: StreamDefaults = StreamDefaults()
    emulator: EmulatorConfig = EmulatorConfig()
    logging: LoggingConfig = LoggingConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    ledger: LedgerConfig = LedgerConfig()
    cluster: ClusterConfig | None = Field(
        default=None, description="Several replicas on one PostgreSQL database."
    )
    # Unique names are checked on the file (`_duplicate_names`), where each duplicate can be
    # named with its index, together with every other problem.
    streams: list[StreamConfig] = Field(default_factory=list)

    def stream(self, name: str) -> StreamConfig | None:
        return next((s for s in self.streams if s.name == name), None)

    @model_validator(mode="after")
    def _cluster_needs_postgresql(self) -> Config:
        if self.cluster is not None and not self.storage.postgresql:
            raise ValueError(
                "[cluster] needs the state in PostgreSQL (replicas share it): set [storage] "
                'url = "postgresql://user@host:5432/db", or remove [cluster]'
            )
        return self


@dataclass(frozen=True)
class Secrets:
    """Secrets resolved from their sources at load time; repr never shows them."""

    api_key: SecretStr | None
    callback_secret: SecretStr
    callback_secret_generated: bool
    status_token: SecretStr | None
    # sink name -> (url, signing secret)
    sinks: dict[str, tuple[SecretStr, SecretStr | None]] = field(default_factory=dict)
    # PostgreSQL: the URL when it is held as a secret, and the password from its source.
    storage_url: SecretStr | None = None
    storage_password: SecretStr | None = None


def _interpolate(
    value: Any,
    path: str,
    environ: Mapping[str, str],
    problems: list[ConfigProblem],
    hidden: dict[str, str],
) -> Any:
    """Expand ``${VAR}`` in every string. Values of secret-looking variables are recorded in
    `hidden` (value -> variable) so that no error message repeats them, and refused where the
    value would be published (stream names, labels, sink and rule names)."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if looks_secret(name) and _PUBLIC_PATH_RE.match(path):
                problems.append(
                    ConfigProblem(
                        path,
                        f"${{{name}}} looks like a secret (by its name) and this value is "
                        "published on /metrics, the status API, alerts and logs; write the "
                        "value itself, or rename the variable if it holds no secret",
                    )
                )
                return ""
            if name in environ and environ[name] != "":
                if looks_secret(name):
                    hidden[environ[name]] = name
                return environ[name]
            if default is not None:
                return default
            problems.append(
                ConfigProblem(
                    path,
                    f"environment variable {name} is not set "
                    f"(export it, or write ${{{name}:-default}})",
                )
            )
            return ""

        return _INTERP_RE.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, _join(path, k), environ, problems, hidden) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, f"{path}[{i}]", environ, problems, hidden) for i, v in enumerate(value)
        ]
    return value


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_HINTS = {
    "extra_forbidden": "unknown key: check its spelling against the README's config reference",
    "missing": "this key is required",
    # Every Decimal in the config is an amount of US dollars.
    "decimal_parsing": 'give an amount in USD as a string, e.g. "12.50"',
    "decimal_type": 'give an amount in USD as a string, e.g. "12.50"',
}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _field_at(loc: tuple[int | str, ...]) -> Any:
    """The pydantic `FieldInfo` an error location points at (None if it is not a field)."""
    model: Any = Config
    info = None
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list: the next part is a field of its items
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        info = fields[part]
        model = info.annotation
        while get_origin(model) in (list, dict, Union, UnionType):
            model = next(a for a in reversed(get_args(model)) if a is not type(None))
    return info


def _range(loc: tuple[int | str, ...]) -> str | None:
    """A field's allowed range when it has both ends, e.g. "allowed: 1 to 60"."""
    info = _field_at(loc)
    if info is None:
        return None
    # pydantic keeps `Field(ge=…, le=…)` as annotated-types constraints, one attribute each.
    ends = {
        k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)
    }
    low = next((f"{w}{ends[k]}" for k, w in (("ge", ""), ("gt", "more than ")) if k in ends), None)
    high = next((f"{w}{ends[k]}" for k, w in (("le", ""), ("lt", "less than ")) if k in ends), None)
    return f"allowed: {low} to {high}" if low and high else None


def _problems_from(exc: ValidationError, hidden: Mapping[str, str]) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path = _join(path, part)
        msg = str(err["msg"]).removeprefix("Value error, ")
        hint = _HINTS.get(err["type"])
        if err["type"] in _BOUNDS:
            hint = _range(err["loc"])
        if (
            err["type"] != "extra_forbidden"
            and "input" in err
            and not isinstance(err["input"], dict | list)
        ):
            msg += f" (got {_shown(err['input'], hidden)})"
        problems.append(ConfigProblem(path, f"{msg}; {hint}" if hint else msg))
    return problems


def _shown(value: Any, hidden: Mapping[str, str]) -> str:
    """A bad value as an error message may show it: without URL credentials, and with the
    values of secret-looking variables shown as the ``${VAR}`` they came from."""
    text = repr(value)
    for secret, name in sorted(hidden.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(secret, f"${{{name}}}")
    return redact_urls(text)


def _duplicate_names(raw: dict[str, Any]) -> list[ConfigProblem]:
    streams = raw.get("streams", [])
    if not isinstance(streams, list):
        return []
    first: dict[str, int] = {}
    problems = []
    for i, entry in enumerate(streams):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            problems.append(
                ConfigProblem(
                    f"streams[{i}].name",
                    f"duplicate name {name!r} (first used by streams[{first[name]}]); "
                    "names must be unique",
                )
            )
        else:
            first[name] = i
    return problems


_BOOL: TypeAdapter[bool] = TypeAdapter(bool)


def _no_feature(raw: dict[str, Any]) -> list[ConfigProblem]:
    """Streams with neither feature on. `StreamConfig` says so too, but only once the entry's
    other fields are valid; checked here, it is reported together with them."""
    streams = raw.get("streams", [])
    if not isinstance(streams, list):
        return []
    problems = []
    for i, entry in enumerate(streams):
        if not isinstance(entry, dict):
            continue
        try:
            on = [
                _BOOL.validate_python(entry.get(k))
                for k in ("content_moderation", "logo_detection")
            ]
        except ValidationError:
            continue  # not booleans: reported as such
        if not any(on):
            problems.append(ConfigProblem(f"streams[{i}]", _NO_FEATURE))
    return problems


def _apply_defaults(raw: dict[str, Any]) -> None:
    defaults = raw.get("defaults", {})
    streams = raw.get("streams", [])
    if not isinstance(defaults, dict) or not isinstance(streams, list):
        return
    base = StreamDefaults.model_fields
    for entry in streams:
        if isinstance(entry, dict):
            for key, field in base.items():
                entry.setdefault(key, defaults.get(key, field.default))


Check = Callable[[Config, Mapping[str, str]], list[ConfigProblem]]
"""A check beyond the file itself (secrets, the state file): the problems it finds."""


def _sections(raw: dict[str, Any]) -> tuple[Config, set[str]]:
    """A `Config` of the top-level sections that are valid on their own (defaults stand in for
    the others), and the names of those that are not: what checks can look at in a file that
    has problems."""
    parts: dict[str, Any] = {}
    failed: set[str] = set()
    for name, info in Config.model_fields.items():
        if name in raw:
            try:
                kind: Any = info.annotation  # every field of Config is annotated
                parts[name] = TypeAdapter(kind).validate_python(raw[name])
                continue
            except ValidationError:
                failed.add(name)
        parts[name] = info.get_default(call_default_factory=True)
    return Config.model_construct(**parts), failed


def _checked(
    checks: Sequence[Check], config: Config, env: Mapping[str, str], failed: set[str]
) -> list[ConfigProblem]:
    """What the checks find, leaving out sections that failed (their defaults stood in)."""
    found = [p for check in checks for p in check(config, env)]
    return [p for p in found if re.split(r"[.\[]", p.path, maxsplit=1)[0] not in failed]


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    checks: Sequence[Check] = (),
) -> Config:
    """Validate TOML text into a `Config`, or raise `ConfigError` with every problem: those of
    the file and those the `checks` find (e.g. `secret_problems`), all in one pass."""
    env = os.environ if environ is None else environ
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [ConfigProblem("", f"not valid TOML: {exc}")]) from None
    problems: list[ConfigProblem] = []
    hidden: dict[str, str] = {}
    raw = _interpolate(raw, "", env, problems, hidden)
    _apply_defaults(raw)
    problems.extend(_duplicate_names(raw))
    problems.extend(_no_feature(raw))
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        # Report each place once: an unset variable or a duplicate name is the root cause,
        # not the empty string or the list it leaves behind.
        known = {p.path for p in problems}
        problems.extend(p for p in _problems_from(exc, hidden) if p.path not in known)
        partial, failed = _sections(raw)
        problems.extend(_unreported(_checked(checks, partial, env, failed), problems))
        raise ConfigError(source, problems) from None
    problems.extend(_unreported(_checked(checks, config, env, set()), problems))
    if problems:
        raise ConfigError(source, problems)
    return config


def _unreported(found: list[ConfigProblem], reported: list[ConfigProblem]) -> list[ConfigProblem]:
    """What a check found at places not already reported, nor inside or around one (a secret
    read from "${UNSET}/key" is missing because the variable is unset: say that once)."""

    def near(a: str, b: str) -> bool:
        return a == b or a.startswith((b + ".", b + "[")) or b.startswith((a + ".", a + "["))

    return [p for p in found if not any(near(p.path, r.path) for r in reported)]


def load_config(
    path: Path, *, environ: Mapping[str, str] | None = None, checks: Sequence[Check] = ()
) -> Config:
    """Read and validate a config file; relative storage paths are kept as written."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [ConfigProblem("", f"cannot read: {exc.strerror}")]) from None
    return parse_config(text, source=str(path), environ=environ, checks=checks)


def read_secret(
    source: SecretSource, path: str, environ: Mapping[str, str], problems: list[ConfigProblem]
) -> SecretStr | None:
    """Read a secret that must be there; if it is not, add a problem naming `path` and where
    the secret was looked for, and return None."""
    value = source.read(environ)
    if value is None:
        problems.append(ConfigProblem(path, f"nothing in {source.describe()}"))
    return value


def resolve_secrets(config: Config, *, environ: Mapping[str, str] | None = None) -> Secrets:
    """Read every secret the config names, or raise `ConfigError` saying which is missing."""
    env = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []
    if config.mavi.backend == "mavi":
        api_key = read_secret(config.mavi.api_key, "mavi.api_key", env, problems)
    else:
        api_key = config.mavi.api_key.read(env)
    generated = False
    callback: SecretStr | None = None
    if config.server.callback_secret is not None:
        callback = read_secret(
            config.server.callback_secret, "server.callback_secret", env, problems
        )
        if callback is not None and not re.fullmatch(
            r"[A-Za-z0-9_-]{16,}", callback.get_secret_value()
        ):
            problems.append(
                ConfigProblem(
                    "server.callback_secret",
                    "must be at least 16 URL-safe characters "
                    "(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')",
                )
            )
    elif config.mavi.backend == "mavi":
        problems.append(
            ConfigProblem(
                "server.callback_secret",
                "required with backend = mavi: it is part of the URL you register in the console",
            )
        )
    else:
        callback, generated = SecretStr(secrets.token_urlsafe(24)), True
    status: SecretStr | None = None
    if config.server.status_token is not None:
        status = read_secret(config.server.status_token, "server.status_token", env, problems)
    sinks: dict[str, tuple[SecretStr, SecretStr | None]] = {}
    for i, sink in enumerate(config.alerts.sinks):
        url = read_secret(sink.url, f"alerts.sinks[{i}].url", env, problems)
        signing = (
            read_secret(sink.secret, f"alerts.sinks[{i}].secret", env, problems)
            if sink.secret is not None
            else None
        )
        if signing is not None and not signing.get_secret_value().startswith("whsec_"):
            problems.append(
                ConfigProblem(f"alerts.sinks[{i}].secret", "must start with whsec_ (base64 key)")
            )
        if url is not None:
            sinks[sink.name] = (url, signing)
    storage_url = storage_password = None
    if isinstance(config.storage.url, SecretSource):
        storage_url = read_secret(config.storage.url, "storage.url", env, problems)
        if storage_url is not None and not storage_url.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            problems.append(ConfigProblem("storage.url", "the secret must be a postgresql:// URL"))
    if config.storage.password is not None:
        storage_password = read_secret(config.storage.password, "storage.password", env, problems)
    if problems:
        raise ConfigError("secrets", problems)
    assert callback is not None
    resolved = Secrets(
        api_key,
        callback,
        generated,
        status,
        sinks,
        storage_url=storage_url,
        storage_password=storage_password,
    )
    problems = public_value_problems(config, resolved)
    if problems:
        raise ConfigError("secrets", problems)
    return resolved


def _named_secrets(config: Config, secrets: Secrets) -> list[tuple[str, str]]:
    """Every secret value the config and its secrets hold, with the key it comes from."""
    found: list[tuple[str, str | None]] = [
        ("mavi.api_key", secrets.api_key.get_secret_value() if secrets.api_key else None),
        ("server.callback_secret", secrets.callback_secret.get_secret_value()),
        (
            "server.status_token",
            secrets.status_token.get_secret_value() if secrets.status_token else None,
        ),
    ]
    for i, sink in enumerate(config.alerts.sinks):
        url, signing = secrets.sinks.get(sink.name, (None, None))
        if url is not None:
            found.append((f"alerts.sinks[{i}].url", url.get_secret_value()))
            # The path alone is the secret of most chat webhooks (/services/T…/B…/…).
            path = url.get_secret_value().partition("://")[2].partition("/")[2]
            if len(path) >= 16:
                found.append((f"alerts.sinks[{i}].url", "/" + path))
        if signing is not None:
            found.append((f"alerts.sinks[{i}].secret", signing.get_secret_value()))
    for i, stream in enumerate(config.streams):
        found.extend((f"streams[{i}].url", value) for value in url_secrets(stream.url))
    if secrets.storage_url is not None:
        found.append(("storage.url", secrets.storage_url.get_secret_value()))
        found.extend(
            ("storage.url", value) for value in url_secrets(secrets.storage_url.get_secret_value())
        )
    if secrets.storage_password is not None:
        found.append(("storage.password", secrets.storage_password.get_secret_value()))
    return [(where, value) for where, value in found if value]


def secret_values(config: Config, secrets: Secrets) -> list[str]:
    """The values a `Redactor` must mask for this config: the API key, callback secret,
    status token, sink URLs and signing secrets, and credentials in stream URLs."""
    return [value for _, value in _named_secrets(config, secrets)]


def public_value_problems(config: Config, secrets: Secrets) -> list[ConfigProblem]:
    """Stream names, labels and sink and rule names are published (metrics, status API,
    alerts, logs): one that holds a secret value is a problem."""
    named = _named_secrets(config, secrets)

    def holder(value: str) -> str | None:
        for where, secret in named:
            if value == secret or (len(secret) >= MIN_SECRET_LENGTH and secret in value):
                return where
        return None

    public: list[tuple[str, str]] = []
    for i, stream in enumerate(config.streams):
        public.append((f"streams[{i}].name", stream.name))
        public.extend((f"streams[{i}].labels.{k}", v) for k, v in stream.labels.items())
    public.extend((f"alerts.sinks[{i}].name", s.name) for i, s in enumerate(config.alerts.sinks))
    public.extend((f"alerts.rules[{i}].name", r.name) for i, r in enumerate(config.alerts.rules))
    problems = []
    for path, value in public:
        where = holder(value)
        if where is not None:
            problems.append(
                ConfigProblem(
                    path,
                    f"holds the secret of {where}; this value is published on /metrics, the "
                    "status API, alerts and logs",
                )
            )
    return problems


def secret_problems(config: Config, environ: Mapping[str, str]) -> list[ConfigProblem]:
    """`resolve_secrets` as a `Check`: the secrets that are missing or malformed."""
    try:
        resolve_secrets(config, environ=environ)
    except ConfigError as exc:
        return exc.problems
    return []
