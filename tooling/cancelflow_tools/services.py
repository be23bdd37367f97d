"""The six services as the tooling starts and configures them: name -> (env prefix, default HTTP port)."""

from __future__ import annotations

import importlib

from cancelflow.settings import ServiceSettings

NAMES = ("billing", "provisioning", "payment_gateway", "dispute", "notification", "status_tracker")


def settings_class(service: str) -> type[ServiceSettings]:
    settings: type[ServiceSettings] = importlib.import_module(f"{service}.settings").Settings
    return settings


def service_settings(service: str, **overrides: object) -> ServiceSettings:
    return settings_class(service)(**overrides)


SERVICES: dict[str, tuple[str, int]] = {
    name: (settings_class(name).variable_prefix, settings_class(name).model_fields["http_port"].default)
    for name in NAMES
}
