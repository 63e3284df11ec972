"""A real `moto_server` (PyPI moto[server]) for the SageMaker sink tests (DESIGN section 8).

The server gets a free port, is waited for until it answers HTTP, and is stopped by
its own process id. moto keeps everything in memory, so tests use unique names
(one session-wide server serves them all) and may also start a private one, e.g.
with IAM authentication switched on (`INITIAL_NO_AUTH_ACTION_COUNT`).

Known limitation, asserted by the tests rather than hidden: moto 5 does not
implement SageMaker's UpdateEndpoint and answers it with HTTP 500.
"""

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["AWS_ACCOUNT", "AWS_REGION", "MotoServer", "free_port", "moto_server"]

AWS_REGION = "us-east-1"
AWS_ACCOUNT = "123456789012"  # moto's default account id


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _moto_binary() -> str:
    for candidate in (
        Path(sysconfig.get_path("scripts")) / "moto_server",
        Path(sys.executable).parent / "moto_server",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("moto_server")
    if found:
        return found
    pytest.skip("moto_server not found: pip install 'moto[server]'")


class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` as a child process."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary = _moto_binary()
        self.port = free_port()
        self.log = workdir / f"moto-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self._botocore: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.proc.returncode}: "
                    f"{self.log.read_text()[-2000:]}"
                )
            try:
                with opener.open(self.url + "/moto-api/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {timeout}s")

    def stop(self) -> None:
        """Stop our own process by its pid."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def settings(self, **overrides: Any) -> dict[str, Any]:
        """Connection settings of a SageMaker (or S3) component pointing at this server."""
        values: dict[str, Any] = {
            "endpoint_url": self.url,
            "region": AWS_REGION,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "max_attempts": 1,
        }
        values.update(overrides)
        return values

    def client(self, service: str, **kwargs: Any) -> Any:
        """A synchronous botocore client on this server, for setup and assertions."""
        cache_key = (service, tuple(sorted(kwargs.items())))
        if cache_key in self._clients:
            return self._clients[cache_key]
        values: dict[str, Any] = {
            "region_name": AWS_REGION,
            "endpoint_url": self.url,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        values.update(kwargs)
        client = self._clients[cache_key] = self._session().create_client(service, **values)
        return client

    def _session(self) -> Any:
        import botocore.session

        if self._botocore is None:
            self._botocore = botocore.session.get_session()
        return self._botocore


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
