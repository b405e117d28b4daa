"""Pricing: exact ticks that agree with MAVI's published formula and examples."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamwatch.pricing import (
    TICKS_PER_USD,
    segment_cost_ticks,
    segment_cost_usd,
    ticks_to_usd,
    usd_to_ticks,
)


@pytest.mark.parametrize(
    ("fps", "cm", "logo", "per_hour"),
    [
        (1, True, True, Decimal("2.00")),
        (2, True, True, Decimal("3.00")),  # MAVI's own example
        (2, True, False, Decimal("2.25")),  # MAVI's own example
        (2, False, True, Decimal("2.25")),
        (1, True, False, Decimal("1.50")),
        (5, True, True, Decimal("6.00")),
    ],
)
def test_published_examples(fps, cm, logo, per_hour):
    """720 segments an hour cost what MAVI's pricing page says."""
    cost = segment_cost_usd(fps=fps, content_moderation=cm, logo_detection=logo) * 720
    assert cost == Fraction(per_hour)


@given(fps=st.integers(1, 1000), cm=st.booleans(), logo=st.booleans())
def test_every_price_is_whole_ticks(fps, cm, logo):
    """Every segment price is a whole number of 1/2880 USD, equal to the formula exactly."""
    if not (cm or logo):
        return
    ticks = segment_cost_ticks(fps=fps, content_moderation=cm, logo_detection=logo)
    assert Fraction(ticks, TICKS_PER_USD) == segment_cost_usd(
        fps=fps, content_moderation=cm, logo_detection=logo
    )
    assert ticks == (4 if cm and logo else 3) * (fps + 1)


@given(n=st.integers(0, 10**7), fps=st.integers(1, 60))
def test_sums_are_exact(n, fps):
    """Summing n segments in ticks equals the closed form n·price exactly."""
    ticks = segment_cost_ticks(fps=fps, content_moderation=True, logo_detection=True)
    assert Fraction(ticks * n, TICKS_PER_USD) == n * Fraction(fps + 1, 720)


def test_a_million_segments_sum_exactly():
    """A million one-by-one additions give exactly the closed-form total."""
    ticks = segment_cost_ticks(fps=3, content_moderation=True, logo_detection=False)
    total = 0
    for _ in range(1_000_000):
        total += ticks
    exact = 1_000_000 * segment_cost_usd(fps=3, content_moderation=True, logo_detection=False)
    assert Fraction(total, TICKS_PER_USD) == exact == Fraction(12500, 3)
    assert ticks_to_usd(total) == Decimal("4166.666667")


@given(usd=st.decimals(min_value=0, max_value=10**6, places=4))
def test_usd_round_trip_never_overstates(usd):
    """Converting USD to ticks rounds down, so a balance is never overstated."""
    ticks = usd_to_ticks(usd)
    assert Fraction(ticks, TICKS_PER_USD) <= Fraction(usd)
    assert Fraction(ticks + 1, TICKS_PER_USD) > Fraction(usd)


def test_no_feature_is_an_error():
    """A task with no feature has no price: it is a caller error."""
    with pytest.raises(ValueError, match="feature"):
        segment_cost_ticks(fps=1, content_moderation=False, logo_detection=False)
