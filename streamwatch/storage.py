"""Where the daemon's state is, from `[storage]` and its secrets: the SQLite file, or the
PostgreSQL database. Apart from `streamwatch.config`, which knows no store."""

from __future__ import annotations

import os
from collections.abc import Mapping

from streamwatch.config import Config, ConfigError, ConfigProblem, SecretSource, read_secret
from streamwatch.store import Location, PgTarget

__all__ = ["storage_location"]


def storage_location(config: Config, *, environ: Mapping[str, str] | None = None) -> Location:
    """The SQLite file, or the PostgreSQL database (its URL and password read from their
    sources, the pool's bounds from `[storage]`); `ConfigError` if a secret is missing."""
    storage = config.storage
    if not storage.postgresql:
        return storage.path
    env = os.environ if environ is None else environ
    problems: list[ConfigProblem] = []
    if isinstance(storage.url, SecretSource):
        secret = read_secret(storage.url, "storage.url", env, problems)
        url = secret.get_secret_value() if secret is not None else ""
    else:
        url = str(storage.url)
    password = None
    if storage.password is not None:
        password = read_secret(storage.password, "storage.password", env, problems)
    if problems:
        raise ConfigError("secrets", problems)
    return PgTarget(
        url,
        password=password,
        pool_size=storage.pool_size,
        statement_timeout_seconds=storage.statement_timeout_seconds,
        connect_timeout_seconds=storage.connect_timeout_seconds,
    )
