"""`sagemaker_endpoint`: serve a registered model version from a SageMaker real-time endpoint.

Deploying the version a `sagemaker_model_registry` delivery registered:

1. `DescribeModelPackage`; a version rejected in the registry is not deployed
   (permanent). A version not yet `Approved` is approved (`UpdateModelPackage`),
   because the router plans a deploy only after its own deploy condition passed
   (auto with the metric bounds met, a manual deploy, or `artifact-router model
   approve`); see `sinks.registries.sagemaker` for the approval contract;
2. `CreateModel` (unless `DescribeModel` finds it): `ExecutionRoleArn` is `role_arn`;
   the container is `image_uri` with the version's model data when `image_uri` is
   set, else the model package itself (`ModelPackageName`, which needs a version
   registered with an inference specification, i.e. the registry's `image_uri`);
3. `CreateEndpointConfig` (unless it exists): one production variant `AllTraffic`
   on `instance_type` x `initial_instance_count`;
4. `DescribeEndpoint`: a missing endpoint is created (`CreateEndpoint`); an
   endpoint running another config is pointed at the new one (`UpdateEndpoint`,
   SageMaker's blue/green update); an endpoint already running (or updating to)
   this config is left alone: the replay of a deploy is a no-op (`skipped`).
   An endpoint still Creating/Updating is a TransientError (retried later).

Names are deterministic, so a replay after a crash finds what the first attempt
made: the model is `<group>-v<version>-<hash>` and the config
`<endpoint>-<model>-<hash>`, where the hashes cover what the name stands for (the
container, role, instance type and count), so changing a setting deploys a fresh
model or config instead of silently reusing a stale one. The endpoint name is the
rule's `endpoint_name`, else the `endpoint_name` setting, else the artifact name.
Old models and configs are kept (a rollback is an `UpdateEndpoint` away).

Without a registry in the stack the deploy waits for the store delivery instead:
the model data is the stored S3 object and `image_uri` is required.

With `wait_timeout` above 0 the delivery waits for the endpoint to be InService
(Failed is permanent, with SageMaker's FailureReason; still updating at the
deadline is transient). By default it returns once SageMaker accepted the change.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Any

from pydantic import Field, field_validator

from router.delivery import Action
from sinks.aws import SageMakerClient, SageMakerSettings, entity_name
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, PermanentError, TransientError
from sinks.registries.mlflow import model_source

__all__ = ["SageMakerEndpointDeployer", "SageMakerEndpointSettings"]

_ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
_BUSY = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}
VARIANT = "AllTraffic"


class SageMakerEndpointSettings(SageMakerSettings):
    role_arn: str = Field(description="IAM role SageMaker assumes to run the model")
    image_uri: str | None = Field(
        default=None,
        description="inference image (ECR URI); default: the model package's own container",
    )
    instance_type: str = Field(default="ml.m5.large")
    initial_instance_count: int = Field(default=1, ge=1)
    endpoint_name: str | None = Field(
        default=None, description="endpoint used when the rule names none"
    )
    wait_timeout: float = Field(
        default=0.0, ge=0, description="seconds to wait for InService; 0 returns at once"
    )
    poll_interval: float = Field(default=15.0, gt=0, le=300)

    @field_validator("role_arn")
    @classmethod
    def _role_arn(cls, value: str) -> str:
        if not _ROLE_ARN.fullmatch(value) or len(value) < 20:
            raise ValueError(
                "must be an IAM role ARN such as arn:aws:iam::123456789012:role/SageMakerExecution"
            )
        return value

    @field_validator("endpoint_name")
    @classmethod
    def _endpoint_name(cls, value: str | None) -> str | None:
        if value is not None and entity_name(value) != value:
            raise ValueError(
                "must match [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}, e.g. " + repr(entity_name(value))
            )
        return value


def _digest(*parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


class SageMakerEndpointDeployer(BaseSink):
    """`sagemaker_endpoint`: model, endpoint config and endpoint, idempotently."""

    Settings = SageMakerEndpointSettings
    settings: SageMakerEndpointSettings

    def __init__(self, sink_id: str, settings: SageMakerEndpointSettings) -> None:
        super().__init__(sink_id, settings)
        self.api = SageMakerClient(sink_id, settings)
        self._locks: dict[str, asyncio.Lock] = {}

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action is not Action.DEPLOY:
            raise PermanentError(
                f"sink {self.sink_id}: sagemaker_endpoint handles deploy deliveries, "
                f"not {item.action.value}"
            )
        details = item.upstream.details if item.upstream else {}
        package_arn = details.get("model_package_arn")
        approved_now = False
        if package_arn:
            container, base, approved_now = await self._from_package(str(package_arn), item)
        else:
            container, base = self._from_store(item, details)
        s = self.settings
        model_name = entity_name(base, _digest(container, s.role_arn))
        endpoint = entity_name(
            str(item.params.get("endpoint_name") or s.endpoint_name or item.artifact.name)
        )
        config_name = entity_name(
            endpoint, base, _digest(model_name, s.instance_type, s.initial_instance_count)
        )

        # One change at a time per endpoint: SageMaker refuses to update one mid-update.
        lock = self._locks.setdefault(endpoint, asyncio.Lock())
        async with lock:
            return await self._deploy(
                item, container, model_name, config_name, endpoint, package_arn, approved_now
            )

    async def _deploy(
        self,
        item: DeliveryItem,
        container: dict[str, Any],
        model_name: str,
        config_name: str,
        endpoint: str,
        package_arn: Any,
        approved_now: bool,
    ) -> DeliveryResult:
        client = await self.api.client()
        s = self.settings
        created: list[str] = []
        if await self.api.describe(
            "DescribeModel", f"model {model_name!r}", client.describe_model(ModelName=model_name)
        ) is None and await self.api.create(
            "CreateModel",
            f"model {model_name!r}",
            client.create_model(
                ModelName=model_name, ExecutionRoleArn=s.role_arn, PrimaryContainer=container
            ),
        ):
            created.append("model")
        if await self.api.describe(
            "DescribeEndpointConfig",
            f"endpoint config {config_name!r}",
            client.describe_endpoint_config(EndpointConfigName=config_name),
        ) is None and await self.api.create(
            "CreateEndpointConfig",
            f"endpoint config {config_name!r}",
            client.create_endpoint_config(
                EndpointConfigName=config_name,
                ProductionVariants=[
                    {
                        "VariantName": VARIANT,
                        "ModelName": model_name,
                        "InstanceType": s.instance_type,
                        "InitialInstanceCount": s.initial_instance_count,
                        "InitialVariantWeight": 1.0,
                    }
                ],
            ),
        ):
            created.append("endpoint_config")

        what = f"endpoint {endpoint!r}"
        current = await self.api.describe(
            "DescribeEndpoint", what, client.describe_endpoint(EndpointName=endpoint)
        )
        previous: str | None = None
        if current is None:
            if await self.api.create(
                "CreateEndpoint",
                what,
                client.create_endpoint(EndpointName=endpoint, EndpointConfigName=config_name),
            ):
                created.append("endpoint")
            action = "created"
        else:
            previous = current.get("EndpointConfigName")
            pending = (current.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
            status = current.get("EndpointStatus")
            if config_name in (previous, pending):
                if status == "Failed" and previous == config_name:
                    raise PermanentError(
                        f"SageMaker endpoint {endpoint!r} failed with config {config_name!r}: "
                        f"{current.get('FailureReason') or 'no reason given'}"
                    )
                action = "unchanged"
            elif status in _BUSY:
                raise TransientError(
                    f"SageMaker endpoint {endpoint!r} is {status}; it can be pointed at "
                    f"{config_name!r} once that finishes (retried)"
                )
            else:
                await self.api.call(
                    "UpdateEndpoint",
                    f"{what} to config {config_name!r}",
                    client.update_endpoint(EndpointName=endpoint, EndpointConfigName=config_name),
                )
                action = "updated"
        final = await self._wait(endpoint) if s.wait_timeout > 0 else None
        if final is None:
            final = (
                await self.api.describe(
                    "DescribeEndpoint", what, client.describe_endpoint(EndpointName=endpoint)
                )
                or {}
            )
        return DeliveryResult(
            uri=final.get("EndpointArn"),
            details={
                "endpoint_name": endpoint,
                "endpoint_arn": final.get("EndpointArn"),
                "endpoint_config_name": config_name,
                "model_name": model_name,
                "model_package_arn": package_arn,
                "previous_endpoint_config": previous,
                "endpoint_status": final.get("EndpointStatus"),
                "action": action,
                "approved": approved_now,
            },
            skipped=action == "unchanged" and not created and not approved_now,
        )

    async def _from_package(self, arn: str, item: DeliveryItem) -> tuple[dict[str, Any], str, bool]:
        """(container, name base, approved now) for a registered model package version."""
        client = await self.api.client()
        package = await self.api.describe(
            "DescribeModelPackage",
            arn,
            client.describe_model_package(ModelPackageName=arn),
        )
        if package is None:
            raise PermanentError(
                f"deploy {item.artifact.name!r}: model package {arn} no longer exists in the "
                "SageMaker model registry; register the model again"
            )
        status = package.get("ModelApprovalStatus")
        if status == "Rejected":
            raise PermanentError(
                f"deploy {item.artifact.name!r}: model package {arn} was rejected in the "
                "SageMaker model registry; approve it there, then `artifact-router retry`"
            )
        approved_now = False
        if status != "Approved":
            update: dict[str, Any] = {
                "ModelPackageArn": arn,
                "ModelApprovalStatus": "Approved",
                "ApprovalDescription": f"approved by artifact-router for deploy {item.key}"[:1024],
            }
            if package.get("CustomerMetadataProperties"):
                # Sent again unchanged: SageMaker merges them, some emulators replace them.
                update["CustomerMetadataProperties"] = package["CustomerMetadataProperties"]
            await self.api.call(
                "UpdateModelPackage", f"{arn} (approve)", client.update_model_package(**update)
            )
            approved_now = True
        group = str(package.get("ModelPackageGroupName") or item.artifact.name)
        version = package.get("ModelPackageVersion")
        base = f"{group}-v{version}" if version is not None else group
        spec_containers = (package.get("InferenceSpecification") or {}).get("Containers") or []
        data_url = (spec_containers[0].get("ModelDataUrl") if spec_containers else None) or (
            (package.get("CustomerMetadataProperties") or {}).get("router.artifact_uri")
        )
        if self.settings.image_uri:
            if not data_url:
                details = item.upstream.details if item.upstream else {}
                data_url = details.get("model_data_url")
            return self._image_container(str(data_url or ""), item), base, approved_now
        if not spec_containers:
            raise PermanentError(
                f"deploy {item.artifact.name!r}: model package {arn} has no inference "
                "specification to run; set image_uri on the sagemaker_endpoint component "
                "(or on the sagemaker_model_registry, before registering)"
            )
        return {"ModelPackageName": arn}, base, approved_now

    def _from_store(
        self, item: DeliveryItem, details: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        data_url = details.get("model_data_url") or model_source(item)
        base = f"{item.artifact.name}-{item.artifact.version}"
        return self._image_container(str(data_url), item), base

    def _image_container(self, data_url: str, item: DeliveryItem) -> dict[str, Any]:
        if not self.settings.image_uri:
            raise PermanentError(
                f"deploy {item.artifact.name!r}: sagemaker_endpoint needs image_uri to serve "
                "a model that is not a registered SageMaker model package"
            )
        if not data_url.startswith("s3://"):
            raise PermanentError(
                f"deploy {item.artifact.name!r}: SageMaker loads model data from S3, and this "
                f"model is at {data_url or 'no known location'}; route it to an s3 store"
            )
        return {"Image": self.settings.image_uri, "ModelDataUrl": data_url}

    async def _wait(self, endpoint: str) -> dict[str, Any]:
        client = await self.api.client()
        deadline = time.monotonic() + self.settings.wait_timeout
        what = f"endpoint {endpoint!r}"
        while True:
            got = await self.api.describe(
                "DescribeEndpoint", what, client.describe_endpoint(EndpointName=endpoint)
            )
            if got is None:
                raise TransientError(f"SageMaker {what} is not visible yet")
            status = got.get("EndpointStatus")
            if status == "InService":
                return got
            if status in ("Failed", "UpdateRollbackFailed"):
                raise PermanentError(
                    f"SageMaker {what} is {status}: {got.get('FailureReason') or 'no reason given'}"
                )
            if time.monotonic() > deadline:
                raise TransientError(
                    f"SageMaker {what} is still {status} after {self.settings.wait_timeout:g}s; "
                    "a retry keeps waiting for it"
                )
            await asyncio.sleep(self.settings.poll_interval)

    async def health(self) -> bool:
        try:
            client = await self.api.client()
            await client.list_endpoints(MaxResults=1)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.api.close()
