"""Intake: turn a spool bundle into an AcceptedEvent, or a Rejection that says why.

Everything here runs in a worker thread (it hashes files), and nothing here writes:
the journal commits, then the spool source moves the bundle.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from router.delivery import StagedFile
from router.detect import detect_dataset_format, detect_framework
from router.errors import Problem
from router.manifest import (
    LIMITS,
    DatasetArtifact,
    Manifest,
    ManifestError,
    ModelArtifact,
    parse_manifest,
)

__all__ = ["AcceptedEvent", "Rejection", "load_bundle", "sha256_file", "sha256_files"]

_CHUNK = 1024 * 1024
# Below this many bytes in all, a bundle's files are hashed one after another: a hop to
# the pool costs more than hashing a few small files does.
_PARALLEL_HASH_BYTES = 32 * _CHUNK


class AcceptedEvent(BaseModel):
    """A validated event, ready to journal: manifest plus every file's checksum."""

    event_id: str
    source: Literal["spool", "mqtt"]
    bundle: str | None = None
    manifest: Manifest
    files: list[list[StagedFile]] = Field(description="per artifact, in manifest order")
    detected: list[dict[str, str]] = Field(
        default_factory=list, description="framework/format detected per artifact"
    )
    digest: str
    received_at: float
    reply_to: dict[str, str] | None = None


class Rejection(BaseModel):
    """Why an input was refused, in words a person can act on (written as error.json)."""

    event_id: str | None = None
    source: Literal["spool", "mqtt"]
    bundle: str | None = None
    problems: list[Problem]
    rejected_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def summary(self) -> str:
        return "; ".join(p.render() for p in self.problems)


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_files(paths: Sequence[Path]) -> list[tuple[str, int] | OSError]:
    """Each file's (sha256, size), or the OSError that stopped reading it.

    hashlib releases the GIL while it hashes, so the shards of a checkpoint hash on
    every core at once instead of one after another.
    """
    if len(paths) > 1 and _total_size(paths) >= _PARALLEL_HASH_BYTES:
        return list(_hash_pool().map(_sha256_or_error, paths))
    return [_sha256_or_error(path) for path in paths]


def _sha256_or_error(path: Path) -> tuple[str, int] | OSError:
    try:
        return sha256_file(path)
    except OSError as exc:
        return exc


def _total_size(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(OSError):  # reported when it is read
            total += os.stat(path).st_size
    return total


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    """One pool for all intake, so bundles read at once share the cores, not multiply."""
    return ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="router-hash")


def _resolve_in_bundle(bundle: Path, rel: str, field: str) -> tuple[Path | None, Problem | None]:
    """The file a bundle path names, refusing anything that leaves the bundle."""
    candidate = bundle / rel
    try:
        st = candidate.lstat()
    except FileNotFoundError:
        return None, Problem(
            field=field, value=rel, message="no such file in the bundle; write it before "
            "manifest.json, or fix the path"
        )
    except OSError as exc:
        return None, Problem.cannot_read(field, rel, exc)
    if stat.S_ISREG(st.st_mode) and os.sep not in rel and rel not in (".", ".."):
        # The common case, a plain file at the top of the bundle: nothing to resolve
        # (realpath would lstat every component of the path from /).
        return candidate, None
    root = bundle.resolve()
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        return None, Problem(
            field=field, value=rel,
            message=f"cannot be resolved ({getattr(exc, 'strerror', None) or exc}); a "
            "dangling symlink or a symlink loop: put the real file in the bundle",
        )
    if resolved != root and root not in resolved.parents:
        return None, Problem(
            field=field,
            value=rel,
            message="resolves outside the bundle (symlink escape); copy the file into the "
            "bundle instead of linking to it",
        )
    try:
        st = resolved.stat()
    except OSError as exc:
        return None, Problem.cannot_read(field, rel, exc)
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory" if stat.S_ISDIR(st.st_mode)
            else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a device or socket"
        )
        return None, Problem(
            field=field, value=rel, message=f"is {kind}, not a regular file; only regular "
            "files can be routed"
        )
    return resolved, None


class _Found(NamedTuple):
    """A bundle file that resolved, waiting for its hash."""

    name: str
    type: str
    field: str
    rel: str
    resolved: Path


def load_bundle(bundle: Path, received_at: float) -> AcceptedEvent | Rejection:
    """Validate a complete bundle directory (manifest.json present)."""
    name = bundle.name
    manifest_path = bundle / "manifest.json"
    try:
        st = manifest_path.lstat()
        if not stat.S_ISREG(st.st_mode):
            # A FIFO would block the reader forever, a symlink could point anywhere.
            raise ManifestError(
                [Problem(field="manifest.json", message="must be a regular file (not a "
                         "symlink, FIFO, socket or directory)")]
            )
        if st.st_size > LIMITS.manifest_bytes:
            raise ManifestError([Problem(
                field="manifest.json", value=f"{st.st_size} bytes",
                message=f"is over the {LIMITS.manifest_bytes} byte limit; put large values "
                "in files")])
        with open(manifest_path, "rb") as fh:  # bounded even if it grows meanwhile
            raw = fh.read(LIMITS.manifest_bytes + 1)
        manifest = parse_manifest(raw)
    except ManifestError as exc:
        return Rejection(source="spool", bundle=name, event_id=name, problems=exc.problems)
    except OSError as exc:
        return Rejection(
            source="spool",
            bundle=name,
            event_id=name,
            problems=[Problem.cannot_read("manifest.json", None, exc)],
        )

    event_id = manifest.id or name
    problems: list[Problem] = []
    found: list[list[_Found]] = []
    for a_index, artifact in enumerate(manifest.artifacts):
        mine: list[_Found] = []
        for f_index, entry in enumerate(artifact.files):
            field = f"artifacts[{a_index}].files[{f_index}]"
            if entry.path is None:
                problems.append(
                    Problem(
                        field=field,
                        message="spool bundles carry files by 'path'; 'uri' and "
                        "'content_base64' are for MQTT",
                    )
                )
                continue
            resolved, problem = _resolve_in_bundle(bundle, entry.path, f"{field}.path")
            if problem is not None:
                problems.append(problem)
                continue
            assert resolved is not None and entry.name is not None and entry.type is not None
            mine.append(_Found(entry.name, entry.type, f"{field}.path", entry.path, resolved))
        found.append(mine)
    if problems:  # nothing is hashed for a bundle that is refused anyway
        return Rejection(source="spool", bundle=name, event_id=event_id, problems=problems)
    digests = iter(sha256_files([f.resolved for mine in found for f in mine]))
    files: list[list[StagedFile]] = []
    detected: list[dict[str, str]] = []
    for artifact, mine in zip(manifest.artifacts, found, strict=True):
        staged: list[StagedFile] = []
        for f in mine:
            digest = next(digests)
            if isinstance(digest, OSError):
                # Not raised: one unreadable file must not stall the bundles read with it.
                problems.append(Problem.cannot_read(f.field, f.rel, digest))
                continue
            sha, size = digest
            staged.append(StagedFile(
                name=f.name, type=f.type, path=Path(f.rel), sha256=sha, size=size))
        files.append(staged)
        detected.append(_detect(artifact, bundle, staged))
    if problems:
        return Rejection(source="spool", bundle=name, event_id=event_id, problems=problems)
    return AcceptedEvent(
        event_id=event_id,
        source="spool",
        bundle=name,
        manifest=manifest,
        files=files,
        detected=detected,
        digest=hashlib.sha256(raw).hexdigest(),
        received_at=received_at,
    )


def _detect(artifact: object, bundle: Path, staged: list[StagedFile]) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(artifact, ModelArtifact) and not artifact.framework and staged:
        for f in staged:
            assert f.path is not None
            found = detect_framework(bundle / f.path, f.name)
            if found:
                out["framework"] = found
                break
    if isinstance(artifact, DatasetArtifact) and not artifact.format and staged:
        found = detect_dataset_format(staged[0].name)
        if found:
            out["format"] = found
    return out


def bundle_path_ok(name: str) -> bool:
    """Names starting with '.' are never read (writers build bundles under them)."""
    return bool(name) and not name.startswith(".") and os.sep not in name
