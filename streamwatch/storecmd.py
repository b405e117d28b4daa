"""`streamwatch store copy`: the state from the configured store (or `--from`) into an empty
other one (`--to`), SQLite ⇄ PostgreSQL, verified before it is committed
(`streamwatch.store.copy`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamwatch.config import Config, ConfigError
from streamwatch.storage import storage_location
from streamwatch.store import Location, PgTarget, StoreError
from streamwatch.store.copy import copy_state

__all__ = ["add_parser", "parse_location", "run"]


def add_parser(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """The `store` verb (`store copy`), run by `run`."""
    p = sub.add_parser(
        "store",
        help="copy the state between SQLite and PostgreSQL",
        description="`store copy --to URL` copies the whole state (tasks, segments, charges, "
        "events, outbox, videos, evidence index…) from [storage] (or --from) into an EMPTY "
        "target, in one transaction committed only once the row counts and each stream's "
        "ledger ticks match. URLs: sqlite:///path/to/file.db (or a plain path), "
        "postgresql://user@host:5432/db (password: PGPASSWORD or ~/.pgpass).",
    )
    p.set_defaults(func=run)
    with_config(p)
    p.add_argument("action", choices=["copy"], help="copy: the state into an empty target")
    p.add_argument("--to", required=True, metavar="URL", help="the empty target")
    p.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help="the source (default: [storage] of the config)",
    )


def parse_location(text: str) -> Location:
    """`sqlite:///path`, a plain path, or `postgresql://user@host:port/db` (no password: it
    would show in the process list; libpq's PGPASSWORD and ~/.pgpass are read)."""
    if text.startswith(("postgresql://", "postgres://")):
        if urlsplit(text).password is not None:
            raise ValueError(
                "keep the password out of the command line (others can read it there): "
                "set PGPASSWORD or use ~/.pgpass"
            )
        return PgTarget(text, pool_size=1)
    return Path(text.removeprefix("sqlite://"))


def run(args: argparse.Namespace, config: Config, environ: Mapping[str, str]) -> int:
    """Exit status: 0 copied and verified, 1 refused or failed (nothing committed)."""
    try:
        target = parse_location(args.to)
        source = (
            parse_location(args.source)
            if args.source
            else storage_location(config, environ=environ)
        )
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(source, Path) and not source.is_file():
        print(f"error: no state file at {source}", file=sys.stderr)
        return 1

    def progress(table: str, rows: int) -> None:
        print(f"{table}: {rows} rows", file=sys.stderr)

    try:
        result = copy_state(source, target, progress=progress)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ticks = sum(result.ledger.values())
    print(
        f"copied {sum(result.rows.values())} rows from {source} to {target}; verified: row "
        f"counts of {len(result.rows)} tables, ledger of {len(result.ledger)} streams "
        f"({ticks} ticks)"
    )
    return 0
