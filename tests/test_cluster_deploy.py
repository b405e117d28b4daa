"""deploy/kubernetes/cluster/: the fleet's manifests (two replicas, a rollout that never goes
below them, a disruption budget), checked by the same tools as the single-pod ones, with a
config that passes check-config against a real PostgreSQL; and the systemd drop-in for a fleet
of hosts, checked by systemd-analyze and with the config it completes."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

from streamwatch.config import load_config
from tests import pg
from tests.conftest import cli, tool
from tests.test_deploy import (
    DEPLOY,
    K8S,
    UNIT,
    on_password_database,
    run,
    runnable_unit,
    seconds,
    unit_settings,
)

FLEET = K8S / "cluster"
DROP_IN = DEPLOY / "systemd" / "streamwatch.service.d" / "cluster.conf"
# The commented lines of deploy/systemd/streams.toml that a host of a fleet uncomments.
FLEET_LINES = (
    "#url = ",
    "#password = ",
    "#[cluster]",
    "#replica_id = ",
    "#lease_seconds = ",
    "#renew_seconds = ",
)


def objects() -> dict[str, dict[str, Any]]:
    return {
        doc["kind"]: doc
        for path in sorted(FLEET.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    }


def test_fleet_manifests_pass_strict_schema_validation():
    """kubernetes-validate --strict (the API's own schemas, unknown fields rejected) passes on
    the Deployment, the ConfigMap and the PodDisruptionBudget."""
    files = sorted(str(p) for p in FLEET.glob("*.yaml"))
    assert len(files) == 3
    code, out = run(tool("kubernetes-validate"), "--strict", *files)
    assert code == 0, out


def test_fleet_rolls_out_without_going_below_its_replicas_and_keeps_one_through_disruptions():
    """Two replicas, RollingUpdate with maxUnavailable 0 (a new pod is ready before an old one
    stops), no state volume, the database URL required; the budget selects the same pods and
    keeps one; the grace period leaves room after the drain."""
    found = objects()
    deployment, pdb = found["Deployment"], found["PodDisruptionBudget"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["minAvailable"] == 1
    assert all("persistentVolumeClaim" not in v for v in pod["spec"]["volumes"])
    (container,) = pod["spec"]["containers"]
    database = next(e for e in container["env"] if e["name"] == "STREAMWATCH_DATABASE_URL")
    assert database["valueFrom"]["secretKeyRef"].get("optional") is not True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    config = yaml.safe_load((FLEET / "configmap.yaml").read_text())["data"]["streams.toml"]
    drain = float(config.split("drain_seconds = ", 1)[1].split()[0])
    assert seconds(pod["spec"]["terminationGracePeriodSeconds"]) > drain + 5


def test_fleet_config_passes_check_config_against_a_real_database(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """The ConfigMap's streams.toml has [cluster] on PostgreSQL and passes `streamwatch
    check-config` with the Deployment's variables pointing at a real server."""
    doc = yaml.safe_load((FLEET / "configmap.yaml").read_text())
    path = tmp_path / "streams.toml"
    path.write_text(doc["data"]["streams.toml"])
    env = {
        "MAVI_API_KEY": "sk-mai-deploy-check",
        "STREAMWATCH_CALLBACK_SECRET": "deploy-check-secret-0123456789",
        "STREAMWATCH_DATABASE_URL": pg_cluster.url(pg_cluster.new_database()),
    }
    config = load_config(path, environ=env)
    assert config.cluster is not None
    assert config.storage.postgresql
    result = cli("check-config", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr


# --- systemd: two hosts on one database ---------------------------------------------------------


def test_fleet_drop_in_passes_systemd_analyze_verify(tmp_path: Path):
    """`systemd-analyze verify` reads the drop-in beside the unit and has nothing to say; a
    typo in the drop-in makes it speak (so the drop-in was read)."""
    analyze = tool("systemd-analyze")
    unit = runnable_unit(tmp_path)
    (tmp_path / "streamwatch.service.d").mkdir()
    drop_in = tmp_path / "streamwatch.service.d" / DROP_IN.name
    drop_in.write_text(DROP_IN.read_text())
    assert run(analyze, "verify", str(unit)) == (0, "")
    drop_in.write_text(DROP_IN.read_text().replace("Environment=", "Environmnt="))
    code, out = run(analyze, "verify", str(unit))
    assert "Environmnt" in out, (code, out)


def test_fleet_host_config_reads_the_drop_ins_credential_and_replica_id(
    tmp_path: Path, pg_cluster: pg.Cluster
):
    """deploy/systemd/streams.toml with its PostgreSQL and [cluster] lines uncommented reads
    exactly the credentials the unit and its fleet drop-in load, takes the host's short name
    (the drop-in's %l) as its replica id, and passes `streamwatch check-config` against a real
    server with them."""
    dropin = unit_settings(DROP_IN.read_text())
    env = dict(value.split("=", 1) for value in dropin["Environment"])
    assert env == {"STREAMWATCH_REPLICA_ID": "%l"}
    host = socket.gethostname().split(".")[0]  # what systemd puts for %l
    lines = (DEPLOY / "systemd" / "streams.toml").read_text().splitlines()
    text = "\n".join(
        line.removeprefix("#") if line.startswith(FLEET_LINES) else line
        for line in lines
        if not line.startswith("path = ")
    )
    loaded = {
        value.partition(":")[0]
        for settings in (unit_settings(UNIT.read_text()), dropin)
        for value in settings["LoadCredential"]
    }
    config, creds = on_password_database(text, loaded, pg_cluster, tmp_path)
    environ = {"CREDENTIALS_DIRECTORY": str(creds), "STREAMWATCH_REPLICA_ID": host}
    loaded_config = load_config(config, environ=environ)
    assert loaded_config.cluster is not None
    assert loaded_config.cluster.replica_id == host
    ok = cli("check-config", "--config", str(config), env=environ)
    assert ok.returncode == 0, ok.stderr
