"""`sagemaker_model_registry`: a model package version in a SageMaker model package group.

Registering a model artifact (aiobotocore, the SageMaker API):

1. the model package group is `model_package_group` from the settings, else the
   artifact's name made a SageMaker name (`[a-zA-Z0-9-]`, at most 63 characters);
   it is created when `DescribeModelPackageGroup` says it does not exist (a racing
   creator's "already exists" counts as success);
2. the group's packages are listed (`ListModelPackages`, newest first) looking for
   one whose description ends with `router.delivery_key=<key>`, that exact key: a
   replay finds the version it created before and creates nothing (`skipped`);
3. otherwise `CreateModelPackage` makes the next version, in one request with
   everything a version must never lack: the delivery key (in the description, which
   SageMaker never changes afterwards, and as the customer metadata property
   `router.delivery_key`), a `ClientToken` derived from the key (so SageMaker itself
   refuses to run the same creation twice), the artifact's URI (customer metadata
   `router.artifact_uri`, and `ModelDataUrl` of the inference specification when
   `image_uri` is set), pipeline, run, step, version, framework, metrics and the
   rule's `metadata` as customer metadata properties.

Approval: the registry cannot see the rule's deploy condition, so the contract is:
a version is registered `PendingManualApproval` unless the delivery's params say
`auto_approve: true` (then `Approved`). The `sagemaker_endpoint` deployer approves
the version (`UpdateModelPackage` to `Approved`) before it deploys it, since the
router only plans a deploy once its own condition passed (auto with the metric
bounds met, a manual deploy, or `artifact-router model approve`).

The artifact's URI comes from the store delivery this one waited for; SageMaker
reads model data from S3, so route registered models to an `s3` store (a
`model.tar.gz` for SageMaker's framework containers).

Result details (what `sagemaker_endpoint` reads): `model_package_group`,
`model_package_arn`, `model_package_version`, `approval_status`, `model_data_url`.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Literal

from pydantic import Field, field_validator

from router.delivery import Action
from sinks.aws import (
    SageMakerClient,
    SageMakerSettings,
    entity_name,
    is_not_found,
    metadata_value,
)
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, PermanentError, TransientError
from sinks.registries.mlflow import model_source
from sinks.trackers.mlflow import param_text, tracked_values

__all__ = [
    "DELIVERY_KEY_PROPERTY",
    "SageMakerRegistry",
    "SageMakerRegistrySettings",
    "approval_for",
    "key_token",
]

DELIVERY_KEY_PROPERTY = "router.delivery_key"
DESCRIPTION_MARK = "router.delivery_key="
MAX_DESCRIPTION = 1024
MAX_PROPERTIES = 50  # CustomerMetadataProperties entries SageMaker accepts
_TOKEN_OK = re.compile(r"[A-Za-z0-9_.:/=+\-@]{1,200}")


class SageMakerRegistrySettings(SageMakerSettings):
    model_package_group: str | None = Field(
        default=None, description="default: the artifact name as a SageMaker name"
    )
    image_uri: str | None = Field(
        default=None,
        description="inference image (ECR URI) recorded in each version's inference "
        "specification with the artifact as ModelDataUrl; without it the version only "
        "records the artifact URI and sagemaker_endpoint must set its own image_uri",
    )
    content_types: list[str] = Field(
        default_factory=list, description="SupportedContentTypes, e.g. [text/csv]"
    )
    response_types: list[str] = Field(
        default_factory=list, description="SupportedResponseMIMETypes, e.g. [text/csv]"
    )

    @field_validator("model_package_group")
    @classmethod
    def _valid_group(cls, value: str | None) -> str | None:
        if value is not None and entity_name(value) != value:
            raise ValueError(
                "must match [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62} (letters, digits and single "
                f"hyphens, at most 63 characters), e.g. {entity_name(value)!r}"
            )
        return value


def key_token(key: str) -> str:
    """The delivery key as SageMaker metadata allows it (the key, or its sha256)."""
    if _TOKEN_OK.fullmatch(key):
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def approval_for(item: DeliveryItem) -> Literal["Approved", "PendingManualApproval"]:
    return "Approved" if item.params.get("auto_approve") is True else "PendingManualApproval"


def _printable(text: str) -> str:
    """Drop control and other non-printable characters (not allowed in descriptions)."""
    return "".join(ch for ch in text if not unicodedata.category(ch).startswith("C"))


def _description(item: DeliveryItem, token: str) -> str:
    c, a = item.context, item.artifact
    mark = f" | {DESCRIPTION_MARK}{token}"
    head = _printable(f"{c.pipeline}/{c.run_id}/{c.step_name}: {a.name} {a.version}")
    return head[: MAX_DESCRIPTION - len(mark)] + mark


def _properties(item: DeliveryItem, token: str, uri: str) -> dict[str, str]:
    c, a = item.context, item.artifact
    props: dict[str, Any] = {
        DELIVERY_KEY_PROPERTY: token,
        "router.artifact_uri": uri,
        "router.pipeline": c.pipeline,
        "router.run_id": c.run_id,
        "router.step_name": c.step_name,
        "router.event_id": c.event_id,
        "router.version": a.version,
    }
    if a.framework:
        props["router.framework"] = a.framework
    metrics, _ = tracked_values(a)
    for name, value in metrics.items():
        props[f"metric.{name}"] = repr(value)
    metadata = item.params.get("metadata") or {}
    if isinstance(metadata, dict):
        for name, value in metadata.items():
            props.setdefault(str(name), param_text(value))
    out: dict[str, str] = {}
    for name, value in props.items():
        if len(out) == MAX_PROPERTIES:
            break
        out[metadata_value(name, 128)] = metadata_value(value)
    return out


class SageMakerRegistry(BaseSink):
    """`sagemaker_model_registry`: model package versions in a package group."""

    Settings = SageMakerRegistrySettings
    settings: SageMakerRegistrySettings

    def __init__(self, sink_id: str, settings: SageMakerRegistrySettings) -> None:
        super().__init__(sink_id, settings)
        self.api = SageMakerClient(sink_id, settings)
        self._groups: set[str] = set()

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action is not Action.REGISTER:
            raise PermanentError(
                f"sink {self.sink_id}: sagemaker_model_registry registers models; "
                f"{item.action.value} needs another component (deploys: sagemaker_endpoint)"
            )
        uri = model_source(item)
        group = self.settings.model_package_group or entity_name(item.artifact.name)
        await self._ensure_group(group, item.artifact.name)
        token = key_token(item.key)
        found = await self._find(group, token)
        if found is not None:
            return self._result(group, found, uri, skipped=True)
        client = await self.api.client()
        request: dict[str, Any] = {
            "ModelPackageGroupName": group,
            "ModelPackageDescription": _description(item, token),
            "ModelApprovalStatus": approval_for(item),
            "CustomerMetadataProperties": _properties(item, token, uri),
            "ClientToken": hashlib.sha256(item.key.encode()).hexdigest()[:36],
        }
        if self.settings.image_uri:
            if not uri.startswith("s3://"):
                raise PermanentError(
                    f"register {item.artifact.name!r}: SageMaker loads model data from S3, and "
                    f"this model is at {uri}; route it to an s3 store"
                )
            spec: dict[str, Any] = {
                "Containers": [{"Image": self.settings.image_uri, "ModelDataUrl": uri}]
            }
            if self.settings.content_types:
                spec["SupportedContentTypes"] = self.settings.content_types
            if self.settings.response_types:
                spec["SupportedResponseMIMETypes"] = self.settings.response_types
            request["InferenceSpecification"] = spec
        try:
            created = await client.create_model_package(**request)
        except Exception as exc:
            if is_not_found(exc):  # the group was deleted since we saw it: make it again
                self._groups.discard(group)
                raise TransientError(
                    f"SageMaker CreateModelPackage: model package group {group!r} no longer "
                    "exists; the next attempt creates it again"
                ) from exc
            raise self.api.error(exc, "CreateModelPackage", f"in group {group!r}") from exc
        arn = str(created["ModelPackageArn"])
        described = await self.api.call(
            "DescribeModelPackage", arn, client.describe_model_package(ModelPackageName=arn)
        )
        return self._result(group, described, uri, skipped=False)

    def _result(
        self, group: str, package: dict[str, Any], uri: str, skipped: bool
    ) -> DeliveryResult:
        arn = str(package["ModelPackageArn"])
        version = package.get("ModelPackageVersion")
        return DeliveryResult(
            uri=arn,
            details={
                "model_package_group": group,
                "model_package_arn": arn,
                "model_package_version": int(version) if version is not None else None,
                "approval_status": package.get("ModelApprovalStatus"),
                "model_data_url": uri,
            },
            skipped=skipped,
        )

    async def _ensure_group(self, group: str, artifact_name: str) -> None:
        if group in self._groups:
            return
        client = await self.api.client()
        what = f"model package group {group!r}"
        described = await self.api.describe(
            "DescribeModelPackageGroup",
            what,
            client.describe_model_package_group(ModelPackageGroupName=group),
        )
        if described is None:
            await self.api.create(
                "CreateModelPackageGroup",
                what,
                client.create_model_package_group(
                    ModelPackageGroupName=group,
                    ModelPackageGroupDescription=_printable(
                        f"models named {artifact_name}, registered by artifact-router"
                    )[:MAX_DESCRIPTION],
                ),
            )
        self._groups.add(group)

    async def _find(self, group: str, token: str) -> dict[str, Any] | None:
        """The version of `group` created for this delivery key, if any."""
        client = await self.api.client()
        mark = f" | {DESCRIPTION_MARK}"
        kwargs: dict[str, Any] = {
            "ModelPackageGroupName": group,
            "SortBy": "CreationTime",
            "SortOrder": "Descending",
            "MaxResults": 100,
        }
        while True:
            page = await self.api.call(
                "ListModelPackages", f"of group {group!r}", client.list_model_packages(**kwargs)
            )
            for summary in page.get("ModelPackageSummaryList") or []:
                # The token after the last mark, compared whole (tokens hold no space):
                # a suffix match took key "xrouter.delivery_key=ev-1" for "ev-1".
                description = str(summary.get("ModelPackageDescription") or "")
                _, found, tail = description.rpartition(mark)
                if found and tail == token:
                    return dict(summary)
            token_next = page.get("NextToken")
            if not token_next:
                return None
            kwargs["NextToken"] = token_next

    async def health(self) -> bool:
        try:
            client = await self.api.client()
            await client.list_model_package_groups(MaxResults=1)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.api.close()
