"""`sagemaker_model_registry` and `sagemaker_endpoint` against a real moto_server.

moto implements SageMaker's model registry, models, endpoint configs and endpoints,
but not UpdateEndpoint: it answers that call with HTTP 500. The tests say so where
it matters: pointing an existing endpoint at a new config is tested as the
TransientError (and, through a real daemon, the retries and the dead letter) that
this 500 produces, not as a success moto cannot give.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from sinks.aws import entity_name, map_sagemaker_error
from sinks.base import PermanentError, TransientError
from sinks.deployers.sagemaker import SageMakerEndpointDeployer, SageMakerEndpointSettings
from sinks.registries.sagemaker import (
    DELIVERY_KEY_PROPERTY,
    SageMakerRegistry,
    SageMakerRegistrySettings,
    key_token,
)
from sinks.registry import check_component, create_sink, sink_class
from tests.conftest import Workspace, model_manifest, write_bundle
from tests.servers_aws import AWS_ACCOUNT, MotoServer, free_port, moto_server

__all__ = ["moto_server"]  # the fixture, imported for pytest

ROLE = f"arn:aws:iam::{AWS_ACCOUNT}:role/SageMakerExecution"
IMAGE = f"{AWS_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/sklearn-inference:1.2-1"


def _unique(prefix: str = "fraud_detector") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _registry(server: MotoServer, **overrides: Any) -> SageMakerRegistry:
    settings = SageMakerRegistrySettings.model_validate(
        server.settings(**{"image_uri": IMAGE, "content_types": ["text/csv"], **overrides})
    )
    return SageMakerRegistry("prod.model_registry", settings)


def _deployer(server: MotoServer, **overrides: Any) -> SageMakerEndpointDeployer:
    settings = SageMakerEndpointSettings.model_validate(
        server.settings(**{"role_arn": ROLE, "instance_type": "ml.m5.large", **overrides})
    )
    return SageMakerEndpointDeployer("prod.model_deployer", settings)


def _stored(uri: str) -> DeliveryResult:
    return DeliveryResult(
        objects=[StoredObject(file_name="model.tar.gz", uri=uri, size=3, sha256="0" * 64)],
        uri=uri,
    )


def _item(
    action: Action,
    name: str,
    event: str,
    *,
    version: str = "1.0.0",
    params: dict[str, Any] | None = None,
    upstream: DeliveryResult | None = None,
) -> DeliveryItem:
    component = "model_registry" if action is Action.REGISTER else "model_deployer"
    return DeliveryItem(
        key=f"{event}/0/{action.value}/prod.{component}",
        action=action,
        sink_id=f"prod.{component}",
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
            version=version,
            framework="sklearn",
            metadata={"metrics": {"accuracy": 0.97, "f1_score": 0.91}},
        ),
        params=params if params is not None else {},
        upstream=upstream,
    )


def _register_item(name: str, event: str, **kwargs: Any) -> DeliveryItem:
    kwargs.setdefault("params", {"metadata": {"owner": "risk-team"}})
    kwargs.setdefault("upstream", _stored(f"s3://models/{name}/{event}/model.tar.gz"))
    return _item(Action.REGISTER, name, event, **kwargs)


async def _register(server: MotoServer, item: DeliveryItem) -> DeliveryResult:
    registry = _registry(server)
    try:
        return await registry.deliver(item)
    finally:
        await registry.close()


def _packages(server: MotoServer, group: str) -> list[dict[str, Any]]:
    listed = server.client("sagemaker").list_model_packages(ModelPackageGroupName=group)
    return sorted(listed["ModelPackageSummaryList"], key=lambda p: p["ModelPackageVersion"])


# -- registry -----------------------------------------------------------------------------


async def test_register_creates_the_group_and_a_version_and_a_replay_creates_none(
    moto_server: MotoServer,
) -> None:
    name = _unique()
    group = entity_name(name)
    assert group == name.replace("_", "-")
    sm = moto_server.client("sagemaker")
    with pytest.raises(sm.exceptions.ClientError):
        sm.describe_model_package_group(ModelPackageGroupName=group)

    item = _register_item(name, "ev-1")
    registry = _registry(moto_server)
    try:
        first = await registry.deliver(item)
        again = await registry.deliver(item)
    finally:
        await registry.close()
    # a daemon killed after SageMaker created the version, before the journal noted it
    after_restart = await _register(moto_server, item)

    uri = f"s3://models/{name}/ev-1/model.tar.gz"
    assert first.details == {
        "model_package_group": group,
        "model_package_arn": first.uri,
        "model_package_version": 1,
        "approval_status": "PendingManualApproval",
        "model_data_url": uri,
    }
    assert not first.skipped and again.skipped and after_restart.skipped
    assert again.uri == after_restart.uri == first.uri
    assert sm.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupName"]
    [package] = _packages(moto_server, group)
    described = sm.describe_model_package(ModelPackageName=package["ModelPackageArn"])
    assert described["ModelApprovalStatus"] == "PendingManualApproval"
    assert described["ModelPackageDescription"].endswith(f"router.delivery_key={item.key}")
    container = described["InferenceSpecification"]["Containers"][0]
    assert container == {"Image": IMAGE, "ModelDataUrl": uri}
    assert described["InferenceSpecification"]["SupportedContentTypes"] == ["text/csv"]
    props = described["CustomerMetadataProperties"]
    assert props[DELIVERY_KEY_PROPERTY] == item.key
    assert props["router.artifact_uri"] == uri
    assert props["router.run_id"] == "run-ev-1"
    assert props["router.framework"] == "sklearn"
    assert float(props["metric.accuracy"]) == 0.97
    assert props["owner"] == "risk-team"

    # the next event adds version 2 to the same group
    second = await _register(moto_server, _register_item(name, "ev-2", version="1.1.0"))
    assert second.details["model_package_version"] == 2
    assert [p["ModelPackageVersion"] for p in _packages(moto_server, group)] == [1, 2]


async def test_approval_status_pending_unless_auto_approve(moto_server: MotoServer) -> None:
    name = _unique()
    pending = await _register(moto_server, _register_item(name, "ev-1", params={}))
    approved = await _register(
        moto_server, _register_item(name, "ev-2", params={"auto_approve": True})
    )
    not_quite = await _register(
        moto_server, _register_item(name, "ev-3", params={"auto_approve": "yes"})
    )
    assert pending.details["approval_status"] == "PendingManualApproval"
    assert approved.details["approval_status"] == "Approved"
    assert not_quite.details["approval_status"] == "PendingManualApproval"
    statuses = [p["ModelApprovalStatus"] for p in _packages(moto_server, entity_name(name))]
    assert statuses == ["PendingManualApproval", "Approved", "PendingManualApproval"]


async def test_a_long_or_odd_delivery_key_is_matched_by_its_hash(moto_server: MotoServer) -> None:
    name = _unique()
    event = "ev #1 (" + "x" * 300 + ")"
    item = _register_item(name, event)
    assert key_token(item.key).startswith("sha256:")
    first = await _register(moto_server, item)
    again = await _register(moto_server, item)
    assert again.skipped and again.uri == first.uri
    assert len(_packages(moto_server, entity_name(name))) == 1


async def test_a_key_that_ends_like_another_is_not_taken_for_its_replay(
    moto_server: MotoServer,
) -> None:
    """A description suffix match took the package of event `xrouter.delivery_key=ev-1`
    for a replay of event `ev-1`: ev-1 was skipped and never registered."""
    name = _unique()
    tricky = await _register(moto_server, _register_item(name, "xrouter.delivery_key=ev-1"))
    real = await _register(moto_server, _register_item(name, "ev-1", version="2.0.0"))
    assert not real.skipped and real.uri != tricky.uri
    assert len(_packages(moto_server, entity_name(name))) == 2
    again = await _register(moto_server, _register_item(name, "ev-1", version="2.0.0"))
    assert again.skipped and again.uri == real.uri


async def test_an_explicit_group_and_a_missing_store_result(moto_server: MotoServer) -> None:
    group = entity_name(_unique("shared"))
    registry = _registry(moto_server, model_package_group=group)
    try:
        result = await registry.deliver(_register_item(_unique(), "ev-1"))
        assert result.details["model_package_group"] == group
        with pytest.raises(PermanentError, match="no stored location"):
            await registry.deliver(_register_item(_unique(), "ev-2", upstream=None))
        with pytest.raises(PermanentError, match="route it to an s3 store"):
            await registry.deliver(
                _register_item(_unique(), "ev-3", upstream=_stored("gs://b/model.pkl"))
            )
    finally:
        await registry.close()


# -- endpoints ----------------------------------------------------------------------------


async def test_deploy_creates_model_config_and_endpoint_and_a_replay_is_a_no_op(
    moto_server: MotoServer,
) -> None:
    name = _unique()
    registered = await _register(moto_server, _register_item(name, "ev-1"))
    assert registered.details["approval_status"] == "PendingManualApproval"
    endpoint = entity_name(_unique("fraud-prod"))
    item = _item(
        Action.DEPLOY, name, "ev-1", params={"endpoint_name": endpoint}, upstream=registered
    )
    deployer = _deployer(moto_server)
    try:
        deployed = await deployer.deliver(item)
        replayed = await deployer.deliver(item)
    finally:
        await deployer.close()

    details = deployed.details
    assert details["action"] == "created" and details["approved"] is True
    assert details["endpoint_name"] == endpoint
    assert details["endpoint_status"] == "InService"
    assert not deployed.skipped
    assert replayed.skipped and replayed.details["action"] == "unchanged"
    assert replayed.details["endpoint_config_name"] == details["endpoint_config_name"]

    sm = moto_server.client("sagemaker")
    # the deploy approved the version: the router's own condition already passed
    package = sm.describe_model_package(ModelPackageName=registered.details["model_package_arn"])
    assert package["ModelApprovalStatus"] == "Approved"
    # ... and kept its metadata (the registry's idempotency key among it)
    assert package["CustomerMetadataProperties"][DELIVERY_KEY_PROPERTY].startswith("ev-1/")
    model = sm.describe_model(ModelName=details["model_name"])
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"] == {
        "ModelPackageName": registered.details["model_package_arn"]
    }
    config = sm.describe_endpoint_config(EndpointConfigName=details["endpoint_config_name"])
    [variant] = config["ProductionVariants"]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        details["model_name"],
        "ml.m5.large",
        1,
    )
    described = sm.describe_endpoint(EndpointName=endpoint)
    assert described["EndpointConfigName"] == details["endpoint_config_name"]
    assert deployed.uri == described["EndpointArn"]
    # registering again (a replay) still finds the approved version
    assert (await _register(moto_server, _register_item(name, "ev-1"))).skipped


async def test_a_newer_version_goes_through_update_endpoint_which_moto_answers_with_500(
    moto_server: MotoServer,
) -> None:
    """Deploying v2 onto an endpoint that serves v1 must call UpdateEndpoint.

    moto's limitation: it does not implement UpdateEndpoint and answers HTTP 500. The
    sink maps that 500 to TransientError naming UpdateEndpoint, so the dispatcher
    retries it and finally dead-letters it (see the daemon test below); everything
    before the call (approval, CreateModel, CreateEndpointConfig) really happens.
    """
    name = _unique()
    endpoint = entity_name(_unique("fraud-prod"))
    deployer = _deployer(moto_server, image_uri=IMAGE, endpoint_name=endpoint)
    try:
        v1 = await _register(moto_server, _register_item(name, "ev-1"))
        first = await deployer.deliver(
            _item(Action.DEPLOY, name, "ev-1", params={"endpoint_name": None}, upstream=v1)
        )
        assert first.details["endpoint_name"] == endpoint  # the setting, the rule named none
        v2 = await _register(moto_server, _register_item(name, "ev-2", version="1.1.0"))
        with pytest.raises(TransientError) as caught:
            await deployer.deliver(
                _item(Action.DEPLOY, name, "ev-2", version="1.1.0", params={}, upstream=v2)
            )
    finally:
        await deployer.close()
    message = str(caught.value)
    assert "UpdateEndpoint" in message and "500" in message and endpoint in message

    sm = moto_server.client("sagemaker")
    described = sm.describe_endpoint(EndpointName=endpoint)
    assert described["EndpointConfigName"] == first.details["endpoint_config_name"]
    configs = sm.list_endpoint_configs(NameContains=endpoint)["EndpointConfigs"]
    assert len(configs) == 2  # the v2 config exists, ready for the update
    package = sm.describe_model_package(ModelPackageName=v2.details["model_package_arn"])
    assert package["ModelApprovalStatus"] == "Approved"
    models = sm.list_models(NameContains=entity_name(name))["Models"]
    v2_models = [m for m in models if "-v2-" in m["ModelName"]]
    assert len(v2_models) == 1
    container = sm.describe_model(ModelName=v2_models[0]["ModelName"])["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataUrl"] == f"s3://models/{name}/ev-2/model.tar.gz"


def test_update_endpoint_500_is_retried_then_dead_lettered_by_the_daemon(
    moto_server: MotoServer, tmp_path: Path, start_daemon: Any
) -> None:
    """The whole path through a real daemon: s3 store, registry and endpoint on moto.

    moto answers UpdateEndpoint with HTTP 500 (not implemented): the second version's
    deploy is retried `max_attempts` times with backoff, then dead-lettered with the
    error naming UpdateEndpoint, and its event is marked failed.
    """
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    moto_server.client("s3").create_bucket(Bucket=bucket)
    name = _unique()
    endpoint = entity_name(_unique("fraud-prod"))
    workspace = Workspace(tmp_path)
    workspace.stack["artifact_stores"] = {
        "models": {"type": "s3", "bucket": bucket, **moto_server.settings()}
    }
    workspace.stack["model_registry"] = {
        "type": "sagemaker_model_registry",
        "image_uri": IMAGE,
        **moto_server.settings(),
    }
    workspace.stack["model_deployer"] = {
        "type": "sagemaker_endpoint",
        "role_arn": ROLE,
        "retry": {"max_attempts": 3, "base_delay": 0.05, "max_delay": 0.2},
        **moto_server.settings(),
    }
    workspace.stack["artifact_routing"]["Model"] = {
        "store": "models",
        "path": "{pipeline}/{name}/{version}",
        "register": True,
        "deploy": True,
        "deploy_condition": "auto",
        "endpoint_name": endpoint,
    }
    workspace.write()
    start_daemon(workspace)
    write_bundle(
        workspace.spool, "e1", model_manifest(name, version="1"), {"model.pkl": b"version one"}
    )
    status = workspace.wait_settled(1, timeout=60)
    assert status["events"] == {"done": 1}, status
    sm = moto_server.client("sagemaker")
    first_config = sm.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]

    write_bundle(
        workspace.spool,
        "e2",
        model_manifest(name, run_id="run-2", version="2"),
        {"model.pkl": b"version two"},
    )
    status = workspace.wait_settled(2, timeout=60)
    assert status["events"] == {"done": 1, "failed": 1}, status
    [dead] = status["dead_letters"]
    assert dead["key"].startswith("e2/") and "/deploy/" in dead["key"]
    assert dead["attempts"] == 3
    assert "gave up after 3 attempts" in dead["last_error"]
    assert "UpdateEndpoint" in dead["last_error"]
    assert sm.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"] == first_config
    # both versions were registered, from the objects the s3 store wrote
    group = entity_name(name)
    packages = _packages(moto_server, group)
    assert [p["ModelApprovalStatus"] for p in packages] == ["Approved", "Approved"]
    second = sm.describe_model_package(ModelPackageName=packages[1]["ModelPackageArn"])
    data_url = second["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    assert data_url == f"s3://{bucket}/fraud/{name}/2/model.pkl"


# -- errors -------------------------------------------------------------------------------


async def test_validation_errors_are_permanent(moto_server: MotoServer) -> None:
    name = _unique()
    registered = await _register(moto_server, _register_item(name, "ev-1"))
    deploy = _item(Action.DEPLOY, name, "ev-1", params={}, upstream=registered)

    # SageMaker refuses an instance type it does not know: ValidationException
    bad_type = _deployer(moto_server, instance_type="ml.bogus")
    try:
        with pytest.raises(PermanentError) as caught:
            await bad_type.deliver(deploy)
    finally:
        await bad_type.close()
    assert "CreateEndpointConfig" in str(caught.value)
    assert "ValidationException" in str(caught.value) and "ml.bogus" in str(caught.value)

    # the registered package is gone (someone deleted it): nothing to deploy
    gone = DeliveryResult(
        uri="x",
        details={
            "model_package_arn": f"arn:aws:sagemaker:us-east-1:{AWS_ACCOUNT}:"
            f"model-package/{entity_name(name)}/99"
        },
    )
    deployer = _deployer(moto_server)
    try:
        with pytest.raises(PermanentError, match="no longer exists"):
            await deployer.deliver(_item(Action.DEPLOY, name, "ev-9", upstream=gone))
        # a store result (no registry) needs image_uri, and an S3 location
        with pytest.raises(PermanentError, match="needs image_uri"):
            await deployer.deliver(
                _item(Action.DEPLOY, name, "ev-8", upstream=_stored("s3://b/k/model.tar.gz"))
            )
    finally:
        await deployer.close()
    with_image = _deployer(moto_server, image_uri=IMAGE)
    try:
        with pytest.raises(PermanentError, match="loads model data from S3"):
            await with_image.deliver(
                _item(Action.DEPLOY, name, "ev-7", upstream=_stored("gs://b/k/model.pkl"))
            )
    finally:
        await with_image.close()


def test_a_wrong_role_arn_is_a_config_error() -> None:
    problems = check_component(
        "model_deployer",
        "stacks.aws.model_deployer",
        ComponentConfig.model_validate({"type": "sagemaker_endpoint", "role_arn": "admin"}),
    )
    assert [p.field for p in problems] == ["stacks.aws.model_deployer.role_arn"]
    assert "IAM role ARN" in problems[0].message
    missing = check_component(
        "model_deployer",
        "stacks.aws.model_deployer",
        ComponentConfig.model_validate({"type": "sagemaker_endpoint"}),
    )
    assert [p.field for p in missing] == ["stacks.aws.model_deployer.role_arn"]


@pytest.mark.parametrize("component", ["sagemaker_model_registry", "sagemaker_endpoint"])
def test_credentials_in_the_endpoint_url_are_a_config_error(component: str) -> None:
    """botocore never sends URL userinfo: such an endpoint_url can only fail (it was
    retried as transient) and put the password into messages."""
    role, extra = (
        ("model_registry", {}) if component == "sagemaker_model_registry"
        else ("model_deployer", {"role_arn": ROLE})
    )
    problems = check_component(
        role,
        f"stacks.aws.{role}",
        ComponentConfig.model_validate({
            "type": component, **extra,
            "endpoint_url": "http://proxyuser:hunter2@127.0.0.1:5000",
        }),
    )
    assert [p.field for p in problems] == [f"stacks.aws.{role}.endpoint_url"]
    text = " ".join(str(p) for p in problems) + " ".join(p.message for p in problems)
    assert "user name or password" in text and "aws_access_key_id" in text
    assert "hunter2" not in text


async def test_access_denied_and_unknown_keys_are_permanent(tmp_path: Path) -> None:
    """A private moto_server with IAM authentication on (INITIAL_NO_AUTH_ACTION_COUNT)."""
    server = MotoServer(tmp_path, env={"INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    server.start()
    try:
        iam = server.client("iam")
        iam.create_user(UserName="no-permissions")  # the two unauthenticated calls
        key = iam.create_access_key(UserName="no-permissions")["AccessKey"]
        denied = _registry(
            server,
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        unknown = _registry(server)  # "testing" is not a key this IAM knows
        try:
            with pytest.raises(PermanentError) as no_permission:
                await denied.deliver(_register_item(_unique(), "ev-1"))
            with pytest.raises(PermanentError) as bad_key:
                await unknown.deliver(_register_item(_unique(), "ev-1"))
        finally:
            await denied.close()
            await unknown.close()
    finally:
        server.stop()
    assert "access denied (AccessDenied" in str(no_permission.value)
    assert "sagemaker:DescribeModelPackageGroup" in str(no_permission.value)
    assert "InvalidClientTokenId" in str(bad_key.value)


async def test_connection_refused_is_transient(tmp_path: Path) -> None:
    registry = SageMakerRegistry(
        "prod.model_registry",
        SageMakerRegistrySettings(
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            region="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            max_attempts=1,
            connect_timeout=2,
        ),
    )
    try:
        with pytest.raises(TransientError, match="DescribeModelPackageGroup"):
            await registry.deliver(_register_item(_unique(), "ev-1"))
        assert await registry.health() is False
    finally:
        await registry.close()


def test_error_codes_map_onto_the_sink_contract() -> None:
    from botocore.exceptions import ClientError

    def error(code: str, status: int, message: str = "m") -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "CreateModel",
        )

    where = "AWS region us-east-1"
    assert isinstance(
        map_sagemaker_error(error("ThrottlingException", 400), "CreateModel", "m", where),
        TransientError,
    )
    assert isinstance(
        map_sagemaker_error(error("InternalFailure", 500), "CreateModel", "m", where),
        TransientError,
    )
    busy = error("ValidationException", 400, 'Cannot update in-progress endpoint "arn"')
    assert isinstance(map_sagemaker_error(busy, "UpdateEndpoint", "e", where), TransientError)
    invalid = map_sagemaker_error(
        error("ValidationException", 400, "Could not access model data"), "CreateModel", "m", where
    )
    assert isinstance(invalid, PermanentError)
    assert "Could not access model data" in str(invalid)
    denied = map_sagemaker_error(error("AccessDeniedException", 400), "CreateModel", "m", where)
    assert isinstance(denied, PermanentError) and "access denied" in str(denied)


def test_failures_without_an_answer_read_the_same_for_s3_and_sagemaker() -> None:
    """Credentials, a missing region, a request botocore refuses and the network: one
    wording (sinks/aws_errors.py) for the S3 store and both SageMaker sinks."""
    from botocore.exceptions import (
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        ParamValidationError,
    )

    from sinks.stores.s3 import S3Store, S3StoreSettings

    store = S3Store("s.artifact_store", S3StoreSettings(bucket_name="models",
                                                        endpoint_url="http://127.0.0.1:9"))
    cases = [
        (NoCredentialsError(), PermanentError, "no usable AWS credentials"),
        (NoRegionError(), PermanentError, "no AWS region; set `region`"),
        (ParamValidationError(report="Invalid bucket name"), PermanentError, "invalid request"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), TransientError,
         "at http://127.0.0.1:9: EndpointConnectionError"),
        (RuntimeError("boom"), TransientError, "unexpected RuntimeError: boom"),
    ]
    for exc, kind, words in cases:
        s3 = store._map_error(exc, "PutObject", "k")
        sagemaker = map_sagemaker_error(exc, "CreateModel", "m", "http://127.0.0.1:9")
        assert isinstance(s3, kind) and isinstance(sagemaker, kind), exc
        assert words in str(s3) and words in str(sagemaker), (str(s3), str(sagemaker))
        assert str(s3).startswith("PutObject s3://models/k")
        assert str(sagemaker).startswith("SageMaker CreateModel m")


def test_the_registry_knows_both_types() -> None:
    assert sink_class("sagemaker_model_registry") is SageMakerRegistry
    assert sink_class("sagemaker_endpoint") is SageMakerEndpointDeployer
    sink = create_sink(
        "aws.model_registry",
        ComponentConfig.model_validate({"type": "sagemaker_model_registry", "region": "eu-west-1"}),
    )
    assert isinstance(sink, SageMakerRegistry)
    problems = check_component(
        "model_registry",
        "stacks.aws.model_registry",
        ComponentConfig.model_validate(
            {"type": "sagemaker_model_registry", "model_package_group": "bad name!"}
        ),
    )
    assert problems and "bad-name" in problems[0].message


def test_aws_clock_skew_403_is_transient_and_access_denied_stays_permanent() -> None:
    """AWS answers a skewed clock with a 403 RequestTimeTooSkewed: NTP fixes it, so it is
    retried, while a plain 403 AccessDenied dead-letters. The ClientError is built by
    hand: moto does not check request times."""
    from botocore.exceptions import ClientError

    def answer(code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": 403}}, "CreateModel")

    skewed = map_sagemaker_error(answer("RequestTimeTooSkewed"), "CreateModel", "m", "AWS")
    denied = map_sagemaker_error(answer("AccessDenied"), "CreateModel", "m", "AWS")
    assert isinstance(skewed, TransientError), skewed
    assert isinstance(denied, PermanentError) and "access denied" in str(denied)
