"""The read API (router.client: Flow, Run, merge_artifacts, cached) and the HTTP API
(router.http_api), against catalogs filled by the real daemon: SQLite and PostgreSQL,
the local store and S3 (rclone serve s3), direct and through ROUTER_URL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

import router
from router import Artifact, Dataset, Flow, Metrics, Model, Run, emit, merge_artifacts
from router.client import Client, NotFound
from router.config import load_config
from router.db import Database
from router.http_api import add_routes, local_store_roots
from router.sdk import UntrustedFileError
from tests.conftest import DaemonProcess, Workspace, free_port, model_manifest, write_bundle
from tests.servers_storage import GcsEmulator, RcloneS3, gcs_emulator, rclone_s3

__all__ = ["gcs_emulator", "rclone_s3"]  # fixtures used here

StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("ROUTER_RUN_ID", "ROUTER_STEP_NAME", "ROUTER_PIPELINE", "ROUTER_SPOOL",
                "ROUTER_URL", "ROUTER_CONFIG", "ROUTER_TRANSPORT", "ROUTER_STACK",
                "FLOWYML_STACK", "AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_DAG_RUN_ID",
                "AIRFLOW_CTX_TASK_ID", "ARGO_WORKFLOW_NAME", "ARGO_TEMPLATE",
                "FLOWYML_UPLOAD_ALL_ARTIFACTS", "ROUTER_TRUST_PICKLE", "ROUTER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


def client_for(workspace: Workspace, **kwargs: Any) -> Client:
    return Client(config=workspace.config_path, cache_dir=workspace.root / "cache", **kwargs)


def fitted(offset: float = 0.0) -> LogisticRegression:
    x = np.array([[0.0], [1.0], [2.0], [3.0]]) + offset
    return LogisticRegression().fit(x, [0, 0, 1, 1])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Flow, Run, artifacts ---------------------------------------------------------------


def test_flow_runs_artifacts_versions_and_not_found(
    workspace: Workspace, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_daemon(workspace)
    for run_id in ("run-a", "run-b"):
        emit(Model(fitted(), name="clf", upload=True, metadata={"owner": "risk"}),
             Metrics(accuracy=0.9 if run_id == "run-a" else 0.95, name="eval"),
             pipeline="fraud", run_id=run_id, step_name="train", spool=workspace.spool)
        workspace.wait_settled(1 if run_id == "run-a" else 2)
    monkeypatch.setenv("ROUTER_CONFIG", str(workspace.config_path))
    monkeypatch.setenv("ROUTER_TRUST_PICKLE", "1")  # our own joblib models: opt in
    monkeypatch.setenv("ROUTER_CACHE_DIR", str(workspace.root / "cache"))

    flow = Flow("fraud")  # the default client: ROUTER_CONFIG names the catalog
    assert [r.id for r in flow.runs()] == ["run-b", "run-a"]
    assert [r.id for r in flow] == ["run-b", "run-a"]
    latest = flow.latest_run
    assert latest is not None and latest.pathspec == "fraud/run-b"
    assert Run("fraud/run-a").data.eval == {"accuracy": 0.9}
    assert latest.data.eval == {"accuracy": 0.95}
    assert "train" in latest and "nope" not in latest

    art = latest["train"]["clf"]
    assert art.pathspec == "fraud/run-b/train/clf" and art.type == "model"
    assert art.version == "2" and [v.version for v in art.versions()] == ["2", "1"]
    assert [v.run_id for v in art.versions()] == ["run-b", "run-a"]
    assert art.metadata["owner"] == "risk" and art.metadata["router.serializer"] == "joblib"
    assert art.framework == "sklearn"
    (location,) = art.locations
    assert location.sink_id == "local.artifact_store" and location.action == "store"
    stored = Path(location.uri.removeprefix("file://"))
    assert stored.is_relative_to(workspace.store) and stored.name == "model.joblib"
    assert art.checksum == location.sha256 == sha256(stored)
    assert art.size == stored.stat().st_size
    assert art.data.predict(np.array([[3.0]])).tolist() == [1]
    assert [a.name for a in latest.artifacts] == ["clf", "eval"]
    assert sorted(latest.data) == ["clf", "eval"]

    with pytest.raises(NotFound, match="no run 'fraud/run-zz'"):
        Run("fraud/run-zz")
    with pytest.raises(NotFound, match="has no step 'nope'; it has train"):
        latest["nope"]
    with pytest.raises(NotFound, match="has no artifact 'x'"):
        latest["train"]["x"]
    with pytest.raises(AttributeError, match="no artifact 'x'"):
        _ = latest.data.x
    with pytest.raises(ValueError, match="pipeline/run_id"):
        Run("fraud")
    assert Flow("no-such-pipeline").latest_run is None


def test_merge_artifacts_gathers_three_parallel_branches(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    start_daemon(workspace)
    branches = {"branch_a": 0.0, "branch_b": 1.0, "branch_c": 2.0}
    for name, offset in branches.items():
        emit(Model(fitted(offset), name="model", upload=True),
             Metrics(score=offset / 10, name="score"),
             Artifact(name=f"only_{name}", data=name, upload=True),
             pipeline="join", run_id="r1", step_name=name, spool=workspace.spool)
    emit(Dataset(np.zeros(3), name="shared", upload=True), pipeline="join", run_id="r1",
         step_name="start", spool=workspace.spool)
    workspace.wait_settled(4)

    with client_for(workspace, trust_pickle=True) as client:
        run = Run("join/r1", client=client)
        inputs = [run[name] for name in branches]
        merged = merge_artifacts(inputs)
        assert merged.keys() == ["model", "score", "only_branch_a", "only_branch_b",
                                 "only_branch_c"]
        assert merged.score == [{"score": 0.0}, {"score": 0.1}, {"score": 0.2}]
        assert len(merged.model) == 3
        predictions = [m.predict(np.array([[1.6]])).tolist() for m in merged.model]
        assert predictions == [[1], [0], [0]]  # each branch's own model, in branch order
        assert merged["only_branch_b"] == ["branch_b"]
        only_scores = merge_artifacts(inputs, include=["score"])
        assert only_scores.keys() == ["score"]
        assert "model" not in merge_artifacts(inputs, exclude=["model"])
        with pytest.raises(NotFound, match="missing_name"):
            merge_artifacts(inputs, include=["missing_name"])
        # One run's data merges with others' too (Runs and DataArtifacts are branches).
        assert merge_artifacts([run["start"]["shared"], run["start"]]).shared[0].tolist() == [
            0.0, 0.0, 0.0]


def test_the_client_works_inside_a_running_event_loop(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    start_daemon(workspace)
    emit(Artifact(name="config", data={"a": 1}, upload=True), pipeline="loop", run_id="r",
         step_name="s", spool=workspace.spool)
    workspace.wait_settled(1)

    async def inside() -> Any:
        with client_for(workspace) as client:  # sync API, called from a coroutine
            return Flow("loop", client=client).latest_run["s"].data.config  # type: ignore[index]

    assert asyncio.run(inside()) == {"a": 1}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_catalog_queries_on_sqlite_and_postgresql(
    backend: str, tmp_path: Path, start_daemon: StartDaemon, request: pytest.FixtureRequest
) -> None:
    url = (request.getfixturevalue("pg_url") if backend == "postgresql"
           else f"sqlite+aiosqlite:///{tmp_path / 'state' / 'router.db'}")
    workspace = Workspace(tmp_path, journal_url=url)
    start_daemon(workspace)
    prep = emit(Dataset(np.arange(4), name="features", upload=True), pipeline="pg",
                run_id="r1", step_name="prep", spool=workspace.spool, cache_key="key-1")
    emit(Model(fitted(), name="clf", upload=True), pipeline="pg", run_id="r1",
         step_name="train", inputs=[prep.refs[0]], spool=workspace.spool)
    emit(Dataset(np.arange(4) * 2, name="features", upload=True), pipeline="pg",
         run_id="r2", step_name="prep", spool=workspace.spool, cache_key="key-2")
    emit(Metrics({"auc": 0.5}, name="eval"), pipeline="pg", run_id="r1", step_name="eval",
         spool=workspace.spool, run_status="FAILED")  # the run's last step says it ended
    workspace.wait_settled(4)
    with client_for(workspace) as client:
        ended, still_open = Run("pg/r1", client=client), Run("pg/r2", client=client)
        assert (ended.status, ended.finished, ended.successful) == ("failed", True, False)
        assert ended.finished_at is not None and ended.finished_at >= ended.created_at
        assert (still_open.status, still_open.finished, still_open.finished_at) == (
            None, False, None)
        # and the tracker was told, once: a run_end line beside the step's metrics
        lines = [json.loads(line) for line in
                 (workspace.tracking / "pg" / "r1.jsonl").read_text().splitlines()]
        assert sorted((row["kind"], row.get("status")) for row in lines) == [
            ("metrics", None), ("run_end", "failed")]
        hit = router.cached("pg", "prep", "key-1", client=client)
        assert hit is not None and hit.run_id == "r1"
        assert hit.data.features.tolist() == [0, 1, 2, 3]
        assert router.cached("pg", "prep", "key-2", client=client).run_id == "r2"  # type: ignore[union-attr]
        assert router.cached("pg", "prep", "key-3", client=client) is None
        features = Run("pg/r1", client=client)["prep"]["features"]
        assert [c.pathspec for c in features.consumers] == ["pg/r1/train/clf"]
        assert [i.pathspec for i in features.consumers[0].inputs] == ["pg/r1/prep/features"]


# --- the HTTP API -----------------------------------------------------------------------


class ApiServer:
    """`add_routes` on an aiohttp app of our own, in a thread with its own loop."""

    def __init__(self, database_url: str, spool: Path,
                 store_roots: list[Path] | None = None) -> None:
        self._store_roots = store_roots
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._database_url, self._spool = database_url, spool
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(20), "the API server did not start"

    def _serve(self) -> None:
        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        db = Database(self._database_url)
        app = web.Application()
        roots = self._store_roots
        add_routes(app, db, spool=self._spool,
                   store_roots=None if roots is None else (lambda: roots))
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.run_until_complete(db.dispose())
        self._loop.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(20)


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def emit_lineage_run(workspace: Workspace) -> None:
    prep = emit(Dataset(np.arange(6), name="train data", upload=True),
                Artifact(name="notes", data="not uploaded: served from the spool"),
                pipeline="http", run_id="r1", step_name="prep", spool=workspace.spool)
    emit(Model(fitted(), name="clf", upload=True), inputs=[prep.refs[0]], pipeline="http",
         run_id="r1", step_name="train", spool=workspace.spool)
    workspace.wait_settled(2)


def check_read_path(api_url: str, workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"{api_url}/api/v1"
    status, body = get_json(f"{base}/runs?pipeline=http")
    assert status == 200 and [r["run_id"] for r in body["runs"]] == ["r1"]
    assert body["runs"][0]["artifacts"] == 3
    status, body = get_json(f"{base}/runs/http/r1")
    assert status == 200 and body["run"]["pipeline"] == "http"
    assert sorted(a["name"] for a in body["artifacts"]) == ["clf", "notes", "train data"]
    status, body = get_json(f"{base}/artifacts?pipeline=http&run_id=r1&name=clf")
    (clf,) = body["artifacts"]
    assert clf["locations"][0]["uri"].startswith("file://") and len(clf["checksum"]) == 64
    assert clf["inputs"] == ["http/r1/prep/train data"]
    status, body = get_json(f"{base}/artifacts/{clf['id']}/lineage")
    assert [a["name"] for a in body["inputs"]] == ["train data"] and body["consumers"] == []
    data_id = body["inputs"][0]["id"]
    status, body = get_json(f"{base}/artifacts/{data_id}/lineage")
    assert [a["name"] for a in body["consumers"]] == ["clf"]
    assert get_json(f"{base}/artifacts/999999")[0] == 404
    assert get_json(f"{base}/runs/http/nope") == (
        404, {"error": "no run 'nope' of pipeline 'http' in the catalog"})
    assert get_json(f"{base}/runs?limit=x")[0] == 400

    # The Python client through ROUTER_URL: the catalog over HTTP, files where they are.
    monkeypatch.setenv("ROUTER_URL", api_url)
    monkeypatch.setenv("ROUTER_CACHE_DIR", str(workspace.root / "http-cache"))
    monkeypatch.setenv("ROUTER_TRUST_PICKLE", "1")  # clf is our own joblib model
    run = Flow("http").latest_run
    assert run is not None and [s.name for s in run.steps()] == ["prep", "train"]
    assert run.data["train data"].tolist() == list(range(6))
    assert run.data.train_data.tolist() == list(range(6))
    assert run["train"].data.clf.predict(np.array([[3.0]])).tolist() == [1]
    clf_art = run["train"]["clf"]
    assert [a.name for a in clf_art.inputs] == ["train data"]
    assert [a.name for a in run["prep"]["train data"].consumers] == ["clf"]
    assert clf_art.versions()[0].version == clf_art.version
    # Not uploaded: no store location; the server sends the file from its spool.
    assert run.data.notes == "not uploaded: served from the spool"
    assert run["prep"]["notes"].path().is_relative_to(workspace.root / "http-cache")
    assert router.cached("http", "prep", "none") is None


def test_http_api_read_path_with_router_url(
    workspace: Workspace, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_daemon(workspace)
    emit_lineage_run(workspace)
    server = ApiServer(workspace.journal_url, workspace.spool)
    try:
        check_read_path(server.url, workspace, monkeypatch)
    finally:
        server.stop()


def test_http_api_served_by_the_daemon(
    tmp_path: Path, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = Workspace(tmp_path, listen=f"127.0.0.1:{free_port()}")
    start_daemon(workspace)
    url = f"http://{workspace.router['listen']}"
    emit_lineage_run(workspace)
    check_read_path(url, workspace, monkeypatch)


# --- files come back only as the catalog has them ---------------------------------------

SECRET = b"TOP SECRET: outside every root\n"


def get_bytes(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def file_url(base: str, artifact_id: int, name: str) -> str:
    return f"{base}/api/v1/artifacts/{artifact_id}/files/{urllib.parse.quote(name, safe='')}"


def test_http_file_endpoint_never_serves_a_file_outside_the_store(
    tmp_path: Path, start_daemon: StartDaemon
) -> None:
    """A file named '%2e%2e%2f...' (its file:// location once held it unencoded, and the
    endpoint decoded it to '../') and a stored file swapped for a symlink to a file
    outside the store: the endpoint sends the artifact's own bytes or 404, never the
    outside file."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    workspace = Workspace(tmp_path, listen=f"127.0.0.1:{free_port()}")
    start_daemon(workspace)
    evil = "%2e%2e%2f" * 5 + "secret.txt"  # <store>/fraud/run-1/train/evil/ is 5 below tmp_path
    manifest = model_manifest("evil")
    manifest["artifacts"][0]["files"] = [{"path": "model.pkl", "name": evil}]
    write_bundle(workspace.spool, "evil", manifest, {"model.pkl": b"evil model"})
    write_bundle(workspace.spool, "linked", model_manifest("linked"), {"model.pkl": b"linked"})
    assert workspace.wait_settled(2)["events"] == {"done": 2}
    base = f"http://{workspace.router['listen']}"
    listed = get_json(f"{base}/api/v1/artifacts?pipeline=fraud")[1]["artifacts"]
    rows = {a["name"]: a for a in listed}

    status, body = get_bytes(file_url(base, rows["evil"]["id"], evil))
    assert body != SECRET and (status, body) in ((200, b"evil model"), (404, body)), body

    stored = workspace.store / "fraud" / "run-1" / "train" / "linked" / "model.pkl"
    stored.unlink()
    stored.symlink_to(tmp_path / "secret.txt")
    # Also without the spool copy, which the endpoint would rightly fall back to.
    (workspace.spool / "done" / "linked" / "model.pkl").unlink()
    status, body = get_bytes(file_url(base, rows["linked"]["id"], "model.pkl"))
    assert (status, body != SECRET) == (404, True), body


def test_file_endpoint_serves_store_locations_only_under_the_store_roots(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    """`add_routes(store_roots=...)`: a file:// location outside every local store root
    is not served, however intact; inside one of the config's (local_store_roots) it is."""
    start_daemon(workspace)
    write_bundle(workspace.spool, "b1", model_manifest("m"), {"model.pkl": b"in the store"})
    assert workspace.wait_settled(1)["events"] == {"done": 1}
    elsewhere, nowhere = workspace.root / "elsewhere", workspace.root / "no-spool"
    elsewhere.mkdir()
    configured = local_store_roots(load_config(workspace.config_path).config)
    assert configured == [workspace.store.resolve()]
    for roots, expected in (([elsewhere], 404), (configured, 200)):
        server = ApiServer(workspace.journal_url, nowhere, store_roots=roots)
        try:
            (art,) = get_json(f"{server.url}/api/v1/artifacts?name=m")[1]["artifacts"]
            status, body = get_bytes(file_url(server.url, art["id"], "model.pkl"))
        finally:
            server.stop()
        assert status == expected, (roots, body)
        assert status == 404 or body == b"in the store"


def overwritten_versions(workspace: Workspace, start_daemon: StartDaemon) -> None:
    """Versions 1 and 2 of model m stored at one key (`on_conflict: overwrite`): the
    store's file holds version 2, version 1's catalog entry still points at it."""
    workspace.stack["artifact_routing"]["Model"] = {
        "store": "local", "path": "{pipeline}/latest/{name}", "on_conflict": "overwrite"}
    workspace.write()
    start_daemon(workspace)
    for run_id, data in (("r1", b"version one"), ("r2", b"version two")):
        write_bundle(workspace.spool, run_id, model_manifest("m", run_id=run_id,
                     version=run_id[1]), {"model.pkl": data})
        workspace.wait_settled(int(run_id[1]))
    assert workspace.status()["events"] == {"done": 2}


def test_an_overwritten_version_is_never_read_back_with_the_newer_bytes(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    """The local client and the HTTP endpoint check the file:// file against the
    catalog's sha256: version 1 comes from its spool bundle, or not at all (a checksum
    error), never with version 2's bytes."""
    overwritten_versions(workspace, start_daemon)
    server = ApiServer(workspace.journal_url, workspace.spool, store_roots=[workspace.store])
    try:
        with client_for(workspace) as client:
            (v1,) = [r for r in client.backend.artifacts(name="m") if r.version == "1"]
            assert client.local_file(v1, "model.pkl").read_bytes() == b"version one"
            assert get_bytes(file_url(server.url, v1.id, "model.pkl")) == (200, b"version one")
            # Without the spool copy: 404 from the server, a checksum error from the client.
            (workspace.spool / "done" / "r1" / "model.pkl").unlink()
            assert get_bytes(file_url(server.url, v1.id, "model.pkl"))[0] == 404
            with pytest.raises(FileNotFoundError, match="catalog says"):
                client.local_file(v1, "model.pkl")
    finally:
        server.stop()


def test_http_client_checks_fetched_files_and_catalog_checksums(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    """Files fetched over HTTP are checked against the catalog's sha256 before they are
    cached, and a `files[].sha256` that is not one never names a cache path.  The client
    is made a remote reader (its `read` finds no file:// path) and, as the reviewer's
    repro does, holds a catalog row whose checksum the served bytes do not match."""
    overwritten_versions(workspace, start_daemon)
    server = ApiServer(workspace.journal_url, workspace.spool)
    cache = workspace.root / "http-cache"
    try:
        with Client(url=server.url, cache_dir=cache) as client:
            client.read = lambda uri, **kw: (_ for _ in ()).throw(  # type: ignore[method-assign]
                FileNotFoundError(uri))
            (v1,) = [r for r in client.backend.artifacts(name="m") if r.version == "1"]
            v2_sha = hashlib.sha256(b"version two").hexdigest()
            stale = v1.model_copy(update={"files": [{**v1.files[0], "sha256": v2_sha}]})
            with pytest.raises(FileNotFoundError, match="catalog says"):
                client.local_file(stale, "model.pkl")
            assert not (cache / v2_sha / "model.pkl").exists()
            assert client.local_file(v1, "model.pkl").read_bytes() == b"version one"
            bad = v1.model_copy(update={"files": [{**v1.files[0], "sha256": "../escaped"}]})
            with pytest.raises(ValueError, match="64 lowercase hex"):
                client.local_file(bad, "model.pkl")
            assert not (workspace.root / "escaped").exists()
    finally:
        server.stop()


# --- what the reader trusts ----------------------------------------------------------------


class Payload:
    """Unpickling it creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_formats_that_run_code_load_only_when_the_reader_opts_in(
    workspace: Workspace, start_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest author (any bash emitter) set router.files metadata naming pickle for
    its file, and `.data` unpickled it: code from the spool ran in the reader."""
    start_daemon(workspace)
    marker = workspace.root / "code-ran"
    payload = pickle.dumps(Payload(marker))
    manifest = {"manifest_version": 1, "pipeline": "p", "run_id": "r1", "step_name": "bash",
                "artifacts": [{"type": "report", "name": "notes", "upload": True,
                               "files": [{"path": "notes.txt"}],
                               "metadata": {"router.files": {"notes.txt": {
                                   "serializer": "pickle"}}}}]}
    write_bundle(workspace.spool, "ev-1", manifest, {"notes.txt": payload})
    emit(Model(fitted(), name="clf", upload=True),
         Model(fitted(), name="clf_skops", serializer="skops", upload=True),
         Dataset(np.arange(3), name="arr", upload=True),
         pipeline="p", run_id="r1", step_name="sdk", spool=workspace.spool)
    workspace.wait_settled(2)

    with client_for(workspace) as client:
        run = Run("p/r1", client=client)
        with pytest.raises(UntrustedFileError) as exc:
            _ = run["bash"].data.notes
        assert isinstance(exc.value, PermissionError) and not marker.exists()
        message = str(exc.value)
        for part in ("file 'notes.txt' of artifact p/r1/bash/notes", "'pickle'",
                     "publish a manifest", "Client(trust_pickle=True)",
                     "ROUTER_TRUST_PICKLE=1", ".path()"):
            assert part in message, part
        assert run["bash"]["notes"].path().read_bytes() == payload  # load it yourself
        with pytest.raises(UntrustedFileError, match="'joblib'"):
            _ = run["sdk"].data.clf
        # Safe formats stay automatic: skops' default types cover sklearn, npy without pickle.
        assert run["sdk"].data.clf_skops.predict(np.array([[3.0]])).tolist() == [1]
        assert run["sdk"].data.arr.tolist() == [0, 1, 2]

        monkeypatch.setenv("ROUTER_TRUST_PICKLE", "1")  # read at load time
        assert Run("p/r1", client=client)["sdk"].data.clf.predict(
            np.array([[3.0]])).tolist() == [1]
        _ = Run("p/r1", client=client)["bash"].data.notes
        assert marker.exists()  # opting in trusts whoever wrote the spool
    with client_for(workspace, trust_pickle=False) as client, \
            pytest.raises(UntrustedFileError):  # the argument wins over the environment
        _ = Run("p/r1", client=client)["sdk"].data.clf
    with client_for(workspace, trust_pickle=True) as client:
        monkeypatch.delenv("ROUTER_TRUST_PICKLE")
        assert Run("p/r1", client=client)["sdk"].data.clf.predict(
            np.array([[0.0]])).tolist() == [0]


def test_a_cached_file_is_hashed_again_and_the_cache_dir_is_private(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    """The cache (by default /tmp/artifact-router-cache-<uid>, created 0755 unchecked)
    returned whatever file sat at <sha256>/<name>, whatever its content."""
    start_daemon(workspace)
    emit(Artifact(name="notes", data="from the spool"),  # not uploaded: read from the spool
         pipeline="p", run_id="r1", step_name="s", spool=workspace.spool)
    workspace.wait_settled(1)
    cache = workspace.root / "fresh" / "cache"
    with Client(config=workspace.config_path, cache_dir=cache) as client:
        notes = Run("p/r1", client=client)["s"]["notes"]
        assert notes.data == "from the spool"
        assert cache.stat().st_mode & 0o777 == 0o700  # created private
        entry = notes.row.files[0]
        planted = cache / entry["sha256"] / entry["name"]
        planted.parent.mkdir()
        planted.write_bytes(b"planted")
        assert Run("p/r1", client=client)["s"].data.notes == "from the spool"
        assert not planted.exists()

    shared = workspace.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    owners = [(shared, "mode 777")]
    if os.getuid() == 0:  # root can give a directory away, as another user's would be
        foreign = workspace.root / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, -1)
        owners.append((foreign, "owner uid 65534"))
    for directory, why in owners:
        with Client(config=workspace.config_path, cache_dir=directory) as client, \
                pytest.raises(PermissionError, match=f"cache dir .*{why}.*ROUTER_CACHE_DIR"):
            _ = Run("p/r1", client=client)["s"].data.notes


def test_foreign_files_that_do_not_parse_as_their_extension_come_back_as_paths(
    workspace: Workspace, start_daemon: StartDaemon
) -> None:
    """No serializer recorded: a latin-1 .txt raised UnicodeDecodeError and JSON lines in
    a .json JSONDecodeError, where the docstring promises the local Path."""
    start_daemon(workspace)
    files = {"train.log.txt": "café résumé\n".encode("latin-1"),
             "summary.json": b'{"step": 1}\n{"step": 2}\n',
             "plain.txt": "naïve\n".encode(), "config.json": b'{"a": 1}'}
    manifest = {"manifest_version": 1, "pipeline": "p", "run_id": "r1", "step_name": "s",
                "artifacts": [{"type": "report", "name": name.split(".")[0], "upload": True,
                               "files": [{"path": name}]} for name in files]}
    write_bundle(workspace.spool, "ev-1", manifest, files)
    workspace.wait_settled(1)
    with client_for(workspace) as client:
        data = Run("p/r1", client=client)["s"].data
        assert isinstance(data.train, Path) and data.train.read_bytes() == files["train.log.txt"]
        assert isinstance(data.summary, Path)
        assert data.summary.read_bytes() == files["summary.json"]
        assert data.plain == "naïve\n" and data.config == {"a": 1}  # these still parse


def test_merge_artifacts_refuses_a_string() -> None:
    """merge_artifacts(["branch_a"]) recursed into the string's characters forever."""
    for inputs in (["branch_a"], "branch_a"):
        with pytest.raises(TypeError, match=r"string 'b.*merge_artifacts\(\[run\['a'\]"):
            merge_artifacts(inputs)


# --- S3 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "gcs"])
def test_object_store_round_trip(
    store: str, tmp_path: Path, start_daemon: StartDaemon, request: pytest.FixtureRequest
) -> None:
    """Uploaded to `rclone serve s3` / gcp-storage-emulator, read back by the client with
    the store's own settings from the config, cached by checksum."""
    server: RcloneS3 | GcsEmulator = request.getfixturevalue(
        "rclone_s3" if store == "s3" else "gcs_emulator")
    workspace = Workspace(tmp_path)
    prefix = f"client-{tmp_path.name}"
    workspace.stack["artifact_store"] = {"type": store, **server.settings(prefix=prefix)}
    for rule in workspace.stack["artifact_routing"].values():
        if "store" in rule:
            rule["store"] = store
    workspace.write()
    start_daemon(workspace)
    matrix = np.arange(20, dtype=np.int64).reshape(4, 5)
    emit(Model(fitted(), name="clf", upload=True), Dataset(matrix, name="matrix", upload=True),
         pipeline="objflow", run_id="r1", step_name="train", spool=workspace.spool)
    status = workspace.wait_settled(1)
    assert status["events"] == {"done": 1}, status

    scheme = "s3" if store == "s3" else "gs"
    key = f"{prefix}/objflow/r1/train/clf/model.joblib"
    with client_for(workspace, trust_pickle=True) as client:
        step = Run("objflow/r1", client=client)["train"]
        clf = step["clf"]
        assert clf.uri == f"{scheme}://{server.bucket}/{key}"
        assert step.data.clf.predict(np.array([[3.0]])).tolist() == [1]
        assert step.data.matrix.tolist() == matrix.tolist()
        local = clf.path()
        assert local.is_relative_to(workspace.root / "cache") and sha256(local) == clf.checksum
        # A second read comes from the cache (keyed by checksum), not the server.
        fresh_client = client_for(workspace)
        try:
            again = Run("objflow/r1", client=fresh_client)["train"]["clf"]
            assert again.path() == local
        finally:
            fresh_client.close()
        assert client.read(clf.uri or "", sha256=clf.checksum) == local
        # A cached file is hashed again before use: other bytes are fetched anew.
        local.write_bytes(b"corrupt or planted")
        assert client.read(clf.uri or "", sha256=clf.checksum) == local
        assert sha256(local) == clf.checksum
        with pytest.raises(OSError, match="sha256"):
            client.read(clf.uri or "", sha256="0" * 64)
