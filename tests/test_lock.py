"""requirements.lock, from which the container image is built, against pyproject.toml.

The lock is made by the `uv pip compile` command in its header (README: Development). pip's
`--require-hashes` mode in the Dockerfile refuses any dependency the lock leaves out, at build
time; these tests catch, with no network, a lock and a pyproject.toml that have drifted apart.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
PYPROJECT = "streamwatch (pyproject.toml)"


def parse_lock(text: str) -> tuple[dict[str, Version], dict[str, list[str]], dict[str, set[str]]]:
    """Pinned version, hashes and `# via` sources of every package in a uv-compiled lock."""
    pins: dict[str, Version] = {}
    hashes: dict[str, list[str]] = {}
    via: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if pin := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            current = canonicalize_name(pin[1])
            pins[current] = Version(pin[2])
            hashes[current], via[current] = [], set()
        elif stripped.startswith("--hash=sha256:"):
            hashes[current].append(stripped.removeprefix("--hash=sha256:").rstrip(" \\"))
        elif current and (source := re.match(r"^#\s+(?:via\s+)?(?!via$)(\S.*)$", stripped)):
            via[current].add(source[1])
    return pins, hashes, via


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def lock_python() -> str:
    found = re.search(r"--python-version (\d+\.\d+)", LOCK.read_text())
    assert found, "the lock's header names the Python it was compiled for"
    return found[1]


def test_the_lock_pins_every_runtime_dependency_within_its_declared_range():
    """Each `[project] dependencies` entry is in the lock at a version its range allows."""
    pins, _, _ = parse_lock(LOCK.read_text())
    env = {"python_version": lock_python(), "sys_platform": "linux", "platform_system": "Linux"}
    wrong = {}
    for req in runtime_requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        pinned = pins.get(canonicalize_name(req.name))
        if pinned is None or not req.specifier.contains(pinned, prereleases=True):
            wrong[req.name] = f"locked {pinned}, declared {req.specifier or 'any'}"
    assert wrong == {}


def test_the_lock_holds_the_runtime_closure_exactly_pinned_and_hashed():
    """Every locked package is pinned with `==` and hashed, its sources are locked packages or
    pyproject.toml, and what pyproject.toml brings in directly is exactly the runtime
    dependencies (a lock compiled with the dev extras would show them here)."""
    pins, hashes, via = parse_lock(LOCK.read_text())
    assert pins, "the lock pins something"
    assert [name for name, found in hashes.items() if not found] == []
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for found in hashes.values() for h in found)
    sources = set().union(*via.values())
    assert sources - set(pins) == {PYPROJECT}
    direct = {name for name, found in via.items() if PYPROJECT in found}
    assert direct == {canonicalize_name(r.name) for r in runtime_requirements()}


def test_the_image_is_built_from_the_lock_for_the_locked_python():
    """The Dockerfile installs the dependencies from requirements.lock with hashes required,
    adds streamwatch without resolving again, on the Python the lock was compiled for."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY requirements\.lock ", text, re.M)
    assert re.search(r"pip wheel .*--require-hashes .*-r requirements\.lock", text)
    assert re.search(r"pip wheel .*--no-deps .* \.$", text, re.M)
    assert re.search(r"pip install .*--no-index --find-links=/wheels", text)
    images = re.findall(r"^FROM python:(\d+\.\d+)-slim", text, re.M)
    assert images == [lock_python()] * 2
