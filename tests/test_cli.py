"""The `streamwatch` command as a user runs it: a real process, real signals, real HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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


def config(tmp_path: Path, port: int, streams: list[str]) -> Path:
    entries = "".join(f'[[streams]]\nname = "{n}"\nurl = "rtmp://cams.test/{n}"\n' for n in streams)
    path = tmp_path / "streams.toml"
    path.write_text(f"""
[mavi]
backend = "emulator"
segment_seconds = 0.05
[server]
listen = "127.0.0.1:{port}"
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
    assert out.returncode == 3
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
