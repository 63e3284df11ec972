"""Which filesystem a bench run writes on, and whether its figures would hold elsewhere.

On ext4 without a journal, making a file skips every free inode whose deletion is less
than 5 s old (5 min while its inode-table block is dirty): after the thousands of files
a bench writes and deletes, each new file scans past them.  Peers that only create
files (`rclone copy`) slow down three- to four-fold there, the router far less, so the
ratios on such a disk flatter the router.  See bench/RESULTS.md, session 23.  On
tmpfs the opposite: the router's flushes cost nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkdirFilesystem", "workdir_filesystem"]


@dataclass(frozen=True)
class WorkdirFilesystem:
    path: Path
    mount_point: str
    device: str
    fstype: str
    journaled: bool | None  # None where the question does not apply (not ext3/ext4)

    def describe(self) -> str:
        journal = {True: ", journaled", False: ", no journal", None: ""}[self.journaled]
        return f"{self.fstype} on {self.device} at {self.mount_point}{journal}"

    @property
    def warning(self) -> str | None:
        if self.fstype in ("tmpfs", "ramfs"):
            return (f"workdir {self.path} is on {self.describe()}, in memory: flushes cost "
                    "nothing there, so the price of the router's durability goes unmeasured "
                    "and the ratios would not hold on a disk. Give --workdir on a disk.")
        if self.journaled is not False:
            return None
        return (f"workdir {self.path} is on {self.describe()}: there the kernel skips "
                "recently freed inodes when it makes a file, so creating files slows after "
                "the deletions a bench makes, rclone copy most of all; the ratios would "
                "not hold on a journaled disk. Give --workdir on a journaled filesystem "
                "(or TMPDIR=<dir> for bench/probe.py).")


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def workdir_filesystem(path: Path, mounts: str | None = None,
                       journals: Iterable[str] | None = None) -> WorkdirFilesystem | None:
    """The mount holding `path` (or its nearest existing parent); None off Linux.

    `mounts` is /proc/mounts' text and `journals` the entries of /proc/fs/jbd2 (one
    `<device>-<inode>` per journaled filesystem); both are read from /proc unless given.
    """
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    if journals is None:
        try:
            journals = os.listdir("/proc/fs/jbd2")
        except OSError:
            journals = []
    journals = list(journals)
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    where = where.resolve()
    best: tuple[str, str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, mount_point, fstype = _unescape(fields[0]), _unescape(fields[1]), fields[2]
        holds = where == Path(mount_point) or Path(mount_point) in where.parents
        if holds and (best is None or len(mount_point) >= len(best[1])):  # deepest, last
            best = (device, mount_point, fstype)
    if best is None:
        return None
    device, mount_point, fstype = best
    journaled = None
    if fstype in ("ext3", "ext4"):
        name = Path(os.path.realpath(device)).name  # /dev/mapper/x -> dm-0, as jbd2 names it
        journaled = any(entry.rsplit("-", 1)[0] == name for entry in journals)
    return WorkdirFilesystem(Path(path), mount_point, device, fstype, journaled)
