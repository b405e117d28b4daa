"""Config loading: validation with key paths and hints, interpolation, defaults, secrets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streamwatch.config import (
    ConfigError,
    load_config,
    parse_config,
    resolve_secrets,
    secret_problems,
)

MINIMAL = """
[[streams]]
name = "cam"
url = "rtmp://h/live"
"""


def problems(text: str, environ: dict[str, str] | None = None, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ=environ or {}, **kwargs)
    return {p.path: p.message for p in info.value.problems}


def test_minimal_config_takes_defaults():
    """A stream entry without optional keys takes [defaults], then the built-in defaults."""
    cfg = parse_config(MINIMAL + "\n[defaults]\nfps = 3\n", environ={})
    s = cfg.streams[0]
    assert (s.fps, s.content_moderation, s.logo_detection, s.max_logos) == (3, True, False, 5)
    assert cfg.mavi.backend == "emulator"


def test_preflight_from_defaults_or_per_stream_and_outside_the_spec():
    """preflight and its timeout come from [defaults] unless a stream says otherwise, are off
    by default, and are not part of what MAVI is asked (turning it on restarts no task)."""
    assert parse_config(MINIMAL, environ={}).streams[0].preflight is False
    text = MINIMAL.replace('url = "rtmp://h/live"', 'url = "rtmp://h/live"\npreflight = false')
    text += '[[streams]]\nname = "dock"\nurl = "rtmp://h/dock"\n'
    text += "\n[defaults]\npreflight = true\npreflight_timeout_seconds = 4\n"
    cam, dock = parse_config(text, environ={}).streams
    assert (cam.preflight, dock.preflight) == (False, True)
    assert dock.preflight_timeout_seconds == 4
    assert cam.spec_hash() == parse_config(MINIMAL, environ={}).streams[0].spec_hash()
    bad = problems(MINIMAL + "preflight_timeout_seconds = 0\n")
    assert "greater than 0" in bad["streams[0].preflight_timeout_seconds"]


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("[mavi]\nbackend = 'cloud'", "mavi.backend", "'mavi' or 'emulator'"),
        ("[mavi]\nbase_url = 'ftp://x'", "mavi.base_url", "http"),
        ("[server]\nlisten = '8080'", "server.listen", "host:port"),
        ("[emulator]\nlisten = '9400'", "emulator.listen", "host:port"),
        ("[server]\nlistn = 'x'", "server.listn", "unknown key"),
        ("[storage]\nbatch_max = 0", "storage.batch_max", "greater than or equal to 1"),
        (
            "[storage]\nsegment_retention_days = 0",
            "storage.segment_retention_days",
            "greater than 0",
        ),
        ("[supervisor]\non_stall = 'panic'", "supervisor.on_stall", "'wait' or 'restart'"),
        ("[mavi]\napi_key = 'sk-mai-inline'", "mavi.api_key", "valid dictionary"),
        ("[mavi.api_key]\nenv = 'A'\nfile = '/k'", "mavi.api_key", "exactly one"),
        (
            "[[streams]]\nname='a'\nurl='http://h/x'",
            "streams[0].url",
            "rtmp://, rtmps://, rtsp:// or rtsps://",
        ),
        ("[[streams]]\nname='a'\nurl='rtmp://h'\nfps=0", "streams[0].fps", "got 0"),
        ("[[streams]]\nname='a'\nurl='rtmp://h'\nmax_logos=51", "streams[0].max_logos", "50"),
        ("[[streams]]\nname='a b'\nurl='rtmp://h'", "streams[0].name", "pattern"),
        (
            "[[streams]]\nname='a'\nurl='rtmp://h'\ncontent_moderation=false",
            "streams[0]",
            "content_moderation, logo_detection or both",
        ),
        (
            "[[streams]]\nname='a'\nurl='rtmp://h'\nlabels={'bad-key'='x'}",
            "streams[0].labels",
            "label",
        ),
    ],
)
def test_bad_values_name_their_key_path(text, path, fragment):
    """Each bad value is reported at its key path, with a message saying what is allowed."""
    found = problems(text)
    assert path in found, found
    assert fragment in found[path]


def test_every_problem_is_reported_not_just_the_first():
    """Several mistakes in one file are all listed, duplicates and missing variables included."""
    text = """
[mavi]
backend = "x"
[[streams]]
name = "a"
url = "http://bad"
[[streams]]
name = "a"
url = "rtmp://h/${MISSING}"
fps = 0
"""
    found = problems(text)
    assert set(found) >= {
        "mavi.backend",
        "streams[0].url",
        "streams[1].name",
        "streams[1].url",
        "streams[1].fps",
    }
    assert "duplicate name 'a'" in found["streams[1].name"]
    assert "MISSING" in found["streams[1].url"]


def test_interpolation_from_the_environment():
    """${VAR} takes the environment, ${VAR:-default} falls back, $$ is a literal dollar."""
    text = """
[storage]
path = "${STATE_DIR}/sw.db"
[[streams]]
name = "cam"
url = "rtmp://${CAM_HOST:-cams.local}/live/$$key"
"""
    cfg = parse_config(text, environ={"STATE_DIR": "/var/lib/sw"})
    assert str(cfg.storage.path) == "/var/lib/sw/sw.db"
    assert cfg.streams[0].url == "rtmp://cams.local/live/$key"


def test_toml_syntax_errors_give_line_and_column():
    """A file that is not TOML says where it breaks."""
    found = problems("[mavi\nbackend = 1")
    assert "line 1" in found[""]


def test_config_is_frozen():
    """Config objects cannot be changed after validation."""
    cfg = parse_config(MINIMAL, environ={})
    with pytest.raises(ValueError, match="frozen"):
        cfg.streams[0].fps = 9  # type: ignore[misc]


def test_spec_hash_changes_only_with_what_mavi_is_asked():
    """Labels do not restart a task; fps, features and URL do; max_logos only with logos on."""
    base = parse_config(MINIMAL, environ={}).streams[0]
    assert base.model_copy(update={"labels": {"a": "b"}}).spec_hash() == base.spec_hash()
    assert base.model_copy(update={"max_logos": 9}).spec_hash() == base.spec_hash()
    assert base.model_copy(update={"fps": 2}).spec_hash() != base.spec_hash()
    logos = base.model_copy(update={"logo_detection": True})
    assert logos.spec_hash() != base.spec_hash()
    assert logos.model_copy(update={"max_logos": 9}).spec_hash() != logos.spec_hash()


def test_secrets_come_from_env_or_file(tmp_path: Path):
    """API key and callback secret are read from their named sources, never from the file."""
    key_file = tmp_path / "key"
    key_file.write_text("sk-mai-from-file\n")
    text = f"""
[mavi]
backend = "mavi"
api_key = {{ file = "{key_file}" }}
[server]
callback_secret = {{ env = "CB" }}
"""
    cfg = parse_config(text, environ={})
    secrets = resolve_secrets(cfg, environ={"CB": "a" * 24})
    assert secrets.api_key is not None
    assert secrets.api_key.get_secret_value() == "sk-mai-from-file"
    assert "sk-mai" not in repr(secrets)


def test_missing_secrets_for_a_real_account_are_all_reported():
    """With backend = mavi, a missing key and a missing callback secret are both named."""
    cfg = parse_config("[mavi]\nbackend = 'mavi'\n", environ={})
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, environ={})
    paths = {p.path for p in info.value.problems}
    assert paths == {"mavi.api_key", "server.callback_secret"}


def test_short_callback_secret_is_refused():
    """A guessable callback secret is refused with a way to make a good one."""
    cfg = parse_config("[server]\ncallback_secret = { env = 'CB' }\n", environ={})
    with pytest.raises(ConfigError, match="token_urlsafe"):
        resolve_secrets(cfg, environ={"CB": "short"})


def test_emulator_backend_generates_a_callback_secret():
    """The built-in emulator needs no secret set up: one is made per run."""
    secrets = resolve_secrets(parse_config(MINIMAL, environ={}), environ={})
    assert secrets.callback_secret_generated
    assert len(secrets.callback_secret.get_secret_value()) >= 24


def test_check_config_exits_non_zero_and_prints_every_error(tmp_path: Path):
    """`streamwatch check-config` lists all problems on stderr and exits 1."""
    path = tmp_path / "bad.toml"
    path.write_text("[[streams]]\nname='a'\nurl='http://x'\nfps=0\n[typo]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "streamwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    for where in ("streams[0].url", "streams[0].fps", "typo"):
        assert where in proc.stderr


def test_check_config_accepts_the_shipped_file():
    """The top-level streams.toml shipped with the project is valid."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "streamwatch", "check-config", "-c", str(root / "streams.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout


TEN_PROBLEMS = """
[mavi]
backend = "mavi"
api_key = { env = "NO_SUCH_KEY" }
[server]
callback_secret = { env = "NO_SUCH_SECRET" }
[budgets]
daily_usd = "abc"
[supervisor]
on_stall = "panic"
[[streams]]
name = "a"
url = "http://bad"
fps = 0
content_moderation = false
[[streams]]
name = "b"
url = "rtmp://h/b"
content_moderation = false
[[streams]]
name = "b"
url = "rtmp://h/b2"
max_logos = 0
"""


def test_one_pass_reports_secrets_and_the_feature_rule_with_the_rest(tmp_path: Path):
    """Missing secrets and "enable a feature" come in the same report as every other problem,
    from `check-config` as from `load_config`, each place once."""
    path = tmp_path / "bad.toml"
    path.write_text(TEN_PROBLEMS)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={}, checks=[secret_problems])
    paths = [p.path for p in info.value.problems]
    assert sorted(paths) == sorted(
        [
            "mavi.api_key",
            "server.callback_secret",
            "budgets.daily_usd",
            "supervisor.on_stall",
            "streams[0].url",
            "streams[0].fps",
            "streams[0]",  # neither feature, reported with the entry's other problems
            "streams[1]",
            "streams[2].name",  # the duplicate, once
            "streams[2].max_logos",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "streamwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,  # where the default state file would be
        env={k: v for k, v in os.environ.items() if not k.startswith("NO_SUCH")},
    )
    assert proc.returncode == 1
    assert "10 problem(s)" in proc.stderr
    for where in paths:
        assert f"  - {where}: " in proc.stderr


def test_a_section_with_problems_is_not_checked_for_secrets():
    """A secret is not reported missing for a section that is itself invalid (its defaults
    would be checked instead of what the file says)."""
    text = (
        "[server]\nlisten = 'nowhere'\ncallback_secret = { env = 'CB' }\n[mavi]\nbackend = 'mavi'"
    )
    found = problems(text, checks=[secret_problems])
    assert set(found) == {"server.listen", "mavi.api_key"}


@pytest.mark.parametrize(
    ("text", "path", "fragment"),
    [
        ("[[streams]]\nname='a'\nurl='rtmp://h'\nfps=0", "streams[0].fps", "1 to 60"),
        ("[[streams]]\nname='a'\nurl='rtmp://h'\nfps=61", "streams[0].fps", "1 to 60"),
        ("[mavi]\nsegment_seconds = 0", "mavi.segment_seconds", "more than 0 to 300"),
        ("[budgets]\ndaily_usd = 'abc'", "budgets.daily_usd", '"12.50"'),
        (
            "[[streams]]\nname='a'\nurl='rtmp://h'\nbudget={ monthly_usd = '1,000' }",
            "streams[0].budget.monthly_usd",
            '"12.50"',
        ),
    ],
)
def test_hints_say_the_whole_rule(text, path, fragment):
    """A number out of range states both bounds; a bad amount shows the expected form."""
    found = problems(text)
    assert fragment in found[path], found


def test_a_duplicate_stream_name_is_reported_once():
    """Two streams with one name make one problem, at the second entry."""
    text = MINIMAL + MINIMAL.replace("rtmp://h/live", "rtmp://h/other")
    with pytest.raises(ConfigError) as info:
        parse_config(text, environ={})
    assert [(p.path, "duplicate" in p.message) for p in info.value.problems] == [
        ("streams[1].name", True)
    ]


def test_a_secret_behind_an_unset_variable_is_reported_once():
    """A secret file named with an unset variable is one problem, the variable, not also an
    empty secret."""
    text = "[mavi]\nbackend = 'mavi'\napi_key = { file = '${NO_SUCH_DIR}/key' }\n"
    found = problems(text, checks=[secret_problems])
    assert set(found) == {"mavi.api_key.file", "server.callback_secret"}
    assert "NO_SUCH_DIR" in found["mavi.api_key.file"]


def test_secret_variables_cannot_be_interpolated_into_published_values():
    """${VAR} of a secret-looking variable (KEY, SECRET, TOKEN, PASSWORD…) is refused in a
    stream name, a label, or a sink or rule name, with the key path, even when it is set;
    elsewhere (a stream URL) it is allowed."""
    text = """
[[streams]]
name = "${CAM_PASSWORD}"
url = "rtsp://admin:${CAM_PASSWORD}@cam/live"
labels = { team = "${MAVI_API_KEY}", site = "${SITE}" }
"""
    env = {"CAM_PASSWORD": "hunter2hunter2", "MAVI_API_KEY": "sk-mai-x", "SITE": "paris"}
    found = problems(text, env)
    assert set(found) == {"streams[0].name", "streams[0].labels.team"}
    assert "${MAVI_API_KEY} looks like a secret" in found["streams[0].labels.team"]
    assert "/metrics" in found["streams[0].labels.team"]


def test_published_values_holding_a_secret_are_refused():
    """A label, stream name or sink name that holds a configured secret's value (here read
    from innocently named variables) is refused by name of the secret, not by value."""
    text = """
[mavi]
backend = "mavi"
api_key = { env = "K" }
[server]
callback_secret = { env = "CB" }
[[alerts.sinks]]
name = "${SINK}"
type = "slack"
url = { env = "HOOK" }
[[streams]]
name = "cam"
url = "rtsp://admin:RtspSecret987@cam/live"
labels = { team = "${TEAM}", site = "paris" }
"""
    env = {
        "K": "sk-mai-0123456789",
        "CB": "c" * 24,
        "HOOK": "https://hooks.slack.test/services/T0/B0/XXXXXXXXXX",
        "TEAM": "ops-sk-mai-0123456789",
        "SINK": "RtspSecret987",
    }
    cfg = parse_config(text, environ=env)
    with pytest.raises(ConfigError) as info:
        resolve_secrets(cfg, environ=env)
    found = {p.path: p.message for p in info.value.problems}
    assert set(found) == {"streams[0].labels.team", "alerts.sinks[0].name"}
    assert "holds the secret of mavi.api_key" in found["streams[0].labels.team"]
    assert "holds the secret of streams[0].url" in found["alerts.sinks[0].name"]
    assert "sk-mai-0123456789" not in str(info.value)
    assert "RtspSecret987" not in str(info.value)


def test_bad_values_are_shown_without_their_secrets(tmp_path: Path):
    """`check-config` shows a bad value to help fix it, but not a URL's password nor the
    value of a secret-looking variable (it names the variable instead)."""
    path = tmp_path / "bad.toml"
    path.write_text(
        "[mavi]\nrequest_timeout_seconds = '${MAVI_API_KEY}'\n"
        "[[streams]]\nname='a'\nurl='http://admin:RtspSecret987@cam/x?token=abcdef'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "streamwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MAVI_API_KEY": "sk-mai-0123456789"},
    )
    assert proc.returncode == 1
    assert "'http://admin:***@cam/x?token=***'" in proc.stderr
    assert "'${MAVI_API_KEY}'" in proc.stderr
    for secret in ("RtspSecret987", "abcdef", "sk-mai-0123456789"):
        assert secret not in proc.stderr
