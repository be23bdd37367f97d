"""docker-compose.yml, the Dockerfile and the PostgreSQL init script agree with cancelflow.settings."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from cancelflow.settings import SERVICES, service_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES_YAML: dict = COMPOSE["services"]
INIT_SQL = (ROOT / "deploy" / "postgres" / "init.sql").read_text(encoding="utf-8")
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
APP_SERVICES = sorted(SERVICES)
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def compose_name(service: str) -> str:
    return service.replace("_", "-")


def resolved(value: object) -> str:
    """A Compose value with `${VAR:-default}` replaced by its default, as with an empty .env."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def env_of(service: str) -> dict[str, str]:
    return {k: resolved(v) for k, v in SERVICES_YAML[compose_name(service)]["environment"].items()}


def healthcheck_command(name: str) -> str:
    test = SERVICES_YAML[name]["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_runs_its_module(service: str) -> None:
    spec = SERVICES_YAML[compose_name(service)]
    assert spec["command"] == ["python", "-m", service]
    assert spec["image"] == "cancelflow:local"
    assert spec["build"]["context"] == "."


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_env_has_the_contract_variables(service: str) -> None:
    prefix, port = SERVICES[service]
    env = env_of(service)
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["CANCELFLOW_HTTP_HOST"] == "0.0.0.0"
    assert env[f"{prefix}_HTTP_PORT"] == str(port)
    assert env["SMTP_HOST"] == "mailpit" and env["SMTP_PORT"] == "1025"
    assert env["SUPPORT_EMAIL"]
    assert env["VENDOR_API_URL"] == "http://vendor-sandbox:8090"
    assert env["GATEWAY_API_URL"] == "http://gateway-sandbox:8091"
    url = urlsplit(env[f"{prefix}_DATABASE_URL"])
    assert url.scheme == "postgresql+asyncpg"
    assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{service}")


@pytest.mark.parametrize("service", APP_SERVICES)
def test_settings_read_the_compose_env(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The names in the compose file are the ones the settings classes actually read.
    prefix, port = SERVICES[service]
    env = env_of(service)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = service_settings(service)
    assert settings.database_url() == env[f"{prefix}_DATABASE_URL"]
    assert settings.http_port == port
    assert settings.http_host == "0.0.0.0"
    assert settings.bootstrap_servers == "kafka:9092"
    assert settings.smtp_address == ("mailpit", 1025)
    assert settings.vendor_url == "http://vendor-sandbox:8090"
    assert settings.gateway_url == "http://gateway-sandbox:8091"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_healthcheck_hits_healthz_on_its_port(service: str) -> None:
    _, port = SERVICES[service]
    command = healthcheck_command(compose_name(service))
    assert f"http://127.0.0.1:{port}/healthz" in command
    assert "curl" not in command  # python:3.11-slim has none


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_waits_for_its_dependencies(service: str) -> None:
    depends = SERVICES_YAML[compose_name(service)]["depends_on"]
    assert depends["kafka"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["topics"]["condition"] == "service_completed_successfully"


def test_outbound_dependencies() -> None:
    assert "vendor-sandbox" in SERVICES_YAML["provisioning"]["depends_on"]
    assert "gateway-sandbox" in SERVICES_YAML["payment-gateway"]["depends_on"]
    assert "gateway-sandbox" in SERVICES_YAML["dispute"]["depends_on"]
    assert "mailpit" in SERVICES_YAML["notification"]["depends_on"]


def test_every_dependency_condition_can_be_met() -> None:
    for name, spec in SERVICES_YAML.items():
        for target, rule in spec.get("depends_on", {}).items():
            assert target in SERVICES_YAML, f"{name} depends on unknown {target}"
            assert rule["condition"] in CONDITIONS
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES_YAML[target], f"{target} has no healthcheck"
            if rule["condition"] == "service_completed_successfully":
                assert SERVICES_YAML[target]["restart"] == "no"


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, spec in SERVICES_YAML.items():
        if name != "topics":
            assert spec["healthcheck"]["test"], name


def test_infrastructure_images() -> None:
    assert SERVICES_YAML["kafka"]["image"].startswith("apache/kafka:3.")
    assert SERVICES_YAML["postgres"]["image"].startswith("postgres:16")
    assert SERVICES_YAML["mailpit"]["image"].startswith("axllent/mailpit")


def test_kafka_is_kraft_single_node_with_a_real_healthcheck() -> None:
    kafka = SERVICES_YAML["kafka"]
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert re.search(r"kafka-(broker-api-versions|topics)\.sh", healthcheck_command("kafka"))


def test_topics_is_a_one_shot_after_kafka() -> None:
    topics = SERVICES_YAML["topics"]
    assert topics["command"] == ["cancelflow", "topics", "--bootstrap", "kafka:9092"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics["restart"] == "no"


def test_mail_and_status_ports() -> None:
    assert "8025:8025" in SERVICES_YAML["mailpit"]["ports"]
    assert "8080:8080" in SERVICES_YAML["status-tracker"]["ports"]


@pytest.mark.parametrize(("sandbox", "port"), [("vendor", 8090), ("gateway", 8091)])
def test_sandboxes_stand_in_for_vendor_and_gateway(sandbox: str, port: int) -> None:
    spec = SERVICES_YAML[f"{sandbox}-sandbox"]
    assert spec["command"] == ["python", "-m", "cancelflow.sandboxes", sandbox, "--host", "0.0.0.0",
                               "--port", str(port)]
    assert f"http://127.0.0.1:{port}/healthz" in healthcheck_command(f"{sandbox}-sandbox")
    assert "ports" not in spec  # no authentication: never published


def test_postgres_runs_the_init_script() -> None:
    volumes = SERVICES_YAML["postgres"]["volumes"]
    assert any(v.startswith("./deploy/postgres/init.sql:/docker-entrypoint-initdb.d/") for v in volumes)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_init_script_creates_the_service_database_and_user(service: str) -> None:
    prefix, _ = SERVICES[service]
    url = urlsplit(env_of(service)[f"{prefix}_DATABASE_URL"])
    database = url.path.lstrip("/")
    assert re.search(rf"CREATE USER {url.username} WITH PASSWORD '{url.password}';", INIT_SQL)
    assert re.search(rf"CREATE DATABASE {database} OWNER {url.username};", INIT_SQL)


def test_dockerfile() -> None:
    assert re.search(r"^FROM python:3\.11-slim\b", DOCKERFILE, re.M)
    assert re.search(r"^RUN pip install \.", DOCKERFILE, re.M)
    users = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in {"root", "0"}
    assert not re.search(r"^(CMD|ENTRYPOINT)\b", DOCKERFILE, re.M)
    assert "CANCELFLOW_HTTP_HOST=0.0.0.0" in DOCKERFILE
