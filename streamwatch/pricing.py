"""MAVI stream prices, exact.

MAVI charges ``duration_s * rate * (1 + (fps - 1) * 0.5) / 3600`` USD per 5-second segment,
with ``rate`` 2.00 $/h for both features and 1.50 $/h for one. Every such price is a whole
number of 1/2880 USD ("ticks"), so money is kept as integer ticks and turned into USD only
for display.
"""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction

__all__ = [
    "SEGMENT_SECONDS",
    "TICKS_PER_USD",
    "segment_cost_ticks",
    "segment_cost_usd",
    "ticks_to_usd",
    "usd_to_ticks",
]

TICKS_PER_USD = 2880
SEGMENT_SECONDS = 5


def segment_cost_usd(*, fps: int, content_moderation: bool, logo_detection: bool) -> Fraction:
    """The exact USD price of one 5-second segment."""
    features = int(content_moderation) + int(logo_detection)
    if features == 0:
        raise ValueError("a task needs at least one feature")
    if fps < 1:
        raise ValueError("fps must be >= 1")
    rate = Fraction(2) if features == 2 else Fraction(3, 2)
    return SEGMENT_SECONDS * rate * (1 + Fraction(fps - 1, 2)) / 3600


@functools.cache  # few distinct arguments, asked on every orphan callback
def segment_cost_ticks(*, fps: int, content_moderation: bool, logo_detection: bool) -> int:
    """The price of one segment in ticks of 1/2880 USD: 4·(fps+1) for both features, 3·(fps+1)
    for one."""
    cost = segment_cost_usd(
        fps=fps, content_moderation=content_moderation, logo_detection=logo_detection
    )
    ticks = cost * TICKS_PER_USD
    assert ticks.denominator == 1, "MAVI prices are whole ticks"
    return ticks.numerator


def ticks_to_usd(ticks: int, *, places: int = 6) -> Decimal:
    """Ticks as USD, rounded half-even to `places` decimals, for display only."""
    exact = Fraction(ticks, TICKS_PER_USD)
    quantum = Decimal(1).scaleb(-places)
    return (Decimal(exact.numerator) / Decimal(exact.denominator)).quantize(
        quantum, rounding=ROUND_HALF_EVEN
    )


def usd_to_ticks(usd: Decimal | int | str) -> int:
    """USD as whole ticks, rounded down (a balance of 1.0001 USD buys no partial tick)."""
    return int(Fraction(Decimal(usd)) * TICKS_PER_USD)
