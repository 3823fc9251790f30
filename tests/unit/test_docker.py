"""The compose topology (docker/compose.yaml) checked for structure: this machine has no Docker
engine. Services, images, the Postgres connection, health checks, volumes, a non-root worker,
and every variable the file needs documented in .env.example with no secret written inline."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

DOCKER = ROOT / "docker"


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_services_images_and_dependencies():
    c = _compose()
    services = c["services"]
    assert set(services) == {"postgres", "prefect-server", "worker"}
    assert services["postgres"]["image"].startswith("postgres:")
    import prefect

    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect.__version__}-python3.11"  # the server the project is tested with
    assert services["worker"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert all("healthcheck" in s and s["healthcheck"]["test"] for s in services.values())


def test_the_server_stores_in_postgres_and_the_worker_serves_a_pipeline_on_the_store_volume():
    s = _compose()["services"]
    url = s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
    assert s["prefect-server"]["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert all(p.startswith("127.0.0.1:") for p in s["prefect-server"]["ports"])  # not on every interface
    worker = s["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["command"][:2] == ["polyalign", "serve"]
    assert "store:/store" in worker["volumes"] and worker["environment"]["POLYALIGN_STORE"] == "/store"
    assert set(_compose()["volumes"]) == {"postgres-data", "store"}


def test_images_run_as_a_non_root_user():
    assert _compose()["services"]["worker"]["user"] not in ("root", "0")
    for name in ("Dockerfile", "Dockerfile.cuda"):
        users = re.findall(r"^USER\s+(\S+)", (DOCKER / name).read_text(), flags=re.M)
        assert users and users[-1] not in ("root", "0"), name


def test_every_variable_is_documented_and_no_secret_is_inline():
    text = (DOCKER / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    documented = {line.split("=", 1)[0] for line in (DOCKER / ".env.example").read_text().splitlines() if "=" in line and not line.startswith("#")}
    assert used <= documented, used - documented
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?" in text  # required, never defaulted
    assert not re.search(r"^\s*\w*(PASSWORD|API_KEY):\s*[^$\s]", text, flags=re.M)  # every value from the environment
