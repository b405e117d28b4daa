"""What README.md claims about the command line and the config, checked against the code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from streamwatch import cli
from streamwatch.config import AlertSink, load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README section under a `## title` heading, up to the next one."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def table(text: str, header: str) -> dict[str, str]:
    """A markdown table whose header row starts with `header`: first cell -> the rest."""
    lines = text[text.index(f"| {header}") :].splitlines()[2:]
    rows = {}
    for line in lines:
        if not line.startswith("|"):
            break
        first, rest = line.strip("|").split("|", 1)
        rows[first.strip()] = rest
    return rows


def verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_readme_names_the_verbs_that_take_no_config():
    """ "Every verb but X takes -c/--config": X is exactly the verbs without the option."""
    without = {
        name
        for name, parser in verbs().items()
        if not any("--config" in a.option_strings for a in parser._actions)
        and name != "video"  # its own verbs take it
    }
    claim = re.search(r"Every verb but (.+?) takes `-c/--config", section("Command line"))
    assert claim is not None, "README must say which verbs take -c/--config"
    assert set(re.findall(r"`([a-z-]+)`", claim[1])) == without


def test_exit_codes_in_the_readme_are_the_cli_codes():
    """The exit-code legend lists exactly the codes the CLI returns, each verb row uses only
    those, every verb has a row, and the rows the new-operator trial found wrong say it now."""
    text = section("Command line")
    legend = {int(code) for code in table(text, "exit code")}
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert legend == codes
    rows = table(text, "verb")
    documented = {re.match(r"`streamwatch ([a-z-]+)", verb)[1] for verb in rows}  # type: ignore[index]
    assert documented == set(verbs())
    by_verb: dict[str, str] = {}
    for verb, rest in rows.items():
        cell = rest.rsplit("|", 1)[-1]
        assert {int(c) for c in re.findall(r"\b\d+\b", cell)} <= legend, verb
        by_verb.setdefault(verb.split()[1].strip("`"), cell)
    assert "state file" in by_verb["run"]
    assert {"0", "1", "2"} <= set(re.findall(r"\b\d\b", by_verb["emulator"]))


def test_columns_the_readme_names_are_in_the_status_table():
    """Every "`X` column" the README points at is a column `streamwatch status` prints."""
    named = re.findall(r"`([^`]+)` column", README)
    assert named
    header = cli.render_status(
        {
            "version": "0",
            "now": None,
            "backend": "emulator",
            "account": {
                "halted": False,
                "halt_reason": None,
                "halt_detail": None,
                "halted_until": None,
            },
            "streams": [],
            "cost": {
                "today_usd": "0",
                "month_usd": "0",
                "burn_usd_per_hour": "0",
                "estimated_unreported_usd": "0.000000",
                "budget": {},
                "by_label": {},
                "precharge": "separate",
            },
            "orphans": {
                "tasks": 0,
                "callbacks": 0,
                "live_tasks": 0,
                "uncertain_tasks": 0,
                "stopped_tasks": 0,
                "estimated_today_usd": "0.000000",
                "estimated_month_usd": "0.000000",
                "estimated_burn_usd_per_hour": "0.0000",
            },
            "alerts": {},
            "preflight": {"probes": {}, "precharges_avoided": 0, "precharges_avoided_usd": "0"},
        }
    ).splitlines()[0]
    for column in named:
        assert column in header, column


def test_quick_start_says_where_state_lives_and_how_to_move_the_port(tmp_path: Path):
    """The quick start names streamwatch.db in the current folder and the two variables that
    move the state file and the port; with the shipped config, they do."""
    quick = README[: README.index("\n---\n")]
    assert "`streamwatch.db`" in quick
    assert "current folder" in quick
    assert "STREAMWATCH_LISTEN=127.0.0.1:8081" in quick
    assert "STREAMWATCH_STATE=" in quick
    shipped = load_config(ROOT / "streams.toml", environ={})
    assert shipped.storage.path == Path("streamwatch.db")  # relative: the current folder
    assert shipped.server.listen == "127.0.0.1:8080"
    moved = load_config(
        ROOT / "streams.toml",
        environ={"STREAMWATCH_LISTEN": "127.0.0.1:8081", "STREAMWATCH_STATE": str(tmp_path)},
    )
    assert (moved.server.port, moved.storage.path) == (8081, tmp_path)


def test_every_alert_sink_key_is_documented_with_its_rule():
    """The `[[alerts.sinks]]` key table lists every key, and says `secret` is required for
    webhook sinks (the config refuses one without it)."""
    rows = table(section("Alerts to people"), "`[[alerts.sinks]]` key")
    assert {k.strip("`") for k in rows} == set(AlertSink.model_fields)
    secret = rows["`secret`"]
    assert "required" in secret
    assert "webhook" in secret
