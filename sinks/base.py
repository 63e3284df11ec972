"""The one interface every sink implements, and the errors that steer retries."""

from __future__ import annotations

import abc
from typing import ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from router.delivery import (
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    StoredObject,
    TransientError,
)

__all__ = [
    "BaseBatchSink",
    "BaseSink",
    "BatchSink",
    "DeliveryItem",
    "DeliveryResult",
    "PermanentError",
    "Sink",
    "SinkSettings",
    "StoredObject",
    "TransientError",
]


class SinkSettings(BaseModel):
    """Base for each sink's settings: unknown keys are config errors, not silence."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Sink(Protocol):
    """Deliver one item idempotently; raise TransientError to retry, PermanentError to stop."""

    sink_id: str

    async def deliver(self, item: DeliveryItem) -> DeliveryResult: ...

    async def health(self) -> bool: ...

    async def close(self) -> None: ...


@runtime_checkable
class BatchSink(Sink, Protocol):
    """A sink that takes up to `max_batch` deliveries in one call, to pay its per-call
    costs (a thread hop, a flush to disk) once per batch.  One outcome per item, in
    order: a result, or the exception that item would have raised from `deliver`."""

    max_batch: int

    async def deliver_batch(
        self, items: list[DeliveryItem]
    ) -> list[DeliveryResult | Exception]: ...


class BaseSink(abc.ABC):
    """Convenience base: settings parsing, trivial health and close."""

    Settings: ClassVar[type[SinkSettings]] = SinkSettings
    # Deliveries in flight for this sink type unless the component sets `concurrency:`
    # (None: the router's `sink_concurrency`).
    default_concurrency: ClassVar[int | None] = None
    # > 1: the dispatcher hands this many deliveries at once to `deliver_batch`.
    max_batch: ClassVar[int] = 1

    def __init__(self, sink_id: str, settings: SinkSettings) -> None:
        self.sink_id = sink_id
        self.settings = settings

    @abc.abstractmethod
    async def deliver(self, item: DeliveryItem) -> DeliveryResult: ...

    async def open(self) -> None:
        """Prepare connections before the first delivery (the daemon calls it at start;
        best effort: errors here are ignored and surface on delivery)."""
        return None

    async def health(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class BaseBatchSink(BaseSink):
    """Base for sinks whose work is done in batches: `deliver` is a batch of one."""

    @abc.abstractmethod
    async def deliver_batch(
        self, items: list[DeliveryItem]
    ) -> list[DeliveryResult | Exception]: ...

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        (outcome,) = await self.deliver_batch([item])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
