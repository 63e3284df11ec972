"""structlog setup: JSON lines when not on a terminal, console otherwise; secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import structlog

__all__ = ["add_secrets", "configure_logging", "secret_values"]


def secret_values(tree: Any, *, _key: str = "") -> set[str]:
    """Every value under a secret-looking key of a config tree, and every URL password in
    it (`endpoint_url: http://user:pw@host`), to redact from logs."""
    from router.config import is_secret_key, url_passwords

    found: set[str] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if is_secret_key(str(k)) and isinstance(v, str) and len(v) >= 3:
                found.add(v)
            found |= secret_values(v, _key=str(k))
    elif isinstance(tree, list):
        for v in tree:
            found |= secret_values(v, _key=_key)
    elif isinstance(tree, str):
        found |= {p for p in url_passwords(tree) if len(p) >= 3}
    return found


_SECRETS: list[str] = []  # longest first, so a secret containing another goes first


def add_secrets(values: Iterable[str]) -> None:
    """More values to redact (a reloaded config's), besides those given at start."""
    _SECRETS[:] = sorted(set(_SECRETS) | set(values), key=len, reverse=True)


def _redactor(secrets: Iterable[str]) -> Any:
    from router.config import mask_url_passwords

    _SECRETS[:] = []
    add_secrets(secrets)
    ordered = _SECRETS

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            for secret in ordered:
                if secret in value:
                    value = value.replace(secret, "***")
            # Also any URL password the config did not hold (a redirect, a library's
            # message): `scheme://user:***@host`.
            return mask_url_passwords(value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(scrub(v) for v in value)
        return value

    def processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        return scrub(event_dict)

    return processor


def configure_logging(
    level: str = "INFO", secrets: Iterable[str] = (), json: bool | None = None
) -> None:
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
