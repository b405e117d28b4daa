"""The `streamwatch` command as a user runs it: a real process, real signals, real HTTP."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamwatch import cli as cli_module
from streamwatch import videocmd
from streamwatch.cli import _parser
from streamwatch.table import table
from tests.conftest import SECRET, cli, free_port


def wait_for(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Poll another process (no event crosses a process boundary) until `check` holds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def status(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/api/v1/status"
    with urllib.request.urlopen(url, timeout=5) as r:
        doc: dict[str, Any] = json.load(r)
        return doc


def config(
    tmp_path: Path, port: int, streams: list[str], *, server: str = "", extra: str = ""
) -> Path:
    entries = "".join(f'[[streams]]\nname = "{n}"\nurl = "rtmp://cams.test/{n}"\n' for n in streams)
    path = tmp_path / "streams.toml"
    path.write_text(f"""
{extra}
[mavi]
backend = "emulator"
segment_seconds = 0.05
[server]
listen = "127.0.0.1:{port}"
{server}
[storage]
path = "{tmp_path / "state.db"}"
[supervisor]
tick_seconds = 0.02
on_shutdown = "stop"
drain_seconds = 2
[logging]
format = "json"
{entries}
""")
    return path


@pytest.fixture
def daemon_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    port = free_port()
    path = config(tmp_path, port, ["alpha", "beta"])
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwatch", "run", "-c", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc, port, path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_run_status_reload_and_graceful_stop(daemon_proc, tmp_path: Path):
    """The daemon runs, `status` shows it, SIGHUP reconciles, SIGTERM drains and exits 0."""
    proc, port, path = daemon_proc

    def running(names: set[str]) -> bool:
        try:
            doc = status(port)
        except OSError:
            return False
        live = {s["name"] for s in doc["streams"] if s["state"] == "running" and s["segments"] > 0}
        return live == names and {s["name"] for s in doc["streams"]} == names

    wait_for(lambda: running({"alpha", "beta"}), "both streams to run")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert 'streamwatch_stream_up{stream="alpha"} 1.0' in metrics
    assert "_created" not in metrics, "run turns off prometheus_client's _created series"
    out = cli("status", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[:3] == ["STREAM", "STATE", "TASK"]
    assert "alpha" in out.stdout
    assert "running" in out.stdout

    config(tmp_path, port, ["beta", "gamma"])
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: running({"beta", "gamma"}), "the reload to reconcile")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    log = (tmp_path / "daemon.log").read_text()
    events = [json.loads(line)["event"] for line in log.splitlines() if line.startswith("{")]
    assert "app.reloaded" in events
    assert "app.drained" in events
    assert events[-1] == "app.stopped"
    assert SECRET not in log


def test_status_when_no_daemon_runs(tmp_path: Path):
    """`status` against nothing says the daemon is unreachable and exits 3."""
    path = config(tmp_path, free_port(), ["alpha"])
    out = cli("status", "-c", str(path))
    assert out.returncode == 3
    assert "cannot reach the daemon" in out.stderr


def test_resume_through_the_cli(daemon_proc):
    """`streamwatch resume` reaches the running daemon."""
    _, port, path = daemon_proc
    wait_for(lambda: _up(port), "the daemon")
    out = cli("resume", "-c", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("resumed")
    out = cli("resume", "nosuch", "-c", str(path))
    assert out.returncode == 4  # the daemon answered, and refused
    assert "unknown streams" in out.stderr


def _up(port: int) -> bool:
    try:
        status(port)
    except OSError:
        return False
    return True


def test_callback_url_prints_the_url_to_register(tmp_path: Path):
    """`callback-url` prints public_url + the secret path for the MAVI console."""
    path = tmp_path / "c.toml"
    path.write_text("""
[mavi]
backend = "mavi"
[server]
public_url = "https://sw.example.org/"
callback_secret = { env = "CB_SECRET" }
""")
    out = cli("callback-url", "-c", str(path), env={"CB_SECRET": SECRET, "MAVI_API_KEY": "k"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"https://sw.example.org/callbacks/mavi/{SECRET}"


def test_run_with_a_bad_config_fails_fast(tmp_path: Path):
    """`run` with an invalid file exits 1 and names the problem."""
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nlisten = 'nowhere'\n")
    out = cli("run", "-c", str(path))
    assert out.returncode == 1
    assert "server.listen" in out.stderr


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (no traceback)."""
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: d / "missing" / "state.db", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: _write(d / "notes.txt", "my notes\n"), "not a streamwatch state file"),
    ],
    ids=["no-folder", "a-folder", "not-a-database"],
)
def test_run_and_check_config_refuse_a_state_file_they_cannot_use(
    tmp_path: Path, setup: Callable[[Path], Path], fragment: str
):
    """A state file in a missing folder, a folder, or a file that is not a state file: both
    `check-config` and `run` exit 1 with one line naming [storage] path, no traceback."""
    state = setup(tmp_path)
    path = config(tmp_path, free_port(), ["alpha"])
    path.write_text(path.read_text().replace(str(tmp_path / "state.db"), str(state)))
    for verb in ("check-config", "run"):
        out = cli(verb, "-c", str(path))
        assert out.returncode == 1, (verb, out.stderr)
        line = one_line_error(out)
        assert "storage.path" in line
        assert fragment in line


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_emulator_argument_mistakes_and_a_taken_port_are_one_line(tmp_path: Path):
    """`streamwatch emulator` with a bad --balance-usd or --listen exits 2, and on a port that
    is taken exits 1, each with one line on stderr."""
    for args, name in (
        (["--balance-usd", "abc"], "--balance-usd"),
        (["--listen", "nonsense"], "--listen"),
        (["--segment-seconds", "0"], "--segment-seconds"),
    ):
        out = cli("emulator", *args)
        assert out.returncode == 2, out.stderr
        assert name in one_line_error(out)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("emulator", "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(out)


def test_emulator_picks_its_event_loop_as_run_does():
    """`streamwatch emulator` serves on the loop STREAMWATCH_EVENT_LOOP picks, as `run` does
    (uvloop when installed, for the callbacks it posts): a bad choice is one line, exit 1."""
    out = cli("emulator", "--listen", "127.0.0.1:0", env={"STREAMWATCH_EVENT_LOOP": "tokio"})
    assert out.returncode == 1
    assert "STREAMWATCH_EVENT_LOOP must be auto, asyncio or uvloop" in one_line_error(out)


def test_argument_mistakes_are_not_called_config_errors(tmp_path: Path):
    """A bad --since or --url exits 2 and names the argument; it is not "in the config"."""
    path = config(tmp_path, free_port(), ["alpha"])
    for args, name in (
        (["cost", "--since", "yesterday"], "--since"),
        (["cost", "--until", "2026-13-45"], "--until"),
        (["status", "--url", "127.0.0.1:18100"], "--url"),
        (["alerts", "list", "--limit", "0"], "--limit"),
    ):
        out = cli(*args, "-c", str(path))
        assert out.returncode == 2, (args, out.stderr)
        line = one_line_error(out)
        assert name in line
        assert "config" not in line


def test_exit_codes_tell_unreachable_refused_and_bad_argument(tmp_path: Path):
    """3 when nothing answers, 4 when the daemon answers no (wrong token, unknown stream), 2
    for a URL without a scheme; a right token gets 0."""
    port = free_port()
    path = config(tmp_path, port, ["alpha"], server='status_token = { env = "SW_TOKEN" }')
    right, wrong = {"SW_TOKEN": "the-right-token"}, {"SW_TOKEN": "a-wrong-token"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwatch", "run", "-c", str(path)],
        env={**os.environ, **right},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), "the daemon")
        assert cli("status", "-c", str(path), env=right).returncode == 0
        out = cli("status", "-c", str(path), env=wrong)
        assert out.returncode == 4
        assert "HTTP 401" in one_line_error(out)
        out = cli("resume", "no-such-stream", "-c", str(path), env=right)
        assert out.returncode == 4
        assert "HTTP 404" in one_line_error(out)
        out = cli("status", "-c", str(path), "--url", f"127.0.0.1:{port}", env=right)
        assert out.returncode == 2
        assert "--url" in one_line_error(out)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    out = cli("status", "-c", str(path), env=right)
    assert out.returncode == 3
    assert "cannot reach the daemon" in one_line_error(out)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_resume_says_when_it_lifted_an_account_halt(tmp_path: Path):
    """After a balance halt, `resume` says it lifted the halt instead of "released: none"."""
    port = free_port()
    path = config(tmp_path, port, ["alpha"], extra="[emulator]\nbalance_usd = 0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwatch", "run", "-c", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _up(port) and status(port)["account"]["halted"], "the balance halt")
        out = cli("resume", "-c", str(path))
        assert out.returncode == 0, out.stderr
        assert "lifted the account halt (balance)" in out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_each_retry_is_one_documented_log_line(tmp_path: Path):
    """Refused starts that are retried log `mavi.request_retry` once per retry, and nothing
    from stamina itself."""
    port = free_port()
    script = 'url = "rtmp://cams.test/alpha"\nstart_failures = [503, 503]'
    path = config(
        tmp_path,
        port,
        ["alpha"],
        extra=f"[mavi.retry]\ninitial_seconds = 0.01\nmax_seconds = 0.02\n"
        f"[[emulator.scripts]]\n{script}",
    )
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamwatch", "run", "-c", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _up(port) and status(port)["streams"][0]["state"] == "running", "alpha")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    events = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines()]
    retries = [e for e in events if "retry" in e["event"]]
    assert [(e["event"], e["endpoint"], e["attempt"]) for e in retries] == [
        ("mavi.request_retry", "start", 2),
        ("mavi.request_retry", "start", 3),
    ]


def _actions(parser: argparse.ArgumentParser, prog: str) -> Iterator[tuple[str, Any, Any]]:
    """(prog, parser, action) for every parser and sub-parser of the command line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prog} {name}")
        else:
            yield prog, parser, action


def test_every_verb_option_and_positional_has_help():
    """Each verb's help page has a description, and every option and positional says what it
    is for."""
    seen = set()
    for prog, parser, action in _actions(_parser(), "streamwatch"):
        seen.add(prog)
        assert parser.description, f"`{prog} --help` has no description"
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        what = "/".join(action.option_strings) or action.dest
        assert action.help, f"{prog}: {what} has no help"
    assert {"streamwatch cost", "streamwatch video clips", "streamwatch emulator"} <= seen


def test_every_verb_is_run_by_its_own_command():
    """Each verb's parser names the command that runs it (no lookup by name at run time):
    `streamwatch VERB` runs `_cmd_VERB`, and each `video` verb its own coroutine."""
    parser = _parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, sub in verbs.choices.items():
        assert sub.get_default("func") is getattr(cli_module, "_cmd_" + name.replace("-", "_"))
    (video,) = [
        a for a in verbs.choices["video"]._actions if isinstance(a, argparse._SubParsersAction)
    ]
    for name, sub in video.choices.items():
        assert sub.get_default("video_run") is getattr(videocmd, "_" + name), name


@pytest.mark.parametrize(
    ("rows", "right", "lines"),
    [
        ([], (), []),
        ([("A", "BB"), ("ccc", "d")], (), ["A    BB", "ccc  d"]),
        (
            [("NAME", "USD"), ("a", "1.5"), ("bb", "10.25")],
            (1,),
            ["NAME    USD", "a       1.5", "bb    10.25"],
        ),
        ([("x", ""), ("y", "")], (), ["x", "y"]),
    ],
)
def test_the_one_table_renderer(rows, right, lines):
    """Every table the command prints: columns as wide as their widest cell, two spaces apart,
    numbers right-aligned where asked, no blanks at a line's end."""
    assert table(rows, right=right) == lines
