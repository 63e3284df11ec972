"""Alembic migrations, run programmatically at start (no alembic.ini needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

__all__ = ["alembic_config", "upgrade_head"]


def alembic_config(connection: Any = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade_head(connection: Any) -> None:
    """Run inside AsyncConnection.run_sync: upgrade the schema to the newest revision."""
    command.upgrade(alembic_config(connection), "head")
