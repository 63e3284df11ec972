"""Sinks: where artifacts go.  Peers behind one small interface (`sinks.base.Sink`)."""

from sinks.base import BaseSink, Sink
from sinks.registry import SINK_TYPES, check_component, create_sink

__all__ = ["SINK_TYPES", "BaseSink", "Sink", "check_component", "create_sink"]
