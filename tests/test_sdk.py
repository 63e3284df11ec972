"""The Python SDK (router.sdk) end to end: emit -> the real daemon -> store -> Flow/Run.

Every round trip goes through `artifact-router run` as a child process (conftest's
`start_daemon`), lands in the local store, and is read back through the catalog.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.linear_model import LogisticRegression

import router
from router import (
    DATA,
    MODEL,
    REPORT,
    Artifact,
    Dataset,
    Flow,
    Metrics,
    Model,
    Parameters,
    Report,
    Run,
    emit,
    step,
    use_stack,
)
from router.client import Client
from router.manifest import ManifestError
from router.sdk import UntrustedFileError, content_key, resolve_context, run_context
from tests.conftest import ROOT, DaemonProcess, Workspace, write_bundle
from tests.servers_mqtt import Broker, mqtt_broker, mqtt_broker_factory

__all__ = ["mqtt_broker", "mqtt_broker_factory"]  # fixtures used here

StartDaemon = Callable[..., DaemonProcess]


class Custom:
    """Not a DataFrame, array, estimator or JSON: only pickle (the fallback) takes it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ROUTER_RUN_ID", "ROUTER_STEP_NAME", "ROUTER_PIPELINE", "ROUTER_SPOOL",
                "ROUTER_URL", "ROUTER_TRANSPORT", "ROUTER_STACK", "FLOWYML_STACK",
                "AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID", "AIRFLOW_CTX_TASK_ID",
                "ARGO_WORKFLOW_NAME", "ARGO_TEMPLATE", "FLOWYML_UPLOAD_ALL_ARTIFACTS",
                "ROUTER_TRUST_PICKLE", "ROUTER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def client(workspace: Workspace) -> Iterator[Client]:
    """Opted in to pickle-based formats: these tests read back the SDK's own objects."""
    with Client(config=workspace.config_path, cache_dir=workspace.root / "cache",
                trust_pickle=True) as c:
        yield c


def manifest_of(bundle_or_event: Path) -> dict[str, Any]:
    return json.loads((bundle_or_event / "manifest.json").read_text())


def done_manifest(workspace: Workspace, event_id: str) -> dict[str, Any]:
    return manifest_of(workspace.spool / "done" / event_id)


# --- every type and format, through the daemon and back --------------------------------


def test_every_type_and_format_round_trips(
    workspace: Workspace, start_daemon: StartDaemon, client: Client, tmp_path: Path
) -> None:
    start_daemon(workspace)
    frame = pd.DataFrame({"amount": [12.5, 80.0, 3.2], "label": ["ok", "fraud", "ok"]},
                         index=[10, 11, 12])
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    clf = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), [0, 0, 1, 1])
    csv = tmp_path / "raw.csv"
    csv.write_text("a,b\n1,2\n")
    artifacts: list[Any] = [
        Dataset(frame, name="frame", upload=True),
        Dataset(array, name="array", upload=True),
        Dataset(csv, name="raw_csv", upload=True),
        Dataset(frame, name="frame_csv", file_name="frame.csv", upload=True),
        Model.create(data=clf, name="clf", version="1.0.0", upload=True,
                     serving_config={"replicas": 2}, input_schema={"x": "float"},
                     metadata={"metrics": {"accuracy": 0.97}}),
        Model(clf, name="clf_skops", serializer="skops", upload=True),
        Artifact(name="config", data={"lr": 0.01, "layers": [64, 32], "nested": {"a": None}},
                 upload=True),
        Artifact(name="blob", data=b"\x00\x01binary", upload=True),
        Artifact(name="custom", data=Custom({"k": (1, 2)}), upload=True),
        Report("<h1>Fraud report</h1>", name="summary", upload=True),
        Report("plain words", name="notes", upload=False),  # read from the spool bundle
        Metrics({"accuracy": 0.97}, f1=0.91).at_step(100).with_metadata(split="test"),
        Parameters(lr=0.01, layers=[64, 32], optimizer="adam"),
    ]
    polars = importlib.import_module("polars") if importlib.util.find_spec("polars") else None
    if polars is not None:
        artifacts.append(Dataset(polars.DataFrame({"x": [1, 2, 3]}), name="polars_frame",
                                 upload=True))
    emission = emit(*artifacts, pipeline="types", run_id="run-1", step_name="make",
                    spool=workspace.spool)
    status = workspace.wait_settled(1)
    assert status["events"] == {"done": 1}, status

    # The manifest records the serializer chosen for each object.
    by_name = {a["name"]: a for a in done_manifest(workspace, emission.event_id)["artifacts"]}
    expected = {
        "frame": "parquet", "array": "npy", "raw_csv": "file", "frame_csv": "csv",
        "clf": "joblib", "clf_skops": "skops", "config": "json", "blob": "bytes",
        "custom": "pickle", "summary": "text", "notes": "text",
    }
    for name, serializer in expected.items():
        assert by_name[name]["metadata"]["router.serializer"] == serializer, name
    assert by_name["clf"]["framework"] == "sklearn"
    assert by_name["clf"]["serving_config"] == {"replicas": 2}
    assert by_name["frame"]["format"] == "parquet"
    assert by_name["frame"]["schema"] == {"amount": "float64", "label": str(frame.dtypes.iloc[1])}
    assert by_name["frame"]["statistics"] == {"num_rows": 3, "num_columns": 2}
    assert by_name["array"]["format"] == "numpy"
    assert by_name["metrics"]["step"] == 100

    run = Flow("types", client=client).latest_run
    assert run is not None and run.id == "run-1"
    data = run["make"].data
    pd.testing.assert_frame_equal(data.frame, frame)
    np.testing.assert_array_equal(data.array, array)
    assert data.array.dtype == np.float32
    assert data.raw_csv.read_text() == "a,b\n1,2\n"  # a file comes back as its path
    pd.testing.assert_frame_equal(data.frame_csv, frame.reset_index(drop=True))
    for name in ("clf", "clf_skops"):
        assert data[name].predict(np.array([[0.0], [3.0]])).tolist() == [0, 1]
    assert data.config == {"lr": 0.01, "layers": [64, 32], "nested": {"a": None}}
    assert data.blob == b"\x00\x01binary"
    assert data.custom == Custom({"k": (1, 2)})
    assert data.summary == "<h1>Fraud report</h1>"
    assert data.notes == "plain words"
    assert data.metrics == {"accuracy": 0.97, "f1": 0.91}
    assert isinstance(data.metrics, Metrics) and data.metrics.step == 100
    assert data.metrics.metadata["split"] == "test"
    assert data.parameters == {"lr": 0.01, "layers": [64, 32], "optimizer": "adam"}
    if polars is not None:
        assert data.polars_frame.equals(polars.DataFrame({"x": [1, 2, 3]}))

    # Uploaded objects were read from the local store; the rest from the spool bundle.
    clf_art = run["make"]["clf"]
    assert clf_art.version == "1.0.0" and clf_art.type == "model"
    assert clf_art.uri is not None and clf_art.uri.startswith(f"file://{workspace.store}")
    assert clf_art.path().is_relative_to(workspace.store)
    assert len(clf_art.checksum or "") == 64
    assert run["make"]["notes"].locations == []
    assert run["make"]["notes"].path().is_relative_to(workspace.spool / "done")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is not installed (torch.save is used only where it is)")
def test_torch_round_trip(workspace: Workspace, start_daemon: StartDaemon,
                          client: Client) -> None:
    torch = pytest.importorskip("torch")
    start_daemon(workspace)
    net = torch.nn.Linear(3, 1)
    emit(Model(net, name="net", upload=True), pipeline="t", run_id="r", step_name="s",
         spool=workspace.spool)
    workspace.wait_settled(1)
    back = Run("t/r", client=client)["s"].data.net
    assert torch.equal(back.weight, net.weight)

    # Without opting in to pickle, tensors and state dicts still load (weights_only=True);
    # a whole module needs the full load, which can run code from the file.
    emit(Model(net.state_dict(), name="weights", serializer="torch", upload=True),
         pipeline="t", run_id="r2", step_name="s", spool=workspace.spool)
    workspace.wait_settled(2)
    with Client(config=workspace.config_path, cache_dir=workspace.root / "cache") as untrusted:
        assert torch.equal(Run("t/r2", client=untrusted)["s"].data.weights["weight"],
                           net.weight)
        with pytest.raises(UntrustedFileError, match="'torch'"):
            _ = Run("t/r", client=untrusted)["s"].data.net


# --- @step, the environment, lineage ----------------------------------------------------


def test_step_takes_run_and_step_from_the_environment_and_records_lineage(
    workspace: Workspace, start_daemon: StartDaemon, client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_daemon(workspace)
    monkeypatch.setenv("ROUTER_SPOOL", str(workspace.spool))
    monkeypatch.setenv("ROUTER_PIPELINE", "fraud_training")
    monkeypatch.setenv("ROUTER_RUN_ID", "run-42")

    @step
    def prep() -> Dataset:
        return Dataset(pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [0, 0, 1, 1]}),
                       name="train_data", upload=True)

    @step
    def train(data: Dataset) -> tuple[Model, Metrics]:
        frame = data.data
        clf = LogisticRegression().fit(frame[["x"]], frame["y"])
        return Model(clf, name="model", upload=True), Metrics(accuracy=1.0, name="train_metrics")

    monkeypatch.setenv("ROUTER_STEP_NAME", "evaluate_step")  # the environment wins

    @step
    def evaluate(model: Model) -> Metrics:
        return Metrics(accuracy=0.95, name="evaluation")

    monkeypatch.delenv("ROUTER_STEP_NAME")
    data = prep()
    model, _ = train(data)
    assert data.ref == "fraud_training/run-42/prep/train_data"
    assert model.ref == "fraud_training/run-42/train/model"
    monkeypatch.setenv("ROUTER_STEP_NAME", "evaluate_step")
    evaluate(model)
    workspace.wait_settled(3)

    run = Flow("fraud_training", client=client).latest_run
    assert run is not None and run.pathspec == "fraud_training/run-42"
    assert [s.name for s in run.steps()] == ["prep", "train", "evaluate_step"]
    trained = run["train"].data.model
    assert trained.predict(pd.DataFrame({"x": [0.5, 3.5]})).tolist() == [0, 1]
    model_art = run["train"]["model"]
    assert model_art.input_refs == ["fraud_training/run-42/prep/train_data"]
    assert [a.ref for a in model_art.inputs] == ["fraud_training/run-42/prep/train_data"]
    assert [a.ref for a in model_art.consumers] == ["fraud_training/run-42/evaluate_step/"
                                                    "evaluation"]
    data_art = run["prep"]["train_data"]
    assert {a.ref for a in data_art.consumers} == {
        "fraud_training/run-42/train/model", "fraud_training/run-42/train/train_metrics"
    }
    assert run.data.evaluation == {"accuracy": 0.95}


def test_orchestrator_variables_are_fallbacks() -> None:
    airflow = {"AIRFLOW_CTX_DAG_ID": "fraud_dag", "AIRFLOW_CTX_DAG_RUN_ID":
               "manual__2024-05-01T00:00:00+00:00", "AIRFLOW_CTX_TASK_ID": "train_task"}
    ctx = resolve_context(env=airflow, default_step="train")
    assert (ctx.pipeline, ctx.run_id, ctx.step_name) == (
        "fraud_dag", "manual__2024-05-01T00:00:00+00:00", "train_task")
    argo = {"ROUTER_PIPELINE": "fraud", "ARGO_WORKFLOW_NAME": "fraud-x7k2p",
            "ARGO_TEMPLATE": json.dumps({"name": "train-model", "container": {}})}
    ctx = resolve_context(env=argo, default_step="train")
    assert (ctx.pipeline, ctx.run_id, ctx.step_name) == ("fraud", "fraud-x7k2p", "train-model")
    ours = {**airflow, "ROUTER_PIPELINE": "p", "ROUTER_RUN_ID": "r", "ROUTER_STEP_NAME": "s"}
    ctx = resolve_context(env=ours, default_step="train")
    assert (ctx.pipeline, ctx.run_id, ctx.step_name) == ("p", "r", "s")
    ctx = resolve_context(env={"ROUTER_PIPELINE": "p"}, default_step="fn_name")
    assert ctx.step_name == "fn_name" and ctx.run_id.startswith("run-")
    assert resolve_context(env={"ROUTER_PIPELINE": "p"}, default_step="x").run_id == ctx.run_id
    with run_context(pipeline="ctx_p", run_id="ctx_r"):
        ctx = resolve_context(env=ours, default_step="x")
        assert (ctx.pipeline, ctx.run_id) == ("ctx_p", "ctx_r")
    with pytest.raises(ValueError, match="ROUTER_PIPELINE"):
        resolve_context(env={}, default_step="x")


# --- Domino-style named artifacts ------------------------------------------------------


def test_named_artifact_files_from_two_steps_are_one_catalog_entry(
    workspace: Workspace, start_daemon: StartDaemon, client: Client, tmp_path: Path
) -> None:
    start_daemon(workspace)
    my_model = Artifact(name="My Model", type=MODEL, upload=True)
    model_file = my_model.File(name="model.pkl")
    classes_file = my_model.File(name="classes", type="txt")
    reports = Artifact(name="TFL Reports", type=REPORT)
    pdf = reports.File(name="t_vscat.pdf")
    assert my_model.kind == "model" and Artifact(name="d", type=DATA).kind == "dataset"

    clf = LogisticRegression().fit(np.array([[0.0], [1.0]]), [0, 1])
    report_pdf = tmp_path / "in.pdf"
    report_pdf.write_bytes(b"%PDF-1.4 tiny")

    @step(pipeline="domino", run_id="r1", spool=workspace.spool)
    def train() -> model_file:  # type: ignore[valid-type]
        return clf  # the annotation names the declared file

    @step(pipeline="domino", run_id="r1", spool=workspace.spool)
    def label() -> tuple[classes_file, Any]:  # type: ignore[valid-type]
        return ["legit", "fraud"], pdf.from_path(report_pdf)

    train()
    label()
    workspace.wait_settled(2)

    run = Run("domino/r1", client=client)
    gathered = run.artifacts
    assert sorted(a.name for a in gathered) == ["My Model", "TFL Reports"]
    named = next(a for a in gathered if a.name == "My Model")
    assert named.steps == ["label", "train"] and sorted(named.files) == ["classes", "model.pkl"]
    files = run.data["My Model"]
    assert sorted(files) == ["classes", "model.pkl"]
    assert files["classes"] == ["legit", "fraud"]
    assert files["model.pkl"].predict(np.array([[1.0]])).tolist() == [1]
    assert run.data.My_Model["classes"] == ["legit", "fraud"]  # attribute spelling
    assert run.data["TFL Reports"]["t_vscat.pdf"].read_bytes() == b"%PDF-1.4 tiny"
    assert len(named.checksum or "") == 64 and named.checksum != named.row.checksum
    # One step's view holds only the files that step emitted.
    assert list(run["train"]["My Model"].files) == ["model.pkl"]
    assert list(run["label"].data["My Model"]) == ["classes"]
    stored = sorted(p.name for p in (workspace.store / "domino" / "r1").rglob("*") if p.is_file())
    assert stored == ["classes", "model.pkl"]


def test_the_same_file_name_twice_is_an_error_at_declaration_and_at_intake(
    workspace: Workspace, start_daemon: StartDaemon, client: Client
) -> None:
    art = Artifact(name="My Model", type=MODEL)
    art.File(name="model.pkl")
    with pytest.raises(ValueError) as exc:
        art.File(name="model.pkl", type="pkl")
    message = str(exc.value)
    assert "'model.pkl' is declared twice" in message
    assert "File(name='model.pkl')" in message and "File(name='model.pkl', type='pkl')" in message
    with pytest.raises(ValueError, match="has no extension"):
        art.File(name="classes")

    # Emitting one declared file twice never reaches the spool.
    slot = Artifact(name="x", type=DATA).File(name="a.json")
    with pytest.raises(ManifestError, match="appears twice"):
        emit(slot([1]), slot([2]), pipeline="p", run_id="r", step_name="s",
             spool=workspace.spool)
    assert not list((workspace.spool / "incoming").iterdir())

    # A bundle written by hand is rejected by the daemon, naming both entries.
    start_daemon(workspace)
    manifest = {
        "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
        "artifacts": [{"type": "MODEL", "name": "My Model", "files": [
            {"path": "a/model.pkl", "name": "model.pkl"},
            {"path": "b/other.pkl", "name": "model.pkl"},
        ]}],
    }
    write_bundle(workspace.spool, "dup", manifest,
                 {"a/model.pkl": b"one", "b/other.pkl": b"two"})
    workspace.wait_settled(1)
    error = json.loads((workspace.spool / "rejected" / "dup" / "error.json").read_text())
    text = json.dumps(error)
    assert "model.pkl" in text and "files[0]" in text and "files[1]" in text
    assert "a/model.pkl" in text and "b/other.pkl" in text


# --- stacks -------------------------------------------------------------------------------


def two_stack_workspace(workspace: Workspace) -> tuple[Path, Path]:
    """Stacks `local` (the workspace's store) and `archive` (a second local store)."""
    archive = workspace.root / "archive-store"
    config = yaml.safe_load(workspace.config_path.read_text())
    other = json.loads(json.dumps(config["stacks"]["local"]))
    other["artifact_store"] = {"type": "local", "path": str(archive)}
    config["stacks"]["archive"] = other
    workspace.config_path.write_text(yaml.safe_dump(config))
    return workspace.store, archive


def test_use_stack_nesting_routes_emitted_artifacts(
    workspace: Workspace, start_daemon: StartDaemon, client: Client
) -> None:
    local_store, archive_store = two_stack_workspace(workspace)
    start_daemon(workspace)
    common = {"pipeline": "stacks", "run_id": "r1", "spool": workspace.spool}

    def one(name: str) -> Any:
        return emit(Artifact(name=name, data={"n": name}, upload=True), step_name=name,
                    **common)

    outside = one("outside")
    with use_stack("archive"):
        outer = one("outer")
        with use_stack("local"):
            inner = one("inner")
        after_inner = one("after_inner")
    explicit = emit(Artifact(name="explicit", data=1, upload=True), step_name="explicit",
                    stack="archive", **common)

    @step(spool=workspace.spool, **{k: v for k, v in common.items() if k != "spool"})
    async def async_step() -> Artifact:
        await asyncio.sleep(0)
        return Artifact(name="async_step", data={"n": "async_step"}, upload=True)

    async def in_a_task() -> None:
        with use_stack("archive"):  # the stack follows the step into its emit thread
            await async_step()

    asyncio.run(in_a_task())
    assert router.current_stack() is None
    assert "stack" not in outside.manifest
    assert [e.manifest["stack"] for e in (outer, inner, after_inner, explicit)] == [
        "archive", "local", "archive", "archive"]
    workspace.wait_settled(6)

    def landed(root: Path) -> list[str]:
        return sorted(p.parent.parent.name for p in root.rglob("artifact.json"))

    assert landed(local_store) == ["inner", "outside"]
    assert landed(archive_store) == ["after_inner", "async_step", "explicit", "outer"]
    run = Run("stacks/r1", client=client)
    assert run.data.outer == {"n": "outer"}  # read back from the archive stack's store
    assert run["outer"]["outer"].path().is_relative_to(archive_store)


# --- caching ------------------------------------------------------------------------------


def test_cached_returns_an_earlier_runs_artifacts_for_the_same_key(
    workspace: Workspace, start_daemon: StartDaemon, client: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_daemon(workspace)
    monkeypatch.setenv("ROUTER_SPOOL", str(workspace.spool))
    monkeypatch.setenv("ROUTER_CONFIG", str(workspace.config_path))
    raw = pd.DataFrame({"a": [1, 2, 3]})
    calls: list[str] = []

    @step(pipeline="cache", cache_key=lambda frame: content_key(frame, {"scale": 2}))
    def features(frame: pd.DataFrame) -> Dataset:
        calls.append("ran")
        return Dataset(frame * 2, name="features", upload=True)

    key = content_key(raw, {"scale": 2})
    assert key == content_key(raw.copy(), {"scale": 2})
    assert key != content_key(raw, {"scale": 3})
    with run_context(run_id="run-1"):
        features(raw)
    workspace.wait_settled(1)

    hit = router.cached("cache", "features", key)  # through the default client
    assert hit is not None and hit.run_id == "run-1"
    pd.testing.assert_frame_equal(hit.data.features, raw * 2)
    assert hit["features"].metadata["router.cache_key"] == key
    assert router.cached("cache", "features", content_key(raw, {"scale": 3})) is None
    assert router.cached("cache", "other_step", key) is None

    # The step that finds a hit skips its work and carries the earlier artifact on.
    @step(pipeline="cache", run_id="run-2")
    def downstream(frame: pd.DataFrame) -> Dataset:
        found = router.cached("cache", "features", content_key(frame, {"scale": 2}))
        features_data = found.data.features if found else features(frame).data
        return Dataset(features_data + 1, name="plus_one", upload=True)

    downstream(raw)
    workspace.wait_settled(2)
    assert calls == ["ran"]
    run = Run("cache/run-2", client=client)
    pd.testing.assert_frame_equal(run.data.plus_one, raw * 2 + 1)


# --- the examples ---------------------------------------------------------------------------


def test_example_pipelines_in_python_and_bash(
    workspace: Workspace, start_daemon: StartDaemon, client: Client
) -> None:
    start_daemon(workspace)
    env = {**os.environ, "ROUTER_CONFIG": str(workspace.config_path), "ROUTER_RUN_ID": "py-1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    subprocess.run([sys.executable, str(ROOT / "examples" / "pipeline.py"), "--read"],
                   check=True, env=env, cwd=workspace.root, timeout=120, capture_output=True)
    subprocess.run(["bash", str(ROOT / "examples" / "pipeline.sh")], check=True,
                   env={**env, "ROUTER_RUN_ID": "sh-1"}, cwd=workspace.root, timeout=120,
                   capture_output=True)
    workspace.wait_settled(6)
    status = workspace.status()
    assert status["events"] == {"done": 6}, status

    flow = Flow("fraud_training", client=client)
    assert [r.id for r in flow.runs()] == ["sh-1", "py-1"]
    py = flow["py-1"]
    assert [s.name for s in py.steps()] == ["prep", "train", "evaluate"]
    assert set(py.data) >= {"train_data", "test_data", "fraud_detector", "hparams",
                            "evaluation"}
    assert py.data.evaluation["accuracy"] > 0.8
    model = py["train"]["fraud_detector"]
    assert model.framework == "sklearn" and model.uri is not None
    assert [a.name for a in model.inputs] == ["train_data"]
    assert {a.name for a in model.consumers} == {"evaluation"}

    sh = flow["sh-1"]
    assert [s.name for s in sh.steps()] == ["prep", "train", "evaluate"]
    assert sh.data.evaluation["accuracy"] > 0
    assert sh["train"]["fraud_detector"].input_refs == ["fraud_training/sh-1/prep/train_data"]
    assert sh["train"]["fraud_detector"].path().read_bytes().startswith(b"{")


# --- MQTT ---------------------------------------------------------------------------------


def test_emit_over_mqtt_when_configured(
    tmp_path: Path, mqtt_broker: Broker, start_daemon: StartDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    outbox = tmp_path / "ws" / "state" / "outbox"
    outbox.mkdir(parents=True)
    workspace = Workspace(tmp_path / "ws", mqtt=mqtt_broker.mqtt_settings(
        allowed_roots=[str(outbox)], inline_max_bytes=4096))
    monkeypatch.setenv("ROUTER_CONFIG", str(workspace.config_path))
    monkeypatch.setenv("ROUTER_TRANSPORT", "mqtt")
    daemon = start_daemon(workspace)
    # On a fresh broker a message published before the router's first subscription has
    # no subscriber and is dropped (publish_manifest raises): wait for the subscription.
    deadline = time.monotonic() + 30
    while '"event": "mqtt connected"' not in daemon.log():
        assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)

    big = np.random.default_rng(1).random(5000)  # 40 kB: travels as a file:// URI
    emission = emit(
        Dataset(big, name="big", upload=True),
        Artifact(name="small", data={"inline": True}, upload=True),
        Report("kept where it is", name="notes"),  # not uploaded: read where intake found it
        Metrics(accuracy=0.5, name="eval"),
        pipeline="mqtt_flow", run_id="r1", step_name="train",
    )
    assert emission.transport == "mqtt" and emission.bundle is None
    assert not (workspace.spool / "incoming").exists() or not list(
        (workspace.spool / "incoming").iterdir())
    status = workspace.wait_settled(1, timeout=60)
    assert status["events"] == {"done": 1}, status
    # The large file stays in the outbox (the router reads it at delivery time).
    assert [p.name for p in (outbox / emission.event_id).rglob("*.npy")] == ["data.npy"]

    with Client(config=workspace.config_path, cache_dir=tmp_path / "cache") as client:
        data = Run("mqtt_flow/r1", client=client)["train"].data
        np.testing.assert_array_equal(data.big, big)
        assert data.small == {"inline": True}
        assert data.notes == "kept where it is"
        assert data.eval == {"accuracy": 0.5}


def test_a_file_name_that_leaves_the_bundle_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """`file_name="../.."` or an absolute path once wrote the file there, then raised (or
    not at all): now emit raises naming file_name, and nothing is written anywhere."""
    spool = tmp_path / "spool"
    target = tmp_path / "elsewhere" / "abs.bin"
    target.parent.mkdir()
    for bad in ("../../../../escaped.bin", str(target), "..", "sub/model.bin"):
        with pytest.raises(ValueError, match=r"file_name=.*plain file name"):
            emit(Model(b"model bytes", name="m", file_name=bad),
                 pipeline="p", run_id="r", step_name="s", spool=spool)
    assert not (tmp_path / "escaped.bin").exists() and not target.exists()
    assert not list((spool / "incoming").iterdir())  # no bundle, no .tmp- left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "spool"]


def test_an_event_id_the_daemon_would_never_read_is_refused(tmp_path: Path) -> None:
    """DESIGN 2: names starting with '.' are never read, so emit(event_id=".x") was an
    event silently lost; an id with '/' named a folder elsewhere."""
    spool = tmp_path / "spool"
    for bad, reason in ((".x", "starts with '.'"), ("a/../../x", "must not contain '/'")):
        with pytest.raises(ValueError, match=f"event_id='{re.escape(bad)}'.*{reason}"):
            emit(Model(b"m", name="m"), pipeline="p", run_id="r", step_name="s",
                 spool=spool, event_id=bad)
    assert not (spool / "incoming").exists() or not list((spool / "incoming").iterdir())
    assert emit(Model(b"m", name="m"), pipeline="p", run_id="r", step_name="s", spool=spool,
                event_id="x.1").bundle == spool / "incoming" / "x.1"
