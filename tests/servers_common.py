"""What every real-server fixture needs: a free port, the server's binary, a wait
until it answers, and a stop by its own process id."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["find_script", "free_port", "serve_app", "stop_process", "wait_http"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """An aiohttp `web.Application` of canned answers on a free port: its base URL. For
    answers a real server cannot be made to give on demand (a 429, a SlowDown)."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def locate_script(name: str) -> str | None:
    """A console script installed into this environment, else on PATH; None if absent."""
    for candidate in (
        Path(sysconfig.get_path("scripts")) / name,
        Path(sys.executable).parent / name,
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def find_script(name: str, install: str) -> str:
    """locate_script, or skip the test naming the install."""
    found = locate_script(name)
    if found:
        return found
    pytest.skip(f"{name} not found: {install}")


def wait_http(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0,
    ok_only: bool = False,
) -> None:
    """Until the server answers HTTP at `url` (any status, or only 2xx with `ok_only`)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode} before answering: "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with opener.open(url, timeout=2):
                return
        except urllib.error.HTTPError:
            if not ok_only:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(
        f"server at {url} did not answer within {timeout}s: "
        f"{log.read_text(errors='replace')[-2000:]}"
    )


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, group: bool = False
) -> None:
    """Stop our own child (its whole session with `group`), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        if group and proc is not None:  # workers left behind after the parent exited
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        return
    send = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        send(proc.pid, sig)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            send(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
