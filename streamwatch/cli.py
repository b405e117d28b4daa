"""The `streamwatch` command. Verbs (stable; see README): run, check-config, status, resume,
cost, alerts, video, callback-url, backup, probe, emulator.

Why one module of this length: it is the one parser and the short commands it dispatches to,
each a screen or less; the larger verbs live apart (`probecmd`, `videocmd`), and what the
commands compute lives with its concept (`costs`, `status`, `ledger`), drawn by `table`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import stamina.instrumentation
import structlog
from prometheus_client import disable_created_metrics
from pydantic import ValidationError

from streamwatch import __version__, fleetcmd, probecmd, storecmd, videocmd
from streamwatch.alerts.events import AlertEvent
from streamwatch.config import (
    Check,
    Config,
    ConfigError,
    ConfigProblem,
    Secrets,
    check_host_port,
    load_config,
    read_secret,
    resolve_secrets,
    secret_problems,
    secret_values,
)
from streamwatch.costs import (
    CostReport,
    Estimate,
    PreflightCost,
    cost_report,
    estimate,
    preflight_cost,
)
from streamwatch.eventloop import EventLoopError, loop_factory
from streamwatch.http import local_url
from streamwatch.ledger import period_bounds
from streamwatch.logs import configure_logging
from streamwatch.redact import Redactor, redact_urls
from streamwatch.status import StatusDoc, StreamDoc
from streamwatch.storage import storage_location
from streamwatch.store import (
    ChargeTotal,
    Location,
    NewAlert,
    OrphanCharges,
    OutboxRow,
    PgTarget,
    ReadOnlyStore,
    Store,
    StoreError,
    check_state_file,
)
from streamwatch.store.postgres import check_database
from streamwatch.table import table

__all__ = ["main"]

# What each exit code means, for every verb (README, "Command line").
EXIT_OK = 0  # done
EXIT_CONFIG = 1  # the config, its secrets or the state file are wrong, or the work failed
EXIT_USAGE = 2  # a bad command-line argument (argparse uses 2 as well)
EXIT_UNREACHABLE = 3  # the daemon (or, for `alerts test`, a sink) could not be reached
EXIT_REFUSED = 4  # the daemon answered, and refused (wrong token, unknown stream)
EXIT_NOT_MEDIA = 5  # `probe`: the source answered with something that is not media
EXIT_STILL_RUNNING = (
    fleetcmd.EXIT_STILL_RUNNING
)  # `fleet stop --wait`: tasks still run at the timeout
EXIT_BROKEN_PIPE = 141  # as a shell reports a program killed by SIGPIPE
DEFAULT_CONFIG = "streams.toml"

Command = Callable[[argparse.Namespace], int]
"""What runs a verb: its parsed arguments in, its exit code out."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong, and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _http_url(text: str) -> str:
    """An http(s) base URL, without a trailing slash."""
    if not re.match(r"^https?://[^/\s]+", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// or https:// URL, e.g. http://127.0.0.1:8080"
        )
    return text.rstrip("/")


def _when(text: str) -> float:
    """A UTC date (2026-11-01), month (2026-11) or ISO time, as a unix time."""
    try:
        when = datetime.fromisoformat(text + "-01" if len(text) == 7 else text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date: use YYYY-MM-DD, YYYY-MM or an ISO time (UTC)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _host_port(text: str) -> tuple[str, int]:
    try:
        check_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _usd(text: str) -> Decimal:
    try:
        amount = Decimal(text)
    except ArithmeticError:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in USD, e.g. 100 or 12.50")
    return amount


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    """A converter to a number above 0 (of `kind`)."""
    what = "a whole number" if kind is int else "a number"

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} above 0")
        return value

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="streamwatch", description="Keep MAVI live-stream moderation running and watched."
    )
    parser.add_argument("--version", action="version", version=f"streamwatch {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, text: str, about: str, run: Command) -> argparse.ArgumentParser:
        """A verb with its one-line help (in `streamwatch --help`), its description and the
        command that runs it."""
        p: argparse.ArgumentParser = sub.add_parser(name, help=text, description=about)
        p.set_defaults(func=run)
        return p

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            type=Path,
            default=Path(os.environ.get("STREAMWATCH_CONFIG", DEFAULT_CONFIG)),
            help="config file (default: $STREAMWATCH_CONFIG or ./streams.toml)",
        )

    daemon_url = "the daemon's base URL, e.g. http://127.0.0.1:8080 (default: from [server] listen)"
    p = verb(
        "run",
        "run the daemon",
        "Run the daemon in the foreground until SIGTERM or Ctrl-C: start a MAVI task for every "
        "stream in the config, store their callbacks, account the cost and send alerts. SIGHUP "
        "re-reads [[streams]]. Exits 1 when the config, its secrets or the state file are wrong, "
        "or the server cannot listen.",
        _cmd_run,
    )
    with_config(p)
    p = verb(
        "check-config",
        "validate the config; print every problem",
        "Validate the config file, its secrets and the state file ([storage] path) or database "
        "([storage] url: connects, checks the credentials and the schema) in one pass "
        "and print every problem with its key path; when all is well, print what the config "
        "will cost.",
        _cmd_check_config,
    )
    with_config(p)
    p = verb(
        "status",
        "show the running daemon's streams",
        "Ask the running daemon for its streams, their state, last segment, counts and cost, "
        "and print them as a table (or the raw JSON).",
        _cmd_status,
    )
    with_config(p)
    p.add_argument("--url", type=_http_url, help=daemon_url)
    p.add_argument("--json", action="store_true", help="print the raw status JSON")
    p = verb(
        "resume",
        "lift a balance halt and release held streams",
        "Tell the running daemon to lift an account halt (after a 402 or 401) and release held "
        "and backing-off streams, so that they start again at once.",
        _cmd_resume,
    )
    with_config(p)
    p.add_argument("streams", nargs="*", metavar="STREAM", help="streams to release (default: all)")
    p.add_argument("--url", type=_http_url, help=daemon_url)
    p = verb(
        "cost",
        "what streams cost, from the state file; or `cost estimate`",
        "Total the charges recorded in the state file over a UTC range, by stream or by label "
        "(the daemon need not run); `cost estimate` prices the config as written instead.",
        _cmd_cost,
    )
    with_config(p)
    p.add_argument("what", nargs="?", choices=["estimate"], help="price the config as written")
    p.add_argument(
        "--since", type=_when, help="UTC date, month or ISO time (default: start of this month)"
    )
    p.add_argument(
        "--until", type=_when, help="UTC date, month or ISO time, exclusive (default: now)"
    )
    p.add_argument(
        "--by",
        choices=["stream", "label"],
        default="stream",
        help="total per stream, or per label value (key=value) (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = verb(
        "alerts",
        "send a test alert, or list recent alerts",
        "`alerts test` sends a sample alert through the outbox to every sink (or one) and prints "
        "each sink's result; `alerts list` shows recent alerts with their delivery state.",
        _cmd_alerts,
    )
    with_config(p)
    p.add_argument(
        "action",
        choices=["test", "list"],
        help="test: send a sample alert to the sinks; list: show recent alerts",
    )
    p.add_argument("--sink", help="test: only this sink (default: every sink)")
    p.add_argument(
        "--limit",
        type=_positive(int),
        default=30,
        help="list: how many (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    videocmd.add_parsers(sub, with_config, _cmd_video, url=_http_url, positive=_positive(int))
    p = verb(
        "callback-url",
        "print the URL to register in the MAVI console",
        "Print the callback URL (public_url, route and secret) to paste into the MAVI console as "
        "the account's webhook. It contains the secret: paste it, do not post it.",
        _cmd_callback_url,
    )
    with_config(p)
    p.add_argument("--video", action="store_true", help="the batch upload callback URL instead")
    p = verb(
        "backup",
        "copy the state file safely, even while the daemon runs",
        "Copy the state file with SQLite's online backup (safe while the daemon writes), check "
        "the copy's integrity and write it only when complete.",
        _cmd_backup,
    )
    with_config(p)
    p.add_argument("dest", type=Path, help="the backup file, or a folder for a dated one")
    probecmd.add_parser(sub, with_config, _cmd_probe)
    storecmd.add_parser(sub, with_config, _cmd_store)
    fleetcmd.add_parser(sub, with_config, _cmd_fleet, positive=_positive(float))
    p = verb(
        "emulator",
        "run the MAVI emulator on its own",
        "Serve the MAVI emulator (v2 stream API and v1 batch video API) on its own, for demos "
        "and for programs under test; print its two base URLs on stdout. It reads no config "
        "file: everything is given here.",
        _cmd_emulator,
    )
    p.add_argument(
        "--listen",
        type=_host_port,
        default="127.0.0.1:9400",
        help="host:port to serve on; port 0 picks a free one (default %(default)s)",
    )
    p.add_argument("--webhook", help="the account's callback URL, where callbacks are posted")
    p.add_argument(
        "--balance-usd",
        type=_usd,
        default="100",
        help="starting balance in USD (default %(default)s)",
    )
    p.add_argument(
        "--segment-seconds",
        type=_positive(float),
        default=5.0,
        help="seconds between a task's segment callbacks (default %(default)s, as MAVI)",
    )
    p.add_argument("--capacity", type=_positive(int), help="concurrent task limit (default: none)")
    p.add_argument("--api-key-env", help="require the key in this environment variable")
    p.add_argument("--script", type=Path, help="TOML file of [[scripts]] (see README)")
    p.add_argument("--string-codes", action="store_true", help='answer "code": "200" strings')
    p.add_argument(
        "--answer-delay-seconds",
        type=_positive(float),
        default=0.0,
        help="hold each start's answer this long after the task is created (crash tests; "
        "default %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Library logs go to stderr and only when they matter, so that stdout stays the command's
    # own output (tables, JSON). `run` and `emulator` configure their own.
    configure_logging(level="warning")
    # The MAVI clients log each retry themselves (`mavi.request_retry`, with the endpoint);
    # stamina's own hooks would add a second, vaguer line and a counter on the global registry.
    stamina.instrumentation.set_on_retry_hooks([])
    command: Command = args.func
    try:
        code = command(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return code
    except ConfigError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except _DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`streamwatch cost | head`): no traceback. Python flushes stdout
        # again at exit, so point it somewhere that accepts the rest.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _one_line(exc: ConfigError) -> str:
    """The error as one line when there is one problem; else the list."""
    if len(exc.problems) == 1:
        return f"{exc.source}: {exc.problems[0]}"
    return str(exc)


def _load(path: Path) -> Config:
    return load_config(path)


def _state_file_problems(config: Config, environ: Mapping[str, str]) -> list[ConfigProblem]:
    """The state file as a config `Check`: its folder, and what is already there. (The
    database, for `check-config` only: `run` finds out as it opens it.)"""
    if config.storage.postgresql:
        return []
    problem = check_state_file(config.storage.path)
    return [ConfigProblem("storage.path", problem)] if problem else []


def _database_problems(config: Config, environ: Mapping[str, str]) -> list[ConfigProblem]:
    """The PostgreSQL database as a config `Check`: reachable, the credentials accepted, the
    database there, its schema current (connects; writes nothing)."""
    if not config.storage.postgresql:
        return []
    try:
        location = storage_location(config, environ=environ)
    except ConfigError:
        return []  # the missing secret is reported by the secrets' check
    assert isinstance(location, PgTarget)
    location = dataclasses.replace(
        location, connect_timeout_seconds=min(location.connect_timeout_seconds, 10.0)
    )
    problem = check_database(location)
    return [ConfigProblem("storage.url", problem)] if problem else []


def _load_with_secrets(
    path: Path, *, state_file: bool = False, database: bool = False
) -> tuple[Config, Secrets]:
    """The config and its secrets; every problem with them (and with the state file or the
    database, if asked) is reported in one `ConfigError`."""
    checks: list[Check] = [secret_problems]
    if state_file:
        checks.append(_state_file_problems)
    if database:
        checks.append(_database_problems)
    config = load_config(path, checks=checks)
    return config, resolve_secrets(config)


def _cmd_run(args: argparse.Namespace) -> int:
    from streamwatch.app import App
    from streamwatch.background import BackgroundFailed
    from streamwatch.guard import raise_file_limit

    config, secrets = _load_with_secrets(args.config, state_file=True)
    redactor = Redactor(secret_values(config, secrets))
    configure_logging(level=config.logging.level, fmt=config.logging.format, redactor=redactor)
    # `_created` series would double every labelled counter and histogram for no operator use.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
    # Each connection is a file descriptor: take all the process may have (the server fits its
    # connection cap under it).
    raise_file_limit()
    try:
        _, factory = loop_factory()
    except EventLoopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = App(config, config_path=args.config, secrets=secrets, redactor=redactor)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(app.run())
    except asyncio.CancelledError:
        return 1
    except (OSError, StoreError, BackgroundFailed) as exc:
        structlog.get_logger("streamwatch").error("app.failed", error=str(exc))
        return 1
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    config, _ = _load_with_secrets(args.config, state_file=True, database=True)
    print(f"{args.config}: OK — {len(config.streams)} stream(s), backend {config.mavi.backend}")
    probed = [s.name for s in config.streams if s.preflight]
    if probed and shutil.which("ffprobe") is None:
        print(
            f"warning: preflight is on for {', '.join(probed)} but ffprobe is not installed:"
            " they will start without a probe (install FFmpeg: apt-get install ffmpeg)"
        )
    print()
    print(render_estimate(_estimate(config)))
    return EXIT_OK


def _daemon_url(config: Config, override: str | None) -> str:
    return override or local_url(config.server.host, config.server.port)


def _headers(config: Config) -> dict[str, str]:
    if config.server.status_token is None:
        return {}
    problems: list[ConfigProblem] = []
    token = read_secret(config.server.status_token, "server.status_token", os.environ, problems)
    if token is None:
        raise ConfigError("secrets", problems)
    return {"Authorization": f"Bearer {token.get_secret_value()}"}


class _DaemonError(Exception):
    """No usable answer from the daemon; `exit_code` says which kind."""

    exit_code = EXIT_UNREACHABLE


class _Unreachable(_DaemonError):
    """The daemon did not answer."""


class _Refused(_DaemonError):
    """The daemon answered, but refused (or not with what was asked for)."""

    exit_code = EXIT_REFUSED


async def _http(method: str, url: str, headers: dict[str, str], body: Any = None) -> Any:
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, headers=headers, json=body) as resp,
        ):
            try:
                doc = await resp.json(content_type=None)
            except ValueError:
                raise _Refused(
                    f"{url} answered HTTP {resp.status} with a body that is not JSON: "
                    "is it streamwatch?"
                ) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Unreachable(
            f"cannot reach the daemon at {url} ({type(exc).__name__}); "
            "is `streamwatch run` running with this config?"
        ) from None
    if resp.status != 200:
        error = doc.get("error", doc) if isinstance(doc, dict) else doc
        hint = " (check [server] status_token)" if resp.status == 401 else ""
        raise _Refused(f"the daemon at {url} answered HTTP {resp.status}: {error}{hint}")
    return doc


def _call_daemon(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The daemon's answer, or `_Unreachable` / `_Refused`."""
    config = _load(args.config)
    url = _daemon_url(config, args.url) + path
    return asyncio.run(_http(method, url, _headers(config), body))


def _cmd_status(args: argparse.Namespace) -> int:
    doc: StatusDoc = _call_daemon(args, "GET", "/api/v1/status")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_status(doc))
    return EXIT_OK


def _source(stream: StreamDoc) -> str:
    """The SOURCE cell: what the last preflight probe saw (codec, size, frame rate, bit rate),
    `offline` while probes find nothing, `-` without preflight."""
    if stream.get("source_offline_since"):
        return "offline"
    source = stream.get("source")
    if not source:
        return "-"
    parts = [source["video_codec"] or "no video", source["resolution"] or ""]
    if source["fps"]:
        parts.append(f"{source['fps']:g}fps")
    if source["bitrate"]:
        parts.append(f"{source['bitrate'] / 1e6:.2f}Mb/s")
    return " ".join(p for p in parts if p)


def render_status(doc: StatusDoc) -> str:
    """The status document as a table for people."""
    lines = []
    account = doc["account"]
    if account["halted"]:
        lines.append(
            f"ACCOUNT HALTED ({account['halt_reason']}: {account['halt_detail']}) until "
            f"{_short(account['halted_until'])} — top up, then `streamwatch resume`"
        )
    header = (
        "STREAM",
        "STATE",
        "TASK",
        "LAST SEGMENT",
        "SEGMENTS",
        "UNSAFE",
        "ERRORS",
        "RESTARTS",
        "SOURCE",
        "TODAY $",
        "$/H",
    )
    rows = [header]
    for s in doc["streams"]:
        rows.append(
            (
                s["name"],
                s["state"] + ("" if s["configured"] else " (removed)"),
                (s["task_id"] or "-")[:8],
                _short(s["last_segment_at"]),
                str(s["segments"]),
                str(s["unsafe_segments"]),
                str(s["failed_segments"]),
                str(s["restarts"]),
                _source(s),
                _money(s["cost"]["today_usd"]),
                _money(s["cost"]["burn_usd_per_hour"]),
            )
        )
    lines += table(rows)
    if not doc["streams"]:
        lines.append("(no streams configured)")
    cost = doc["cost"]
    line = (
        f"account: today ${_money(cost['today_usd'])}, month ${_money(cost['month_usd'])}, "
        f"burning ${_money(cost['burn_usd_per_hour'])}/h"
    )
    if cost["estimated_unreported_usd"] != "0.000000":
        line += f", ~${_money(cost['estimated_unreported_usd'])} billed but not yet reported"
    budget = cost["budget"]
    if "daily_usd" in budget:
        percent, cap = budget["daily_used_percent"], _money(budget["daily_usd"])
        line += f"; daily budget {percent}% of ${cap}"
    if "monthly_usd" in budget:
        percent, cap = budget["monthly_used_percent"], _money(budget["monthly_usd"])
        line += f"; monthly budget {percent}% of ${cap}"
    lines.append(line)
    preflight = doc.get("preflight")
    if preflight and preflight["probes"]:
        probes = ", ".join(f"{k} {v}" for k, v in sorted(preflight["probes"].items()))
        lines.append(
            f"preflight: {preflight['precharges_avoided']} pre-charge(s) avoided"
            f" (${_money(preflight['precharges_avoided_usd'])}); probes: {probes}"
        )
    dead = doc.get("alerts", {}).get("dead", 0)
    if dead:
        lines.append(f"{dead} alert(s) could not be delivered: `streamwatch alerts list`")
    orphans = doc["orphans"]
    if orphans["tasks"]:
        line = (
            f"{orphans['callbacks']} callback(s) from {orphans['tasks']} task(s) this daemon "
            "did not start: someone else's task is billing this account"
        )
        if orphans.get("estimated_today_usd", "0.000000") != "0.000000":
            line += (
                f" (~${_money(orphans['estimated_today_usd'])} today, estimated; counted"
                " against the account's budget)"
            )
        lines.append(line)
    return "\n".join(lines)


def _money(value: str) -> str:
    """A USD string for people: cents, or four places below a cent."""
    amount = Decimal(value)
    return f"{amount:.2f}" if amount >= 1 or amount == 0 else f"{amount:.4f}"


def _short(ts: str | None) -> str:
    if not ts:
        return "-"
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")


def _recorded(config: Config, nothing: str) -> Location | None:
    """Where the state is, to read it; None (with the error printed) if there is no state
    file yet or a storage secret is missing."""
    try:
        location = storage_location(config)
    except ConfigError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return None
    if isinstance(location, Path) and not location.exists():
        print(f"error: no state file at {location}: {nothing}", file=sys.stderr)
        return None
    return location


def _cmd_cost(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.what == "estimate":
        doc = _estimate(config)
        print(json.dumps(doc, indent=2) if args.json else render_estimate(doc))
        return EXIT_OK
    now = time.time()
    since = args.since if args.since is not None else period_bounds("month", now)[0]
    until = args.until if args.until is not None else now
    location = _recorded(config, "nothing recorded yet")
    if location is None:
        return EXIT_CONFIG

    async def read() -> tuple[list[ChargeTotal], OrphanCharges, PreflightCost]:
        async with ReadOnlyStore(location) as store:
            return (
                await store.charge_totals(since=since, until=until),
                await store.orphan_charge_totals(since=since, until=until),
                preflight_cost((await store.streams()).values()),
            )

    totals, orphans, preflight = asyncio.run(read())
    report = cost_report(
        totals,
        orphans,
        specs={s.name: s for s in config.streams},
        by=args.by,
        since=since,
        until=until,
        precharge=config.ledger.precharge,
        preflight=preflight,
    )
    print(json.dumps(report, indent=2) if args.json else render_cost(report))
    return EXIT_OK


def render_cost(doc: CostReport) -> str:
    """The cost report as a table for people."""
    orphans = doc["orphans"]
    rows = [(doc["by"].upper(), "STARTS", "SEGMENTS", "USD")]
    rows += [(g["name"], str(g["precharges"]), str(g["segments"]), g["usd"]) for g in doc["groups"]]
    rows.append(("TOTAL", "", "", doc["total_usd"]))
    if orphans["tasks"]:
        rows.append(
            (
                "ORPHANS (estimated)",
                str(orphans["precharges"]),
                str(orphans["segments"]),
                orphans["estimated_usd"],
            )
        )
        rows.append(("TOTAL WITH ORPHANS", "", "", doc["total_with_orphans_usd"]))
    lines = [f"{_short(doc['since'])} to {_short(doc['until'])} UTC"]
    lines += table(rows, right=(1, 2, 3))
    reading = "its own charge" if doc["precharge"] == "separate" else "the first segment"
    lines.append(f"(each start's pre-charge counted as {reading}; see ledger.precharge)")
    if orphans["tasks"]:
        uncertain = (
            f", {orphans['uncertain_tasks']} of them priced without knowing their fps"
            if orphans["uncertain_tasks"]
            else ""
        )
        lines.append(
            f"({orphans['tasks']} task(s) this daemon did not start: priced from what their"
            f" callbacks show{uncertain}; see README, Orphan tasks)"
        )
    preflight = doc.get("preflight")
    if preflight and (preflight["probes"] or preflight["precharges_avoided"]):
        probes = ", ".join(f"{k} {v}" for k, v in preflight["probes"].items())
        lines.append(
            f"preflight, since the state file began: {preflight['precharges_avoided']}"
            f" pre-charge(s) avoided, ${_money(preflight['precharges_avoided_usd'])} not spent"
            f" (probes: {probes})"
        )
    return "\n".join(lines)


def _estimate(config: Config) -> Estimate:
    return estimate(config.streams, config.budgets, segment_seconds=config.mavi.segment_seconds)


def render_estimate(doc: Estimate) -> str:
    """The estimate as a table for people."""
    rows = [("STREAM", "FPS", "FEATURES", "$/SEGMENT", "$/HOUR", "$/DAY", "$/30 DAYS")]
    for s in doc["streams"]:
        rows.append(
            (
                s["name"],
                str(s["fps"]),
                "+".join(s["features"]),
                s["segment_usd"],
                _money(s["hour_usd"]),
                _money(s["day_usd"]),
                _money(s["days30_usd"]),
            )
        )
    t = doc["total"]
    rows.append(
        ("TOTAL", "", "", "", _money(t["hour_usd"]), _money(t["day_usd"]), _money(t["days30_usd"]))
    )
    lines = table(rows, right=(3, 4, 5, 6))
    for cap in doc["budgets"]:
        when = (
            "never (nothing runs)"
            if cap["hours_at_full_burn"] is None
            else f"after {cap['hours_at_full_burn']} h at full burn"
        )
        lines.append(f"{cap['scope']} {cap['period']} budget ${_money(cap['usd'])}: reached {when}")
    lines.append(f"({doc['note']})")
    return "\n".join(lines)


def _cmd_alerts(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _alerts_list(_load(args.config), limit=args.limit, as_json=args.json)
    config, secrets = _load_with_secrets(args.config)
    names = [s.name for s in config.alerts.sinks]
    if args.sink and args.sink not in names:
        print(
            f"error: --sink: no sink named {args.sink!r} (have: {', '.join(names) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    chosen = [args.sink] if args.sink else names
    if not chosen:
        print("error: no [[alerts.sinks]] configured", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(_alerts_test(config, secrets, chosen))


async def _alerts_test(config: Config, secrets: Secrets, chosen: list[str]) -> int:
    """Send one sample alert to each chosen sink through the outbox, as the daemon would."""
    from streamwatch.alerts.outbox import Outbox
    from streamwatch.alerts.sinks.registry import build_sinks

    now = time.time()
    event = AlertEvent(
        kind="test",
        severity="info",
        title="streamwatch test alert",
        text="If you can read this, alerts from streamwatch reach you.",
        at=now,
    )
    location = storage_location(config)
    async with aiohttp.ClientSession() as session, Store(location) as store:
        sinks = {
            k: v
            for k, v in build_sinks(
                config.alerts.sinks, secrets.sinks, session=session, clock=time.time
            ).items()
            if k in chosen
        }
        ids = {name: str(uuid.uuid4()) for name in chosen}
        await store.enqueue_alerts(
            [
                NewAlert(ids[n], n, "cli-test", f"cli-test:{ids[n]}", event.to_json(), now)
                for n in chosen
            ]
        )
        outbox = Outbox(
            store=store, sinks=sinks, retry_initial=0.5, retry_max=2.0, poll_seconds=0.5
        )
        async with outbox.running():
            for _ in range(3):  # a few quick tries; what is left, the daemon retries
                await outbox.deliver_due()
                await outbox.settle()
                rows = {r.alert_id: r for r in await store.recent_alerts(limit=200)}
                if all(rows[i].state != "pending" for i in ids.values()):
                    break
                await asyncio.sleep(1.0)
    failed = 0
    for name in chosen:
        row = rows[ids[name]]
        print(f"{name}: {row.state}" + (f" ({row.last_error})" if row.last_error else ""))
        failed += row.state != "delivered"
    return EXIT_OK if not failed else EXIT_UNREACHABLE


def _alerts_list(config: Config, *, limit: int, as_json: bool) -> int:
    location = _recorded(config, "no alerts yet")
    if location is None:
        return EXIT_CONFIG

    async def read() -> list[OutboxRow]:
        async with ReadOnlyStore(location) as store:
            return await store.recent_alerts(limit=limit)

    found = asyncio.run(read())
    docs = [
        {
            "alert_id": r.alert_id,
            "sink": r.sink,
            "rule": r.rule,
            "state": r.state,
            "attempts": r.attempts,
            "kind": r.event["kind"],
            "title": r.event["title"],
            "stream": r.event.get("stream"),
            "resolved": r.event.get("resolved", False),
            "created_at": datetime.fromtimestamp(r.created_at, UTC).isoformat(),
            "last_error": r.last_error,
        }
        for r in found
    ]
    if as_json:
        print(json.dumps(docs, indent=2))
        return EXIT_OK
    rows = [("WHEN", "SINK", "STATE", "TRIES", "KIND", "TITLE")]
    rows += [
        (
            _short(d["created_at"]),
            d["sink"],
            d["state"],
            str(d["attempts"]),
            d["kind"],
            ("resolved: " if d["resolved"] else "") + d["title"],
        )
        for d in docs
    ]
    for line in table(rows):
        print(line)
    if not docs:
        print("(no alerts yet)")
    return EXIT_OK


def _cmd_video(args: argparse.Namespace) -> int:
    return videocmd.run(args, _load(args.config))


def _cmd_resume(args: argparse.Namespace) -> int:
    doc = _call_daemon(args, "POST", "/api/v1/resume", {"streams": args.streams})
    done = []
    if doc.get("halt_lifted"):
        done.append(f"lifted the account halt ({doc['halt_lifted']})")
    if doc.get("released"):
        done.append(f"released {', '.join(doc['released'])}")
    print(f"resumed: {'; '.join(done) if done else 'nothing was halted or held'}")
    return EXIT_OK


def _cmd_callback_url(args: argparse.Namespace) -> int:
    config, secrets = _load_with_secrets(args.config)
    if secrets.callback_secret_generated:
        print(
            "error: [server] callback_secret is not set; with the emulator a fresh one is made "
            "each run. Set it (env or file) to get a stable URL.",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    base = config.server.public_url or _daemon_url(config, None)
    route = "mavi-video" if args.video else "mavi"
    print(f"{base.rstrip('/')}/callbacks/{route}/{secrets.callback_secret.get_secret_value()}")
    if not config.server.public_url:
        print(
            "note: [server] public_url is unset; this URL is only reachable locally",
            file=sys.stderr,
        )
    return EXIT_OK


def _cmd_backup(args: argparse.Namespace) -> int:
    from streamwatch.store import backup

    config = _load(args.config)
    if config.storage.postgresql:
        print(
            "error: the state is in PostgreSQL ([storage] url): back it up with pg_dump "
            "(e.g. pg_dump -Fc -f streamwatch.dump DBNAME) or your provider's backups; "
            "`streamwatch store copy --to sqlite:///FILE` makes a state file of it",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    shown = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if shown:
            print(f"\rbacking up: {done * 100 // max(total, 1)}%", end="", file=sys.stderr)

    try:
        result = backup(config.storage.path, args.dest, progress=progress)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except _DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if shown:
            print(file=sys.stderr)
    size = result.bytes / 2**20
    print(f"{result.path}: schema {result.schema_version}, {size:.1f} MiB, integrity ok")
    return EXIT_OK


def _cmd_probe(args: argparse.Namespace) -> int:
    return probecmd.run(args)


def _cmd_store(args: argparse.Namespace) -> int:
    return storecmd.run(args, _load(args.config) if not args.source else Config(), os.environ)


def _cmd_fleet(args: argparse.Namespace) -> int:
    return fleetcmd.run(args, _load(args.config))


def _cmd_emulator(args: argparse.Namespace) -> int:
    from streamwatch.emulator import Emulator, EmulatorScript, Script
    from streamwatch.pricing import usd_to_ticks

    scripts: dict[str, Script] = {}
    if args.script:
        try:
            raw = tomllib.loads(args.script.read_text(encoding="utf-8"))
            for item in raw.get("scripts", []):
                script = EmulatorScript.model_validate(item)
                scripts[script.url] = Script.from_config(script)
        except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
            print(f"error: {args.script}: {redact_urls(str(exc))}", file=sys.stderr)
            return EXIT_CONFIG
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: {args.api_key_env} is not set", file=sys.stderr)
            return EXIT_CONFIG
    configure_logging(redactor=Redactor([api_key, args.webhook]))
    host, port = args.listen
    emulator = Emulator(
        segment_seconds=args.segment_seconds,
        balance_ticks=usd_to_ticks(args.balance_usd),
        api_key=api_key,
        capacity=args.capacity,
        scripts=scripts,
        webhook=args.webhook,
        string_codes=args.string_codes,
        answer_delay_seconds=args.answer_delay_seconds,
    )

    async def serve() -> None:
        async with emulator.running(host=host, port=port):
            # Both APIs, as the [mavi] keys that take them; a program reads these lines to learn
            # the port (--listen with port 0 picks a free one).
            print(f"MAVI emulator: base_url = {emulator.base_url}", flush=True)
            print(f"MAVI emulator: batch_base_url = {emulator.batch_url}", flush=True)
            await asyncio.Event().wait()

    try:
        _, factory = loop_factory()  # as `run`: uvloop when installed (the callbacks it posts)
    except EventLoopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as r:
            r.run(serve())
    except OSError as exc:  # the address is taken, or not ours to listen on
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
