"""`vertex_model_registry` and `vertex_endpoint` against VertexRecordedContractFake.

No Vertex AI emulator exists, so these tests run against a FAKE: the recorded
contract of the documented REST calls in `tests/fake_vertex.py` (request fields
validated as the real API does, Google's error format, long-running operations
that finish after a few `operations.get` polls). They prove the sinks speak that
contract; they cannot prove what Google's servers accept beyond it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.config import ComponentConfig
from router.delivery import (
    Action,
    ArtifactView,
    DeliveryContext,
    DeliveryItem,
    DeliveryResult,
    StoredObject,
)
from router.manifest import ArtifactKind
from sinks.base import PermanentError, TransientError
from sinks.deployers.vertex import VertexEndpointDeployer, VertexEndpointSettings, endpoint_id
from sinks.gcp import SCOPE, VertexApiError
from sinks.registries.vertex import (
    KEY_LABEL,
    VertexModelRegistry,
    VertexRegistrySettings,
    key_label,
)
from sinks.registry import check_component, create_sink, sink_class
from tests.fake_vertex import CONTRACT, VertexRecordedContractFake

IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/sklearn-cpu.1-3:latest"
BUCKET = "gs://prod-ml-artifacts"


@pytest.fixture
async def vertex_fake() -> AsyncIterator[VertexRecordedContractFake]:
    fake = VertexRecordedContractFake(operation_polls=2)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def _settings(fake: VertexRecordedContractFake, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "project_id": fake.project,
        "location": fake.location,
        "api_endpoint": fake.url,
        "access_token": "test-token",
        "poll_interval": 0.01,
    }
    values.update(overrides)
    return values


def _registry(fake: VertexRecordedContractFake, **overrides: Any) -> VertexModelRegistry:
    overrides.setdefault("serving_container_image_uri", IMAGE)
    settings = VertexRegistrySettings.model_validate(_settings(fake, **overrides))
    return VertexModelRegistry("gcp.model_registry", settings)


def _deployer(fake: VertexRecordedContractFake, **overrides: Any) -> VertexEndpointDeployer:
    settings = VertexEndpointSettings.model_validate(_settings(fake, **overrides))
    return VertexEndpointDeployer("gcp.model_deployer", settings)


def _stored(name: str, event: str) -> DeliveryResult:
    uri = f"{BUCKET}/models/{name}/{event}/model.joblib"
    return DeliveryResult(
        objects=[StoredObject(file_name="model.joblib", uri=uri, size=3, sha256="0" * 64)],
        uri=uri,
    )


def _item(
    action: Action,
    name: str,
    event: str,
    *,
    params: dict[str, Any] | None = None,
    upstream: DeliveryResult | None = None,
) -> DeliveryItem:
    component = "model_registry" if action is Action.REGISTER else "model_deployer"
    return DeliveryItem(
        key=f"{event}/0/{action.value}/gcp.{component}",
        action=action,
        sink_id=f"gcp.{component}",
        context=DeliveryContext(
            event_id=event,
            pipeline="fraud",
            run_id=f"run-{event}",
            step_name="train",
            received_at=datetime.now(UTC),
        ),
        artifact=ArtifactView(
            index=0,
            kind=ArtifactKind.MODEL,
            name=name,
            version=event.removeprefix("ev-"),
            framework="sklearn",
            metadata={"metrics": {"accuracy": 0.97}},
        ),
        params=params if params is not None else {},
        upstream=upstream,
    )


def _register_item(name: str, event: str, **kwargs: Any) -> DeliveryItem:
    kwargs.setdefault("upstream", _stored(name, event))
    kwargs.setdefault("params", {"metadata": {"owner": "risk-team"}})
    return _item(Action.REGISTER, name, event, **kwargs)


async def _register(fake: VertexRecordedContractFake, item: DeliveryItem) -> DeliveryResult:
    registry = _registry(fake)
    try:
        return await registry.deliver(item)
    finally:
        await registry.close()


# -- the fake itself keeps to the recorded contract ----------------------------------------


async def test_the_fake_refuses_what_the_real_api_refuses(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    assert {c["call"] for c in CONTRACT} >= {
        "models.upload",
        "operations.get",
        "endpoints.create",
        "endpoints.list",
        "endpoints.deployModel",
    }
    parent = f"{vertex_fake.url}/v1/{vertex_fake.parent}"
    auth = {"Authorization": "Bearer test-token"}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{parent}/models:upload", json={"model": {"containerSpec": {}}}, headers=auth
        ) as resp:
            body = await resp.json()
            assert resp.status == 400
            assert body["error"]["status"] == "INVALID_ARGUMENT"
            assert "model.displayName" in body["error"]["message"]
        async with http.get(f"{parent}/endpoints", headers={"Authorization": "Bearer x"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["status"] == "UNAUTHENTICATED"
        async with http.get(f"{parent}/models/nope", headers=auth) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["status"] == "NOT_FOUND"
        body = {"displayName": "x"}
        for bad in ("1x", "x-", "Prod", "0123", "x" * 64):
            async with http.post(
                f"{parent}/endpoints", params={"endpointId": bad}, json=body, headers=auth
            ) as resp:
                assert resp.status == 400, bad
        statuses = []
        for _ in range(2):  # the same id twice: 409, even while the first is being made
            async with http.post(
                f"{parent}/endpoints", params={"endpointId": "x-1"}, json=body, headers=auth
            ) as resp:
                statuses.append(resp.status)
        assert statuses == [200, 409]
        async with http.get(f"{parent}/endpoints/x-1/operations", headers=auth) as resp:
            [operation] = (await resp.json())["operations"]
            assert operation["name"].startswith(f"{vertex_fake.parent}/endpoints/x-1/operations/")


# -- registry -----------------------------------------------------------------------------


async def test_upload_a_model_then_a_new_version_and_a_replay_uploads_nothing(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    vertex_fake.page_size = 1  # so the replay has to page through listVersions
    first_item = _register_item("fraud_detector", "ev-1")
    first = await _register(vertex_fake, first_item)
    model_name = f"{vertex_fake.parent}/models/fraud_detector"
    assert first.details == {
        "model_resource_name": model_name,
        "model_id": "fraud_detector",
        "version_id": "1",
        "artifact_uri": f"{BUCKET}/models/fraud_detector/ev-1",
    }
    assert first.uri == f"{model_name}@1" and not first.skipped
    [upload] = [c for c in vertex_fake.calls if c.call == "models.upload"]
    assert upload.body is not None
    assert upload.body["modelId"] == "fraud_detector" and "parentModel" not in upload.body
    assert vertex_fake.count("operations.get") >= 2  # the LRO was polled until done

    second = await _register(vertex_fake, _register_item("fraud_detector", "ev-2"))
    assert second.details["version_id"] == "2" and not second.skipped
    last_upload = [c for c in vertex_fake.calls if c.call == "models.upload"][-1]
    assert last_upload.body is not None
    assert last_upload.body["parentModel"] == model_name and "modelId" not in last_upload.body

    uploads = vertex_fake.count("models.upload")
    replayed = await _register(vertex_fake, first_item)  # a fresh sink: a restarted daemon
    assert replayed.skipped and replayed.uri == first.uri
    assert vertex_fake.count("models.upload") == uploads
    listing = [c for c in vertex_fake.calls if c.call == "models.listVersions"][-1]
    assert listing.query["filter"] == f'labels.{KEY_LABEL}="{key_label(first_item.key)}"'

    versions = vertex_fake.state.models["fraud_detector"]
    assert [v["versionId"] for v in versions] == ["1", "2"]
    v1 = versions[0]
    assert v1["artifactUri"] == f"{BUCKET}/models/fraud_detector/ev-1"
    assert v1["containerSpec"] == {"imageUri": IMAGE}
    assert v1["displayName"] == "fraud_detector"
    assert v1["labels"][KEY_LABEL] == key_label(first_item.key)
    assert v1["labels"]["router_pipeline"] == "fraud"
    assert "accuracy=0.97" in v1["versionDescription"]
    assert "owner=risk-team" in v1["versionDescription"]


async def test_an_operation_still_running_is_resumed_not_repeated(tmp_path: Path) -> None:
    fake = VertexRecordedContractFake(operation_polls=6)
    await fake.start()
    registry = _registry(fake, operation_timeout=0.03, poll_interval=0.02)
    item = _register_item("slow_model", "ev-1")
    try:
        result = None
        gave_up = 0
        for _ in range(10):
            try:
                result = await registry.deliver(item)
                break
            except TransientError as exc:
                gave_up += 1
                assert "still running" in str(exc)
                assert fake.count("models.upload") == 1  # never a second upload
        assert gave_up >= 1, "the operation should have outlived the first attempt"
        assert result is not None and result.details["version_id"] == "1"
        assert fake.count("models.upload") == 1
        assert len(fake.state.models["slow_model"]) == 1
    finally:
        await registry.close()
        await fake.stop()


@pytest.mark.parametrize(
    ("cut_off", "model_exists"),
    [("crash", True), ("crash", False), ("lost_answer", True)],
)
async def test_a_register_replay_waits_for_the_upload_it_lost_track_of(
    cut_off: str, model_exists: bool
) -> None:
    """The first attempt's upload keeps running on Vertex while the sink forgets it: a
    crash (the daemon gave up waiting, then died: a fresh sink replays) or a 503 after
    Vertex accepted the upload.  listVersions does not show a version being uploaded,
    so a replay that only looked there uploaded a second version for one key."""
    fake = VertexRecordedContractFake(operation_polls=1)
    await fake.start()
    try:
        if model_exists:
            await _register(fake, _register_item("fraud_detector", "ev-1"))
        item = _register_item("fraud_detector", "ev-2")
        uploads = fake.count("models.upload")
        fake.operation_polls = 1000  # a slow upload
        first = _registry(fake, operation_timeout=0.05)
        if cut_off == "crash":
            with pytest.raises(TransientError, match="still running"):
                await first.deliver(item)
            await first.close()  # the daemon dies, and what it remembered with it
            first = _registry(fake)
        else:
            fake.fail("models.upload", 503, after=True)
            with pytest.raises(TransientError, match="503"):
                await first.deliver(item)
        fake.advance_operations(3)  # Vertex goes on with the upload meanwhile
        fake.operation_polls = 1
        try:
            result = await first.deliver(item)  # the replay / retry
        finally:
            await first.close()
        fake.advance_operations(0)  # anything still running ends now
        label = key_label(item.key)
        versions = fake.state.models["fraud_detector"]
        same_key = [v["versionId"] for v in versions if v["labels"][KEY_LABEL] == label]
        assert same_key == [result.details["version_id"]]
        assert result.skipped and fake.count("models.upload") == uploads + 1
        listing = [c for c in fake.calls if c.call == "models.operations.list"][-1]
        assert listing.path == f"v1/{fake.parent}/models/fraud_detector/operations"
        assert "filter" not in listing.query
    finally:
        await fake.stop()


async def test_register_needs_a_gcs_location_and_an_image(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    s3 = DeliveryResult(uri="s3://bucket/model.pkl")
    with pytest.raises(PermanentError, match="route it to a gcs store"):
        await _register(vertex_fake, _register_item("m", "ev-1", upstream=s3))
    registry = _registry(vertex_fake, serving_container_image_uri=None)
    try:
        with pytest.raises(PermanentError, match="serving_container_image_uri"):
            await registry.deliver(_register_item("m", "ev-1"))
    finally:
        await registry.close()
    assert vertex_fake.count("models.upload") == 0


# -- endpoints ----------------------------------------------------------------------------


async def test_deploy_creates_or_reuses_the_endpoint_and_moves_all_traffic(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    v1 = await _register(vertex_fake, _register_item("clf", "ev-1"))
    v2 = await _register(vertex_fake, _register_item("clf", "ev-2"))
    model_name = v1.details["model_resource_name"]
    deployer = _deployer(vertex_fake, machine_type="n1-standard-4", max_replica_count=3)
    params = {"endpoint_name": "fraud-prod"}
    try:
        first_item = _item(Action.DEPLOY, "clf", "ev-1", params=params, upstream=v1)
        first = await deployer.deliver(first_item)
        assert vertex_fake.count("endpoints.create") == 1
        deploy_call = next(c for c in vertex_fake.calls if c.call == "endpoints.deployModel")
        assert deploy_call.body is not None
        assert deploy_call.body["trafficSplit"] == {"0": 100}
        assert deploy_call.body["deployedModel"]["model"] == f"{model_name}@1"
        assert deploy_call.body["deployedModel"]["dedicatedResources"] == {
            "machineSpec": {"machineType": "n1-standard-4"},
            "minReplicaCount": 1,
            "maxReplicaCount": 3,
        }
        id1 = first.details["deployed_model_id"]
        assert first.details["traffic_split"] == {id1: 100}
        assert first.details["endpoint_created"] is True and not first.skipped
        endpoint = first.details["endpoint_resource_name"]
        assert first.uri == endpoint and endpoint.startswith(f"{vertex_fake.parent}/endpoints/")

        replay = await deployer.deliver(first_item)
        assert replay.skipped and replay.details["deployed_model_id"] == id1
        assert vertex_fake.count("endpoints.deployModel") == 1

        second_item = _item(Action.DEPLOY, "clf", "ev-2", params=params, upstream=v2)
        second = await deployer.deliver(second_item)
        assert vertex_fake.count("endpoints.create") == 1  # reused, found by display name
        listing = [c for c in vertex_fake.calls if c.call == "endpoints.list"][-1]
        assert listing.query["filter"] == 'display_name="fraud-prod"'
        id2 = second.details["deployed_model_id"]
        assert id2 != id1 and second.details["endpoint_resource_name"] == endpoint
        assert second.details["traffic_split"] == {id2: 100}  # all traffic to the new version
        assert second.details["previous_traffic_split"] == {id1: 100}
        assert (await deployer.deliver(second_item)).skipped
        assert vertex_fake.count("endpoints.deployModel") == 2
    finally:
        await deployer.close()
    [stored] = vertex_fake.state.endpoints.values()
    assert stored["displayName"] == "fraud-prod"
    assert [(d["model"], d["modelVersionId"]) for d in stored["deployedModels"]] == [
        (model_name, "1"),
        (model_name, "2"),
    ]


async def test_a_deploy_replay_waits_for_the_deployment_a_crash_cut_off() -> None:
    """deployedModels does not list a deployment in progress: a replay that only looked
    there deployed the same version a second time."""
    fake = VertexRecordedContractFake(operation_polls=1)
    await fake.start()
    try:
        v1 = await _register(fake, _register_item("clf", "ev-1"))
        v2 = await _register(fake, _register_item("clf", "ev-2"))
        params = {"endpoint_name": "prod"}
        setup = _deployer(fake)
        try:
            await setup.deliver(_item(Action.DEPLOY, "clf", "ev-1", params=params, upstream=v1))
        finally:
            await setup.close()
        item = _item(Action.DEPLOY, "clf", "ev-2", params=params, upstream=v2)
        fake.operation_polls = 1000  # a slow deployment
        crashed = _deployer(fake, operation_timeout=0.05)
        with pytest.raises(TransientError, match="still running"):
            await crashed.deliver(item)
        await crashed.close()  # the daemon dies
        fake.advance_operations(3)
        fake.operation_polls = 1
        replay = _deployer(fake)
        try:
            result = await replay.deliver(item)
        finally:
            await replay.close()
        fake.advance_operations(0)
        [endpoint] = fake.state.endpoints.values()
        assert [d["modelVersionId"] for d in endpoint["deployedModels"]] == ["1", "2"]
        assert result.skipped and fake.count("endpoints.deployModel") == 2
        assert result.details["deployed_model_id"] == endpoint["deployedModels"][1]["id"]
        assert result.details["traffic_split"] == {result.details["deployed_model_id"]: 100}
    finally:
        await fake.stop()


@pytest.mark.parametrize("cut_off", ["crash", "lost_answer"])
async def test_an_endpoint_create_cut_off_is_found_by_its_id_not_made_twice(
    cut_off: str,
) -> None:
    """endpoints.list does not show an endpoint being created: a replay that only
    looked there made a second endpoint with the same display name."""
    fake = VertexRecordedContractFake(operation_polls=1)
    await fake.start()
    try:
        registered = await _register(fake, _register_item("clf", "ev-1"))
        item = _item(
            Action.DEPLOY, "clf", "ev-1", params={"endpoint_name": "Fraud Prod"},
            upstream=registered,
        )
        fake.operation_polls = 1000  # a slow create
        first = _deployer(fake, operation_timeout=0.05)
        if cut_off == "crash":
            with pytest.raises(TransientError, match="still running"):
                await first.deliver(item)
            await first.close()
            first = _deployer(fake)
        else:
            fake.fail("endpoints.create", 503, after=True)
            with pytest.raises(TransientError, match="503"):
                await first.deliver(item)
        fake.advance_operations(3)
        fake.operation_polls = 1
        try:
            result = await first.deliver(item)
        finally:
            await first.close()
        fake.advance_operations(0)
        ident = endpoint_id("Fraud Prod")
        endpoints = fake.state.endpoints.values()
        named = [e["name"] for e in endpoints if e["displayName"] == "Fraud Prod"]
        assert named == [f"{fake.parent}/endpoints/{ident}"]
        assert fake.count("endpoints.create") == 1
        create = next(c for c in fake.calls if c.call == "endpoints.create")
        assert create.query == {"endpointId": ident}
        assert result.details["endpoint_resource_name"] == named[0]
        assert fake.count("endpoints.deployModel") == 1
    finally:
        await fake.stop()


async def test_a_taken_endpoint_id_is_retried_and_a_renamed_endpoint_is_refused(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    registered = await _register(vertex_fake, _register_item("clf", "ev-1"))
    item = _item(Action.DEPLOY, "clf", "ev-1", params={"endpoint_name": "prod"},
                 upstream=registered)
    deployer = _deployer(vertex_fake)
    try:
        # 409 ALREADY_EXISTS with nothing there yet: another create is under way
        vertex_fake.fail("endpoints.create", 409, message="Endpoint already exists")
        with pytest.raises(TransientError, match="being created by another request"):
            await deployer.deliver(item)
        result = await deployer.deliver(item)  # the retry
        name = result.details["endpoint_resource_name"]
        vertex_fake.state.endpoints[name.rsplit("/", 1)[-1]]["displayName"] = "renamed"
        with pytest.raises(PermanentError, match="is now named 'renamed'"):
            await deployer.deliver(item)
    finally:
        await deployer.close()
    assert len(vertex_fake.state.endpoints) == 1


def test_endpoint_ids_keep_to_the_documented_rule() -> None:
    """endpointId: a letter first, [a-z0-9-], at most 63, a letter or digit last."""
    rule = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?")
    names = ["prod", "Fraud Prod", "fraud-prod", "1st", "", "--", "Modèle ü", "x" * 128]
    ids = [endpoint_id(n) for n in names]
    assert all(rule.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)  # names that read alike stay apart
    assert endpoint_id("Fraud Prod") == endpoint_id("Fraud Prod")
    assert endpoint_id("Fraud Prod").startswith("fraud-prod-")


async def test_vertex_endpoints_is_the_same_deployer_and_the_artifact_names_the_endpoint(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    assert sink_class("vertex_endpoints") is sink_class("vertex_endpoint") is VertexEndpointDeployer
    registered = await _register(vertex_fake, _register_item("churn", "ev-1"))
    flowyml_style = _settings(vertex_fake)
    flowyml_style["project"] = flowyml_style.pop("project_id")  # FlowyML's spelling
    deployer = create_sink(
        "gcp.model_deployer",
        ComponentConfig.model_validate({"type": "vertex_endpoints", **flowyml_style}),
    )
    assert isinstance(deployer, VertexEndpointDeployer)
    try:
        result = await deployer.deliver(
            _item(
                Action.DEPLOY, "churn", "ev-1", params={"endpoint_name": None}, upstream=registered
            )
        )
    finally:
        await deployer.close()
    assert result.details["endpoint_display_name"] == "churn"


# -- errors -------------------------------------------------------------------------------


async def test_unavailable_is_transient_and_invalid_argument_is_permanent(
    vertex_fake: VertexRecordedContractFake,
) -> None:
    item = _register_item("errs", "ev-1")
    registry = _registry(vertex_fake)
    deployer = _deployer(vertex_fake)
    try:
        vertex_fake.fail("models.upload", 503)
        with pytest.raises(TransientError, match="503 UNAVAILABLE"):
            await registry.deliver(item)
        vertex_fake.fail("models.upload", 400, message="Invalid artifactUri")
        with pytest.raises(VertexApiError, match="400 INVALID_ARGUMENT: Invalid artifactUri"):
            await registry.deliver(item)
        vertex_fake.fail_operation("models.upload", 3, "No model file found in artifactUri")
        with pytest.raises(PermanentError, match="No model file found"):
            await registry.deliver(item)
        registered = await registry.deliver(item)  # the faults are gone: it lands once
        assert len(vertex_fake.state.models["errs"]) == 1

        deploy = _item(Action.DEPLOY, "errs", "ev-1", upstream=registered)
        vertex_fake.fail("endpoints.list", 429)
        with pytest.raises(TransientError, match="throttled"):
            await deployer.deliver(deploy)
        vertex_fake.fail_operation("endpoints.deployModel", 14, "backend unavailable")
        with pytest.raises(TransientError, match="UNAVAILABLE: backend unavailable"):
            await deployer.deliver(deploy)
        deployed = await deployer.deliver(deploy)  # the retry deploys it
        assert deployed.details["traffic_split"] == {deployed.details["deployed_model_id"]: 100}
    finally:
        await registry.close()
        await deployer.close()

    # a request the API refuses as invalid: no machine type
    bad = _deployer(vertex_fake, machine_type="")
    try:
        with pytest.raises(PermanentError, match=r"INVALID_ARGUMENT.*machineType"):
            await bad.deliver(
                _item(
                    Action.DEPLOY,
                    "errs",
                    "ev-2",
                    params={"endpoint_name": "x"},
                    upstream=registered,
                )
            )
        with pytest.raises(PermanentError, match="no vertex_model_registry delivery"):
            await bad.deliver(_item(Action.DEPLOY, "errs", "ev-3", upstream=_stored("errs", "e")))
    finally:
        await bad.close()

    wrong_token = _registry(vertex_fake, access_token="expired")
    try:
        with pytest.raises(VertexApiError, match="401 UNAUTHENTICATED") as caught:
            await wrong_token.deliver(_register_item("errs", "ev-4"))
        assert "access token" in str(caught.value)
    finally:
        await wrong_token.close()


async def test_connection_refused_is_transient() -> None:
    fake = VertexRecordedContractFake()
    await fake.start()
    url = fake.url
    await fake.stop()  # nothing listens there any more
    registry = VertexModelRegistry(
        "gcp.model_registry",
        VertexRegistrySettings.model_validate(
            {
                "project_id": "p",
                "api_endpoint": url,
                "access_token": "t",
                "serving_container_image_uri": IMAGE,
            }
        ),
    )
    try:
        with pytest.raises(TransientError, match="ClientConnectorError"):
            await registry.deliver(_register_item("m", "ev-1"))
    finally:
        await registry.close()


async def test_a_service_account_token_from_gcloud_aio_auth(
    vertex_fake: VertexRecordedContractFake, tmp_path: Path
) -> None:
    """The real gcloud-aio-auth flow: a signed JWT traded at the (fake) token endpoint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    email = f"router@{vertex_fake.project}.iam.gserviceaccount.com"
    service_file = tmp_path / "sa.json"
    service_file.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": vertex_fake.project,
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": email,
                "client_id": "1",
                "token_uri": f"{vertex_fake.url}/token",
            }
        )
    )
    # no project_id and no access_token: both come from the service account file
    registry = _registry(
        vertex_fake, project_id=None, access_token=None, service_file=str(service_file)
    )
    try:
        result = await registry.deliver(_register_item("sa_model", "ev-1"))
    finally:
        await registry.close()
    assert result.details["model_resource_name"].startswith(vertex_fake.parent)
    [claims] = vertex_fake.token_requests
    assert claims["iss"] == email and claims["scope"] == SCOPE
    assert claims["aud"] == f"{vertex_fake.url}/token"


# -- configuration ------------------------------------------------------------------------


def test_flowyml_style_settings_load() -> None:
    registry = ComponentConfig.model_validate(
        {"type": "vertex_model_registry", "project": "fraud-prod", "region": "europe-west4"}
    )
    assert check_component("model_registry", "stacks.gcp.model_registry", registry) == []
    sink = create_sink("gcp.model_registry", registry)
    assert isinstance(sink, VertexModelRegistry)
    assert sink.settings.project_id == "fraud-prod"
    assert sink.settings.location == "europe-west4"
    assert sink.settings.base_url == "https://europe-west4-aiplatform.googleapis.com"
    bare = ComponentConfig.model_validate({"type": "vertex_endpoint"})
    assert check_component("model_deployer", "stacks.gcp.model_deployer", bare) == []
    typo = ComponentConfig.model_validate({"type": "vertex_endpoint", "machine_typ": "n1"})
    [problem] = check_component("model_deployer", "stacks.gcp.model_deployer", typo)
    assert problem.field == "stacks.gcp.model_deployer.machine_typ"
    replicas = ComponentConfig.model_validate(
        {"type": "vertex_endpoint", "min_replica_count": 3, "max_replica_count": 2}
    )
    [problem] = check_component("model_deployer", "stacks.gcp.model_deployer", replicas)
    assert "max_replica_count" in problem.message
    both = ComponentConfig.model_validate(
        {"type": "vertex_model_registry", "access_token": "t", "service_file": "/x.json"}
    )
    [problem] = check_component("model_registry", "stacks.gcp.model_registry", both)
    assert "not both" in problem.message
