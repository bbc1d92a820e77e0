"""docker-compose.yml, checked by parsing (no Docker engine runs here): every service's command
exists in the CLI, every dependency and volume is declared, health checks gate the start-up."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_services_are_all_there(compose):
    assert set(compose["services"]) == {"postgres", "migrate", "api", "worker", "ray-head"}
    pg = compose["services"]["postgres"]
    assert "healthcheck" in pg
    assert any(v.split(":")[0] in compose["volumes"] for v in pg["volumes"])


def test_featurescope_commands_parse_with_the_real_cli(compose):
    parser = build_parser()
    seen = set()
    for svc in compose["services"].values():
        cmd = svc.get("command")
        if not cmd or cmd[0] != "featurescope":
            continue
        args = parser.parse_args(cmd[1:])  # SystemExit (a failure) on an unknown command or flag
        seen.add(args.command)
    assert {"migrate", "serve", "harvest"} <= seen


def test_dependencies_are_declared_and_gated_by_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on undeclared {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no health check"
    api = services["api"]["depends_on"]
    assert api["migrate"]["condition"] == "service_completed_successfully"
    assert api["postgres"]["condition"] == "service_healthy"


def test_volumes_and_gpu_reservation(compose):
    declared = set(compose["volumes"])
    for name, svc in compose["services"].items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/")):
                assert src in declared, f"{name} mounts undeclared volume {src}"
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_image_installs_what_the_commands_need(compose):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["featurescope"] == "app.cli:main"
    dockerfile = compose["x-image"]["build"]["dockerfile_inline"]
    extras = re.search(r'-e "\.\[([a-z,]+)\]"', dockerfile).group(1).split(",")
    for extra in extras:
        assert extra in project["optional-dependencies"], f"extra {extra} is not declared"
    assert any(d.startswith("ray") for d in project["optional-dependencies"]["ray"])
    assert compose["services"]["ray-head"]["command"][0] == "ray"
    for path in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        assert (REPO / path).exists(), f"the image copies {path}, which is not in the repo"


def test_env_example_names_every_variable_without_a_default():
    text = (REPO / "docker-compose.yml").read_text()
    example = (REPO / ".env.example").read_text()
    names = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)\}", text))  # ${VAR} without :-default
    for name in names:
        assert re.search(rf"^{name}=", example, flags=re.M), f"{name} missing from .env.example"
    assert "POSTGRES_PASSWORD=" in example


def test_the_api_is_published_on_loopback_and_keeps_keys_required(compose):
    """Published on all interfaces with no key, anyone on the network could run the model:
    the API is published on this host's loopback unless FEATURESCOPE_BIND says otherwise, and
    nothing in the compose file opens the scopes that need a key."""
    api = compose["services"]["api"]
    for port in api["ports"]:
        bind = re.fullmatch(r"\$\{FEATURESCOPE_BIND:-([0-9.]+)\}:\S+:8000", port)
        assert bind and bind.group(1) == "127.0.0.1", port
    text = (REPO / "docker-compose.yml").read_text() + (REPO / ".env.example").read_text()
    assert "FEATURESCOPE_OPEN_SCOPES" not in text and "FEATURESCOPE_LOOPBACK_OPEN" not in text
    args = build_parser().parse_args(api["command"][1:])
    assert args.host == "0.0.0.0"  # inside the container: not loopback, so keys are needed


def test_every_published_port_is_on_loopback(compose):
    """Ray's dashboard has a job API that runs code, and the API runs the model: no service
    publishes a port beyond this host's loopback, unless FEATURESCOPE_BIND says so for the API."""
    published = {name: svc.get("ports", []) for name, svc in compose["services"].items()}
    assert published["ray-head"] == ["127.0.0.1:8265:8265"]
    for name, ports in published.items():
        for port in ports:
            assert port.startswith(("127.0.0.1:", "${FEATURESCOPE_BIND:-127.0.0.1}:")), (name, port)
