"""`local` artifact store: a directory tree, written crash-safely.

Each file is copied to a temp file in the store's own folder and hashed on the way,
made durable, then renamed into place, so a reader never sees half a file and a
SIGKILL leaves at worst a temp file that a later attempt removes.  Deliveries come in
batches (`max_batch`): one thread hop per batch, and on Linux one `syncfs` before the
renames and one after instead of two fsyncs per file, while little else is waiting
for write-back (see sinks.durable.flush).

Unless the rule says `on_conflict: overwrite`, a file is put in place with a hard link
(`link(2)` fails if the name exists) rather than a rename (which replaces it): the
check for a taken key happens again, atomically, at the moment of placing, so two
deliveries racing for one key (two batches at once, two daemons) never both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import itertools
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from router.rules import object_key
from sinks.base import (
    BaseBatchSink,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    SinkSettings,
    StoredObject,
    TransientError,
)
from sinks.durable import flush
from sinks.stores.keys import checked_on_conflict, versioned_key

__all__ = ["LocalStore", "LocalStoreSettings"]

_CHUNK = 1024 * 1024
TMP_DIR = ".router-tmp"  # in-progress copies; reserved: no key may start with it
# A full disk or a read-only mount can be fixed by an operator: keep retrying.
_TRANSIENT_ERRNOS = {errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EPERM, errno.EIO}
_CLEAN_EVERY = 600.0  # seconds between sweeps of stale temp files
# link(2) refused because the file system has no hard links (some FUSE, SMB, FAT mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}


class LocalStoreSettings(SinkSettings):
    path: Path
    fsync: bool = True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _conflict(dest: Path, existing: str, sha256: str) -> PermanentError:
    return PermanentError(
        f"conflict: {dest} already holds different content (sha256 {existing[:12]}..., "
        f"this artifact {sha256[:12]}...); set on_conflict: overwrite or version on the "
        "rule, or add {version} or {run_id} to its path"
    )


def _os_error(root: Path, exc: OSError) -> Exception:
    if exc.errno in _TRANSIENT_ERRNOS:
        return TransientError(f"{root}: {exc.strerror} ({exc.filename})")
    return PermanentError(f"{root}: {exc}")


@dataclass
class _Pending:
    """One item of a batch: its objects, and the temp files still to put in place (with
    the index of their object)."""

    item: DeliveryItem
    objects: list[StoredObject] = field(default_factory=list)
    renames: list[tuple[Path, Path, int]] = field(default_factory=list)
    error: Exception | None = None


class LocalStore(BaseBatchSink):
    Settings = LocalStoreSettings
    settings: LocalStoreSettings

    # Many small files per call: see the module docstring.
    default_concurrency: ClassVar[int | None] = 128
    max_batch: ClassVar[int] = 32

    def __init__(self, sink_id: str, settings: LocalStoreSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.path.expanduser().resolve()
        self._cleaned_at = -_CLEAN_EVERY
        # Batches run in worker threads: an item's files are put in place as one unit
        # (see _commit), and check-then-rename is atomic where hard links are missing.
        self._place_lock = threading.Lock()
        # Temp names: unique per process by the prefix, within it by the counter (a
        # uuid4 per file cost a getrandom syscall each).
        self._tmp_prefix = uuid.uuid4().hex[:16]
        self._tmp_numbers = itertools.count()

    def _path_for(self, key: str) -> Path:
        parts = key.split("/")
        if parts[0] == TMP_DIR:
            raise PermanentError(f"key {key!r} is inside the store's own {TMP_DIR}/ folder")
        if self._plain(parts):
            return self.root.joinpath(*parts)
        dest = (self.root / key).resolve()
        if dest != self.root and self.root not in dest.parents:
            raise PermanentError(f"key {key!r} resolves outside the store root {self.root}")
        return dest

    def _plain(self, parts: list[str]) -> bool:
        """True when the key has no `.`/`..`/empty segment and no symlink along it under
        the (resolved) root: then root/key is its own real path, without realpath
        lstat-ing every component from / again."""
        if any(part in ("", ".", "..") for part in parts):
            return False
        current = str(self.root)
        for part in parts:
            current = f"{current}/{part}"
            try:
                if stat.S_ISLNK(os.lstat(current).st_mode):
                    return False
            except FileNotFoundError:
                return True  # from here on nothing exists: we create real directories
            except OSError:
                return False  # a name too long, a file where a folder should be: the slow path says
        return True

    async def deliver_batch(self, items: list[DeliveryItem]) -> list[DeliveryResult | Exception]:
        return await asyncio.to_thread(self._deliver_batch, items)

    def _deliver_batch(self, items: list[DeliveryItem]) -> list[DeliveryResult | Exception]:
        try:
            self._clean_stale_temps()
        except OSError as exc:  # the root is not writable (yet): every item waits
            return [_os_error(self.root, exc)] * len(items)
        batch = [_Pending(item) for item in items]
        claimed: dict[Path, str] = {}  # destinations this batch writes -> their sha256
        try:
            for pending in batch:
                try:
                    self._stage(pending, claimed)
                except (PermanentError, TransientError) as exc:
                    pending.error = exc
                except OSError as exc:
                    pending.error = _os_error(self.root, exc)
            self._commit([p for p in batch if p.error is None and p.renames])
        except OSError as exc:  # the flush or a rename failed: nothing is known durable
            for pending in batch:
                if pending.error is None:
                    pending.error = _os_error(self.root, exc)
        finally:
            for pending in batch:
                for tmp, _, _ in pending.renames:
                    tmp.unlink(missing_ok=True)
        return [p.error or self._result(p) for p in batch]

    def _result(self, pending: _Pending) -> DeliveryResult:
        objects, target = pending.objects, pending.item.target or ""
        return DeliveryResult(
            objects=objects,
            uri=objects[0].uri if len(objects) == 1 else (
                (self.root / target.replace("{file}", "").strip("/")).as_uri()
            ),
            skipped=all(o.version_id == "unchanged" for o in objects),
        )

    def _stage(self, pending: _Pending, claimed: dict[Path, str]) -> None:
        """Check each file against what is there and copy it to a temp file; the item's
        destinations join `claimed` only once all its files are staged."""
        mine: dict[Path, str] = {}
        item = pending.item
        if item.target is None:
            raise PermanentError("store delivery without a target key")
        on_conflict = checked_on_conflict(item)
        for staged in item.artifact.files:
            if staged.path is None and staged.uri:
                # A remote object referenced over MQTT: catalogued where it already is.
                pending.objects.append(
                    StoredObject(
                        file_name=staged.name, uri=staged.uri, size=staged.size,
                        sha256=staged.sha256, version_id="unchanged",
                    )
                )
                continue
            if staged.path is None:
                raise PermanentError(f"file {staged.name!r} has no local path to copy from")
            key = object_key(item.target, staged.name)
            if on_conflict == "version":
                key = versioned_key(key, item.artifact.version)
            dest = self._path_for(key)
            # An earlier item of this batch counts as already there.
            existing = (claimed.get(dest) or mine.get(dest)
                        or (file_sha256(dest) if dest.exists() else None))
            unchanged = existing == staged.sha256
            if existing is not None and not unchanged and on_conflict != "overwrite":
                raise _conflict(dest, existing, staged.sha256)
            if not unchanged:
                tmp = self._copy(staged.path, dest, staged.sha256, staged.size)
                pending.renames.append((tmp, dest, len(pending.objects)))
                mine[dest] = staged.sha256
            pending.objects.append(
                StoredObject(
                    file_name=staged.name,
                    uri=dest.as_uri(),  # percent-encoded: a '%' in a name stays itself
                    size=staged.size,
                    sha256=staged.sha256,
                    version_id="unchanged" if unchanged else None,
                )
            )
        claimed.update(mine)

    def _copy(self, source: Path, dest: Path, expected_sha256: str, size: int) -> Path:
        """Copy to a temp file, hashing on the way; the temp file's path.

        Unbuffered, through one buffer sized for the file: a buffered file object costs
        an isatty ioctl and an lseek per open, and each syscall of a worker thread can
        hand the GIL over (this runs for every file of every small bundle).
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Temp files live in the store's own folder (same file system, so the rename is
        # atomic), never next to user files: cleaning up can't touch a stored artifact.
        tmp = self.root / TMP_DIR / f"{self._tmp_prefix}-{next(self._tmp_numbers)}.part"
        digest = hashlib.sha256()
        buffer = memoryview(bytearray(min(_CHUNK, size + 1)))
        try:
            with open(source, "rb", buffering=0) as src, self._open_temp(tmp) as out:
                while n := src.readinto(buffer):
                    digest.update(buffer[:n])
                    written = 0
                    while written < n:  # a raw write may take part of it
                        written += out.write(buffer[written:n])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != expected_sha256:
            tmp.unlink(missing_ok=True)
            raise PermanentError(
                f"{source} changed after it was accepted (sha256 now "
                f"{digest.hexdigest()[:12]}..., journaled {expected_sha256[:12]}...); "
                "emit a new bundle instead of editing an accepted one"
            )
        return tmp

    def _open_temp(self, tmp: Path) -> io.FileIO:
        try:
            return open(tmp, "xb", buffering=0)
        except FileNotFoundError:  # the first write, or someone removed the folder
            tmp.parent.mkdir(parents=True, exist_ok=True)
            return open(tmp, "xb", buffering=0)

    def _commit(self, ready: list[_Pending]) -> None:
        """Make the copies durable, rename them into place, make the renames durable.

        Flushing before the renames matters: after a crash a destination holds either
        nothing or the whole file, never a file whose data had not reached the disk
        (which a retry would take for someone else's conflicting content)."""
        if not ready:
            return
        self._flush([tmp for pending in ready for tmp, _, _ in pending.renames])
        parents = set()
        for pending in ready:
            exclusive = pending.item.params.get("on_conflict", "fail") != "overwrite"
            try:
                # One item at a time in this process, its keys checked before any file
                # is placed: two items racing for the same keys in different file orders
                # would otherwise each win one file, both fail, and leave a mix.
                with self._place_lock:
                    if exclusive:
                        self._check_free(pending)
                    for tmp, dest, index in pending.renames:
                        parents.add(dest.parent)
                        if exclusive:
                            self._place_new(tmp, dest, pending.objects, index)
                        else:
                            os.replace(tmp, dest)
            except PermanentError as exc:
                # A conflict: this item alone fails; _deliver_batch removes its temp files.
                pending.error = exc
                continue
            pending.renames.clear()
        # Folders made for these keys are new entries in their own parents: up to the root.
        self._flush({*parents, *(up for folder in parents for up in folder.parents
                                 if up.is_relative_to(self.root))})

    @staticmethod
    def _check_free(pending: _Pending) -> None:
        """A conflict on any of the item's keys, raised before one of its files moves."""
        for _, dest, index in pending.renames:
            if os.path.lexists(dest):
                existing = file_sha256(dest)
                if existing != pending.objects[index].sha256:
                    raise _conflict(dest, existing, pending.objects[index].sha256)

    def _place_new(self, tmp: Path, dest: Path, objects: list[StoredObject], index: int) -> None:
        """Put `tmp` at `dest` unless something is there already (checked atomically by
        link(2), which refuses an existing name, against other processes too); same
        content there is a no-op. The caller holds _place_lock."""
        try:
            try:
                os.link(tmp, dest)
                return
            except FileExistsError:
                pass
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if not os.path.lexists(dest):  # atomic within this process: the lock
                    os.replace(tmp, dest)
                    return
            existing = file_sha256(dest)
            if existing != objects[index].sha256:
                raise _conflict(dest, existing, objects[index].sha256)
            objects[index] = objects[index].model_copy(update={"version_id": "unchanged"})
        finally:
            tmp.unlink(missing_ok=True)

    def _flush(self, paths: Iterable[Path]) -> None:
        """The temp files before their renames, then the folders they were renamed into."""
        if self.settings.fsync:
            flush(self.root, paths)

    def _clean_stale_temps(self) -> None:
        """Remove temp files an attempt killed mid-copy left behind (older than an hour);
        swept at most every few minutes, not on every write."""
        now = time.monotonic()
        if now - self._cleaned_at < _CLEAN_EVERY:
            return
        self._cleaned_at = now
        tmp_dir = self.root / TMP_DIR
        tmp_dir.mkdir(parents=True, exist_ok=True)
        cutoff = time.time() - 3600
        for entry in os.scandir(tmp_dir):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)

    async def health(self) -> bool:
        return os.access(self.root if self.root.exists() else self.root.parent, os.W_OK)
