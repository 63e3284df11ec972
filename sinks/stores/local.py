"""`local` artifact store: a directory tree, written crash-safely.

Each file goes to a temp file in the destination directory, is hashed while it is
copied, fsynced and renamed into place, so a reader never sees half a file and a
SIGKILL leaves at worst a `.tmp-*` file that the next attempt replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import time
import uuid
from pathlib import Path

from router.rules import object_key
from sinks.base import (
    BaseSink,
    DeliveryItem,
    DeliveryResult,
    PermanentError,
    SinkSettings,
    StoredObject,
    TransientError,
)

__all__ = ["LocalStore", "LocalStoreSettings"]

_CHUNK = 1024 * 1024
TMP_DIR = ".router-tmp"  # in-progress copies; reserved: no key may start with it
# A full disk or a read-only mount can be fixed by an operator: keep retrying.
_TRANSIENT_ERRNOS = {errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EPERM, errno.EIO}


class LocalStoreSettings(SinkSettings):
    path: Path
    fsync: bool = True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def versioned_key(key: str, version: str) -> str:
    """`a/model.pkl` -> `a/model.v3.pkl`: on_conflict: version keeps every version."""
    head, _, name = key.rpartition("/")
    stem, dot, ext = name.partition(".")
    named = f"{stem}.v{version}{dot}{ext}"
    return f"{head}/{named}" if head else named


class LocalStore(BaseSink):
    Settings = LocalStoreSettings
    settings: LocalStoreSettings

    def __init__(self, sink_id: str, settings: LocalStoreSettings) -> None:
        super().__init__(sink_id, settings)
        self.root = settings.path.expanduser().resolve()

    def _path_for(self, key: str) -> Path:
        if key.split("/", 1)[0] == TMP_DIR:
            raise PermanentError(f"key {key!r} is inside the store's own {TMP_DIR}/ folder")
        dest = (self.root / key).resolve()
        if dest != self.root and self.root not in dest.parents:
            raise PermanentError(f"key {key!r} resolves outside the store root {self.root}")
        return dest

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.target is None:
            raise PermanentError("store delivery without a target key")
        try:
            objects = await asyncio.to_thread(self._deliver_files, item)
        except OSError as exc:
            if exc.errno in _TRANSIENT_ERRNOS:
                raise TransientError(f"{self.root}: {exc.strerror} ({exc.filename})") from exc
            raise PermanentError(f"{self.root}: {exc}") from exc
        return DeliveryResult(
            objects=objects,
            uri=objects[0].uri if len(objects) == 1 else (
                f"file://{self.root}/{item.target.replace('{file}', '').rstrip('/')}"
            ),
            skipped=all(o.version_id == "unchanged" for o in objects),
        )

    def _deliver_files(self, item: DeliveryItem) -> list[StoredObject]:
        assert item.target is not None
        on_conflict = item.params.get("on_conflict", "fail")
        objects = []
        for staged in item.artifact.files:
            if staged.path is None and staged.uri:
                # A remote object referenced over MQTT: catalogued where it already is.
                objects.append(
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
            unchanged = False
            if dest.exists():
                existing = file_sha256(dest)
                if existing == staged.sha256:
                    unchanged = True
                elif on_conflict != "overwrite":
                    raise PermanentError(
                        f"conflict: {dest} already holds different content (sha256 "
                        f"{existing[:12]}..., this artifact {staged.sha256[:12]}...); set "
                        "on_conflict: overwrite or version on the rule, or add {version} "
                        "or {run_id} to its path"
                    )
            if not unchanged:
                self._write(staged.path, dest, staged.sha256)
            objects.append(
                StoredObject(
                    file_name=staged.name,
                    uri=f"file://{dest}",
                    size=staged.size,
                    sha256=staged.sha256,
                    version_id="unchanged" if unchanged else None,
                )
            )
        return objects

    def _write(self, source: Path, dest: Path, expected_sha256: str) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Temp files live in the store's own folder (same file system, so the rename is
        # atomic), never next to user files: cleaning up can't touch a stored artifact.
        tmp_dir = self.root / TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        self._clean_stale_temps(tmp_dir)
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        try:
            with open(source, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                if self.settings.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            if digest.hexdigest() != expected_sha256:
                raise PermanentError(
                    f"{source} changed after it was accepted (sha256 now "
                    f"{digest.hexdigest()[:12]}..., journaled {expected_sha256[:12]}...); "
                    "emit a new bundle instead of editing an accepted one"
                )
            os.replace(tmp, dest)
            if self.settings.fsync:
                fd = os.open(dest.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _clean_stale_temps(tmp_dir: Path) -> None:
        """Remove temp files an attempt killed mid-copy left behind (older than an hour)."""
        cutoff = time.time() - 3600
        for entry in os.scandir(tmp_dir):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)

    async def health(self) -> bool:
        return os.access(self.root if self.root.exists() else self.root.parent, os.W_OK)
