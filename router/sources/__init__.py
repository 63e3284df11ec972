"""Sources hand validated events to the journal: the spool directory and MQTT."""

from __future__ import annotations

from router.config import RouterConfig


def mqtt_enabled(config: RouterConfig) -> bool:
    return config.router.mqtt is not None
