"""flowyml.yaml-compatible configuration: stacks, routing rules and the router's own section.

FlowyML's layout is read unchanged (`stacks:` / `active_stack:` / `artifact_routing:`,
the legacy `plugins:` section as a stack named `default`).  Unlike FlowyML, a key
that neither FlowyML nor the router knows is an error with a did-you-mean, because a
typo in a routing rule would otherwise silently drop routing.
"""

from __future__ import annotations

import os
import re
import string
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    "mask_secrets",
    "select_stack",
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
}
FLOWYML_STACK_UNUSED = {
    "orchestrator",
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


def mask_secrets(value: Any) -> Any:
    """A copy of a config tree with secret-looking values replaced (for display)."""
    if isinstance(value, Mapping):
        return {
            k: ("***" if is_secret_key(str(k)) and v not in (None, "") else mask_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RetryPolicy(_Strict):
    """Exponential backoff with full jitter, bounded by attempts and by age."""

    max_attempts: Annotated[int, Field(ge=1)] = 10
    base_delay: Annotated[float, Field(gt=0)] = 0.5
    max_delay: Annotated[float, Field(gt=0)] = 60.0
    max_age: Annotated[float, Field(gt=0)] = 24 * 3600.0


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
                if short in data and long not in data:
                    data[long] = data.pop(short)
        return data

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class MetricBound(_Strict):
    """`accuracy: 0.9` means at least 0.9; `loss: {max: 0.1}` means at most 0.1."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> MetricBound:
        if self.min is None and self.max is None:
            raise ValueError("give 'min' (higher is better) or 'max' (lower is better)")
        return self


def _parse_bound(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return MetricBound(min=float(value))
    return value


# FlowyML's rule field is called `register`, which shadows ABCMeta.register on the class;
# instances read the field, which is all the router needs.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class RoutingRule(_Strict):
    """FlowyML's ArtifactRoutingRule, plus `on_conflict` and lists of stores."""

    store: str | list[str] | None = None
    path: str = "{run_id}/{step_name}/{artifact_name}"
    register: bool = False
    deploy: bool = False
    deploy_condition: Literal["manual", "auto", "on_approval"] = "manual"
    deploy_min_metrics: dict[str, Annotated[MetricBound, Field()]] = Field(default_factory=dict)
    endpoint_name: str | None = None
    log_to_tracker: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)
    on_conflict: Literal["fail", "overwrite", "version"] = "fail"

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers_are_minimums(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("deploy_min_metrics"), dict):
            data = dict(data)
            data["deploy_min_metrics"] = {
                k: _parse_bound(v) for k, v in data["deploy_min_metrics"].items()
            }
        return data

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

    def component(self, path: str) -> ComponentConfig | None:
        """Look a component up by the path used in sink ids (`artifact_stores.archive`)."""
        if path.startswith("artifact_stores."):
            return self.artifact_stores.get(path.split(".", 1)[1])
        if path.startswith("experiment_tracker"):
            return dict(self.trackers).get(path)
        value = getattr(self, path, None) if path in (
            "artifact_store", "model_registry", "model_deployer"
        ) else None
        return value if isinstance(value, ComponentConfig) else None


class MqttSettings(_Strict):
    """MQTT source settings (see the README's broker section)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "artifact-router"
    topics: list[str] = Field(default_factory=lambda: ["artifacts/#"])
    shared_group: str | None = None
    qos: Literal[0, 1, 2] = 1
    protocol: Literal["5", "3.1.1"] = "5"
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


class RouterSettings(_Strict):
    """The router's own section: where things live and how hard to try."""

    spool: Path = Path("./spool")
    state_dir: Path = Path("./.router")
    journal_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite under state_dir"
    )
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    concurrency: Annotated[int, Field(ge=1, le=4096)] = 64
    sink_concurrency: Annotated[int, Field(ge=1, le=1024)] = 8
    intake_batch: Annotated[int, Field(ge=1, le=10_000)] = 256
    rescan_seconds: Annotated[float, Field(gt=0)] = 5.0
    retention_days: Annotated[float, Field(ge=0)] = 7.0
    listen: str | None = Field(default=None, description="host:port for /healthz and /metrics")
    drain_seconds: Annotated[float, Field(ge=0)] = 60.0
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

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(
            Problem(
                field=path,
                value=match.group(0),
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


def _validation_problems(prefix: str, exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if p not in ("ComponentConfig", "list[ComponentConfig]"))
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "literal_error":
            message = f"must be one of {err.get('ctx', {}).get('expected', '')}"
        problems.append(
            Problem(
                field=_loc(prefix, loc),
                value=None if err["type"] == "missing" else err.get("input"),
                message=message,
            )
        )
    return problems


def _check_template(template: str, path: str, problems: list[Problem]) -> None:
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        problems.append(Problem(field=path, value=template, message=f"bad template: {exc}"))
        return
    for _, field_name, spec, conversion in fields:
        if field_name is None:
            continue
        if field_name not in PLACEHOLDERS:
            problems.append(
                Problem(
                    field=path,
                    value=template,
                    message=f"unknown placeholder {{{field_name}}}"
                    f"{did_you_mean(field_name, PLACEHOLDERS)}; "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)}",
                )
            )
        elif spec or conversion:
            problems.append(
                Problem(field=path, value=template, message="placeholders take no format spec")
            )
    literal = "".join(text for text, *_ in fields)
    if template.startswith("/") or "\\" in template or ".." in template.split("/"):
        problems.append(
            Problem(
                field=path,
                value=template,
                message="a path template is relative to its store: no leading '/', "
                "no '..', no backslashes",
            )
        )
    del literal


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

    for key, rule in stack.artifact_routing.items():
        rpath = f"{base}.artifact_routing.{key}"
        if key.lower() not in _ROUTING_KEYS and key.lower() != "default":
            problems.append(
                Problem(
                    field=rpath,
                    message="unknown artifact type"
                    f"{did_you_mean(key, ['Model', 'Dataset', 'Metrics', 'Parameters', 'Report', 'Artifact', 'default'])}",
                )
            )
        _check_template(rule.path, f"{rpath}.path", problems)
        for store in rule.stores:
            if stack.resolve_store(store) is None:
                known = sorted(stack.artifact_stores) + (
                    [stack.artifact_store.type] if stack.artifact_store else []
                )
                problems.append(
                    Problem(
                        field=f"{rpath}.store",
                        value=store,
                        message=(
                            "names no store of this stack"
                            + (did_you_mean(store, known) if store else "")
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
        if rule.deploy_condition == "auto" and rule.deploy and not rule.deploy_min_metrics:
            pass  # FlowyML deploys unconditionally here; so do we (documented).


def _build(raw: dict[str, Any], source: str) -> tuple[RouterConfig, list[str]]:
    problems: list[Problem] = []
    unused: dict[str, Any] = {}
    warnings: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(source, [Problem(field="(file)", message="must be a YAML mapping")])

    _check_keys(raw, _TOP_KEYS, FLOWYML_TOP_LEVEL_UNUSED, "", problems, unused)
    stacks_raw = raw.get("stacks")
    if stacks_raw is None and isinstance(raw.get("plugins"), dict):
        # FlowyML's legacy single-stack layout loads as a stack named "default".
        stacks_raw = {"default": raw["plugins"]}
        if "artifact_routing" in raw:
            stacks_raw["default"] = {**raw["plugins"], "artifact_routing": raw["artifact_routing"]}
    if stacks_raw is None:
        defaults = _embedded_defaults()
        stacks_raw = defaults["stacks"]
        raw = {**raw, "active_stack": raw.get("active_stack", defaults["active_stack"])}
    if not isinstance(stacks_raw, dict) or not stacks_raw:
        problems.append(
            Problem(field="stacks", value=stacks_raw, message="must map stack names to stacks")
        )
        raise ConfigError(source, problems)

    stacks: dict[str, Any] = {}
    for name, body in stacks_raw.items():
        spath = f"stacks.{name}"
        if not isinstance(body, dict):
            problems.append(Problem(field=spath, value=body, message="must be a mapping"))
            continue
        stack_unused: dict[str, Any] = {}
        _check_keys(body, _STACK_KEYS, FLOWYML_STACK_UNUSED, spath, problems, stack_unused)
        unused.update(stack_unused)
        routing = body.get("artifact_routing") or {}
        if isinstance(routing, dict):
            for key, rule in routing.items():
                if isinstance(rule, dict):
                    _check_keys(
                        rule, _RULE_KEYS, set(), f"{spath}.artifact_routing.{key}", problems, {}
                    )
        known = {k: v for k, v in body.items() if k in _STACK_KEYS}
        stacks[str(name)] = {"name": str(name), **known}

    active = raw.get("active_stack") or next(iter(stacks), "")
    router_raw = raw.get("router") or {}
    if isinstance(router_raw, dict):
        _check_keys(router_raw, set(RouterSettings.model_fields), set(), "router", problems, {})
        if isinstance(router_raw.get("mqtt"), dict):
            _check_keys(
                router_raw["mqtt"], set(MqttSettings.model_fields), set(), "router.mqtt", problems, {}
            )
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


_CONFIG_NAMES = ("router.yaml", "router.yml", "flowyml.yaml", "flowyml.yml", ".flowyml.yaml")


def discover_config(
    explicit: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Path | None:
    """`--config`, then ROUTER_CONFIG, FLOWYML_CONFIG, then the usual names in the cwd."""
    env = os.environ if env is None else env
    for candidate in (explicit, env.get("ROUTER_CONFIG"), env.get("FLOWYML_CONFIG")):
        if candidate:
            path = Path(candidate)
            if not path.is_file():
                raise ConfigError(
                    str(path),
                    [Problem(field="(file)", message="no such file; check the path")],
                )
            return path
    base = cwd or Path.cwd()
    for name in _CONFIG_NAMES:
        if (base / name).is_file():
            return base / name
    return None


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    discover: bool = True,
) -> LoadedConfig:
    """Load, interpolate and validate; the embedded defaults when no file exists."""
    env = os.environ if env is None else env
    file = discover_config(path, env) if discover else (Path(path) if path else None)
    if file is None:
        raw: Any = {}
        source = "(embedded defaults)"
    else:
        source = str(file)
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
            raise ConfigError(
                source, [Problem(field=where, message=f"not valid YAML: {exc}")]
            ) from None
        except OSError as exc:
            raise ConfigError(source, [Problem(field="(file)", message=str(exc))]) from None
    problems: list[Problem] = []
    raw = _interpolate(raw, env, "", problems)
    if problems:
        raise ConfigError(source, problems)
    config, warnings = _build(raw, source)
    return LoadedConfig(config=config, source=source, path=file, warnings=warnings, raw=raw)


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
    """`--stack`, then ROUTER_STACK / FLOWYML_STACK, then the manifest's, then active_stack."""
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
