"""The container and systemd files agree with what `butterfly init` writes.

No Docker here, so the image is not built in tests; what can drift is checked instead:
the compose file's host names, mounts, command and API port against init's output for
those hosts, the unit's paths against init's file names, and the Dockerfile's torch pin
and health check against constraints.txt and the API.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from butterfly.cli.hosts import CONFIG_FILE, InitOptions, init_cluster, node_dir
from butterfly.config import load_config
from butterfly.config.gateways import api_port, gateway_nodes
from butterfly.types.ids import NodeId

ROOT = Path(__file__).resolve().parent.parent
MOUNT = "/var/lib/butterfly"


def test_compose_runs_the_directories_init_writes(tmp_path: Path, tiny_model: Path) -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    names = sorted(services)
    assert names == ["node0", "node1", "node2", "node3"]
    # the hosts the compose file's header tells init to use
    header = (ROOT / "deploy" / "compose.yaml").read_text()
    hosts = re.search(r"--hosts (\S+)", header)
    assert hosts is not None
    assert hosts.group(1) == ",".join(f"{n}:9000" for n in names)
    model = re.search(r"--model (\S+)", header)  # the path the containers see
    assert model is not None
    out = tmp_path / "cluster"
    init_cluster(InitOptions(hosts=tuple(hosts.group(1).split(",")), model=str(tiny_model)), out)
    for i, name in enumerate(names):
        service = {**compose["x-node"], **services[name]}
        assert service["hostname"] == name
        assert service["command"] == ["start", "--config", f"{MOUNT}/{CONFIG_FILE}"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}  # SRC:DST[:ro]
        local = mounts[MOUNT]
        assert model.group(1).startswith(mounts["/models"].replace("./models", "/models"))
        assert local == f"./cluster/{node_dir(Path('.'), i).name}"
        # the mounted directory holds a config that loads and names this service
        cfg = load_config([out / Path(local).name / CONFIG_FILE])
        assert cfg.cluster.members[cfg.node.id] == f"{name}:9000" and cfg.node.id == i
        assert cfg.security.tls.enabled
    gateway = load_config([out / "node-0" / CONFIG_FILE])
    assert services["node0"]["ports"] == [f"{gateway.api.port}:{gateway.api.port}"]
    assert "healthcheck" not in services["node0"]  # the image's check, on the gateway only
    # every gateway-capable node serves the API on its own port (a standby redirects, and
    # takes over when node 0 dies), so each publishes it; the others publish nothing
    for node in range(len(names)):
        cfg = load_config([out / f"node-{node}" / CONFIG_FILE])
        port = api_port(cfg, NodeId(node))
        published = services[names[node]].get("ports", [])
        assert published == ([f"{port}:{port}"] if node in gateway_nodes(cfg) else []), node


def test_dockerfile_pins_the_tested_torch_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert pin is not None
    assert f"download.pytorch.org/whl/cpu torch=={pin.group(1)}" in text
    assert re.search(r"^USER butterfly$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert f'CMD ["start", "--config", "{MOUNT}/{CONFIG_FILE}"]' in text


def test_unit_starts_the_config_init_writes() -> None:
    text = (ROOT / "deploy" / "butterfly@.service").read_text()
    assert f"butterfly start --config {MOUNT}/%i/{CONFIG_FILE}" in text
    assert "User=butterfly" in text and f"ReadWritePaths={MOUNT}/%i" in text
