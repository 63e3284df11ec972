"""artifact-router: route ML pipeline artifacts from a spool or MQTT to stores, registries
and trackers, durably."""

from router.config import RouterConfig, load_config, use_stack
from router.manifest import Manifest, ManifestError, parse_manifest
from router.rules import RoutePlan, plan_event

__all__ = [
    "Manifest",
    "ManifestError",
    "RoutePlan",
    "RouterConfig",
    "load_config",
    "parse_manifest",
    "plan_event",
    "use_stack",
]
__version__ = "0.1.0"
