"""Prometheus metrics, named after Vector's component spec with a `router_` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["RouterMetrics"]


class RouterMetrics:
    """One registry per daemon, so several daemons in one test process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "router_component_received_events",
            "Events received by a source (accepted or not).",
            ["component"],
            registry=r,
        )
        self.sent = Counter(
            "router_component_sent_events",
            "Deliveries completed by a sink.",
            ["component", "sink"],
            registry=r,
        )
        self.errors = Counter(
            "router_component_errors",
            "Errors by type and stage (intake, delivery).",
            ["component", "error_type", "stage"],
            registry=r,
        )
        self.discarded = Counter(
            "router_component_discarded_events",
            "Inputs rejected as invalid (bad manifests) or dead-lettered deliveries.",
            ["component", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "router_delivery_retries",
            "Delivery attempts that will be retried.",
            ["sink"],
            registry=r,
        )
        self.buffer = Gauge(
            "router_buffer_events",
            "Deliveries in flight (the dispatcher's buffer).",
            ["component"],
            registry=r,
        )
        self.takeovers = Counter(
            "router_pool_takeovers",
            "Sessions of dead MQTT pool members this daemon took over, by outcome "
            "(drained, interrupted, stopped, failed).",
            ["outcome"],
            registry=r,
        )
        self.held = Gauge(
            "router_mqtt_held_messages",
            "MQTT messages acknowledged and held in the journal while their file:// files "
            "are hashed; events once hashed (a stuck count means a stuck hash).",
            registry=r,
        )
        self.duration = Histogram(
            "router_delivery_duration_seconds",
            "Time of one delivery attempt.",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
