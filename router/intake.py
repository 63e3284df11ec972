"""Intake: turn a spool bundle into an AcceptedEvent, or a Rejection that says why.

Everything here runs in a worker thread (it hashes files), and nothing here writes:
the journal commits, then the spool source moves the bundle.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import stat
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from router.block_digests import BlockDigester
from router.delivery import FileIdentity, StagedFile
from router.detect import detect_dataset_format, detect_framework
from router.errors import Problem
from router.manifest import (
    LIMITS,
    DatasetArtifact,
    Manifest,
    ManifestError,
    ModelArtifact,
    SafeName,
    parse_manifest,
    problems_from_validation,
)

__all__ = [
    "AcceptedEvent", "CheckedFile", "FileChanged", "FileHash", "HashAbandoned", "LargeBundle",
    "Rejection",
    "load_bundle", "not_utf8", "open_regular", "settled_identity", "sha256_file", "sha256_files",
]

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


class HashAbandoned(Exception):
    """The router is stopping, and a hash under way was given up after its current chunk.

    Not an OSError, so that no caller takes it for an unreadable file: the work the hash
    was for stays unacknowledged (a bundle in incoming/, an MQTT message without its
    PUBACK), to be read whole at the next start. Stopping then costs a chunk, not the
    rest of a checkpoint (about a second per GiB)."""

    def __init__(self, path: Path, hashed: int, size: int) -> None:
        super().__init__(f"{path}: hashed {hashed} of {size} bytes when the router stopped")
        self.hashed, self.size = hashed, size


class LargeBundle(NamedTuple):
    """A bundle whose files were found and checked but not hashed, being over the size
    the caller would hash in line (see load_bundle's `hash_up_to`)."""

    name: str
    size: int
    manifest: Manifest  # for its run and its inputs: bundles of either wait for it


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


# Never follow a final symlink, never block on a FIFO (O_NONBLOCK: a FIFO opens at once
# and fstat shows what it is); O_NONBLOCK changes nothing for reading a regular file.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FileChanged(OSError):
    """The file opened is not the regular file that was checked: it was swapped (for a
    FIFO, a device, a symlink or another file) between the check and the read."""


class CheckedFile(NamedTuple):
    """A path and the stat its checks passed on: the file read must be that very file."""

    path: Path
    st: os.stat_result


def open_regular(path: Path, expected: os.stat_result | None = None) -> int:
    """A descriptor on the regular file at `path`, and, given `expected`, the same file
    (st_dev, st_ino) that was checked; else FileChanged (or ELOOP for a final symlink)."""
    return _open_regular(path, expected)[0]


def _open_regular(
    path: Path, expected: os.stat_result | None = None
) -> tuple[int, os.stat_result]:
    """open_regular, with the descriptor's stat."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileChanged(errno.EINVAL, "is not a regular file")
        if expected is not None and (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
            raise FileChanged(errno.ESTALE, "is not the file that was checked")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class FileHash(NamedTuple):
    sha256: str
    size: int
    identity: FileIdentity | None  # see settled_identity


def read_bounded(fd: int, expected: int, limit: int) -> bytes:
    """Up to `limit` bytes of a file `expected` bytes long, read straight from `fd`.

    A buffered file object costs an isatty ioctl and an lseek per open, and a read of
    `limit` bytes allocates all of them (the manifest limit is 16 MiB): each syscall
    a worker thread makes can hand the GIL to another thread, on every bundle.
    """
    data = os.read(fd, min(expected + 1, limit))
    while len(data) < limit and (more := os.read(fd, min(_CHUNK, limit - len(data)))):
        data += more
    return data


def sha256_file(path: Path, expected: os.stat_result | None = None,
                abandon: threading.Event | None = None) -> FileHash:
    """The file's sha256 and size; HashAbandoned as soon as `abandon` is set."""
    digest = hashlib.sha256()
    size = 0
    started = time.time_ns()
    # Hashed from the checked fd, straight into one buffer sized for the file (see
    # read_bounded for why not a file object).
    fd, before = _open_regular(path, expected)
    companion = BlockDigester.for_file(fd, before.st_size)
    identity = None
    try:
        buffer = memoryview(bytearray(min(_CHUNK, before.st_size + 1)))
        while n := os.readv(fd, [buffer]):
            digest.update(buffer[:n])
            size += n
            if abandon is not None and abandon.is_set():
                raise HashAbandoned(path, size, before.st_size)
        if size >= _IDENTITY_MIN_BYTES:  # smaller files have none: no stat to compare
            identity = settled_identity(before, os.fstat(fd), size, started)
    finally:
        os.close(fd)
        if companion is not None:
            companion.stop(identity)
    return FileHash(digest.hexdigest(), size, identity)


# Files smaller than this are hashed again by the stores that need it: that costs less
# than the identity's bytes in every journal row.
_IDENTITY_MIN_BYTES = _CHUNK


def _coarse_tick_ns() -> int:
    """How far a file's timestamps may lag the clock: the kernel stamps them from its
    coarse clock, one tick behind at most."""
    try:
        return int(time.clock_getres(5) * 1e9)  # CLOCK_REALTIME_COARSE (Linux)
    except OSError:
        return 10_000_000


_TICK_NS = max(_coarse_tick_ns(), 1_000_000)
_WHOLE_MS = 1_000_000
_COARSE_FS_NS = 2_000_000_000  # FAT keeps 2 s; ext3, HFS+ and some network mounts 1 s


def settled_identity(
    before: os.stat_result, after: os.stat_result, size: int, started_ns: int
) -> FileIdentity | None:
    """The file's identity, if any write after the hash must change it; else None.

    A store then trusts an unchanged stat instead of hashing the file again (the S3
    multipart path saves a sha256 pass of every byte). Two conditions make that sound:
    the stat did not move while the file was read, and the file's last change (ctime,
    which no one can set) is older than the hash by more than the timestamps'
    granularity, so that a later write cannot land on the same stamp. Timestamps in
    whole milliseconds mean a coarse filesystem; 2 s is then the margin.
    """
    identity = FileIdentity.of(before)
    if size < _IDENTITY_MIN_BYTES or size != before.st_size or not identity.matches(after):
        return None
    coarse = before.st_ctime_ns % _WHOLE_MS == 0 and before.st_mtime_ns % _WHOLE_MS == 0
    margin = _COARSE_FS_NS if coarse else 2 * _TICK_NS
    return identity if before.st_ctime_ns < started_ns - margin else None


def sha256_files(paths: Sequence[Path | CheckedFile], abandon: threading.Event | None = None
                 ) -> list[FileHash | OSError]:
    """Each file's (sha256, size), or the OSError that stopped reading it.

    A CheckedFile must still be the file its checks passed on (FileChanged otherwise).
    hashlib releases the GIL while it hashes, so the shards of a checkpoint hash on
    every core at once instead of one after another. Setting `abandon` gives them all up
    (HashAbandoned).
    """
    hash_one = functools.partial(_sha256_or_error, abandon=abandon)
    if len(paths) > 1 and _total_size(paths) >= _PARALLEL_HASH_BYTES:
        return list(_hash_pool().map(hash_one, paths))
    return [hash_one(path) for path in paths]


def _sha256_or_error(item: Path | CheckedFile, abandon: threading.Event | None
                     ) -> FileHash | OSError:
    try:
        if isinstance(item, CheckedFile):
            return sha256_file(item.path, item.st, abandon)
        return sha256_file(item, abandon=abandon)
    except OSError as exc:
        return exc


def _total_size(paths: Sequence[Path | CheckedFile]) -> int:
    total = 0
    for item in paths:
        if isinstance(item, CheckedFile):
            total += item.st.st_size
            continue
        with contextlib.suppress(OSError):  # reported when it is read
            total += os.stat(item).st_size
    return total


@functools.cache
def _hash_pool() -> ThreadPoolExecutor:
    """One pool for all intake, so bundles read at once share the cores, not multiply."""
    return ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="router-hash")


def _missing(field: str, rel: str) -> Problem:
    return Problem(field=field, value=rel, message="no such file in the bundle; write it "
                   "before manifest.json, or fix the path")


def _changed(field: str, rel: str) -> Problem:
    return Problem(field=field, value=rel, message="changed while the router read it (replaced "
                   "by a symlink, FIFO or another file after it was checked); write every file "
                   "before manifest.json and leave the bundle alone until it moves")


def _resolve_in_bundle(
    bundle: Path, rel: str, field: str
) -> tuple[CheckedFile | None, Problem | None]:
    """The file a bundle path names, refusing anything that leaves the bundle; with the
    stat the checks passed on, so that the file hashed is that file (see open_regular)."""
    candidate = bundle / rel
    try:
        st = candidate.lstat()
    except FileNotFoundError:
        return None, _missing(field, rel)
    except OSError as exc:
        return None, Problem.cannot_read(field, rel, exc)
    if stat.S_ISREG(st.st_mode) and os.sep not in rel and rel not in (".", ".."):
        # The common case, a plain file at the top of the bundle: nothing to resolve
        # (realpath would lstat every component of the path from /).
        return CheckedFile(candidate, st), None
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
    return CheckedFile(resolved, st), None


class _Found(NamedTuple):
    """A bundle file that resolved, waiting for its hash."""

    name: str
    type: str
    field: str
    rel: str
    resolved: CheckedFile


def load_bundle(
    bundle: Path, received_at: float, hash_up_to: int | None = None,
    abandon: threading.Event | None = None, *, manifest_st: os.stat_result | None = None,
) -> AcceptedEvent | Rejection | LargeBundle:
    """Validate a complete bundle directory (manifest.json present).

    With `hash_up_to`, a valid bundle whose files hold more bytes than that is returned
    as a LargeBundle before any is hashed, so that the caller can hash it apart from
    the small ones it is reading (1 GiB takes about a second). Setting `abandon` stops
    the hashing (HashAbandoned: the router is stopping). `manifest_st` is the caller's
    own lstat of manifest.json, if it took one: each system call of a reading thread may
    hand the GIL to another (bench/RESULTS.md, session 33). The file opened must still
    be that one."""
    name = bundle.name
    if (shown := not_utf8(name)) is not None:
        # The journal stores names as UTF-8: refused here, before anything is read.
        return Rejection(source="spool", bundle=name, problems=[Problem(
            field="bundle", value=shown, message="the directory name is not valid UTF-8; "
            "rename it to UTF-8 (the router journals names as text)")])
    id_problem = _name_as_id(name)
    fallback_id = name if id_problem is None else None
    try:
        root_st = os.lstat(bundle)
    except OSError as exc:
        return Rejection(source="spool", bundle=name, event_id=fallback_id,
                         problems=[Problem.cannot_read("bundle", name, exc)])
    if not stat.S_ISDIR(root_st.st_mode):
        # A symlink would make its target (anywhere) the bundle root.
        kind = "a symlink" if stat.S_ISLNK(root_st.st_mode) else "not a directory"
        return Rejection(source="spool", bundle=name, event_id=fallback_id, problems=[Problem(
            field="bundle", value=name, message=f"is {kind}; a bundle must be a real directory "
            "in incoming/: move or copy the directory there instead of linking to it")])
    manifest_path = bundle / "manifest.json"
    try:
        st = manifest_st if manifest_st is not None else manifest_path.lstat()
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
        # The file checked above, not whatever was swapped in since (a FIFO, a symlink).
        fd = open_regular(manifest_path, st)
        try:  # bounded even if it grows meanwhile
            raw = read_bounded(fd, st.st_size, LIMITS.manifest_bytes + 1)
        finally:
            os.close(fd)
        manifest = parse_manifest(raw)
    except ManifestError as exc:
        return Rejection(source="spool", bundle=name, event_id=fallback_id,
                         problems=exc.problems)
    except (FileChanged, FileNotFoundError) as exc:
        return Rejection(source="spool", bundle=name, event_id=fallback_id, problems=[Problem(
            field="manifest.json", message=f"{exc.strerror or exc} (replaced or removed "
            "while the router read it); write manifest.json.tmp, then rename it, once")])
    except OSError as exc:
        return Rejection(
            source="spool",
            bundle=name,
            event_id=fallback_id,
            problems=[Problem.cannot_read("manifest.json", None, exc)],
        )

    if manifest.id is None and id_problem is not None:
        return Rejection(source="spool", bundle=name, problems=[id_problem])
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
    if hash_up_to is not None:
        size = sum(f.resolved.st.st_size for mine in found for f in mine)
        if size > hash_up_to:
            return LargeBundle(name, size, manifest)
    digests = iter(sha256_files([f.resolved for mine in found for f in mine], abandon))
    files: list[list[StagedFile]] = []
    detected: list[dict[str, str]] = []
    for artifact, mine in zip(manifest.artifacts, found, strict=True):
        staged: list[StagedFile] = []
        for f in mine:
            digest = next(digests)
            if isinstance(digest, OSError):
                # Not raised: one unreadable file must not stall the bundles read with it.
                problems.append(_read_problem(f.field, f.rel, digest))
                continue
            staged.append(StagedFile(name=f.name, type=f.type, path=Path(f.rel),
                                     sha256=digest.sha256, size=digest.size,
                                     identity=digest.identity))
        files.append(staged)
        detected.append(_detect(artifact, [f.resolved for f in mine], staged))
    if not problems and _identity(bundle) != (root_st.st_dev, root_st.st_ino):
        # Swapped for another directory (or a symlink) while it was read.
        problems.append(Problem(field="bundle", value=name, message="was replaced while the "
                                "router read it; build bundles under incoming/.tmp-<name>/ "
                                "and rename the directory once"))
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


def _read_problem(field: str, rel: str, exc: OSError) -> Problem:
    """Why a checked file could not be hashed, with the fix that fits."""
    if isinstance(exc, FileNotFoundError):
        return _missing(field, rel)  # removed after it was checked
    if isinstance(exc, FileChanged) or exc.errno == errno.ELOOP:
        return _changed(field, rel)  # ELOOP: O_NOFOLLOW met a symlink swapped in
    return Problem.cannot_read(field, rel, exc)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def not_utf8(name: str) -> str | None:
    """For a name that is not valid UTF-8, the name with its raw bytes escaped ('\\xff');
    None for a valid one. (os.scandir hands undecodable bytes over as lone surrogates.)"""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return None


_SAFE_NAME: TypeAdapter[str] = TypeAdapter(SafeName)


def _name_as_id(name: str) -> Problem | None:
    """A directory name stands in for a manifest without `id`: the same rules apply."""
    try:
        _SAFE_NAME.validate_python(name)
    except ValidationError as exc:
        first = problems_from_validation(exc)[0]
        return Problem(field="id", value=first.value, message=f"the manifest has no 'id', so "
                       f"the bundle directory name is the event id, and it {first.message}; "
                       "set 'id' in the manifest or rename the directory")
    return None


def _detect(
    artifact: object, checked: list[CheckedFile], staged: list[StagedFile]
) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(artifact, ModelArtifact) and not artifact.framework and staged:
        for c, f in zip(checked, staged, strict=True):
            found = _detect_checked(c, f.name)
            if found:
                out["framework"] = found
                break
    if isinstance(artifact, DatasetArtifact) and not artifact.format and staged:
        found = detect_dataset_format(staged[0].name)
        if found:
            out["format"] = found
    return out


def _detect_checked(checked: CheckedFile, name: str) -> str | None:
    """detect_framework on the checked file itself: it opens a path, which a writer
    could have swapped for a FIFO (blocking forever) since. /dev/fd/N reopens our fd."""
    try:
        fd = open_regular(checked.path, checked.st)
    except OSError:
        return detect_framework(os.devnull, name)  # judged by its name, as when unreadable
    with os.fdopen(fd, "rb"):
        return detect_framework(f"/dev/fd/{fd}", name)


def bundle_path_ok(name: str) -> bool:
    """Names starting with '.' are never read (writers build bundles under them)."""
    return bool(name) and not name.startswith(".") and os.sep not in name
