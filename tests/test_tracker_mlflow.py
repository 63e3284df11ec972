"""The `mlflow` experiment tracker against a real `mlflow server` (sqlite backend)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from router.config import ComponentConfig
from router.delivery import Action
from router.manifest import ArtifactKind
from sinks.base import PermanentError, TransientError
from sinks.mlflow_rest import MlflowApiError, MlflowConnectionSettings, MlflowRest
from sinks.registries.mlflow import MlflowSettings, MlflowSink
from sinks.registry import check_component, create_sink
from sinks.trackers.mlflow import clear_run_cache, logged_tag
from tests.servers_common import serve_app
from tests.servers_mlflow import MlflowServer, free_port, make_item, mlflow_server

__all__ = ["mlflow_server"]  # the fixture, imported for pytest


def _sink(server: MlflowServer, **settings: Any) -> MlflowSink:
    return MlflowSink(
        "stack.experiment_tracker", MlflowSettings(tracking_uri=server.url, **settings)
    )


def _pipeline() -> str:
    return f"fraud-{uuid.uuid4().hex[:8]}"


def _runs(server: MlflowServer, experiment_id: str, run_id: str) -> list[dict[str, Any]]:
    found = server.api(
        "POST",
        "runs/search",
        {"experiment_ids": [experiment_id], "filter": f"tags.`router.run_id` = '{run_id}'"},
    )
    return list(found.get("runs", []))


def _run_info(server: MlflowServer, run: str) -> dict[str, Any]:
    info: dict[str, Any] = server.api("GET", "runs/get", run_id=run)["run"]["info"]
    return info


def _history(server: MlflowServer, run: str, key: str) -> list[tuple[int, float]]:
    got = server.api("GET", "metrics/get-history", run_id=run, metric_key=key)
    return sorted((int(m.get("step", 0)), float(m["value"])) for m in got.get("metrics", []))


async def test_experiment_run_reused_across_steps_and_restarts(mlflow_server: MlflowServer):
    pipeline = _pipeline()
    sink = _sink(mlflow_server, experiment_prefix="router-")
    try:
        train = make_item(
            key=f"ev-train/0/track/{pipeline}",
            pipeline=pipeline,
            step_name="train",
            values={"accuracy": 0.91, "loss": 0.3},
            step=5,
        )
        params = make_item(
            key=f"ev-train/1/track/{pipeline}",
            pipeline=pipeline,
            step_name="train",
            kind=ArtifactKind.PARAMETERS,
            name="hparams",
            values={"lr": 0.001, "layers": [64, 32], "optimizer": "adam"},
        )
        first = await sink.deliver(train)
        await sink.deliver(params)
    finally:
        await sink.close()

    # A new sink (a daemon restart: no cache) logs the next step to the same run.
    clear_run_cache()
    restarted = _sink(mlflow_server, experiment_prefix="router-")
    try:
        evaluate = make_item(
            key=f"ev-eval/0/track/{pipeline}",
            pipeline=pipeline,
            step_name="evaluate",
            values={"accuracy": 0.93},
            step=7,
        )
        model = make_item(
            key=f"ev-eval/1/track/{pipeline}",
            pipeline=pipeline,
            step_name="evaluate",
            kind=ArtifactKind.MODEL,
            name="fraud_detector",
            metadata={"metrics": {"f1_score": 0.88, "note": "not a number"}},
        )
        second = await restarted.deliver(evaluate)
        await restarted.deliver(model)
    finally:
        await restarted.close()

    experiment = mlflow_server.api(
        "GET", "experiments/get-by-name", experiment_name=f"router-{pipeline}"
    )["experiment"]
    runs = _runs(mlflow_server, experiment["experiment_id"], "run-1")
    assert len(runs) == 1
    run = runs[0]["info"]["run_id"]
    assert first.uri == second.uri == f"runs:/{run}"
    assert first.details["mlflow_run_id"] == run

    data = mlflow_server.api("GET", "runs/get", run_id=run)["run"]["data"]
    params_logged = {p["key"]: p["value"] for p in data["params"]}
    assert params_logged == {
        "train.lr": "0.001",
        "train.layers": "[64, 32]",
        "train.optimizer": "adam",
    }
    assert _history(mlflow_server, run, "accuracy") == [(5, 0.91), (7, 0.93)]
    assert _history(mlflow_server, run, "loss") == [(5, 0.3)]
    assert _history(mlflow_server, run, "f1_score") == [(0, 0.88)]
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["router.pipeline"] == pipeline
    assert tags[logged_tag(train.key)] == train.key


@pytest.mark.parametrize("status", ["finished", "failed", "killed"])
async def test_a_run_status_ends_the_mlflow_run_and_later_points_still_land(
    mlflow_server: MlflowServer, status: str
):
    """Without it every run the router made stayed RUNNING forever in MLflow's UI."""
    pipeline = _pipeline()
    ended = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    sink = _sink(mlflow_server)
    try:
        first = await sink.deliver(make_item(key=f"ev-1/0/track/{pipeline}", pipeline=pipeline,
                                             values={"auc": 0.8}, step=1))
        run = first.details["mlflow_run_id"]
        assert _run_info(mlflow_server, run)["status"] == "RUNNING"
        end = make_item(key=f"ev-2/0/end_run/{pipeline}", pipeline=pipeline,
                        action=Action.END_RUN, values={"auc": 0.9}, step=2,
                        received_at=ended, run_status=status)
        result = await sink.deliver(end)
        again = await sink.deliver(end)  # a replay sets the same again
        # A step whose points arrive after the last one's (out of order, retried).
        await sink.deliver(make_item(key=f"ev-3/0/track/{pipeline}", pipeline=pipeline,
                                     values={"auc": 0.85}, step=3))
    finally:
        await sink.close()
    info = _run_info(mlflow_server, run)
    assert info["status"] == status.upper()
    assert int(info["end_time"]) == int(ended.timestamp() * 1000)
    assert result.details["mlflow_run_id"] == run and not again.skipped
    # The END_RUN logs nothing of its own: only the two tracked points are there.
    assert _history(mlflow_server, run, "auc") == [(1, 0.8), (3, 0.85)]


async def test_a_run_first_made_by_a_late_delivery_starts_when_its_event_came(
    mlflow_server: MlflowServer,
):
    """A run whose first delivery is its ending step (or a retry hours later) started
    when the event came, not when the delivery ran: else it started after it ended."""
    pipeline = _pipeline()
    ended = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    sink = _sink(mlflow_server)
    try:
        result = await sink.deliver(make_item(
            key=f"ev-9/0/end_run/{pipeline}", pipeline=pipeline, action=Action.END_RUN,
            values={"auc": 0.9}, step=9, received_at=ended, run_status="finished"))
    finally:
        await sink.close()
    info = _run_info(mlflow_server, result.details["mlflow_run_id"])
    assert info["status"] == "FINISHED"
    assert int(info["start_time"]) <= int(info["end_time"]) == int(ended.timestamp() * 1000)


async def test_replay_logs_no_duplicate_points(mlflow_server: MlflowServer):
    pipeline = _pipeline()
    item = make_item(key=f"ev-1/0/track/{pipeline}", pipeline=pipeline, values={"auc": 0.8}, step=3)
    sink = _sink(mlflow_server)
    try:
        first = await sink.deliver(item)
        again = await sink.deliver(item)
    finally:
        await sink.close()
    clear_run_cache()
    replayed_sink = _sink(mlflow_server)
    try:
        after_restart = await replayed_sink.deliver(item)
    finally:
        await replayed_sink.close()
    assert not first.skipped
    assert again.skipped and after_restart.skipped
    run = first.details["mlflow_run_id"]
    assert _history(mlflow_server, run, "auc") == [(3, 0.8)]


async def test_crash_between_metrics_and_marker_is_replayed_without_duplicates(
    mlflow_server: MlflowServer,
):
    """1,500 metrics take two log-batch requests; the daemon dies after the first."""
    pipeline = _pipeline()
    values = {f"m{i:04d}": float(i) for i in range(1500)}
    item = make_item(key=f"ev-big/0/track/{pipeline}", pipeline=pipeline, values=values, step=2)

    class Killed(BaseException):
        pass

    crashing = _sink(mlflow_server)
    real_post = crashing.api.post
    posted: list[int] = []

    async def post_then_die(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        result = await real_post(endpoint, body)
        if endpoint == "runs/log-batch":
            posted.append(len(body["metrics"]))
            raise Killed  # the process is gone before the next request
        return result

    crashing.api.post = post_then_die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        await crashing.deliver(item)
    await crashing.close()
    assert posted == [999]  # first chunk in, marker (in the last chunk) not

    clear_run_cache()
    replay = _sink(mlflow_server)
    try:
        result = await replay.deliver(item)
    finally:
        await replay.close()
    assert not result.skipped
    assert result.details["metrics"] == 501
    run = result.details["mlflow_run_id"]
    for key in ("m0000", "m0998", "m0999", "m1499"):
        assert _history(mlflow_server, run, key) == [(2, values[key])]
    data = mlflow_server.api("GET", "runs/get", run_id=run)["run"]["data"]
    assert len(data["metrics"]) == 1500
    assert logged_tag(item.key) in {t["key"] for t in data["tags"]}


async def test_history_decides_when_the_latest_point_is_newer(mlflow_server: MlflowServer):
    """A crashed delivery's point hidden behind a later step is found in the history."""
    pipeline = _pipeline()
    early = make_item(key=f"ev-a/0/track/{pipeline}", pipeline=pipeline, values={"x": 1.0}, step=1)
    late = make_item(key=f"ev-b/0/track/{pipeline}", pipeline=pipeline, values={"x": 2.0}, step=9)
    sink = _sink(mlflow_server)
    try:
        first = await sink.deliver(early)
        await sink.deliver(late)
        run = first.details["mlflow_run_id"]
        # Forget that `early` was recorded, as if the marker had never been written.
        mlflow_server.api("POST", "runs/delete-tag", {"run_id": run, "key": logged_tag(early.key)})
        replayed = await sink.deliver(early)
    finally:
        await sink.close()
    assert replayed.details["metrics"] == 0
    assert _history(mlflow_server, run, "x") == [(1, 1.0), (9, 2.0)]


async def test_concurrent_sinks_for_a_new_run_share_one(
    mlflow_server: MlflowServer,
):
    pipeline = _pipeline()
    clear_run_cache()
    sinks = [_sink(mlflow_server) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                sink.deliver(
                    make_item(key=f"ev-{i}/0/track/{pipeline}", pipeline=pipeline, values={"a": i})
                )
                for i, sink in enumerate(sinks)
            )
        )
    finally:
        for sink in sinks:
            await sink.close()
    assert len({r.details["mlflow_run_id"] for r in results}) == 1
    experiment = mlflow_server.api("GET", "experiments/get-by-name", experiment_name=pipeline)
    assert len(_runs(mlflow_server, experiment["experiment"]["experiment_id"], "run-1")) == 1


async def test_param_with_the_same_value_is_success_and_a_new_value_is_permanent(
    mlflow_server: MlflowServer,
):
    pipeline = _pipeline()

    def params(event: str, lr: float):
        return make_item(
            key=f"{event}/0/track/{pipeline}",
            pipeline=pipeline,
            kind=ArtifactKind.PARAMETERS,
            name="hparams",
            values={"lr": lr},
        )

    sink = _sink(mlflow_server)
    try:
        await sink.deliver(params("ev-1", 0.1))
        same = await sink.deliver(params("ev-2", 0.1))
        assert not same.skipped and same.details["params"] == 0
        with pytest.raises(PermanentError, match=r"train\.lr.*'0\.1'.*'0\.2'"):
            await sink.deliver(params("ev-3", 0.2))
    finally:
        await sink.close()


async def test_existing_experiment_is_reused(mlflow_server: MlflowServer):
    pipeline = _pipeline()
    created = mlflow_server.api("POST", "experiments/create", {"name": pipeline})
    sink = _sink(mlflow_server)
    try:
        result = await sink.deliver(
            make_item(key=f"ev/0/track/{pipeline}", pipeline=pipeline, values={"a": 1.0})
        )
    finally:
        await sink.close()
    assert result.details["experiment_id"] == created["experiment_id"]


async def test_unreachable_server_is_transient():
    sink = MlflowSink(
        "stack.experiment_tracker",
        MlflowSettings(
            tracking_uri=f"http://router:pw-in-url@127.0.0.1:{free_port()}", request_timeout=5
        ),
    )
    try:
        with pytest.raises(TransientError, match=r"127\.0\.0\.1") as caught:
            await sink.deliver(make_item(key="ev/0/track/x", values={"a": 1.0}))
        assert "pw-in-url" not in str(caught.value)
        assert await sink.health() is False
    finally:
        await sink.close()


async def test_status_mapping_and_authentication():
    """The client's status mapping, against a plain aiohttp server (not MLflow): the real
    server cannot be made to answer 429 or 503 on demand."""
    answers = {
        "throttled": (429, {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}),
        "broken": (503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "db down"}),
        "denied": (403, {"error_code": "PERMISSION_DENIED", "message": "no"}),
    }

    async def handler(request: web.Request) -> web.Response:
        status, body = answers[request.match_info["name"]]
        return web.json_response(body, status=status)

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>a login page</html>", content_type="text/html")

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"auth": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_get("/echo/api/2.0/mlflow/experiments/search", echo)
    app.router.add_get("/{name}/api/2.0/mlflow/experiments/search", handler)
    app.router.add_get("/html/api/2.0/mlflow/experiments/search", html)
    async with serve_app(app) as base:
        for name, expected, pattern in (
            ("throttled", TransientError, "429"),
            ("broken", TransientError, "503: db down"),
            ("denied", MlflowApiError, "PERMISSION_DENIED: no .*token"),
            ("html", PermanentError, "not MLflow JSON"),
        ):
            client = MlflowRest(
                MlflowConnectionSettings(
                    tracking_uri=f"{base}/{name}", token="t0ken-value"
                )
            )
            try:
                with pytest.raises(expected, match=pattern) as caught:
                    await client.get("experiments/search", {"max_results": 1})
                assert "t0ken-value" not in str(caught.value)
            finally:
                await client.close()
        for settings, expected_auth in (
            ({"token": "tok"}, "Bearer tok"),
            ({"username": "u", "password": "p"}, "Basic dTpw"),
            ({"tracking_uri": f"{base}/echo".replace("//", "//u:p@")}, "Basic dTpw"),
            ({}, None),
        ):
            client = MlflowRest(
                MlflowConnectionSettings.model_validate(
                    {"tracking_uri": f"{base}/echo", **settings}
                )
            )
            try:
                answer = await client.get("experiments/search")
            finally:
                await client.close()
            assert answer == {"auth": expected_auth}


async def test_client_errors_are_permanent_with_mlflow_error_code(mlflow_server: MlflowServer):
    pipeline = _pipeline()
    sink = _sink(mlflow_server)
    try:
        with pytest.raises(PermanentError, match="INVALID_PARAMETER_VALUE"):
            await sink.deliver(
                make_item(
                    key=f"ev/0/track/{pipeline}",
                    pipeline=pipeline,
                    values={"bad\x01name": 1.0},
                )
            )
        assert await sink.health() is True
    finally:
        await sink.close()


async def test_secrets_never_show_and_the_type_fills_both_roles(mlflow_server: MlflowServer):
    settings = MlflowSettings(tracking_uri=mlflow_server.url, token="s3cret-token")
    assert "s3cret-token" not in repr(settings)
    assert "s3cret-token" not in str(settings.model_dump())
    component = ComponentConfig.model_validate(
        {"type": "mlflow", "tracking_uri": mlflow_server.url, "experiment_prefix": "x-"}
    )
    for role in ("experiment_tracker", "model_registry"):
        assert check_component(role, f"stacks.prod.{role}", component) == []
    assert check_component("model_deployer", "stacks.prod.model_deployer", component)
    bad = ComponentConfig.model_validate({"type": "mlflow", "tracking_uri": "file:///tmp/x"})
    [problem] = check_component("experiment_tracker", "stacks.prod.experiment_tracker", bad)
    assert problem.field.endswith("tracking_uri")
    sink = create_sink("prod.experiment_tracker", component)
    assert isinstance(sink, MlflowSink)
    await sink.close()
