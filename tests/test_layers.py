"""The layers README's Architecture section describes, as a fresh interpreter sees them.

import-linter (`lint-imports`, in .ci/run) checks the import graph; these tests check what a
real import loads, package `__init__` modules included, which a graph of import statements
does not show.
"""

from __future__ import annotations

import ast
import subprocess
import sys

LOADED = "import {0}, sys; print(sorted(m for m in sys.modules if m.startswith('streamwatch')))"


def loaded_by(module: str) -> list[str]:
    """The streamwatch modules a fresh interpreter holds after importing `module`."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED.format(module)], capture_output=True, text=True, check=True
    )
    found = ast.literal_eval(done.stdout)
    assert isinstance(found, list)
    return found


def test_the_emulator_loads_only_its_own_modules_and_leaf_helpers():
    """Importing the emulator loads the emulator's own modules and the leaf helpers it shares
    with the daemon (HTTP helpers, pricing, the probe, redaction, background tasks), nothing of
    the daemon: no config, store, supervisor, server or metrics."""
    assert loaded_by("streamwatch.emulator") == [
        "streamwatch",
        "streamwatch.background",
        "streamwatch.emulator",
        "streamwatch.emulator.script",
        "streamwatch.emulator.streams",
        "streamwatch.emulator.videos",
        "streamwatch.http",
        "streamwatch.pricing",
        "streamwatch.probe",
        "streamwatch.redact",
    ]


def test_a_sink_and_the_mavi_clients_load_no_store_metrics_or_policy():
    """Loading a chat sink or a MAVI client loads no store, metrics, ledger or supervisor."""
    daemon = {
        "streamwatch.ledger",
        "streamwatch.metrics",
        "streamwatch.policy",
        "streamwatch.server",
        "streamwatch.store",
        "streamwatch.supervisor",
    }
    for module in (
        "streamwatch.alerts.sinks.slack",
        "streamwatch.mavi.streams",
        "streamwatch.mavi.videos",
    ):
        found = loaded_by(module)
        assert [m for m in found if m in daemon or m.rpartition(".")[0] in daemon] == [], module
