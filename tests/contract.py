"""CONTRACT.md sections 9 and 10 as data, for the tests that check deployment files against them
(tests/unit/test_compose.py, tests/unit/test_deploy.py).

The contract lives outside the repository; these are its settings, verbatim names and defaults.
"""

from __future__ import annotations

from cancelflow.settings import CommonSettings, ServiceSettings
from cancelflow_tools.services import SERVICES

# Section 9: every name the world may set, with its default where the contract gives one.
SECTION_9 = {
    "KAFKA_BOOTSTRAP_SERVERS": None,
    "CANCELFLOW_BROKER_PORT": "9092",
    "CANCELFLOW_DATA_DIR": "./var",
    "SMTP_HOST": None,
    "SMTP_PORT": "1025",
    "SUPPORT_EMAIL": "support@localhost",
    "VENDOR_API_URL": None,
    "GATEWAY_API_URL": None,
    "DUPLICATE_WINDOW_HOURS": "72",
    "VENDOR_SANDBOX_PORT": "8090",
    "GATEWAY_SANDBOX_PORT": "8091",
}
# Section 10.
SECTION_10 = {"CANCELFLOW_PRODUCER_KEYS", "CANCELFLOW_SERVICE_KEYS"}

# `<SERVICE>_HTTP_PORT` defaults of section 9 (the status service answers on STATUS_HTTP_PORT).
HTTP_PORTS = {
    "billing": ("BILLING_HTTP_PORT", 8081),
    "provisioning": ("PROVISIONING_HTTP_PORT", 8082),
    "payment_gateway": ("PAYMENT_GATEWAY_HTTP_PORT", 8083),
    "dispute": ("DISPUTE_HTTP_PORT", 8084),
    "notification": ("NOTIFICATION_HTTP_PORT", 8085),
    "status_tracker": ("STATUS_HTTP_PORT", 8080),
}

# What a production deployment must set for every service: a real broker, its own PostgreSQL
# database, its HTTP port, the mail server, support's address, the vendor and the gateway.
PRODUCTION_REQUIRED = {"KAFKA_BOOTSTRAP_SERVERS", "SMTP_HOST", "SMTP_PORT", "SUPPORT_EMAIL",
                       "VENDOR_API_URL", "GATEWAY_API_URL"}


def database_url_var(service: str) -> str:
    return f"{SERVICES[service][0]}_DATABASE_URL"


def http_port_var(service: str) -> str:
    return f"{SERVICES[service][0]}_HTTP_PORT"


def known_variables(service: str) -> set[str]:
    """Every name a service process reads: section 9 and 10, and the project's own settings
    (cancelflow.settings; CANCELFLOW_HTTP_HOST, CANCELFLOW_LOG_JSON, timeouts, ...)."""
    names = set(SECTION_9) | SECTION_10 | {database_url_var(service), http_port_var(service)}
    for settings_class in (CommonSettings, ServiceSettings):
        for field in settings_class.model_fields.values():
            if isinstance(field.validation_alias, str):
                names.add(field.validation_alias)
    return names
