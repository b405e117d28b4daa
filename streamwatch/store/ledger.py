"""The ledger's queries: confirmed charges per stream, orphan tasks and their estimated
charges, over a time range.

Every charge MAVI makes is in `charges`, in ticks of 1/2880 USD, written in the same
transaction as the start or segment it pays for; orphans' estimates are in `orphan_charges`.

The SQL is the portable subset both backends run (`streamwatch.store.sql`).
"""

from __future__ import annotations

from streamwatch.store.reader import ReadSide
from streamwatch.store.sql import Connection
from streamwatch.store.types import ChargeTotal, OrphanCharges, OrphanTotals

__all__ = ["LedgerReads"]


class LedgerReads(ReadSide):
    async def charge_totals(self, *, since: float, until: float) -> list[ChargeTotal]:
        """Charges with `since <= at < until`, per stream."""

        def op(conn: Connection) -> list[ChargeTotal]:
            rows = conn.execute(
                "SELECT stream, count(CASE WHEN kind = 'precharge' THEN 1 END),"
                " count(CASE WHEN kind = 'segment' THEN 1 END), sum(ticks)"
                " FROM charges WHERE at >= ? AND at < ? GROUP BY stream ORDER BY stream",
                (since, until),
            )
            return [ChargeTotal(*r) for r in rows]

        return await self._read(op)

    async def orphan_summary(self) -> dict[str, int]:
        """Callbacks per task id this daemon never started."""
        return await self._read(
            lambda c: dict(c.execute("SELECT task_id, callbacks FROM orphan_tasks"))
        )

    async def orphan_totals(self) -> OrphanTotals:
        """How many unknown tasks sent callbacks, and how many (without loading the ids)."""
        return await self._read(
            lambda c: OrphanTotals(
                *c.execute(
                    "SELECT count(*), coalesce(sum(callbacks), 0), coalesce(sum(uncertain), 0),"
                    " count(stopped_at), count(end_status) FROM orphan_tasks"
                ).fetchone()
            )
        )

    async def orphan_charge_totals(self, *, since: float, until: float) -> OrphanCharges:
        """Estimated charges of orphan tasks with `since <= at < until`."""
        return await self._read(
            lambda c: OrphanCharges(
                *c.execute(
                    "SELECT count(DISTINCT task_id),"
                    " count(CASE WHEN segment_index = -1 THEN 1 END),"
                    " count(CASE WHEN segment_index >= 0 THEN 1 END), coalesce(sum(ticks), 0),"
                    " count(DISTINCT CASE WHEN uncertain <> 0 THEN task_id END)"
                    " FROM orphan_charges WHERE at >= ? AND at < ?",
                    (since, until),
                ).fetchone()
            )
        )
