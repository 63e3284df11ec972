"""The `wandb` tracker in offline mode: the run files W&B writes, read back.

Offline runs keep everything in `run-<id>.wandb`, W&B's transaction log (LevelDB log
framing of `wandb_internal_pb2.Record` protobufs); W&B >= 0.19 ships no Python reader
for it and writes no summary or history JSON offline, so `wandb_records` below parses
the framing and decodes the records with W&B's own protobuf classes.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("wandb")

from wandb.proto import wandb_internal_pb2

from router.config import ComponentConfig
from router.manifest import ArtifactKind
from sinks.registry import check_component, create_sink
from sinks.trackers.wandb import (
    STEP_METRIC,
    WandbTracker,
    WandbTrackerSettings,
    wandb_run_id,
)
from tests.servers_mlflow import make_item

Record: Any = wandb_internal_pb2.Record  # type: ignore[attr-defined]
_BLOCK = 32 * 1024
_HEADER = 7  # crc32c (4), length (2), type (1); the file starts with a 7-byte ":W&B" header
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # block trailer padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            continue
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(pending)
            yield record


def history_rows(root: Path, run_id: str) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(root.glob(f"wandb/*/run-{run_id}.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def run_config(root: Path, run_id: str) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for path in sorted(root.glob(f"wandb/*/run-{run_id}.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            updates = (
                record.run.config.update
                if kind == "run"
                else record.config.update
                if kind == "config"
                else []
            )
            for item in updates:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    config[key] = json.loads(item.value_json)
    return config


def _children_named(word: str) -> list[int]:
    """Live processes started by this test process whose command line holds `word`."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and word in cmdline and " Z " not in stat:
            found.append(int(entry.name))
    return found


@pytest.fixture
def network_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, list]]:
    """Catch network use from this process: name lookups of any non-loopback host are
    recorded and refused, and W&B's base_url points at a listener nobody may connect to.
    (W&B's Go service is another process; an strace of it showed no connect() either.)
    """
    lookups: list = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in (None, "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"):
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "network use in an offline test")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield listener, lookups
    listener.close()


def _items() -> list:
    return [
        make_item(
            key="ev-1/0/track/prod.wandb",
            values={"accuracy": 0.91, "loss": 0.4},
            step=3,
            received_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
        make_item(
            key="ev-1/1/track/prod.wandb",
            kind=ArtifactKind.PARAMETERS,
            name="hparams",
            values={"lr": 0.001, "optimizer": "adam"},
            received_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
        make_item(
            key="ev-2/0/track/prod.wandb",
            step_name="evaluate",
            values={"accuracy": 0.95},
            step=1,  # earlier than step 3: W&B's own step would drop it
            received_at=datetime(2026, 1, 2, 3, 6, 0, tzinfo=UTC),
        ),
    ]


async def test_offline_run_files_hold_the_metrics_once(
    tmp_path: Path, network_probe: tuple[socket.socket, list]
):
    listener, lookups = network_probe
    port = listener.getsockname()[1]
    settings = WandbTrackerSettings(
        dir=tmp_path, project="fraud", base_url=f"http://127.0.0.1:{port}"
    )
    assert settings.effective_mode == "offline"
    sink = WandbTracker("prod.wandb", settings)
    items = _items()
    try:
        results = [await sink.deliver(item) for item in items]
        replays = [await sink.deliver(item) for item in items]
    finally:
        await sink.close()
    assert not any(r.skipped for r in results)
    assert all(r.skipped for r in replays)

    # Crash after W&B finished and the files moved, before the sidecar write.
    sidecar = sink.sidecar("fraud_training", "run-1")
    sidecar.write_text("")
    restarted = WandbTracker("prod.wandb", settings)
    try:
        again = await restarted.deliver(items[0])
    finally:
        await restarted.close()
    assert again.skipped

    run = wandb_run_id("fraud_training", "run-1")
    assert results[0].details["wandb_run_id"] == run
    rows = history_rows(tmp_path, run)
    points = sorted(
        (row[STEP_METRIC], key, value)
        for row in rows
        for key, value in row.items()
        if not key.startswith("_") and key != STEP_METRIC
    )
    assert points == [(1, "accuracy", 0.95), (3, "accuracy", 0.91), (3, "loss", 0.4)]
    assert run_config(tmp_path, run) == {"train.lr": 0.001, "train.optimizer": "adam"}
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run}-*"))) == len(items)
    assert not (tmp_path / ".router-staging").exists() or not any(
        (tmp_path / ".router-staging").iterdir()
    )

    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected: offline stayed offline
    assert lookups == []
    # W&B's analytics export on their own thread and at exit, out of this test's
    # reach: check that offline mode left them switched off (0.2x+ internals).
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
    except ImportError:  # moved in a later W&B: the strace check is the fallback
        return
    assert getattr(opentelemetry_proxy, "_singleton_telemetry_proxy", None) is None
    assert _children_named("wandb") == []  # finish() and teardown left no service behind


async def test_metrics_named_like_reserved_keys_are_kept_under_their_own_names(
    tmp_path: Path, network_probe: tuple[socket.socket, list]
):
    """`_step`, `_runtime` (W&B's) and `router/step` (the x axis) as metric names were
    overwritten without a word: they are logged as `metrics/<name>`, the step intact."""
    sink = WandbTracker("prod.wandb", WandbTrackerSettings(dir=tmp_path, project="fraud"))
    item = make_item(key="ev-1/0/track/prod.wandb", step=3,
                     values={"_step": 7.0, "_runtime": 5.0, STEP_METRIC: 99.0, "acc": 0.5})
    try:
        assert not (await sink.deliver(item)).skipped
    finally:
        await sink.close()
    [row] = history_rows(tmp_path, wandb_run_id("fraud_training", "run-1"))
    assert row[STEP_METRIC] == 3 and row["acc"] == 0.5
    assert {k: row[k] for k in row if k.startswith("metrics/")} == {
        "metrics/_step": 7.0, "metrics/_runtime": 5.0, f"metrics/{STEP_METRIC}": 99.0}


def test_settings_and_component_type(tmp_path: Path):
    online = WandbTrackerSettings(dir=tmp_path, api_key="wandb-secret-key")
    assert online.effective_mode == "online"
    assert "wandb-secret-key" not in repr(online)
    component = ComponentConfig.model_validate(
        {"type": "wandb", "dir": str(tmp_path), "project": "p", "mode": "offline"}
    )
    assert check_component("experiment_tracker", "stacks.x.experiment_tracker", component) == []
    assert isinstance(create_sink("x.experiment_tracker", component), WandbTracker)
    bad = ComponentConfig.model_validate({"type": "wandb", "dir": str(tmp_path), "mode": "cloud"})
    assert check_component("experiment_tracker", "stacks.x.experiment_tracker", bad)


def _exit_codes(run_dir: Path) -> list[int]:
    return [record.exit.exit_code for path in run_dir.glob("run-*.wandb")
            for record in wandb_records(path) if record.WhichOneof("record_type") == "exit"]


@pytest.mark.parametrize(("status", "code"), [("finished", 0), ("failed", 1), ("killed", 1)])
async def test_a_run_status_finishes_the_run_with_its_exit_code_and_logs_nothing(
    tmp_path: Path, network_probe: tuple[socket.socket, list], status: str, code: int
):
    from router.delivery import Action

    sink = WandbTracker("prod.wandb", WandbTrackerSettings(dir=tmp_path, project="fraud"))
    end = make_item(key="ev-9/0/end_run/prod.wandb", action=Action.END_RUN, step=9,
                    values={"accuracy": 0.5}, run_status=status)
    # A point of an earlier step that arrives after the end (a retry), in a later
    # process: it must not make a failed run look finished (W&B shows the last code).
    late = make_item(key="ev-4/0/track/prod.wandb", step=4, values={"accuracy": 0.4})
    try:
        result = await sink.deliver(end)
        replay = await sink.deliver(end)
    finally:
        await sink.close()
    restarted = WandbTracker("prod.wandb", WandbTrackerSettings(dir=tmp_path, project="fraud"))
    try:
        await restarted.deliver(late)
    finally:
        await restarted.close()
    assert not result.skipped and replay.skipped
    assert _exit_codes(sink.run_files(end)) == [code]
    assert _exit_codes(restarted.run_files(late)) == [code]
    assert [r["accuracy"] for r in
            history_rows(tmp_path, wandb_run_id("fraud_training", "run-1"))] == [0.4]
