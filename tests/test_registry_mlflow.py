"""The `mlflow` model registry and the `mlflow_alias` deployer against a real server."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from router.config import ComponentConfig
from router.delivery import Action, DeliveryResult, StoredObject
from router.manifest import ArtifactKind
from sinks.base import PermanentError
from sinks.deployers.mlflow_alias import MlflowAliasDeployer, MlflowAliasSettings
from sinks.registries.mlflow import DELIVERY_KEY_TAG, MlflowSettings, MlflowSink
from sinks.registry import check_component, create_sink
from tests.servers_mlflow import MlflowServer, make_item, mlflow_server

__all__ = ["mlflow_server"]  # the fixture, imported for pytest


def _registry(server: MlflowServer) -> MlflowSink:
    return MlflowSink("prod.model_registry", MlflowSettings(tracking_uri=server.url))


def _deployer(server: MlflowServer) -> MlflowAliasDeployer:
    return MlflowAliasDeployer("prod.model_deployer", MlflowAliasSettings(tracking_uri=server.url))


def _stored(uri: str) -> DeliveryResult:
    return DeliveryResult(
        objects=[StoredObject(file_name="model.pkl", uri=uri, size=3, sha256="0" * 64)],
        uri=uri,
    )


def _register_item(model: str, pipeline: str, event: str, **overrides: Any):
    values: dict[str, Any] = {
        "key": f"{event}/0/register/prod.model_registry",
        "action": Action.REGISTER,
        "kind": ArtifactKind.MODEL,
        "name": model,
        "pipeline": pipeline,
        "step_name": "train",
        "version": "1.0.0",
        "framework": "sklearn",
        "metadata": {"metrics": {"accuracy": 0.97, "f1_score": 0.91}},
        "params": {"metadata": {"owner": "risk-team"}},
        "upstream": _stored(f"s3://models/{pipeline}/run-1/train/model/model.pkl"),
    }
    values.update(overrides)
    return make_item(**values)


def _versions(server: MlflowServer, model: str) -> list[dict[str, Any]]:
    found = server.api("GET", "model-versions/search", filter=f"name = '{model}'")
    return sorted(found.get("model_versions", []), key=lambda v: int(v["version"]))


async def test_register_replay_and_deploy(mlflow_server: MlflowServer):
    model = f"fraud_detector_{uuid.uuid4().hex[:8]}"
    pipeline = f"fraud-{uuid.uuid4().hex[:8]}"
    item = _register_item(model, pipeline, "ev-1")
    registry = _registry(mlflow_server)
    try:
        first = await registry.deliver(item)
        again = await registry.deliver(item)
    finally:
        await registry.close()
    # A daemon killed after MLflow created the version, before the journal noted it.
    restarted = _registry(mlflow_server)
    try:
        after_restart = await restarted.deliver(item)
    finally:
        await restarted.close()

    assert first.details == {
        "registered_model": model,
        "model_version": "1",
        "source": f"s3://models/{pipeline}/run-1/train/model/model.pkl",
        "mlflow_run_id": first.details["mlflow_run_id"],
    }
    assert first.uri == f"models:/{model}/1"
    assert not first.skipped
    assert again.skipped and after_restart.skipped
    assert again.uri == after_restart.uri == first.uri

    [version] = _versions(mlflow_server, model)
    assert version["source"] == f"s3://models/{pipeline}/run-1/train/model/model.pkl"
    assert version["status"] == "READY"
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags[DELIVERY_KEY_TAG] == item.key
    assert tags["version"] == "1.0.0"
    assert tags["framework"] == "sklearn"
    assert float(tags["metric.accuracy"]) == 0.97
    assert float(tags["metric.f1_score"]) == 0.91
    assert tags["owner"] == "risk-team"

    # The version points at the MLflow run of (pipeline, run_id): the tracker's run.
    experiment = mlflow_server.api("GET", "experiments/get-by-name", experiment_name=pipeline)
    runs = mlflow_server.api(
        "POST",
        "runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": "tags.`router.run_id` = 'run-1'",
        },
    )["runs"]
    assert [r["info"]["run_id"] for r in runs] == [version["run_id"]]

    deployer = _deployer(mlflow_server)
    try:
        deploy = make_item(
            key="ev-1/0/deploy/prod.model_deployer",
            action=Action.DEPLOY,
            kind=ArtifactKind.MODEL,
            name=model,
            params={"endpoint_name": None},
            upstream=first,
        )
        deployed = await deployer.deliver(deploy)
        redeployed = await deployer.deliver(deploy)
        assert deployed.uri == f"models:/{model}@production"
        assert not deployed.skipped and redeployed.skipped
        alias = mlflow_server.api("GET", "registered-models/alias", name=model, alias="production")
        assert alias["model_version"]["version"] == "1"

        # A second event registers version 2; deploying it moves the alias.
        second = _registry(mlflow_server)
        try:
            v2 = await second.deliver(_register_item(model, pipeline, "ev-2"))
        finally:
            await second.close()
        assert v2.details["model_version"] == "2"
        moved = await deployer.deliver(
            make_item(
                key="ev-2/0/deploy/prod.model_deployer",
                action=Action.DEPLOY,
                kind=ArtifactKind.MODEL,
                name=model,
                upstream=v2,
            )
        )
        assert moved.details["previous_version"] == "1"
        alias = mlflow_server.api("GET", "registered-models/alias", name=model, alias="production")
        assert alias["model_version"]["version"] == "2"

        # A rule's endpoint_name is the alias.
        named = await deployer.deliver(
            make_item(
                key="ev-2/0/deploy/prod.model_deployer-b",
                action=Action.DEPLOY,
                kind=ArtifactKind.MODEL,
                name=model,
                params={"endpoint_name": "fraud-scoring"},
                upstream=v2,
            )
        )
        assert named.uri == f"models:/{model}@fraud-scoring"
        aliases = mlflow_server.api("GET", "model-versions/get", name=model, version="2")
        assert sorted(aliases["model_version"]["aliases"]) == ["fraud-scoring", "production"]
    finally:
        await deployer.close()
    assert len(_versions(mlflow_server, model)) == 2


async def test_register_without_a_stored_location_is_permanent(mlflow_server: MlflowServer):
    registry = _registry(mlflow_server)
    try:
        with pytest.raises(PermanentError, match="store the model"):
            await registry.deliver(_register_item("nowhere", "p-nowhere", "ev-x", upstream=None))
    finally:
        await registry.close()


async def test_local_source_outside_the_run_is_refused_with_a_hint(mlflow_server: MlflowServer):
    registry = _registry(mlflow_server)
    try:
        with pytest.raises(PermanentError, match="object store"):
            await registry.deliver(
                _register_item(
                    f"local_{uuid.uuid4().hex[:6]}",
                    "p-local",
                    "ev-local",
                    upstream=_stored("file:///srv/models/model.pkl"),
                )
            )
    finally:
        await registry.close()


async def test_deploy_needs_a_register_result(mlflow_server: MlflowServer):
    deployer = _deployer(mlflow_server)
    try:
        with pytest.raises(PermanentError, match="register: true"):
            await deployer.deliver(
                make_item(
                    key="ev/0/deploy/prod.model_deployer",
                    action=Action.DEPLOY,
                    kind=ArtifactKind.MODEL,
                    upstream=_stored("s3://models/x"),
                )
            )
    finally:
        await deployer.close()


async def test_component_types_are_registered(mlflow_server: MlflowServer):
    alias = ComponentConfig.model_validate(
        {"type": "mlflow_alias", "tracking_uri": mlflow_server.url, "alias": "champion"}
    )
    assert check_component("model_deployer", "stacks.prod.model_deployer", alias) == []
    sink = create_sink("prod.model_deployer", alias)
    assert isinstance(sink, MlflowAliasDeployer)
    assert await sink.health()
    await sink.close()
    registry = create_sink(
        "prod.model_registry",
        ComponentConfig.model_validate({"type": "mlflow", "tracking_uri": mlflow_server.url}),
    )
    assert isinstance(registry, MlflowSink)
    await registry.close()
