"""`[storage] url`: SQLite by URL or path, PostgreSQL with its password (or the whole URL) as
a secret that never shows, and the pool's bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamwatch.config import ConfigError, parse_config, resolve_secrets, secret_values
from streamwatch.storage import storage_location
from streamwatch.store import PgTarget

BASE = '[mavi]\nbackend = "emulator"\n'


def test_sqlite_url_and_path_name_the_same_file():
    """`url = "sqlite:///x"` is the file /x, as `path = "/x"` is; the default stays the
    SQLite file streamwatch.db."""
    by_url = parse_config(BASE + '[storage]\nurl = "sqlite:///var/lib/sw/s.db"\n', environ={})
    by_path = parse_config(BASE + '[storage]\npath = "/var/lib/sw/s.db"\n', environ={})
    assert storage_location(by_url) == storage_location(by_path) == Path("/var/lib/sw/s.db")
    assert not by_url.storage.postgresql
    assert storage_location(parse_config(BASE, environ={})) == Path("streamwatch.db")


@pytest.mark.parametrize(
    ("storage", "fragment"),
    [
        ('url = "mysql://h/db"', "must be"),
        ('url = "sqlite:///a.db"\npath = "b.db"', "not both"),
        ('url = "postgresql://sw:hunter2hunter2@db/sw"', "holds a password"),
        ('url = "postgresql://sw@db/sw"\npool_size = 0', "storage.pool_size"),
    ],
)
def test_bad_storage_settings_are_named(storage: str, fragment: str):
    """A bad URL, both url and path, a password in the URL or a bad bound: one clear
    problem, and the password is never repeated."""
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + f"[storage]\n{storage}\n", environ={})
    assert fragment in str(err.value)
    assert "hunter2hunter2" not in str(err.value)


def test_postgresql_password_and_url_secrets_are_read_and_masked():
    """The password (or a whole URL) comes from the environment or a file; both are among
    the values the logs mask; the pool's bounds come from [storage]."""
    text = (
        BASE + '[storage]\nurl = "postgresql://sw@db:5432/sw?sslmode=require"\n'
        'password = { env = "SW_DB_PW" }\npool_size = 7\nstatement_timeout_seconds = 5\n'
    )
    env = {"SW_DB_PW": "pw-0123456789abcdef"}
    config = parse_config(text, environ=env)
    target = storage_location(config, environ=env)
    assert isinstance(target, PgTarget)
    assert target.password is not None
    assert target.password.get_secret_value() == "pw-0123456789abcdef"
    assert (target.pool_size, target.statement_timeout_seconds) == (7, 5.0)
    assert "pw-0123456789abcdef" in secret_values(config, resolve_secrets(config, environ=env))
    with pytest.raises(ConfigError, match=r"storage\.password"):
        resolve_secrets(config, environ={})
    whole = BASE + '[storage]\nurl = { env = "SW_DB_URL" }\n'
    env = {"SW_DB_URL": "postgresql://sw:pw-fedcba9876543210@db/sw"}
    config = parse_config(whole, environ=env)
    target = storage_location(config, environ=env)
    assert isinstance(target, PgTarget)
    assert "pw-fedcba9876543210" not in str(target)
    assert "pw-fedcba9876543210" in secret_values(config, resolve_secrets(config, environ=env))
