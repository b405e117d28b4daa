"""`[cluster]` (PostgreSQL): the fleet's spend per budget scope and period, counted in the
transaction of each charge, and each budget threshold fired once across the fleet.

`budget_spend(scope, period, period_key, ticks)` holds the confirmed charges of the account
(`scope` `*`) and of each stream, per UTC day and calendar month, for the scopes and periods
a cap is set on (nothing is counted without a cap). Every charge stored by a
replica adds its ticks with `UPDATE … RETURNING ticks` in its own transaction: the row lock
serializes the fleet's charges, and each charge learns the fleet's exact total right after
it. The account's rows are locked before the stream's, always, so two charges never wait on
each other in opposite orders. A period's row missing is created from the ledger's charges
(which already hold this charge), and a charge whose insert lost the race adds itself. The
rows of a scope no longer capped are dropped when a replica starts or reloads its budgets
(`budgets_configured`), so a cap set again starts from the ledger; the replicas are meant to
share one `[budgets]` (while a reload rolls over the fleet, a replica that no longer caps a
scope stops counting it for the others).

`budget_fired(key)`: a budget threshold (or forecast) fired, one row each. The operation
that crosses it inserts its row with `ON CONFLICT DO NOTHING`: only the one whose insert took
the row records the event, and so the alert.

What the caps and thresholds are is the ledger's (the store knows no policy): the daemon
sets `BudgetRules` on the writer's context (`LeaseWrites.set_budget_rules`). Without them (a
single daemon, SQLite) nothing here runs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Protocol

from streamwatch.store.leases import FEED_CHANNEL
from streamwatch.store.reader import ReadSide
from streamwatch.store.sql import Connection
from streamwatch.store.streams import claim_fired, record_event
from streamwatch.store.types import EventRow, FiredThreshold, FleetSpend, SpendTotal, StoreError
from streamwatch.store.writer import Context, WriteSide

__all__ = [
    "ACCOUNT",
    "BudgetReads",
    "BudgetRules",
    "BudgetWrites",
    "OverBudget",
    "PeriodSpan",
    "merge",
    "read_totals",
    "spend",
    "start_gate",
]

ACCOUNT = "*"  # the account's scope in `budget_spend` (a stream's is its name)

PeriodSpan = tuple[str, str, float, float]
"""A budget period holding an instant: its name (day, month), its key, its [start, end)."""


class BudgetRules(Protocol):
    """The budgets as the ledger reads them (`streamwatch.ledger.FleetBudget`), asked in the
    writer's thread."""

    def counted(self, stream: str, at: float) -> list[tuple[str, PeriodSpan]]:
        """What a charge to `stream` made at `at` counts in: (scope, period) for each capped
        scope and period (`ACCOUNT` first), nothing when no cap applies."""
        ...

    def crossed(
        self, stream: str, ticks: int, at: float, totals: Sequence[SpendTotal]
    ) -> list[FiredThreshold]:
        """The thresholds this charge (of `ticks`, to `stream`) crossed, the fleet's totals
        right after it being `totals`."""
        ...

    def near_cap(self, stream: str, at: float, totals: Sequence[SpendTotal]) -> bool:
        """Whether the budget gate may have changed (a cap within one pre-charge)."""
        ...

    def refuse_start(self, stream: str, at: float, totals: Sequence[SpendTotal]) -> str | None:
        """Why a start of `stream` may not be made (its pre-charge would exceed a cap at the
        fleet's `totals`), or None."""
        ...


class OverBudget(StoreError):
    """A start refused in its intent's transaction: the fleet's spend leaves no room for its
    pre-charge. `spend` holds the totals it was refused at."""

    def __init__(self, reason: str, spend: FleetSpend) -> None:
        super().__init__(reason)
        self.spend = spend


def _add(conn: Connection, scope: str, span: PeriodSpan, ticks: int) -> int:
    """Add `ticks` to the scope's row of the period; the fleet's total after it."""
    where = (scope, span[0], span[1])
    row = conn.execute(
        "UPDATE budget_spend SET ticks = ticks + ? WHERE scope = ? AND period = ?"
        " AND period_key = ? RETURNING ticks",
        (ticks, *where),
    ).fetchone()
    if row is not None:
        return int(row[0])
    # The period's first charge for this scope: the ledger's sum (this charge included).
    total = int(conn.execute(*_ledger_sum(scope, span)).fetchone()[0])
    row = conn.execute(
        "INSERT INTO budget_spend (scope, period, period_key, ticks) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (scope, period, period_key) DO NOTHING RETURNING ticks",
        (*where, total),
    ).fetchone()
    if row is not None:
        return int(row[0])
    # Another replica created it meanwhile (its sum could not see this charge): add to it.
    return _add(conn, scope, span, ticks)


def spend(
    ctx: Context, stream: str, task_id: str | None, ticks: int, at: float
) -> FleetSpend | None:
    """Count a charge just inserted in `charges` (same transaction) in the fleet's totals,
    record the thresholds it crossed that no replica fired yet (event and alert, here), and
    wake the other replicas when a cap is near. None without budget rules, or for no money."""
    rules = ctx.budget
    if rules is None or not ticks:
        return None
    counted = rules.counted(stream, at)  # the account's rows first: one lock order
    if not counted:
        return None
    conn = ctx.conn
    totals = [
        SpendTotal(_stream(scope), span[0], span[1], _add(conn, scope, span, ticks))
        for scope, span in counted
    ]
    fired = []
    for threshold in rules.crossed(stream, ticks, at, totals):
        if claim_fired(ctx, threshold.key, at):
            record_event(
                ctx,
                EventRow(at, threshold.stream, task_id, "budget_threshold", None, threshold.detail),
            )
            fired.append(threshold)
    if rules.near_cap(stream, at, totals):
        conn.execute("SELECT pg_notify(?, '')", (FEED_CHANNEL,))
    return FleetSpend(tuple(totals), tuple(fired))


def merge(first: FleetSpend | None, then: FleetSpend | None) -> FleetSpend | None:
    """Two charges' answers as one: the later totals, every threshold fired."""
    if first is None or then is None:
        return then or first
    return FleetSpend(then.totals, first.fired + then.fired)


def _stream(scope: str) -> str | None:
    return None if scope == ACCOUNT else scope


def _ledger_sum(scope: str, span: PeriodSpan) -> tuple[str, tuple[object, ...]]:
    """The query (and its parameters) summing the ledger's charges of `scope` in `span`."""
    _, _, start, end = span
    if scope == ACCOUNT:
        return "SELECT coalesce(sum(ticks), 0) FROM charges WHERE at >= ? AND at < ?", (start, end)
    return (
        "SELECT coalesce(sum(ticks), 0) FROM charges WHERE at >= ? AND at < ? AND stream = ?",
        (start, end, scope),
    )


def read_totals(conn: Connection, counted: Iterable[tuple[str, PeriodSpan]]) -> list[SpendTotal]:
    """The fleet's totals of these scopes and periods (no row yet: the ledger's sum)."""
    out = []
    for scope, span in counted:
        row = conn.execute(
            "SELECT ticks FROM budget_spend WHERE scope = ? AND period = ? AND period_key = ?",
            (scope, span[0], span[1]),
        ).fetchone()
        if row is None:
            row = conn.execute(*_ledger_sum(scope, span)).fetchone()
        out.append(SpendTotal(_stream(scope), span[0], span[1], int(row[0])))
    return out


def start_gate(ctx: Context, stream: str, at: float) -> None:
    """Refuse (`OverBudget`) a start whose pre-charge the fleet's budgets leave no room for,
    read in the start intent's transaction. Nothing without budget rules."""
    rules = ctx.budget
    if rules is None:
        return
    counted = rules.counted(stream, at)
    if not counted:
        return
    totals = read_totals(ctx.conn, counted)
    reason = rules.refuse_start(stream, at, totals)
    if reason is not None:
        raise OverBudget(reason, FleetSpend(tuple(totals)))


def forget_uncounted(ctx: Context, counted: Collection[tuple[str, str]]) -> int:
    """Delete the rows of every (scope, period) not in `counted` (what the budgets now cap):
    no charge keeps them up to date any more, so a cap set again later must start from the
    ledger, not from a stale row. Returns the rows deleted."""
    rows = ctx.conn.execute("SELECT scope, period, period_key FROM budget_spend").fetchall()
    stale = [r for r in rows if (r[0], r[1]) not in counted]
    for scope, period, key in stale:
        ctx.conn.execute(
            "DELETE FROM budget_spend WHERE scope = ? AND period = ? AND period_key = ?",
            (scope, period, key),
        )
    return len(stale)


class BudgetWrites(WriteSide):
    async def budgets_configured(self, counted: Collection[tuple[str, str]]) -> int:
        """[cluster]: the budgets this replica enforces cap these (scope, period) pairs (at
        start, and after each reload): the fleet's rows of any other are dropped (see
        `forget_uncounted`). Returns the rows deleted."""
        keep = frozenset(counted)
        return await self._write(lambda ctx: forget_uncounted(ctx, keep))


class BudgetReads(ReadSide):
    async def budget_totals(self, spans: Sequence[PeriodSpan]) -> list[SpendTotal]:
        """[cluster]: every scope's fleet total in these periods, as the charges left them."""
        keys = [(span[0], span[1]) for span in spans]

        def op(conn: Connection) -> list[SpendTotal]:
            out = []
            for period, key in keys:
                rows = conn.execute(
                    "SELECT scope, ticks FROM budget_spend WHERE period = ? AND period_key = ?",
                    (period, key),
                )
                out += [SpendTotal(_stream(s), period, key, int(t)) for s, t in rows]
            return out

        return await self._read(op)

    async def budget_fired_rows(self) -> frozenset[str]:
        """[cluster]: the budget events fired in the fleet (`budget_fired`)."""
        return await self._read(
            lambda c: frozenset(str(r[0]) for r in c.execute("SELECT key FROM budget_fired"))
        )
