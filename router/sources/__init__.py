"""Sources hand validated events to the journal: the spool directory and MQTT."""

from __future__ import annotations

from pathlib import Path

from router.config import RouterConfig


def inline_roots(state_dir: Path) -> tuple[Path, Path]:
    """Where MQTT inline files are written, and where they move once delivered."""
    state = state_dir.expanduser().resolve()
    return state / "mqtt", state / "mqtt-done"


def retired_path(path: Path, state_dir: Path) -> Path | None:
    """Where an inline file written at `path` lives once its event was delivered."""
    staged, retired = inline_roots(state_dir)
    try:
        return retired / path.relative_to(staged)
    except ValueError:
        return None


def mqtt_enabled(config: RouterConfig) -> bool:
    return config.router.mqtt is not None
