"""`streamwatch fleet stop|start|status`: a fleet of replicas (`[cluster]`) operated through
its PostgreSQL store, with no replica needing to answer.

`fleet stop` marks the fleet as stopping (a `settings` row): at its next lease round each
replica stops planning, stops the tasks it owns (fenced as every stop is), keeps serving for
their final callbacks (`drain_seconds`), releases its leases and exits 0. A replica started
while the mark is there does the same at once (it starts nothing). `--wait` then shows the
tasks still running until there are none. `fleet start` clears the mark. `fleet status`
shows the replicas, the leases each holds, and the running tasks with their owners.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from streamwatch.config import Config
from streamwatch.storage import storage_location
from streamwatch.store import PgTarget, ReadOnlyStore
from streamwatch.store.leases import FleetState, mark_fleet_stop
from streamwatch.table import table

__all__ = ["EXIT_STILL_RUNNING", "add_parser", "run"]

EXIT_STILL_RUNNING = 6  # `fleet stop --wait`: tasks still running when the timeout came


def add_parser(
    sub: Any,
    with_config: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    *,
    positive: Callable[[str], float],
) -> None:
    """The `fleet` verb, run by `run`."""
    p = sub.add_parser(
        "fleet",
        help="stop, start or show a fleet of replicas ([cluster])",
        description="Operate a fleet of replicas on one PostgreSQL store ([cluster]) through "
        "the store named by the config's [storage] url; no replica needs to answer. "
        "`fleet stop` marks the fleet as stopping: every replica stops the tasks it owns, "
        "waits for their final callbacks and exits 0 (a replica started meanwhile stops at "
        "once); with --wait, show the tasks still running until none is (exit 6 if some "
        "still run at --timeout). `fleet start` clears the mark: replicas started from "
        "then on run their streams again. `fleet status` shows the replicas, their leases "
        "and the running tasks with their owners.",
    )
    p.set_defaults(func=run)
    with_config(p)
    p.add_argument(
        "action",
        choices=["stop", "start", "status"],
        help="stop: mark the fleet as stopping; start: clear the mark; status: show the fleet",
    )
    p.add_argument("--wait", action="store_true", help="stop: wait until no task runs")
    p.add_argument(
        "--timeout",
        type=positive,
        default=120.0,
        help="stop --wait: give up after this many seconds (default %(default)s)",
    )
    p.add_argument(
        "--poll",
        type=positive,
        default=1.0,
        help="stop --wait: seconds between looks (default %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="status: print JSON")


def run(args: argparse.Namespace, config: Config) -> int:
    """Exit status: 0 done (stop --wait: no task runs), 1 no usable PostgreSQL store or the
    store failed, 6 stop --wait timed out with tasks still running."""
    if config.cluster is None or not config.storage.postgresql:
        print(
            "error: `fleet` needs a [cluster] section and a PostgreSQL store ([storage] url)",
            file=sys.stderr,
        )
        return 1
    location = storage_location(config)
    assert isinstance(location, PgTarget)
    return asyncio.run(_run(args, location))


async def _run(args: argparse.Namespace, location: PgTarget) -> int:
    # Read-only (the schema checked, never migrated: this command may be another version than
    # the fleet); the mark is written on a connection of its own.
    async with ReadOnlyStore(location) as store:
        if args.action == "start":
            had = await mark_fleet_stop(location, None)
            print("fleet stop mark cleared" if had else "the fleet was not marked as stopping")
            return 0
        if args.action == "status":
            state = await store.fleet_state()
            if args.json:
                print(json.dumps(_doc(state), indent=2))
            else:
                _show(state)
            return 0
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        await mark_fleet_stop(location, {"by": by})
        state = await store.fleet_state()
        live = [r.replica_id for r in state.replicas if r.live(state.now)]
        print(
            f"fleet marked as stopping: {len(live)} live replica(s) stop their tasks at their"
            f" next lease round; {len(state.running)} task(s) running"
        )
        if not args.wait:
            return 0
        deadline = time.monotonic() + args.timeout
        shown = -1
        while state.running:
            if len(state.running) != shown:
                shown = len(state.running)
                print(f"{shown} task(s) still running: {_running_text(state)}")
            if time.monotonic() >= deadline:
                print(
                    f"error: {len(state.running)} task(s) still running after"
                    f" {args.timeout:g} s: {_running_text(state)}",
                    file=sys.stderr,
                )
                return EXIT_STILL_RUNNING
            await asyncio.sleep(args.poll)
            state = await store.fleet_state()
        print("no task running: the fleet is stopped")
        return 0


def _running_text(state: FleetState) -> str:
    return ", ".join(
        f"{stream} ({state.owners.get(stream) or 'no owner'})" for stream in state.running
    )


def _doc(state: FleetState) -> dict[str, Any]:
    return {
        "stopping": state.stop is not None,
        "stop": state.stop,
        "replicas": [
            {
                "replica_id": r.replica_id,
                "live": r.live(state.now),
                "leaving": r.leaving,
                "seen_seconds_ago": round(state.now - r.seen_at, 3),
                "leases": r.leases,
            }
            for r in state.replicas
        ],
        "running": [
            {"stream": s, "task_id": t, "owner": state.owners.get(s)}
            for s, t in state.running.items()
        ],
    }


def _show(state: FleetState) -> None:
    if state.stop is not None:
        print(f"fleet marked as stopping (by {state.stop.get('by', '?')})")
    rows = [["REPLICA", "STATE", "SEEN", "LEASES"]] + [
        [
            r.replica_id,
            "live" if r.live(state.now) else ("left" if r.leaving else "expired"),
            f"{state.now - r.seen_at:.1f}s ago",
            str(r.leases),
        ]
        for r in state.replicas
    ]
    print("\n".join(table(rows, right={3})))
    print(f"{len(state.running)} task(s) running", end="")
    unowned = [s for s in state.running if state.owners.get(s) is None]
    print(f", {len(unowned)} without an owner: {', '.join(unowned)}" if unowned else "")
