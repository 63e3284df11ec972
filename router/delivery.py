"""What the dispatcher hands a sink, and what a sink hands back.

These models are the whole contract between the router core and `sinks/`: a sink
never reads the journal or the config, only a DeliveryItem.
"""

from __future__ import annotations

import os
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.manifest import ArtifactKind

__all__ = [
    "Action",
    "ArtifactView",
    "DeliveryContext",
    "DeliveryItem",
    "DeliveryResult",
    "FileIdentity",
    "PermanentError",
    "StagedFile",
    "StoredObject",
    "TransientError",
]


class Action(StrEnum):
    STORE = "store"
    REGISTER = "register"
    DEPLOY = "deploy"
    TRACK = "track"
    EXPORT = "export"  # a store put of a dataset snapshot (`export_to_dataset:`)
    END_RUN = "end_run"  # a tracker told that the run ended (the manifest's run_status)


class TransientError(Exception):
    """Worth retrying: timeouts, 5xx, throttling, connection refused, a full disk."""


class PermanentError(Exception):
    """Retrying cannot help: 403, no such bucket, invalid input, a key conflict."""


class FileIdentity(BaseModel):
    """A file's stat as it was hashed at intake, kept only where any later write must
    change it (see `router.intake.settled_identity`): a store that finds the same stat
    before and after reading the file knows it read the bytes the sha256 was taken of,
    without hashing a large file a second time."""

    model_config = ConfigDict(frozen=True)  # hashable: it keys router.block_digests

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(dev=st.st_dev, ino=st.st_ino, size=st.st_size,
                   mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns)

    def matches(self, st: os.stat_result) -> bool:
        return self == FileIdentity.of(st)


class StagedFile(BaseModel):
    """A file as accepted at intake: where it is now, and what it must hash to."""

    name: str
    type: str
    path: Path | None = None
    uri: str | None = None
    sha256: str
    size: int
    identity: FileIdentity | None = None


class DeliveryContext(BaseModel):
    event_id: str
    pipeline: str
    run_id: str
    step_name: str
    received_at: datetime
    run_status: str | None = Field(
        default=None, description="the manifest's run_status: this event ends the run"
    )


class ArtifactView(BaseModel):
    index: int
    kind: ArtifactKind
    name: str
    version: str
    framework: str | None = None
    format: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    values: dict[str, Any] = Field(default_factory=dict)
    step: int | None = None
    files: list[StagedFile] = Field(default_factory=list)


class StoredObject(BaseModel):
    file_name: str
    uri: str
    size: int
    sha256: str
    version_id: str | None = None


class DeliveryResult(BaseModel):
    """Where the artifact landed (stores) or what was done (registries, trackers)."""

    objects: list[StoredObject] = Field(default_factory=list)
    uri: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    skipped: bool = Field(default=False, description="idempotent replay: nothing to do")


class DeliveryItem(BaseModel):
    key: str = Field(description="idempotency key: (event, artifact, action, sink)")
    action: Action
    sink_id: str
    context: DeliveryContext
    artifact: ArtifactView
    target: str | None = Field(default=None, description="rendered store key prefix")
    params: dict[str, Any] = Field(default_factory=dict)
    upstream: DeliveryResult | None = Field(
        default=None, description="result of the delivery this one waited for"
    )
    attempt: int = Field(default=1, description="1 for the first try, 2+ for retries")
