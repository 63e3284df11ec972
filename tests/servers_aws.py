"""A real `moto_server` (PyPI moto[server]) for the SageMaker sink tests (DESIGN section 8).

The server gets a free port, is waited for until it answers HTTP, and is stopped by
its own process id. moto keeps everything in memory, so tests use unique names
(one session-wide server serves them all) and may also start a private one, e.g.
with IAM authentication switched on (`INITIAL_NO_AUTH_ACTION_COUNT`).

Known limitation, asserted by the tests rather than hidden: moto 5 does not
implement SageMaker's UpdateEndpoint and answers it with HTTP 500.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers_common import find_script, free_port, stop_process, wait_http

__all__ = ["AWS_ACCOUNT", "AWS_REGION", "MotoServer", "free_port", "moto_server"]

AWS_REGION = "us-east-1"
AWS_ACCOUNT = "123456789012"  # moto's default account id


class MotoServer:
    """`moto_server -H 127.0.0.1 -p PORT` as a child process."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary = find_script("moto_server", "pip install 'moto[server]'")
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
        try:
            wait_http(self.url + "/moto-api/", self.proc, self.log, timeout)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop our own process by its pid."""
        stop_process(self.proc)

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
