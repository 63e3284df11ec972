"""`mlflow_alias` deployer: point an MLflow registered-model alias at a version.

Deploying a model registered by the `mlflow` registry sets the alias
`endpoint_name` from the routing rule (default: the `alias` setting, `production`)
on the version the register delivery created, so serving code loads
`models:/<name>@<alias>`.  Setting an alias is idempotent: a replay sets it again to
the same version (and reports `skipped` when it already points there).
"""

from __future__ import annotations

from pydantic import Field

from router.delivery import Action
from sinks.base import BaseSink, DeliveryItem, DeliveryResult, PermanentError
from sinks.mlflow_rest import MlflowApiError, MlflowConnectionSettings, MlflowRest

__all__ = ["MlflowAliasDeployer", "MlflowAliasSettings"]


class MlflowAliasSettings(MlflowConnectionSettings):
    alias: str = Field(default="production", description="alias set when a rule names none")


class MlflowAliasDeployer(BaseSink):
    Settings = MlflowAliasSettings
    settings: MlflowAliasSettings

    def __init__(self, sink_id: str, settings: MlflowAliasSettings) -> None:
        super().__init__(sink_id, settings)
        self.api = MlflowRest(settings)

    async def deliver(self, item: DeliveryItem) -> DeliveryResult:
        if item.action is not Action.DEPLOY:
            raise PermanentError(
                f"sink {self.sink_id}: mlflow_alias handles deploy deliveries, "
                f"not {item.action.value}"
            )
        details = item.upstream.details if item.upstream else {}
        name, version = details.get("registered_model"), details.get("model_version")
        if not name or not version:
            raise PermanentError(
                f"deploy {item.artifact.name!r}: mlflow_alias points an alias at a registered "
                "model version, and no MLflow register delivery came before this one; set "
                "register: true in the rule and use the mlflow model_registry in the stack"
            )
        alias = str(item.params.get("endpoint_name") or self.settings.alias)
        name, version = str(name), str(version)
        current = await self._current(name, alias)
        if current != version:
            await self.api.post(
                "registered-models/alias", {"name": name, "alias": alias, "version": version}
            )
        return DeliveryResult(
            uri=f"models:/{name}@{alias}",
            details={
                "registered_model": name,
                "model_version": version,
                "alias": alias,
                "previous_version": current,
            },
            skipped=current == version,
        )

    async def _current(self, name: str, alias: str) -> str | None:
        try:
            got = await self.api.get("registered-models/alias", {"name": name, "alias": alias})
        except MlflowApiError as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return str(got["model_version"]["version"])

    async def health(self) -> bool:
        try:
            await self.api.get("registered-models/search", {"max_results": 1})
        except Exception:
            return False
        return True

    async def close(self) -> None:
        await self.api.close()
