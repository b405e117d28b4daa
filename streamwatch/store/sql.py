"""The SQL every operation is written in, and what a backend's connection must offer.

Each operation's body is written once, as sync code over a `Connection` (`execute`,
`executemany`), in SQLite's spelling of a portable subset of SQL. SQLite runs it as it is;
PostgreSQL's connection rewrites each statement once (cached) with `Dialect.postgres`:

| written (SQLite) | run on PostgreSQL |
|---|---|
| `?` placeholders | `$1`, `$2`, … |
| `INSERT OR IGNORE INTO …` | `INSERT INTO … ON CONFLICT DO NOTHING` |
| scalar `max(a, b)`, `min(a, b)` | `greatest(a, b)`, `least(a, b)` |
| `BEGIN IMMEDIATE` | `BEGIN` |

The rest is written to mean the same on both: `count(CASE WHEN … THEN 1 END)` rather than
`sum(a = b)`, `<> 0` rather than an integer used as a truth value, `false` rather than `0`.
PostgreSQL's `tasks` has a `rowid` column (an identity) so that "the latest task" orders
alike. Integer sums come back as `int` from both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

__all__ = ["Connection", "Cursor", "to_postgres"]


class Cursor(Protocol):
    """What an operation reads back from a statement."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """What operations run their statements on: `sqlite3.Connection`, or PostgreSQL's."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...

    @property
    def in_transaction(self) -> bool: ...

    def close(self) -> None: ...


_IGNORE = re.compile(r"^\s*INSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_MINMAX = re.compile(r"\b(max|min)\s*\(", re.IGNORECASE)


def to_postgres(sql: str) -> str:
    """`sql` (SQLite's spelling, see the module's docstring) as PostgreSQL runs it."""
    if sql.strip().upper() == "BEGIN IMMEDIATE":
        return "BEGIN"
    out = _placeholders(sql)
    if _IGNORE.match(out):
        out = _IGNORE.sub("INSERT INTO", out, count=1) + " ON CONFLICT DO NOTHING"
    return _scalar_minmax(out)


def _placeholders(sql: str) -> str:
    """Number the `?` placeholders outside quoted text."""
    parts: list[str] = []
    n = 0
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            n += 1
            parts.append(f"${n}")
            continue
        parts.append(ch)
    return "".join(parts)


def _scalar_minmax(sql: str) -> str:
    """`max(a, b)` → `greatest(a, b)` (and `min` → `least`); the aggregates (one argument)
    stay as they are."""
    out = []
    pos = 0
    for m in _MINMAX.finditer(sql):
        if m.start() < pos:
            continue
        depth, commas, i = 1, 0, m.end()
        while i < len(sql) and depth:
            if sql[i] == "(":
                depth += 1
            elif sql[i] == ")":
                depth -= 1
            elif sql[i] == "," and depth == 1:
                commas += 1
            i += 1
        out.append(sql[pos : m.start()])
        name = "greatest" if m.group(1).lower() == "max" else "least"
        out.append((name if commas else m.group(1)) + "(")
        pos = m.end()
    out.append(sql[pos:])
    return "".join(out)
