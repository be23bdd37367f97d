"""deploy/k8s (Kubernetes manifests) and deploy/prometheus/alerts.yml, parsed and checked against
cancelflow.settings, CONTRACT.md section 9 and cancelflow.metrics. No cluster and no Prometheus run here:
the files are made correct by construction and these tests keep them so."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cancelflow_tools.services import SERVICES
from tests.contract import (
    HTTP_PORTS,
    PRODUCTION_REQUIRED,
    database_url_var,
    http_port_var,
    known_variables,
)
from tests.metric_names import exported_metric_names, metric_names_in

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ALERTS = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
APP_SERVICES = sorted(SERVICES)
CLI_VARIABLES = {"KAFKA_TOPIC_REPLICATION_FACTOR"}  # read by `cancelflow topics`


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def all_documents() -> list[dict[str, Any]]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in documents(path)]


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def k8s_name(service: str) -> str:
    return service.replace("_", "-")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


CONFIG = find("ConfigMap", "cancelflow-config")["data"]
[DATABASES] = [d for d in documents(K8S / "secret.example.yaml") if d["metadata"]["name"] == "cancelflow-databases"]


# --- Kubernetes ----------------------------------------------------------------------------------


def test_every_document_is_namespaced_and_labelled() -> None:
    for doc in all_documents():
        if doc["kind"] in ("Namespace", "Kustomization"):
            continue
        assert doc["metadata"]["namespace"] == "cancelflow", doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cancelflow"


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = documents(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert "secret.example.yaml" not in listed  # placeholders: never applied as they are
    assert listed <= on_disk
    assert on_disk - listed <= {"secret.example.yaml", "migrate-job.yaml"}
    assert [i["name"] for i in kustomization["images"]] == ["cancelflow"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_one_deployment_and_service_per_service(service: str) -> None:
    deployment = find("Deployment", k8s_name(service))
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    main = container(deployment)
    assert main["command"] == ["python", "-m", service]
    assert main["image"].split(":")[0] == "cancelflow"
    _, port = HTTP_PORTS[service]
    assert main["ports"] == [{"name": "http", "containerPort": port}]
    svc = find("Service", k8s_name(service))
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == port and svc["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_probes(service: str) -> None:
    main = container(find("Deployment", k8s_name(service)))
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    # /readyz waits up to 3 s for the database and 3 s for the broker.
    assert main["readinessProbe"]["timeoutSeconds"] > 6


@pytest.mark.parametrize("service", APP_SERVICES)
def test_resources_and_security(service: str) -> None:
    deployment = find("Deployment", k8s_name(service))
    main = container(deployment)
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(main["resources"][kind]), kind
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("service", APP_SERVICES)
def test_environment_matches_contract_section_9(service: str) -> None:
    main = container(find("Deployment", k8s_name(service)))
    assert [e["configMapRef"]["name"] for e in main["envFrom"]] == ["cancelflow-config"]
    env = {e["name"]: e for e in main["env"]}
    port_var, port = HTTP_PORTS[service]
    assert http_port_var(service) == port_var and env[port_var]["value"] == str(port)
    url_var = database_url_var(service)
    secret = env[url_var]["valueFrom"]["secretKeyRef"]
    assert (secret["name"], secret["key"]) == ("cancelflow-databases", url_var)
    assert url_var in DATABASES["stringData"]
    names = set(env) | set(CONFIG)
    assert PRODUCTION_REQUIRED <= names, PRODUCTION_REQUIRED - names
    unknown = names - known_variables(service) - CLI_VARIABLES
    assert not unknown, f"{service}: variables no setting reads: {unknown}"


def test_config_map_is_production_shaped() -> None:
    assert CONFIG["CANCELFLOW_HTTP_HOST"] == "0.0.0.0"
    assert CONFIG["CANCELFLOW_LOG_JSON"] in {"1", "true"}
    assert "CANCELFLOW_ENABLE_FAULT_HOOKS" not in CONFIG
    assert not any(key.endswith("_DATABASE_URL") for key in CONFIG), "database URLs belong in the Secret"
    assert "sandbox" not in CONFIG["VENDOR_API_URL"] and "sandbox" not in CONFIG["GATEWAY_API_URL"]
    assert all(isinstance(v, str) for v in CONFIG.values()), "ConfigMap values must be strings"


def test_secret_template_has_one_postgres_url_per_service() -> None:
    urls = DATABASES["stringData"]
    assert set(urls) == {database_url_var(s) for s in SERVICES}
    for service in SERVICES:
        url = urls[database_url_var(service)]
        assert url.startswith("postgresql+asyncpg://") and url.endswith(f"/{service}")


def test_topics_job_runs_cancelflow_topics() -> None:
    job = find("Job", "cancelflow-topics")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    [main] = pod["containers"]
    assert main["command"][:2] == ["cancelflow", "topics"]
    assert main["envFrom"] == [{"configMapRef": {"name": "cancelflow-config"}}]
    assert "KAFKA_BOOTSTRAP_SERVERS" in CONFIG and int(CONFIG["KAFKA_TOPIC_REPLICATION_FACTOR"]) >= 1


def test_migrate_job_runs_cancelflow_migrate() -> None:
    [main] = find("Job", "cancelflow-migrate")["spec"]["template"]["spec"]["containers"]
    assert main["command"] == ["cancelflow", "migrate"]
    # its own database URLs: users that may change the schema, which the services' users need not
    assert {"secretRef": {"name": "cancelflow-migration-databases"}} in main["envFrom"]
    assert {"secretRef": {"name": "cancelflow-databases"}} not in main["envFrom"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_pods_are_scraped(service: str) -> None:
    template = find("Deployment", k8s_name(service))["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(HTTP_PORTS[service][1])
    assert annotations["prometheus.io/path"] == "/metrics"


# --- alert rules ---------------------------------------------------------------------------------

RULES = [rule for group in ALERTS["groups"] for rule in group["rules"]]
DURATION = re.compile(r"^\d+[smhd]$")
# What the issue asks to be alerted on, and the metric each alert must watch.
REQUIRED_ALERTS = {
    "CancelflowDeadLetters": "cancelflow_dead_lettered_total",
    "CancelflowDeadLettersGrowing": "cancelflow_dead_lettered_total",
    "CancelflowRequestsStuck": "cancelflow_request_oldest_open_seconds",
    "CancelflowOutboxBacklog": "cancelflow_outbox_backlog",
    "CancelflowVendorFailureRate": "cancelflow_external_call_seconds_count",
    "CancelflowRefundsFailing": "cancelflow_refunds_total",
    "CancelflowForgedInternalRecords": "cancelflow_bad_signatures_total",
}


def test_alert_names_are_unique_and_groups_named() -> None:
    names = [r["alert"] for r in RULES]
    assert len(names) == len(set(names))
    assert all(g["name"] and g["rules"] for g in ALERTS["groups"])


def test_required_alerts_exist() -> None:
    by_name = {r["alert"]: r for r in RULES}
    for name, metric in REQUIRED_ALERTS.items():
        assert name in by_name, name
        assert metric in by_name[name]["expr"], (name, metric)


@pytest.mark.parametrize("rule", RULES, ids=[r["alert"] for r in RULES])
def test_alert_rule_shape(rule: dict[str, Any]) -> None:
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
    assert DURATION.match(rule["for"]), rule["for"]
    assert rule["labels"]["severity"] in {"page", "ticket"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    assert len(annotations["runbook"].split()) >= 15, "the runbook says what to do"
    assert "docs/operations.md#" in annotations["runbook"]
    expr = rule["expr"]
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
    assert expr.count("[") == expr.count("]")
    for window in re.findall(r"\[([^\]]+)\]", expr):
        assert DURATION.match(window), window


@pytest.mark.parametrize("rule", RULES, ids=[r["alert"] for r in RULES])
def test_alert_metrics_exist(rule: dict[str, Any]) -> None:
    used = metric_names_in(rule["expr"])
    assert used or "up{" in rule["expr"]
    unknown = used - exported_metric_names()
    assert not unknown, f"{rule['alert']} uses metrics nobody exports: {unknown}"


def test_runbook_anchors_exist_in_operations_doc() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for rule in RULES:
        for anchor in re.findall(r"docs/operations\.md#([\w-]+)", rule["annotations"]["runbook"]):
            assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("service", APP_SERVICES)
def test_signature_keys_come_together_from_one_secret(service: str) -> None:
    # CONTRACT.md section 10: upstream keys on means internal keys on, for every service.
    env = {e["name"]: e for e in container(find("Deployment", k8s_name(service)))["env"]}
    for name in ("CANCELFLOW_PRODUCER_KEYS", "CANCELFLOW_SERVICE_KEYS"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("cancelflow-producer-keys", name)
    [keys] = [d for d in documents(K8S / "secret.example.yaml") if d["metadata"]["name"] == "cancelflow-producer-keys"]
    assert {entry.split(":")[0] for entry in keys["stringData"]["CANCELFLOW_SERVICE_KEYS"].split(",")} == set(SERVICES)


@pytest.mark.parametrize("service", APP_SERVICES)
def test_static_membership_only_where_pods_never_overlap(service: str) -> None:
    # A replaced one-replica Deployment hands its name over (static membership: partitions back at
    # once); pods of a rolling or scaled one overlap and would fence each other with one id.
    deployment = find("Deployment", k8s_name(service))
    env = {e["name"]: e.get("value") for e in container(deployment)["env"]}
    replaced = deployment["spec"]["strategy"]["type"] == "Recreate" and deployment["spec"]["replicas"] == 1
    assert env.get("CANCELFLOW_INSTANCE_ID") == (k8s_name(service) if replaced else None)
    assert "CANCELFLOW_INSTANCE_ID" not in CONFIG
