"""`streamwatch cost` and `cost estimate`: figures from the state file and from the config."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from streamwatch.store import Location, Store, StreamRecord
from tests.conftest import cli, storage_toml, tool

NOV = datetime(2026, 11, 10, 12, tzinfo=UTC).timestamp()
OCT = datetime(2026, 10, 10, 12, tzinfo=UTC).timestamp()


def write_config(tmp_path: Path, location: Location | None = None) -> Path:
    path = tmp_path / "streams.toml"
    path.write_text(f"""
[storage]
{storage_toml(location or tmp_path / "state.db")}
[budgets]
daily_usd = "10.00"
[[streams]]
name = "a"
url = "rtmp://h/a"
labels = {{ site = "paris" }}
[[streams]]
name = "b"
url = "rtmp://h/b"
fps = 2
logo_detection = true
labels = {{ site = "paris", team = "brand" }}
budget = {{ monthly_usd = "100.00" }}
""")
    return path


async def seed(db: Location) -> None:
    async with Store(db) as store:
        for task, stream, fps, logos, at in (
            ("t1", "a", 1, False, NOV),
            ("t2", "b", 2, True, NOV),
            ("t0", "a", 1, False, OCT),
        ):
            await store.record_task_started(
                task_id=task,
                stream=stream,
                spec_hash="h",
                fps=fps,
                content_moderation=True,
                logo_detection=logos,
                max_logos=5,
                started_at=at,
            )


async def test_cost_by_stream_and_label_in_a_range(tmp_path: Path, location: Location):
    """Totals per stream and per label value, limited to --since/--until, exact in USD."""
    config = write_config(tmp_path, location)
    await seed(location)
    out = cli("cost", "-c", str(config), "--since", "2026-11", "--until", "2026-12-01", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    by_stream = {g["name"]: g for g in doc["groups"]}
    assert by_stream["a"]["usd"] == "0.002083"  # one pre-charge at fps 1, one feature: 6 ticks
    assert by_stream["b"]["usd"] == "0.004167"  # fps 2, both features: 12 ticks
    assert by_stream["a"]["precharges"] == 1, "October's start is outside the range"
    assert doc["total_usd"] == "0.006250"  # 18 ticks, exactly
    out = cli("cost", "-c", str(config), "--since", "2026-10-01", "--by", "label", "--json")
    groups = {g["name"]: g["usd"] for g in json.loads(out.stdout)["groups"]}
    assert groups == {"site=paris": "0.008333", "team=brand": "0.004167"}
    table = cli("cost", "-c", str(config), "--since", "2026-10-01")
    assert table.returncode == 0
    assert "TOTAL" in table.stdout
    assert "0.008333" in table.stdout


def test_cost_rejects_a_bad_date(tmp_path: Path):
    """A date that is not a date is named in the error, as a bad argument."""
    out = cli("cost", "-c", str(write_config(tmp_path)), "--since", "last tuesday")
    assert out.returncode == 2
    assert "last tuesday" in out.stderr


def test_cost_without_a_state_file(tmp_path: Path):
    """Before the daemon ever ran, `cost` says there is nothing recorded."""
    out = cli("cost", "-c", str(write_config(tmp_path)))
    assert out.returncode == 1
    assert "nothing recorded" in out.stderr


def test_estimate_prices_the_config_and_its_budgets(tmp_path: Path):
    """`cost estimate` prices each stream per hour, day and 30 days, and when caps are hit."""
    out = cli("cost", "estimate", "-c", str(write_config(tmp_path)), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    hours = {s["name"]: s["hour_usd"] for s in doc["streams"]}
    assert hours == {"a": "1.500000", "b": "3.000000"}
    assert doc["total"]["day_usd"] == "108.000000"
    caps = {(c["scope"], c["period"]): c["hours_at_full_burn"] for c in doc["budgets"]}
    assert caps == {("account", "daily"): 2.22, ("stream b", "monthly"): 33.33}


def test_check_config_shows_the_estimate(tmp_path: Path):
    """check-config prints the same cost summary as `cost estimate`."""
    out = cli("check-config", "-c", str(write_config(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "$/HOUR" in out.stdout
    assert "account daily budget $10.00: reached after 2.22 h at full burn" in out.stdout


async def test_cost_shows_what_preflight_saved(tmp_path: Path, location: Location):
    """The pre-charges preflight avoided (and their price) and its probes by outcome, kept in
    the streams' records, are in `cost` --json and in the table, summed over streams."""
    config = write_config(tmp_path, location)
    await seed(location)
    async with Store(location) as store:
        await store.save_streams(
            [
                StreamRecord(
                    "a",
                    probes=(("ok", 2), ("unreachable", 3)),
                    precharges_avoided=3,
                    ticks_saved=18,
                ),
                StreamRecord("b", probes=(("timeout", 1),), precharges_avoided=1, ticks_saved=12),
            ]
        )
    out = cli("cost", "-c", str(config), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["preflight"] == {
        "probes": {"ok": 2, "timeout": 1, "unreachable": 3},
        "precharges_avoided": 4,
        "precharges_avoided_usd": "0.010417",  # 30 ticks
    }
    table = cli("cost", "-c", str(config))
    assert "4 pre-charge(s) avoided, $0.0104 not spent" in table.stdout
    assert "unreachable 3" in table.stdout


def test_check_config_warns_when_preflight_cannot_probe(tmp_path: Path):
    """With preflight on and no ffprobe on PATH, check-config still passes (starts go ahead
    without a probe) but says so, naming the streams; with ffprobe there, no warning."""
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('name = "b"', 'name = "b"\npreflight = true'))
    empty = tmp_path / "bin"
    empty.mkdir()
    out = cli("check-config", "-c", str(config), env={"PATH": str(empty)})
    assert out.returncode == 0, out.stderr
    assert "warning: preflight is on for b but ffprobe is not installed" in out.stdout
    tool("ffprobe")
    out = cli("check-config", "-c", str(config))
    assert "warning" not in out.stdout
