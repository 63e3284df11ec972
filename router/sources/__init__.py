"""Sources hand validated events to the journal: the spool directory and MQTT."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from router.config import RouterConfig, RouterSettings

SPOOL_STATES = ("done", "accepted", "failed", "incoming")  # where a bundle may be now


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


@dataclass(frozen=True)
class LocalCopies:
    """The files intake keeps of artifacts that were not uploaded: in spool bundles, the
    MQTT inline folders under the state directory, and `router.mqtt.allowed_roots` (the
    only places intake reads or writes such files). The HTTP API serves them and the
    local client reads them; neither may reach anything else."""

    spool: Path | None = None
    state_dir: Path | None = None
    allowed_roots: tuple[Path, ...] = ()

    @classmethod
    def of(cls, settings: RouterSettings) -> LocalCopies:
        return cls(
            spool=Path(settings.spool), state_dir=Path(settings.state_dir),
            allowed_roots=tuple(Path(r) for r in settings.mqtt.allowed_roots)
            if settings.mqtt is not None else (),
        )

    def roots(self) -> list[Path]:
        inline = list(inline_roots(self.state_dir)) if self.state_dir is not None else []
        return inline + [Path(r).expanduser().resolve() for r in self.allowed_roots]

    def find(self, path: str, bundle: str | None) -> Path | None:
        """The kept file of a staged `path`: absolute (MQTT: an inline file, also once
        retired, or an accepted file:// path) or relative to its spool `bundle`, wherever
        the bundle is now; symlinks resolved, and only under these roots."""
        direct = Path(path)
        if direct.is_absolute():
            roots = self.roots()
            retired = retired_path(direct, self.state_dir) if self.state_dir else None
            for candidate in (direct, retired):
                if candidate is None:
                    continue
                resolved = candidate.resolve()
                if any(resolved == r or r in resolved.parents for r in roots) and (
                        resolved.is_file()):
                    return resolved
            return None
        if self.spool is None or not bundle:
            return None
        spool_root = self.spool.resolve()
        for state in SPOOL_STATES:
            base = (spool_root / state / bundle).resolve()
            found = (base / path).resolve()
            if base in found.parents and found.is_file():
                return found
        return None
