"""Where a store writes an item's files, and what it answers: shared by the stores.

One place decides the object key of each file (the rule's rendered target, the file's
name, `on_conflict: version`, the store's prefix) and the result a delivery of several
files reports, for the S3 and GCS stores. The local store, which also catalogues remote
objects where they are, takes the `on_conflict` check and `versioned_key` from here, so
all three lay artifacts out and refuse an unknown `on_conflict` the same way.
"""

from __future__ import annotations

from pathlib import Path

from router.delivery import StagedFile
from router.rules import object_key
from sinks.base import DeliveryItem, DeliveryResult, PermanentError, StoredObject

__all__ = [
    "ON_CONFLICT",
    "checked_on_conflict",
    "clean_prefix",
    "file_keys",
    "folder_key",
    "prefixed",
    "upload_result",
    "versioned_key",
]

ON_CONFLICT = ("fail", "overwrite", "version")


def versioned_key(key: str, version: str) -> str:
    """`a/model.pkl` -> `a/model.v3.pkl`: on_conflict: version keeps every version."""
    head, _, name = key.rpartition("/")
    stem, dot, ext = name.partition(".")
    named = f"{stem}.v{version}{dot}{ext}"
    return f"{head}/{named}" if head else named


def clean_prefix(value: str) -> str:
    """A store's configured key prefix without empty or `.` segments; `..` is refused
    (a prefix must not climb out of what the operator gave the router)."""
    segments = [s for s in value.strip("/").split("/") if s not in ("", ".")]
    if any(s == ".." for s in segments):
        raise ValueError("prefix may not contain '..' segments")
    return "/".join(segments)


def prefixed(prefix: str, key: str) -> str:
    """`key` under the store's (already cleaned) `prefix`."""
    return f"{prefix}/{key}" if prefix else key


def folder_key(target: str) -> str:
    """The key of the folder that holds an item's files: its URI when there are several."""
    return target.replace("{file}", "").rstrip("/")


def checked_on_conflict(item: DeliveryItem) -> str:
    """The item's `on_conflict`; a value no store knows fails the delivery rather than
    being taken for the default."""
    value = str(item.params.get("on_conflict", "fail"))
    if value not in ON_CONFLICT:
        raise PermanentError(f"on_conflict {value!r} is not one of {', '.join(ON_CONFLICT)}")
    return value


def file_keys(item: DeliveryItem, prefix: str) -> list[tuple[StagedFile, Path, str]]:
    """Each of the item's files with its local path and its object key under `prefix`."""
    if item.target is None:
        raise PermanentError("store delivery without a target key")
    versioned = checked_on_conflict(item) == "version"
    out = []
    for staged in item.artifact.files:
        if staged.path is None:
            raise PermanentError(f"file {staged.name!r} has no local path to upload from")
        key = object_key(item.target, staged.name)
        if versioned:
            key = versioned_key(key, item.artifact.version)
        out.append((staged, staged.path, prefixed(prefix, key)))
    return out


def upload_result(
    objects: list[StoredObject], unchanged: list[str], folder_uri: str, bucket: str
) -> DeliveryResult:
    """An object store's answer: the one object's URI, or the folder's for several;
    skipped when every file was already there with the same content."""
    return DeliveryResult(
        objects=objects,
        uri=objects[0].uri if len(objects) == 1 else folder_uri,
        skipped=bool(objects) and len(unchanged) == len(objects),
        details={"bucket": bucket, "unchanged": unchanged} if unchanged else {},
    )
