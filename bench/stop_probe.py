"""How long SIGTERM takes while a large checkpoint is being hashed at intake.

    PYTHONPATH=<tree> python bench/stop_probe.py [GiB]     (default 16)

Starts `artifact-router run` on a scratch workspace, renames in a bundle holding a
sparse file of that size (nothing on disk, all of it to hash), waits until the daemon
has read 1 GiB (`rchar` in /proc/<pid>/io), sends SIGTERM and prints the time to exit.
`<tree>` is a worktree of the commit to measure; the daemon imports the router from it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import (
    DaemonProcess,
    Workspace,
    bytes_read,
    model_manifest,
    wait_bytes_read,
    write_bundle,
)


def main() -> None:
    gib = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    root = Path(tempfile.mkdtemp(prefix="stop-probe-"))
    try:
        daemon = DaemonProcess(Workspace(root))
        time.sleep(2)  # started and watching
        started = bytes_read(daemon)
        write_bundle(daemon.workspace.spool, "ckpt", model_manifest("llm", run_id="r1"),
                     sparse={"model.pkl": gib << 30})
        wait_bytes_read(daemon, started + (1 << 30))
        sent = time.perf_counter()
        code = daemon.terminate(timeout=600)
        print(f"{gib} GiB sparse checkpoint: SIGTERM to exit "
              f"{time.perf_counter() - sent:.2f} s (exit code {code})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
