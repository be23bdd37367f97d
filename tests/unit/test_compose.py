"""docker-compose.yml, the Dockerfile, the PostgreSQL init script and the monitoring files (Prometheus,
Grafana) agree with cancelflow.settings, CONTRACT.md section 9 and cancelflow.metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from cancelflow_tools.services import SERVICES, service_settings
from tests.contract import (
    HTTP_PORTS,
    PRODUCTION_REQUIRED,
    SECTION_9,
    database_url_var,
    http_port_var,
    known_variables,
)
from tests.metric_names import exported_metric_names, metric_names_in

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
    assert "127.0.0.1:8025:8025" in SERVICES_YAML["mailpit"]["ports"]
    assert "127.0.0.1:8080:8080" in SERVICES_YAML["status-tracker"]["ports"]


@pytest.mark.parametrize(("sandbox", "port"), [("vendor", 8090), ("gateway", 8091)])
def test_sandboxes_stand_in_for_vendor_and_gateway(sandbox: str, port: int) -> None:
    spec = SERVICES_YAML[f"{sandbox}-sandbox"]
    assert spec["command"] == ["python", "-m", "cancelflow_tools.sandboxes", sandbox, "--host", "0.0.0.0",
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


# --- CONTRACT.md section 9, logs, monitoring -------------------------------------------------------

PROMETHEUS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
GRAFANA = ROOT / "deploy" / "grafana"


def _mounts(name: str) -> dict[str, str]:
    """A compose service's bind mounts, container path -> host path (relative to the repository)."""
    mounts = {}
    for volume in SERVICES_YAML[name].get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            mounts[container] = host
    return mounts


@pytest.mark.parametrize("service", APP_SERVICES)
def test_service_env_matches_contract_section_9(service: str) -> None:
    env = env_of(service)
    port_var, port = HTTP_PORTS[service]
    assert env[port_var] == str(port)
    assert database_url_var(service) in env
    assert PRODUCTION_REQUIRED <= set(env), PRODUCTION_REQUIRED - set(env)
    assert env["DUPLICATE_WINDOW_HOURS"] == SECTION_9["DUPLICATE_WINDOW_HOURS"]
    # Nothing misspelt: every name is one the contract or the settings know.
    unknown = set(env) - known_variables(service)
    assert not unknown, f"{service}: variables no setting reads: {unknown}"
    # Production settings: JSON logs, no sandboxes' fault hooks, no embedded broker or SMTP sink.
    assert env["CANCELFLOW_LOG_JSON"].lower() in {"1", "true"}
    assert "CANCELFLOW_ENABLE_FAULT_HOOKS" not in env
    assert "CANCELFLOW_DATA_DIR" not in env or env["CANCELFLOW_DATA_DIR"].startswith("/")


def test_settings_ports_are_the_contract_defaults() -> None:
    for service, (variable, port) in HTTP_PORTS.items():
        assert http_port_var(service) == variable
        assert SERVICES[service][1] == port


def test_every_image_is_pinned() -> None:
    for name, spec in SERVICES_YAML.items():
        image = spec["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_monitoring_images_and_ports() -> None:
    assert SERVICES_YAML["prometheus"]["image"].startswith("prom/prometheus:v")
    assert SERVICES_YAML["grafana"]["image"].startswith("grafana/grafana:")
    assert "127.0.0.1:9090:9090" in SERVICES_YAML["prometheus"]["ports"]
    assert "127.0.0.1:3000:3000" in SERVICES_YAML["grafana"]["ports"]
    assert SERVICES_YAML["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_prometheus_scrapes_every_service(service: str) -> None:
    _, port = SERVICES[service]
    [job] = [j for j in PROMETHEUS["scrape_configs"] if j["job_name"] == "cancelflow"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    scraped = {target: group.get("labels", {}).get("service")
               for group in job["static_configs"] for target in group["targets"]}
    assert scraped.get(f"{compose_name(service)}:{port}") == service


def test_prometheus_mounts_its_config_and_the_alert_rules() -> None:
    mounts = _mounts("prometheus")
    command = " ".join(SERVICES_YAML["prometheus"]["command"])
    config = re.search(r"--config\.file=(\S+)", command).group(1)
    assert mounts[config] == "./deploy/prometheus/prometheus.yml"
    for rule_file in PROMETHEUS["rule_files"]:
        assert mounts[rule_file] == "./deploy/prometheus/alerts.yml"
    for host in mounts.values():
        assert (ROOT / host).exists(), host


def test_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    mounts = _mounts("grafana")
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboards_dir = "/var/lib/grafana/dashboards"
    assert mounts[dashboards_dir] == "./deploy/grafana/dashboards"
    [datasource] = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "cancelflow.yml").read_text())["providers"]
    assert provider["options"]["path"] == dashboards_dir
    dashboard = json.loads((GRAFANA / "dashboards" / "cancelflow.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    # What the issue asks the dashboard to show: outcomes, latency, refunds, DLQ, lag.
    for metric in ("cancelflow_outcomes_total", "cancelflow_handler_seconds_bucket",
                   "cancelflow_external_call_seconds_bucket", "cancelflow_refunds_total",
                   "cancelflow_refund_amount_total", "cancelflow_dead_lettered_total",
                   "cancelflow_consumer_lag", "cancelflow_outbox_backlog"):
        assert metric in exprs, metric
    unknown = metric_names_in(exprs) - exported_metric_names()
    assert not unknown, f"the dashboard uses metrics nobody exports: {unknown}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_published_port_binds_loopback_only() -> None:
    # "Nothing exposed by default": Kafka (PLAINTEXT, no ACLs), Mailpit (every customer email), the status
    # API, Prometheus and Grafana are reachable from this machine only.
    published = {name: spec["ports"] for name, spec in SERVICES_YAML.items() if "ports" in spec}
    assert set(published) == {"kafka", "mailpit", "status-tracker", "prometheus", "grafana"}
    for name, ports in published.items():
        for port in ports:
            assert isinstance(port, str) and port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)


def test_grafana_needs_a_password_from_env() -> None:
    env = SERVICES_YAML["grafana"]["environment"]
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password), password  # no default: required
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert ":-" not in password  # no fallback such as admin


@pytest.mark.parametrize("variable", ["BILLING_API_URL", "PROVISIONING_API_URL", "PAYMENT_GATEWAY_API_URL"])
def test_the_status_service_reads_the_owners_under_a_name_they_answer_to(variable: str) -> None:
    """The subscription page's reads carry `Host: <owner>`: an owner that answers only loopback names
    would refuse them with 403 (shared/cancelflow/http_guard.py)."""
    url = resolved(SERVICES_YAML["status-tracker"]["environment"][variable])
    host = urlsplit(url).hostname
    allowed = resolved(SERVICES_YAML[host]["environment"].get("CANCELFLOW_ALLOWED_HOSTS", ""))
    assert host in allowed.split(",")


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_service_keeps_its_static_membership_across_restarts(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The compose service's name: the same after a restart or a recreate, one container per service.
    env = env_of(service)
    assert env["CANCELFLOW_INSTANCE_ID"] == compose_name(service)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = service_settings(service)
    assert settings.on_kafka and settings.instance_id == compose_name(service)
