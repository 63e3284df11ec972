"""flowyml.yaml-compatible configuration: stacks, routing rules and the router's own section.

FlowyML's layout is read unchanged (`stacks:` / `active_stack:` / `artifact_routing:`,
the legacy `plugins:` section as a stack named `default`).  Unlike FlowyML, a key
that neither FlowyML nor the router knows is an error with a did-you-mean, because a
typo in a routing rule would otherwise silently drop routing.
"""

from __future__ import annotations

import io
import json
import os
import re
import string
import tempfile
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import unquote

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.errors import ConfigError, Problem, did_you_mean
from router.manifest import ArtifactKind

__all__ = [
    "PLACEHOLDERS",
    "ComponentConfig",
    "LoadedConfig",
    "MetricBound",
    "MqttSettings",
    "RetryPolicy",
    "RouterConfig",
    "RouterSettings",
    "RoutingRule",
    "StackConfig",
    "current_stack",
    "discover_config",
    "is_secret_key",
    "load_config",
    "mask_at",
    "mask_secrets",
    "mask_url_passwords",
    "select_stack",
    "set_active_stack",
    "url_passwords",
    "use_stack",
]

# Placeholders a path template may use.  FlowyML's three, then the router's extensions.
PLACEHOLDERS = (
    "run_id",
    "step_name",
    "artifact_name",
    "pipeline",
    "name",
    "version",
    "date",
    "file",
)

# Keys FlowyML defines that the router reads nothing from: accepted, reported by validate.
FLOWYML_TOP_LEVEL_UNUSED = {
    "orchestrator",
    "container_registry",
    "metadata_store",
    "feature_store",
    "data_validator",
    "alerter",
    "pipeline_defaults",
    "docker",
    "resources",
    "project",
    "version",
    "ui",
    "server",
    "settings",
    "secrets",
    "logging",
    "integrations",
}

# FlowyML asset types the router has no manifest type for: their routing rules are
# accepted (a shared flowyml.yaml keeps loading) and reported as unused.
FLOWYML_ROUTING_UNUSED = {"checkpoint", "featureset", "feature_set", "prompt"}
FLOWYML_STACK_UNUSED = {
    "orchestrator",
    "executor",
    "image_builder",
    "step_operator",
    "annotator",
    "model_monitor",
    "container_registry",
    "metadata_store",
    "feature_store",
    "data_validator",
    "alerter",
    "resources",
    "docker",
}

_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|api_key|apikey|access_key|private_key|credential|auth)",
    re.IGNORECASE,
)
_NOT_SECRET = {"access_key_id", "aws_access_key_id", "token_uri", "auth_uri", "credentials_file"}


def is_secret_key(key: str) -> bool:
    return key.lower() not in _NOT_SECRET and bool(_SECRET_KEY.search(key))


# `scheme://user:password@`; the password runs to the authority's last `@` (an unescaped
# `@` in it still parses, as urllib reads it), never past a `/` or a space.
_URL_PASSWORD = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)(?P<password>[^/\s]+)@"
)


def url_passwords(text: str) -> set[str]:
    """The password of every `scheme://user:password@` in `text`, also percent-decoded
    (a client may log either form)."""
    found = {m.group("password") for m in _URL_PASSWORD.finditer(text)}
    return found | {unquote(p) for p in found}


# `scheme://user@`, a user without a password: a token passed as the user name
# (`https://<token>@host`, as git hosts and many HTTP APIs take one) is the whole secret.
_URL_USER_ONLY = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://)[^/:@\s]+@")


def mask_url_passwords(text: str) -> str:
    """`text` with the password of every URL in it replaced by '***', and the user of a
    URL that has no password (it may be a token; there is no telling)."""
    if "://" not in text:
        return text
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", text)
    return _URL_USER_ONLY.sub(lambda m: f"{m.group('head')}***@", text)


def mask_secrets(value: Any) -> Any:
    """A copy of a config tree with secret values replaced by '***' (for display).

    Masks the value of every secret-looking key (password, token, secret_access_key,
    api_key, ...) and the password part of URLs (`postgresql://user:***@host/db`).
    """
    if isinstance(value, Mapping):
        return {
            k: ("***" if is_secret_key(str(k)) and v not in (None, "") else mask_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [mask_secrets(v) for v in value]
    if isinstance(value, str):
        return mask_url_passwords(value)
    return value


def mask_at(loc: Sequence[Any], value: Any) -> Any:
    """An invalid input found at key path `loc`, masked for an error message: all of it
    under a secret-looking key, else its secret keys and URL passwords (a model-level
    error's input is the whole section, secrets included)."""
    key = str(loc[-1]) if loc else ""
    return mask_secrets({key: value})[key]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RetryPolicy(_Strict):
    """Exponential backoff with full jitter, bounded by attempts and by age."""

    max_attempts: Annotated[int, Field(ge=1)] = 10
    base_delay: Annotated[float, Field(gt=0)] = 0.5
    max_delay: Annotated[float, Field(gt=0)] = 60.0
    max_age: Annotated[float, Field(gt=0)] = 24 * 3600.0

    @model_validator(mode="after")
    def _base_below_max(self) -> RetryPolicy:
        if self.base_delay > self.max_delay:
            raise ValueError(
                f"base_delay {self.base_delay:g} is above max_delay {self.max_delay:g}; "
                "raise max_delay or lower base_delay"
            )
        return self


class ComponentConfig(BaseModel):
    """A stack component: `type` plus the component's own settings.

    `retry` and `concurrency` are the router's per-sink policy; every other key is
    handed to the sink's settings model, which validates it when the config loads.
    """

    model_config = ConfigDict(extra="allow")

    type: str
    retry: RetryPolicy | None = None
    concurrency: Annotated[int, Field(ge=1, le=1024)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _flowyml_aliases(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for short, long in (("bucket", "bucket_name"), ("project", "project_id")):
                if short in data and long in data:
                    raise PydanticCustomError(
                        "located",
                        "{message}",
                        {
                            "message": f"give either {short!r} (FlowyML's spelling) or "
                            f"{long!r}, not both",
                            "at": short,
                            "value": data[short],
                        },
                    )
                if short in data:
                    data[long] = data.pop(short)
        return data

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


_BOUND_HELP = "write a number (a minimum, as FlowyML does), {min: x} or {max: x} (lower is better)"


class MetricBound(_Strict):
    """`accuracy: 0.9` means at least 0.9; `loss: {max: 0.1}` means at most 0.1."""

    min: Annotated[float, Field(allow_inf_nan=False)] | None = None
    max: Annotated[float, Field(allow_inf_nan=False)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _plain_number_is_a_minimum(cls, data: Any) -> Any:
        if isinstance(data, bool):
            raise ValueError(f"is not a bound; {_BOUND_HELP}")
        if isinstance(data, int | float):
            return {"min": data}
        if isinstance(data, str):
            try:
                return {"min": float(data)}  # "${MIN_ACCURACY:-0.9}" interpolates to text
            except ValueError:
                raise ValueError(f"is not a number; {_BOUND_HELP}") from None
        if data is None:
            raise ValueError(f"is empty; {_BOUND_HELP}")
        return data

    @model_validator(mode="after")
    def _one_bound(self) -> MetricBound:
        if self.min is None and self.max is None:
            raise ValueError("give 'min' (higher is better) or 'max' (lower is better)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}; no value can pass")
        return self


# FlowyML's rule field is called `register`, which shadows ABCMeta.register on the class;
# instances read the field, which is all the router needs.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class DatasetExport(_Strict):
    """`export_to_dataset:` a completed dataset becomes the next numbered snapshot of a
    named dataset in a store (Domino Flows' export), recorded in the catalog."""

    name: Annotated[str, Field(min_length=1, max_length=200)]
    store: str | None = None
    path: str = "datasets/{dataset}/{snapshot}"


class RoutingRule(_Strict):
    """FlowyML's ArtifactRoutingRule, plus `on_conflict`, lists of stores and exports."""

    store: str | list[str] | None = None
    path: str = "{run_id}/{step_name}/{artifact_name}"
    register: bool = False
    deploy: bool = False
    deploy_condition: Literal["manual", "auto", "on_approval"] = "manual"
    deploy_min_metrics: dict[str, MetricBound] = Field(default_factory=dict)
    endpoint_name: str | None = None
    log_to_tracker: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    on_conflict: Literal["fail", "overwrite", "version"] = "fail"
    export_to_dataset: DatasetExport | None = None

    @field_validator("store")
    @classmethod
    def _store_list_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list routes nowhere; name a store or leave 'store' out")
        return value

    @property
    def stores(self) -> list[str | None]:
        if self.store is None:
            return [None]
        return [self.store] if isinstance(self.store, str) else list(self.store)


# artifact_routing keys, case-insensitive, as FlowyML's type names ("Model", "Dataset").
_ROUTING_KEYS = {kind.value: kind for kind in ArtifactKind} | {"data": ArtifactKind.DATASET}


class StackConfig(_Strict):
    name: str
    artifact_store: ComponentConfig | None = None
    artifact_stores: dict[str, ComponentConfig] = Field(default_factory=dict)
    experiment_tracker: ComponentConfig | list[ComponentConfig] | None = None
    model_registry: ComponentConfig | None = None
    model_deployer: ComponentConfig | None = None
    artifact_routing: dict[str, RoutingRule] = Field(default_factory=dict)
    unused: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def rule_for(self, kind: ArtifactKind) -> RoutingRule | None:
        for key, rule in self.artifact_routing.items():
            if _ROUTING_KEYS.get(key.lower()) == kind:
                return rule
        for key, rule in self.artifact_routing.items():
            if key.lower() == "default":
                return rule
        return None

    @property
    def trackers(self) -> list[tuple[str, ComponentConfig]]:
        if self.experiment_tracker is None:
            return []
        if isinstance(self.experiment_tracker, ComponentConfig):
            return [("experiment_tracker", self.experiment_tracker)]
        return [(f"experiment_tracker[{i}]", c) for i, c in enumerate(self.experiment_tracker)]

    def resolve_store(self, name: str | None) -> tuple[str, ComponentConfig] | None:
        """A rule's `store:` names a key of `artifact_stores`, or the type of `artifact_store`."""
        if name is not None and name in self.artifact_stores:
            return f"artifact_stores.{name}", self.artifact_stores[name]
        if self.artifact_store is not None and name in (None, self.artifact_store.type):
            return "artifact_store", self.artifact_store
        return None

    def components(self) -> list[tuple[str, ComponentConfig]]:
        """Every configured component, by the path used in sink ids."""
        single = [
            (path, comp) for path in ("artifact_store", "model_registry", "model_deployer")
            if (comp := getattr(self, path)) is not None
        ]
        return single + [
            (f"artifact_stores.{name}", comp) for name, comp in self.artifact_stores.items()
        ] + self.trackers

    def component(self, path: str) -> ComponentConfig | None:
        """Look a component up by the path used in sink ids (`artifact_stores.archive`)."""
        if path.startswith("artifact_stores."):
            return self.artifact_stores.get(path.split(".", 1)[1])
        if path.startswith("experiment_tracker"):
            return dict(self.trackers).get(path)
        value = (
            getattr(self, path, None)
            if path in ("artifact_store", "model_registry", "model_deployer")
            else None
        )
        return value if isinstance(value, ComponentConfig) else None


def _int_from_text(value: Any) -> Any:
    # `qos: ${MQTT_QOS:-1}` interpolates to text.
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _text_from_number(value: Any) -> Any:
    # `protocol: 5` is a number in YAML.
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


class MqttSettings(_Strict):
    """MQTT source settings (see the README's broker section)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    client_id: str = "artifact-router"
    topics: list[str] = Field(default_factory=lambda: ["artifacts/#"])
    shared_group: str | None = None
    qos: Annotated[Literal[0, 1, 2], BeforeValidator(_int_from_text)] = 1
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_text_from_number)] = "5"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive: int = 60
    session_expiry: int = 7 * 24 * 3600
    inline_max_bytes: int = 1024 * 1024
    allowed_roots: list[str] = Field(default_factory=list)
    dead_letter_topic: str | None = None
    receipts: bool = False
    receipt_topic: str = "artifacts/receipts/{event_id}"
    # Pools only: seconds a member may be offline before a live member drains its
    # session (mosquitto keeps a dead member's messages there); 0 or null: never.
    takeover_after: Annotated[float, Field(ge=0)] | None = 10.0
    # Pools only: how often a member says "online" again. A member whose status has not
    # come for three of its heartbeats is taken for offline: one that died while the
    # broker was down left no Will, and its retained "online" status would stand for
    # good. 0: never (a member that does not beat is never taken for silent).
    heartbeat_seconds: Annotated[float, Field(ge=0)] = 15.0

    def takeover_enabled(self) -> bool:
        """Whether this member watches the pool and drains dead members' sessions."""
        return bool(self.shared_group and self.takeover_after and self.protocol == "5")

    @field_validator("receipt_topic")
    @classmethod
    def _receipt_topic(cls, value: str) -> str:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        except ValueError as exc:
            raise ValueError(f"bad template: {exc}") from None
        if names - {"event_id"}:
            raise ValueError(
                f"unknown placeholder(s) {', '.join(sorted(names - {'event_id'}))}; only "
                "{event_id} is filled in"
            )
        if "+" in value or "#" in value:
            raise ValueError("a topic to publish to cannot contain the wildcards + or #")
        return value

    @field_validator("topics")
    @classmethod
    def _topic_filters(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("subscribe to at least one topic filter, e.g. artifacts/#")
        for topic in value:
            if not topic or topic.startswith("$share/"):
                raise ValueError(
                    f"{topic!r}: give a plain filter; set shared_group for $share/<group>/"
                )
            if "#" in topic and not topic.endswith("#"):
                raise ValueError(f"{topic!r}: '#' may only be the last level")
        return value

    @field_validator("shared_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#")):
            raise ValueError("a shared subscription group is one topic level: no / + or #")
        return value

    @model_validator(mode="after")
    def _takeover(self) -> MqttSettings:
        if not (self.shared_group and self.takeover_after):
            return self
        if self.protocol != "5" and "takeover_after" in self.model_fields_set:
            raise ValueError(
                f"takeover_after {self.takeover_after:g} needs protocol \"5\" (a dead member's "
                'session is ended with an MQTT v5 DISCONNECT); set protocol: "5" or '
                "takeover_after: 0"
            )
        if any(c in self.client_id for c in "/+#"):
            raise ValueError(
                f"client_id {self.client_id!r} names this member's status topic in the pool: no "
                "/ + or #; choose another client_id, or set takeover_after: 0"
            )
        return self


class RouterSettings(_Strict):
    """The router's own section: where things live and how hard to try."""

    spool: Path = Path("./spool")
    state_dir: Path = Path("./.router")
    journal_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite under state_dir"
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    concurrency: Annotated[int, Field(ge=1, le=4096)] = 256
    sink_concurrency: Annotated[int, Field(ge=1, le=1024)] = 32
    intake_batch: Annotated[int, Field(ge=1, le=10_000)] = 256
    rescan_seconds: Annotated[float, Field(gt=0)] = 5.0
    retention_days: Annotated[float, Field(ge=0)] = 7.0
    listen: str | None = Field(default=None, description="host:port for /healthz and /metrics")
    drain_seconds: Annotated[float, Field(ge=0)] = 60.0
    # How long a claimed delivery stays this daemon's without renewal (renewed every
    # third of it): when a pool member dies, the others take its in-flight work after this.
    lease_seconds: Annotated[float, Field(ge=3)] = 120.0
    mqtt: MqttSettings | None = None

    def database_url(self) -> str:
        if self.journal_url:
            return self.journal_url
        return f"sqlite+aiosqlite:///{(self.state_dir / 'router.db').resolve()}"


class RouterConfig(_Strict):
    stacks: dict[str, StackConfig]
    active_stack: str
    router: RouterSettings = Field(default_factory=RouterSettings)
    unused: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def stack(self, name: str) -> StackConfig:
        try:
            return self.stacks[name]
        except KeyError:
            raise KeyError(
                f"no stack named {name!r}{did_you_mean(name, self.stacks)}; "
                f"known stacks: {', '.join(sorted(self.stacks))}"
            ) from None


class LoadedConfig(BaseModel):
    """A validated config and where it came from (for messages and `stack set`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: RouterConfig
    source: str
    path: Path | None = None
    warnings: list[str] = Field(default_factory=list)
    raw: dict[str, Any] = Field(default_factory=dict)


# --- interpolation ------------------------------------------------------------------

# `$$` is a literal `$`; `${NAME}` and `${NAME:-default}` read the environment; any other
# `${` is a mistake worth reporting rather than passing on as text.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")


def _interpolate(value: Any, env: Mapping[str, str], path: str, problems: list[Problem]) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k), problems)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name is None:
            problems.append(
                Problem(
                    field=path or "(file)",
                    value=text,
                    message="malformed variable reference; write ${NAME} or "
                    "${NAME:-default} (NAME: letters, digits and '_'), or $$ for a literal $",
                )
            )
            return ""
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(
            Problem(
                field=path or "(file)",
                value=text,
                message=f"environment variable {name} is not set; export it or write "
                f"${{{name}:-default}}",
            )
        )
        return ""

    return _VAR.sub(sub, value)


# --- validation ---------------------------------------------------------------------

_TOP_KEYS = {"stacks", "active_stack", "router", "plugins", "artifact_routing"}
_STACK_KEYS = set(StackConfig.model_fields) - {"name", "unused"}
_RULE_KEYS = set(RoutingRule.model_fields)
_ROUTING_NAMES = ["Model", "Dataset", "Metrics", "Parameters", "Report", "Artifact", "default"]


def _check_keys(
    data: Mapping[str, Any],
    known: set[str],
    unused: set[str],
    path: str,
    problems: list[Problem],
    unused_found: dict[str, Any],
) -> None:
    for key in data:
        if key in known:
            continue
        if key in unused:
            unused_found[f"{path}.{key}" if path else key] = data[key]
            continue
        problems.append(
            Problem(
                field=f"{path}.{key}" if path else str(key),
                message=f"unknown key{did_you_mean(str(key), known | unused)}; "
                "FlowyML would ignore it silently, the router refuses it",
            )
        )


def _loc(prefix: str, loc: tuple[int | str, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _candidates(tp: Any) -> list[Any]:
    origin = get_origin(tp)
    if origin is Annotated:
        return _candidates(get_args(tp)[0])
    if origin in (Union, UnionType):
        return [c for arg in get_args(tp) for c in _candidates(arg)]
    return [tp]


def _known_fields(root: type[BaseModel], loc: tuple[int | str, ...]) -> set[str]:
    """Field names of the model a validation error's location points into."""
    current: Any = root
    for part in loc:
        step: Any = None
        for cand in _candidates(current):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                if isinstance(part, str) and part in cand.model_fields:
                    step = cand.model_fields[part].annotation
                    break
            elif get_origin(cand) is dict and isinstance(part, str):
                step = get_args(cand)[1]
                break
            elif get_origin(cand) is list and isinstance(part, int):
                step = get_args(cand)[0]
                break
        if step is not None:
            current = step
        # else: a union member tag pydantic puts in the location; stay where we are
    return {
        name
        for cand in _candidates(current)
        if isinstance(cand, type) and issubclass(cand, BaseModel)
        for name in cand.model_fields
        if name not in ("name", "unused") or cand is not StackConfig
    }


_UNION_TAGS = ("ComponentConfig", "list[ComponentConfig]", "str", "list[str]")


def _validation_problems(prefix: str, exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
        message = err["msg"].removeprefix("Value error, ")
        value = None if err["type"] == "missing" else mask_at(loc, err.get("input"))
        if err["type"] == "literal_error":
            message = f"must be one of {err.get('ctx', {}).get('expected', '')}"
        elif err["type"] == "missing":
            message = "required key is missing"
            if loc and loc[-1] == "type":
                message += "; every component names its type, e.g. type: local"
        elif err["type"] == "located":
            ctx = err.get("ctx") or {}
            loc = (*loc, ctx["at"]) if ctx.get("at") else loc
            message, value = str(ctx.get("message", message)), mask_at(loc, ctx.get("value"))
        elif err["type"] == "extra_forbidden":
            key = str(loc[-1]) if loc else ""
            hint = did_you_mean(key, _known_fields(RouterConfig, tuple(err["loc"])[:-1]))
            message = f"unknown key{hint}; FlowyML would ignore it silently, the router refuses it"
        problems.append(Problem(field=_loc(prefix, loc), value=value, message=message))
    return problems


def _check_template(
    template: str, path: str, problems: list[Problem], extra: tuple[str, ...] = ()
) -> None:
    known_placeholders = (*PLACEHOLDERS, *extra)
    if not template.strip():
        problems.append(
            Problem(
                field=path,
                value=template,
                message="an empty path puts every artifact at the store's root; write a "
                "template such as '{pipeline}/{run_id}/{step_name}/{name}'",
            )
        )
        return
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        problems.append(
            Problem(
                field=path,
                value=template,
                message=f"bad template: {exc}; write {{{{ and }}}} for literal braces",
            )
        )
        return
    for _, field_name, spec, conversion in fields:
        if field_name is None:
            continue
        if field_name not in known_placeholders:
            problems.append(
                Problem(
                    field=path,
                    value=template,
                    message=f"unknown placeholder {{{field_name}}}"
                    f"{did_you_mean(field_name, known_placeholders)}; "
                    f"known: {', '.join('{' + p + '}' for p in known_placeholders)}",
                )
            )
        elif spec or conversion:
            problems.append(
                Problem(
                    field=path,
                    value=template,
                    message=f"placeholder {{{field_name}}} takes no format spec or conversion",
                )
            )
    segments = template.split("/")
    if all(seg in ("", ".") for seg in segments):
        problems.append(
            Problem(
                field=path,
                value=template,
                message="names no directory or file; write a template such as "
                "'{pipeline}/{run_id}/{step_name}/{name}'",
            )
        )
    if template.startswith("/") or "\\" in template or ".." in segments or "\x00" in template:
        problems.append(
            Problem(
                field=path,
                value=template,
                message="a path template is relative to its store: no leading '/', "
                "no '..' segment, no backslashes",
            )
        )


def _validate_stack_semantics(stack: StackConfig, problems: list[Problem]) -> None:
    from sinks.registry import check_component

    base = f"stacks.{stack.name}"
    components: list[tuple[str, str, ComponentConfig | None]] = [
        ("artifact_store", "artifact_store", stack.artifact_store),
        ("model_registry", "model_registry", stack.model_registry),
        ("model_deployer", "model_deployer", stack.model_deployer),
        *(("artifact_store", f"artifact_stores.{n}", c) for n, c in stack.artifact_stores.items()),
        *(("experiment_tracker", p, c) for p, c in stack.trackers),
    ]
    for role, key, component in components:
        if component is not None:
            problems.extend(check_component(role, f"{base}.{key}", component))

    seen_kinds: dict[str, str] = {}
    for key, rule in stack.artifact_routing.items():
        rpath = f"{base}.artifact_routing.{key}"
        lowered = key.lower()
        canonical = _ROUTING_KEYS[lowered].value if lowered in _ROUTING_KEYS else lowered
        if lowered not in _ROUTING_KEYS and lowered != "default":
            problems.append(
                Problem(
                    field=rpath,
                    value=key,
                    message="unknown artifact type"
                    f"{did_you_mean(key, _ROUTING_NAMES)}; use one of "
                    f"{', '.join(_ROUTING_NAMES)} (any case; Data means Dataset)",
                )
            )
        elif canonical in seen_kinds:
            problems.append(
                Problem(
                    field=rpath,
                    value=key,
                    message=f"a second rule for {canonical} (the first is "
                    f"{seen_kinds[canonical]!r}; type names ignore case); keep one",
                )
            )
        else:
            seen_kinds[canonical] = key
        _check_template(rule.path, f"{rpath}.path", problems)
        export = rule.export_to_dataset
        if export is not None:
            epath = f"{rpath}.export_to_dataset"
            kind = _ROUTING_KEYS.get(key.lower())
            if kind is not ArtifactKind.DATASET and key.lower() != "default":
                problems.append(Problem(field=epath, message="only dataset rules (Dataset, "
                                        "DATA or default) can export to a dataset"))
            _check_template(export.path, f"{epath}.path", problems, extra=("dataset", "snapshot"))
            if "{snapshot}" not in export.path:
                problems.append(Problem(field=f"{epath}.path", value=export.path,
                                        message="must contain {snapshot}, or every export "
                                        "would overwrite the last"))
            if export.store is not None and stack.resolve_store(export.store) is None:
                problems.append(Problem(field=f"{epath}.store", value=export.store,
                                        message="names no store of this stack"
                                        + did_you_mean(export.store, list(stack.artifact_stores))))
        listed: dict[str, str | None] = {}  # component -> the name that first chose it
        for store in rule.stores:
            resolved = stack.resolve_store(store)
            if resolved is not None and resolved[0] in listed:
                # Two names for one store would plan two deliveries with one key: the
                # journal could not take the event, nor the rest of its batch.
                problems.append(
                    Problem(
                        field=f"{rpath}.store",
                        value=rule.store,
                        message=f"lists the store {resolved[0]} twice ({listed[resolved[0]]!r} "
                        f"and {store!r}); list each store once",
                    )
                )
            elif resolved is not None:
                listed[resolved[0]] = store
            if store is None:
                continue  # the stack's artifact_store, if any; planning reports its absence
            if resolved is None:
                known = sorted(stack.artifact_stores) + (
                    [stack.artifact_store.type] if stack.artifact_store else []
                )
                problems.append(
                    Problem(
                        field=f"{rpath}.store",
                        value=store,
                        message=(
                            "names no store of this stack"
                            + did_you_mean(store, known)
                            + "; add it under artifact_stores or set artifact_store"
                            + (f" (known: {', '.join(known)})" if known else "")
                        ),
                    )
                )
        if rule.register and stack.model_registry is None:
            problems.append(
                Problem(
                    field=f"{rpath}.register",
                    value=True,
                    message=f"stack {stack.name!r} has no model_registry; add one or set "
                    "register: false",
                )
            )
        if rule.deploy and stack.model_deployer is None:
            problems.append(
                Problem(
                    field=f"{rpath}.deploy",
                    value=True,
                    message=f"stack {stack.name!r} has no model_deployer; add one or set "
                    "deploy: false",
                )
            )
        # deploy_condition: auto with no deploy_min_metrics deploys every model, as in
        # FlowyML; that is a choice, not an error.


def _build(raw: Any, source: str) -> tuple[RouterConfig, list[str]]:
    problems: list[Problem] = []
    unused: dict[str, Any] = {}
    warnings: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(
            source,
            [
                Problem(
                    field="(file)",
                    value=raw if isinstance(raw, str | int | float) else type(raw).__name__,
                    message="must be a YAML mapping with stacks:, active_stack: and router:",
                )
            ],
        )

    _check_keys(raw, _TOP_KEYS, FLOWYML_TOP_LEVEL_UNUSED, "", problems, unused)
    stacks_raw = raw.get("stacks")
    if stacks_raw is not None:
        if "plugins" in raw:
            # FlowyML reads `plugins:` only when there is no `stacks:`.
            unused["plugins"] = raw["plugins"]
        if "artifact_routing" in raw:
            problems.append(
                Problem(
                    field="artifact_routing",
                    message="a top-level artifact_routing applies only to the legacy "
                    "plugins: layout; move it under stacks.<name>.artifact_routing",
                )
            )
    elif isinstance(raw.get("plugins"), dict):
        # FlowyML's legacy single-stack layout loads as a stack named "default".
        stacks_raw = {"default": raw["plugins"]}
        if "artifact_routing" in raw:
            stacks_raw["default"] = {**raw["plugins"], "artifact_routing": raw["artifact_routing"]}
    else:
        defaults = _embedded_defaults()
        stacks_raw = defaults["stacks"]
        if "artifact_routing" in raw:
            # As FlowyML: a top-level artifact_routing is the routing of the default
            # stack (here the embedded `local` one), replacing its rules.
            local = defaults["active_stack"]
            stacks_raw[local] = {**stacks_raw[local], "artifact_routing": raw["artifact_routing"]}
        raw = {**raw, "active_stack": raw.get("active_stack", defaults["active_stack"])}
    if not isinstance(stacks_raw, dict) or not stacks_raw:
        problems.append(
            Problem(
                field="stacks",
                value=stacks_raw,
                message="must map stack names to stacks, e.g. stacks: {local: {artifact_store: "
                "{type: local, path: ./artifacts}}}",
            )
        )
        raise ConfigError(source, problems)

    stacks: dict[str, Any] = {}
    for name, body in stacks_raw.items():
        spath = f"stacks.{name}"
        if not isinstance(body, dict):
            problems.append(
                Problem(
                    field=spath,
                    value=body,
                    message="must be a mapping of components (artifact_store, model_registry, "
                    "...) and artifact_routing",
                )
            )
            continue
        stack_unused: dict[str, Any] = {}
        _check_keys(body, _STACK_KEYS, FLOWYML_STACK_UNUSED, spath, problems, stack_unused)
        unused.update(stack_unused)
        known = {k: v for k, v in body.items() if k in _STACK_KEYS}
        routing = body.get("artifact_routing")
        if isinstance(routing, dict):
            kept = {}
            for key, rule in routing.items():
                rpath = f"{spath}.artifact_routing.{key}"
                if str(key).lower() in FLOWYML_ROUTING_UNUSED:
                    unused[rpath] = rule
                    continue
                if isinstance(rule, dict):
                    _check_keys(rule, _RULE_KEYS, set(), rpath, problems, {})
                kept[str(key)] = {} if rule is None else rule
            known["artifact_routing"] = kept
        elif routing is None and "artifact_routing" in body:
            known["artifact_routing"] = {}
        stacks[str(name)] = {"name": str(name), **known}

    active = raw.get("active_stack") or next(iter(stacks), "")
    router_raw = raw.get("router")
    if router_raw is None:
        router_raw = {}
    if isinstance(router_raw, dict):
        _check_keys(router_raw, set(RouterSettings.model_fields), set(), "router", problems, {})
        if isinstance(router_raw.get("mqtt"), dict):
            mqtt_keys = set(MqttSettings.model_fields)
            _check_keys(router_raw["mqtt"], mqtt_keys, set(), "router.mqtt", problems, {})
    if problems:
        raise ConfigError(source, problems)

    try:
        config = RouterConfig.model_validate(
            {"stacks": stacks, "active_stack": active, "router": router_raw}
        )
    except ValidationError as exc:
        raise ConfigError(source, _validation_problems("", exc)) from None

    if config.active_stack not in config.stacks:
        problems.append(
            Problem(
                field="active_stack",
                value=config.active_stack,
                message=f"names no stack{did_you_mean(config.active_stack, config.stacks)}; "
                f"known: {', '.join(config.stacks)}",
            )
        )
    for stack in config.stacks.values():
        _validate_stack_semantics(stack, problems)
    if problems:
        raise ConfigError(source, problems)
    config.unused = unused
    for key in sorted(unused):
        warnings.append(f"{key}: FlowyML setting, not used by the router")
    return config, warnings


def _embedded_defaults() -> dict[str, Any]:
    text = resources.files("router").joinpath("defaults.yaml").read_text()
    data: dict[str, Any] = yaml.safe_load(text)
    return data


# --- files --------------------------------------------------------------------------

# The router's own names, then FlowyML's (flowyml.plugins.config.CONFIG_FILE_NAMES).
_CONFIG_NAMES = (
    "router.yaml",
    "router.yml",
    "flowyml.yaml",
    "flowyml.yml",
    ".flowyml.yaml",
    ".flowyml.yml",
)


def discover_config(
    explicit: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Path | None:
    """`--config`, then ROUTER_CONFIG, FLOWYML_CONFIG, then the usual names in the cwd."""
    env = os.environ if env is None else env
    for origin, candidate in (
        ("--config", explicit),
        ("ROUTER_CONFIG", env.get("ROUTER_CONFIG")),
        ("FLOWYML_CONFIG", env.get("FLOWYML_CONFIG")),
    ):
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                raise ConfigError(
                    str(path),
                    [
                        Problem(
                            field=origin,
                            value=str(candidate),
                            message="no such file; check the path or unset it",
                        )
                    ],
                )
            return path
    base = cwd or Path.cwd()
    for name in _CONFIG_NAMES:
        if (base / name).is_file():
            return base / name
    return None


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(file: Path, source: str) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem(field="(file)", message=str(exc))]) from None
    try:
        return yaml.load(text, Loader=_StrictLoader) or {}  # a SafeLoader: no objects
    except _DuplicateKey as exc:
        raise ConfigError(
            source,
            [
                Problem(
                    field=f"line {exc.second}",
                    value=exc.key,
                    message=f"key given twice (first on line {exc.first}); YAML would keep "
                    "only the last silently: remove or rename one",
                )
            ],
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = Problem(field=where, message=f"not valid YAML: {exc}")
        raise ConfigError(source, [problem]) from None


def config_secrets(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
                   ) -> set[str]:
    """Secret values a config file holds (interpolated), even when it does not validate:
    for redacting them from a reload's error.  Empty when it cannot be read at all."""
    from router.logs import secret_values

    if path is None:
        return set()
    try:
        raw = _read_yaml(Path(path), str(path))
    except ConfigError:
        return set()
    return secret_values(_interpolate(raw, os.environ if env is None else env, "", []))


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    discover: bool = True,
) -> LoadedConfig:
    """Load, interpolate and validate; the embedded defaults when no file exists.

    Raises ConfigError naming the file, each bad key path, its value and the fix.
    """
    env = os.environ if env is None else env
    file = discover_config(path, env) if discover else (Path(path) if path else None)
    if file is None:
        raw: Any = {}
        source = "(embedded defaults)"
    else:
        source = str(file)
        raw = _read_yaml(file, source)
    problems: list[Problem] = []
    raw = _interpolate(raw, env, "", problems)
    if problems:
        raise ConfigError(source, problems)
    config, warnings = _build(raw, source)
    return LoadedConfig(config=config, source=source, path=file, warnings=warnings, raw=raw)


def _yaml_scalar(name: str) -> str:
    """`name` as a YAML scalar that both PyYAML and ruamel read back as that string."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) and yaml.safe_load(name) == name:
        return name
    return json.dumps(name)  # a JSON string is a YAML double-quoted scalar


def _edit_active_stack_line(text: str, name: str) -> str | None:
    """The file with its one top-level `active_stack:` line changed (or one appended)."""
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if re.match(r"active_stack[ \t]*:", line)]
    if not hits:
        sep = "" if not text or text.endswith("\n") else "\n"
        return f"{text}{sep}active_stack: {_yaml_scalar(name)}\n"
    if len(hits) > 1:
        return None
    match = re.fullmatch(
        r"active_stack[ \t]*:[ \t]*[^#\r\n]*?(?P<comment>[ \t]+#[^\r\n]*)?(?P<eol>\r?\n)?",
        lines[hits[0]],
    )
    if match is None:
        return None
    tail = (match.group("comment") or "") + (match.group("eol") or "")
    lines[hits[0]] = f"active_stack: {_yaml_scalar(name)}{tail}"
    return "".join(lines)


def _parsed(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except (yaml.YAMLError, _DuplicateKey):
        return None


def _ruamel_rewrite(text: str, name: str) -> str:
    """Round-trip the whole document through ruamel.yaml (comments kept, layout guessed)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.util import load_yaml_guess_indent

    yaml_rt = YAML(typ="rt")
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096
    _, indent, block_seq_indent = load_yaml_guess_indent(text)
    doc = yaml_rt.load(text)
    doc["active_stack"] = name
    yaml_rt.indent(mapping=indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
    out = io.StringIO()
    yaml_rt.dump(doc, out)
    return out.getvalue()


def set_active_stack(path: str | os.PathLike[str], name: str) -> None:
    """`stack set NAME`: rewrite `active_stack:` in place, keeping the rest of the file.

    The name must be a stack of the file (the legacy `plugins:` layout has one stack,
    `default`; a file without stacks has the embedded ones).  Only the `active_stack:`
    line changes (or one is appended), so comments, quoting and layout stay as written;
    a file where that is not possible (a flow-style document) is round-tripped through
    ruamel.yaml, which keeps comments.  `${VAR}` references are not expanded.  The file
    is replaced atomically and keeps its permissions.
    """
    from ruamel.yaml.error import YAMLError as RuamelError

    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [Problem(field="(file)", message=str(exc))]) from None
    data = _read_yaml(file, source)
    if not isinstance(data, dict):
        raise ConfigError(source, [Problem(field="(file)", message="must be a YAML mapping")])
    stacks = data.get("stacks")
    if isinstance(stacks, dict):
        names = [str(k) for k in stacks]
    elif isinstance(data.get("plugins"), dict):
        names = ["default"]
    else:
        names = [str(k) for k in _embedded_defaults()["stacks"]]
    if name not in names:
        raise ConfigError(
            source,
            [
                Problem(
                    field="active_stack",
                    value=name,
                    message=f"no stack named {name!r}{did_you_mean(name, names)}; "
                    f"known stacks: {', '.join(names)}",
                )
            ],
        )
    if data.get("active_stack") == name:
        return

    expected = {**data, "active_stack": name}
    new_text = _edit_active_stack_line(text, name)
    if new_text is None or _parsed(new_text) != expected:
        try:
            new_text = _ruamel_rewrite(text, name)
        except RuamelError as exc:
            problem = Problem(field="(file)", message=f"cannot rewrite: {exc}")
            raise ConfigError(source, [problem]) from None
        if _parsed(new_text) != expected:
            raise ConfigError(
                source,
                [
                    Problem(
                        field="active_stack",
                        value=name,
                        message="the file could not be rewritten safely; edit active_stack by hand",
                    )
                ],
            )

    mode = file.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(new_text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- stack selection ----------------------------------------------------------------

_stack_context: ContextVar[str | None] = ContextVar("router_stack", default=None)


@contextmanager
def use_stack(name: str) -> Iterator[str]:
    """Route what is emitted inside the block to `name`; nests, inner wins.

    Backed by a ContextVar, so concurrent asyncio tasks each see their own stack.
    """
    token = _stack_context.set(name)
    try:
        yield name
    finally:
        _stack_context.reset(token)


def current_stack() -> str | None:
    return _stack_context.get()


def select_stack(
    config: RouterConfig,
    *,
    flag: str | None = None,
    manifest_stack: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """`--stack`, then ROUTER_STACK / FLOWYML_STACK, then the manifest's, then active_stack.

    Raises KeyError (with a did-you-mean) when the winning name is not a stack.
    """
    env = os.environ if env is None else env
    for candidate in (
        flag,
        env.get("ROUTER_STACK"),
        env.get("FLOWYML_STACK"),
        manifest_stack,
        config.active_stack,
    ):
        if candidate:
            config.stack(candidate)  # raises with a did-you-mean when unknown
            return candidate
    return config.active_stack
