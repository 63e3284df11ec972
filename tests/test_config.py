"""flowyml.yaml-compatible configuration: layout, rules, interpolation, stacks, errors."""

from __future__ import annotations

import asyncio
import json
import re
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import (
    PLACEHOLDERS,
    ComponentConfig,
    LoadedConfig,
    MetricBound,
    MqttSettings,
    RetryPolicy,
    RouterConfig,
    RouterSettings,
    RoutingRule,
    current_stack,
    discover_config,
    load_config,
    mask_secrets,
    select_stack,
    set_active_stack,
    use_stack,
)
from router.errors import ConfigError
from router.manifest import ArtifactKind

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_ROUTER = ROOT / "config" / "router.yaml"
EXAMPLE_FLOWYML = ROOT / "config" / "flowyml.yaml"

LOCAL_STORE = "artifact_store: {type: local, path: ./artifacts}"


def write(tmp_path: Path, text: str, name: str = "router.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    return load_config(write(tmp_path, text), env=env or {})


def one_stack(routing: str = "", extra: str = "") -> str:
    """A config with one stack `s` holding a local store, registry, deployer and tracker."""
    return (
        textwrap.dedent(
            """\
        active_stack: s
        stacks:
          s:
            artifact_store: {type: local, path: ./artifacts}
            artifact_stores:
              archive: {type: local, path: ./archive}
            model_registry: {type: vertex_model_registry, project: p}
            model_deployer: {type: vertex_endpoint, project: p}
            experiment_tracker: {type: jsonl, path: ./tracking}
        """
        )
        + textwrap.indent(textwrap.dedent(extra), "    ")
        + (
            "    artifact_routing:\n" + textwrap.indent(textwrap.dedent(routing), "      ")
            if routing
            else ""
        )
    )


# --- the example configs --------------------------------------------------------------


def test_example_router_yaml_loads_local_only() -> None:
    loaded = load_config(EXAMPLE_ROUTER, env={})
    config = loaded.config
    assert list(config.stacks) == ["local"] and config.active_stack == "local"
    local = config.stacks["local"]
    assert local.artifact_store is not None
    assert (local.artifact_store.type, local.artifact_store.settings["path"]) == (
        "local",
        "./artifacts",
    )
    assert [c.type for _, c in local.trackers] == ["jsonl"]
    model = local.rule_for(ArtifactKind.MODEL)
    assert model is not None and model.store == "local"
    metrics = local.rule_for(ArtifactKind.METRICS)
    assert metrics is not None and metrics.log_to_tracker
    assert loaded.warnings == []


def test_example_router_yaml_reads_the_environment() -> None:
    loaded = load_config(EXAMPLE_ROUTER, env={"ROUTER_ARTIFACTS": "/data/artifacts"})
    store = loaded.config.stacks["local"].artifact_store
    assert store is not None and store.settings["path"] == "/data/artifacts"


def _commented_router_section() -> str:
    lines = EXAMPLE_ROUTER.read_text().splitlines()
    start = lines.index("# router:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(block) + "\n"


def test_example_router_yaml_documents_every_router_setting(tmp_path: Path) -> None:
    section = _commented_router_section()
    # Uncommented, the section is a valid router: block holding every setting ...
    loaded = load_text(tmp_path, section)
    data = yaml.safe_load(section)["router"]
    assert set(data) == set(RouterSettings.model_fields)
    assert set(data["retry"]) == set(RetryPolicy.model_fields)
    assert set(data["mqtt"]) == set(MqttSettings.model_fields)
    # ... and every value it shows is the default, so uncommenting changes nothing.
    settings = loaded.config.router
    assert settings.model_dump(exclude={"mqtt"}) == RouterSettings().model_dump(exclude={"mqtt"})
    assert settings.mqtt == MqttSettings()


def test_example_flowyml_yaml_loads_with_the_seed_stacks() -> None:
    loaded = load_config(EXAMPLE_FLOWYML, env={})
    config = loaded.config
    assert set(config.stacks) == {"local", "gcp-prod", "aws-staging"}
    assert config.active_stack == "local"

    gcp = config.stacks["gcp-prod"]
    assert gcp.artifact_store is not None
    assert gcp.artifact_store.type == "gcs"
    assert gcp.artifact_store.settings["bucket_name"] == "prod-ml-artifacts"
    assert gcp.artifact_store.settings["project_id"] == "my-project"  # ${GCP_PROJECT:-...}
    assert gcp.model_registry is not None and gcp.model_registry.type == "vertex_model_registry"
    assert gcp.model_deployer is not None and gcp.model_deployer.type == "vertex_endpoint"
    assert [c.type for _, c in gcp.trackers] == ["mlflow"]
    model = gcp.rule_for(ArtifactKind.MODEL)
    assert model is not None
    assert (model.store, model.register, model.deploy, model.deploy_condition) == (
        "gcs",
        True,
        True,
        "auto",
    )
    assert model.deploy_min_metrics == {"accuracy": MetricBound(min=0.9)}
    metrics = gcp.rule_for(ArtifactKind.METRICS)
    assert metrics is not None and metrics.log_to_tracker

    aws = config.stacks["aws-staging"]
    assert aws.artifact_store is not None and aws.artifact_store.type == "s3"
    assert aws.artifact_store.settings["bucket_name"] == "staging-ml"
    assert aws.model_registry is not None and aws.model_registry.type == "sagemaker_model_registry"
    aws_model = aws.rule_for(ArtifactKind.MODEL)
    assert aws_model is not None and (aws_model.store, aws_model.register) == ("s3", True)
    # FlowyML's orchestrators are accepted and reported, not silently dropped.
    assert any("stacks.gcp-prod.orchestrator" in w for w in loaded.warnings)


def test_example_flowyml_yaml_takes_the_project_from_the_environment() -> None:
    loaded = load_config(EXAMPLE_FLOWYML, env={"GCP_PROJECT": "fraud-prod-123"})
    store = loaded.config.stacks["gcp-prod"].artifact_store
    assert store is not None and store.settings["project_id"] == "fraud-prod-123"


# --- rule fields ----------------------------------------------------------------------


def test_rule_defaults_are_flowymls() -> None:
    rule = RoutingRule()
    assert rule.store is None
    assert rule.path == "{run_id}/{step_name}/{artifact_name}"
    assert (rule.register, rule.deploy, rule.log_to_tracker) == (False, False, False)
    assert rule.deploy_condition == "manual"
    assert rule.deploy_min_metrics == {}
    assert rule.endpoint_name is None and rule.metadata == {}
    assert rule.on_conflict == "fail"


RULE_FIELDS: list[tuple[str, str, Any]] = [
    ("store: local", "store", "local"),
    ("store: archive", "store", "archive"),
    ("store: [local, archive]", "stores", ["local", "archive"]),
    ("store: local", "stores", ["local"]),
    ("path: 'latest/{name}'", "path", "latest/{name}"),
    ("register: true", "register", True),
    ("deploy: true", "deploy", True),
    ("deploy_condition: manual", "deploy_condition", "manual"),
    ("deploy_condition: auto", "deploy_condition", "auto"),
    ("deploy_condition: on_approval", "deploy_condition", "on_approval"),
    (
        "deploy_min_metrics: {accuracy: 0.9}",
        "deploy_min_metrics",
        {"accuracy": MetricBound(min=0.9)},
    ),
    ("deploy_min_metrics: {f1: 1}", "deploy_min_metrics", {"f1": MetricBound(min=1.0)}),
    (
        "deploy_min_metrics: {loss: {max: 0.1}}",
        "deploy_min_metrics",
        {"loss": MetricBound(max=0.1)},
    ),
    (
        "deploy_min_metrics: {auc: {min: 0.8, max: 0.99}}",
        "deploy_min_metrics",
        {"auc": MetricBound(min=0.8, max=0.99)},
    ),
    ("deploy_min_metrics: {acc: '0.75'}", "deploy_min_metrics", {"acc": MetricBound(min=0.75)}),
    ("endpoint_name: fraud-detector", "endpoint_name", "fraud-detector"),
    ("log_to_tracker: true", "log_to_tracker", True),
    ("metadata: {team: risk, tier: 1}", "metadata", {"team": "risk", "tier": 1}),
    ("on_conflict: fail", "on_conflict", "fail"),
    ("on_conflict: overwrite", "on_conflict", "overwrite"),
    ("on_conflict: version", "on_conflict", "version"),
]


@pytest.mark.parametrize(("rule_yaml", "attribute", "expected"), RULE_FIELDS)
def test_every_rule_field_is_read(
    tmp_path: Path, rule_yaml: str, attribute: str, expected: Any
) -> None:
    loaded = load_text(tmp_path, one_stack(f"Model: {{{rule_yaml}}}\n"))
    rule = loaded.config.stacks["s"].rule_for(ArtifactKind.MODEL)
    assert rule is not None
    assert getattr(rule, attribute) == expected


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("Model", ArtifactKind.MODEL),
        ("model", ArtifactKind.MODEL),
        ("MODEL", ArtifactKind.MODEL),
        ("Dataset", ArtifactKind.DATASET),
        ("Data", ArtifactKind.DATASET),
        ("Metrics", ArtifactKind.METRICS),
        ("Parameters", ArtifactKind.PARAMETERS),
        ("Report", ArtifactKind.REPORT),
        ("Artifact", ArtifactKind.ARTIFACT),
    ],
)
def test_routing_keys_ignore_case(tmp_path: Path, key: str, kind: ArtifactKind) -> None:
    loaded = load_text(tmp_path, one_stack(f"{key}: {{path: 'special/{{name}}'}}\n"))
    stack = loaded.config.stacks["s"]
    rule = stack.rule_for(kind)
    assert rule is not None and rule.path == "special/{name}"
    others = [k for k in ArtifactKind if k != kind]
    assert all(stack.rule_for(k) is None for k in others)


def test_default_rule_covers_types_without_their_own(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        one_stack(
            "Model: {path: 'models/{name}'}\ndefault: {path: 'other/{name}', store: archive}\n"
        ),
    )
    stack = loaded.config.stacks["s"]
    assert stack.rule_for(ArtifactKind.MODEL).path == "models/{name}"  # type: ignore[union-attr]
    for kind in (ArtifactKind.DATASET, ArtifactKind.REPORT, ArtifactKind.ARTIFACT):
        rule = stack.rule_for(kind)
        assert rule is not None and (rule.path, rule.store) == ("other/{name}", "archive")


def test_stores_resolve_by_name_or_by_type(tmp_path: Path) -> None:
    stack = load_text(tmp_path, one_stack()).config.stacks["s"]
    assert stack.resolve_store("archive") == (
        "artifact_stores.archive",
        stack.artifact_stores["archive"],
    )
    assert stack.resolve_store("local") == ("artifact_store", stack.artifact_store)
    assert stack.resolve_store(None) == ("artifact_store", stack.artifact_store)
    assert stack.resolve_store("gcs") is None
    assert stack.component("artifact_stores.archive") is stack.artifact_stores["archive"]
    assert stack.component("model_registry") is stack.model_registry
    assert stack.component("experiment_tracker") is stack.experiment_tracker
    assert stack.component("nonsense") is None


def test_several_trackers(tmp_path: Path) -> None:
    text = one_stack().replace(
        "experiment_tracker: {type: jsonl, path: ./tracking}",
        "experiment_tracker:\n      - {type: jsonl, path: ./t1}\n      - {type: jsonl, path: ./t2}",
    )
    stack = load_text(tmp_path, text).config.stacks["s"]
    assert [(p, c.settings["path"]) for p, c in stack.trackers] == [
        ("experiment_tracker[0]", "./t1"),
        ("experiment_tracker[1]", "./t2"),
    ]
    assert stack.component("experiment_tracker[1]") is stack.trackers[1][1]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"type": "gcs", "bucket": "b"}, {"bucket_name": "b"}),
        ({"type": "gcs", "bucket_name": "b"}, {"bucket_name": "b"}),
        ({"type": "gcs", "project": "p"}, {"project_id": "p"}),
        ({"type": "gcs", "bucket": "b", "project": "p"}, {"bucket_name": "b", "project_id": "p"}),
    ],
)
def test_flowyml_component_aliases(given: dict[str, str], expected: dict[str, str]) -> None:
    assert ComponentConfig.model_validate(given).settings == expected


def test_component_retry_and_concurrency_are_router_policy(tmp_path: Path) -> None:
    text = one_stack().replace(
        "artifact_store: {type: local, path: ./artifacts}",
        "artifact_store: {type: local, path: ./a, concurrency: 3, retry: {max_attempts: 2}}",
    )
    store = load_text(tmp_path, text).config.stacks["s"].artifact_store
    assert store is not None
    assert store.concurrency == 3 and store.retry == RetryPolicy(max_attempts=2)
    assert store.settings == {"path": "./a"}  # what the sink itself sees


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_every_placeholder_is_accepted(tmp_path: Path, placeholder: str) -> None:
    loaded = load_text(tmp_path, one_stack(f"Model: {{path: 'm/{{{placeholder}}}'}}\n"))
    assert loaded.config.stacks["s"].rule_for(ArtifactKind.MODEL).path == f"m/{{{placeholder}}}"  # type: ignore[union-attr]


def test_placeholders_are_flowymls_and_the_routers() -> None:
    assert set(PLACEHOLDERS) == {
        "run_id",
        "step_name",
        "artifact_name",
        "pipeline",
        "name",
        "version",
        "date",
        "file",
    }


# --- the router section ---------------------------------------------------------------


def test_router_section(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        """\
        router:
          spool: /var/spool/router
          journal_url: postgresql+asyncpg://router@db/router
          concurrency: 16
          retention_days: 1.5
          listen: 127.0.0.1:9464
          retry: {max_attempts: 3, base_delay: 0.1, max_delay: 2}
          mqtt: {host: broker, port: "${MQTT_PORT:-8883}", qos: "${QOS:-2}", protocol: 5}
        """,
    )
    settings = loaded.config.router
    assert settings.spool == Path("/var/spool/router")
    assert settings.database_url() == "postgresql+asyncpg://router@db/router"
    assert (settings.concurrency, settings.retention_days, settings.listen) == (
        16,
        1.5,
        "127.0.0.1:9464",
    )
    assert settings.retry == RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=2)
    assert settings.mqtt is not None
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.qos) == ("broker", 8883, 2)
    assert settings.mqtt.protocol == "5"
    # No stacks: the embedded local defaults, with this router section.
    assert loaded.config.active_stack == "local"


def test_default_journal_is_sqlite_under_the_state_dir(tmp_path: Path) -> None:
    settings = RouterSettings(state_dir=tmp_path / "state")
    assert settings.database_url() == f"sqlite+aiosqlite:///{tmp_path / 'state' / 'router.db'}"


def test_no_config_file_means_embedded_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_config(env={})
    assert loaded.source == "(embedded defaults)" and loaded.path is None
    assert loaded.config.active_stack == "local"
    store = loaded.config.stacks["local"].artifact_store
    assert store is not None and store.type == "local"


# --- FlowyML compatibility ------------------------------------------------------------


def test_flowyml_keys_are_accepted_and_reported_unused(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        f"""\
        project: fraud
        orchestrator: {{type: local}}
        stacks:
          s:
            {LOCAL_STORE}
            orchestrator: {{type: vertex_ai, project: p}}
            container_registry: {{type: gcr}}
            artifact_routing:
              Prompt: {{store: gcs, path: "prompts/{{artifact_name}}/v{{version}}"}}
              Model: {{store: local}}
        plugins: {{artifact_store: {{type: local, path: ./x}}}}
        """,
    )
    assert set(loaded.config.unused) == {
        "project",
        "orchestrator",
        "plugins",
        "stacks.s.orchestrator",
        "stacks.s.container_registry",
        "stacks.s.artifact_routing.Prompt",
    }
    assert sorted(loaded.warnings) == sorted(
        f"{key}: FlowyML setting, not used by the router" for key in loaded.config.unused
    )
    assert list(loaded.config.stacks["s"].artifact_routing) == ["Model"]


def test_top_level_routing_without_stacks_routes_the_embedded_stack(tmp_path: Path) -> None:
    """As FlowyML: with neither stacks: nor plugins:, a top-level artifact_routing is the
    default stack's routing (it was silently ignored)."""
    loaded = load_text(tmp_path, "artifact_routing:\n"
                       "  Model: {store: local, path: 'custom/{name}/{file}'}\n")
    assert loaded.config.active_stack == "local"
    stack = loaded.config.stacks["local"]
    assert stack.artifact_store is not None and stack.artifact_store.type == "local"
    rule = stack.rule_for(ArtifactKind.MODEL)
    assert rule is not None and rule.path == "custom/{name}/{file}"
    assert list(stack.artifact_routing) == ["Model"]  # it replaces the default rules
    with pytest.raises(ConfigError, match=r"stacks.local.artifact_routing.Model.path"):
        load_text(tmp_path, "artifact_routing:\n  Model: {path: '{nope}'}\n")


def test_legacy_plugins_layout_is_a_stack_named_default(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        f"""\
        plugins:
          {LOCAL_STORE}
          experiment_tracker: {{type: jsonl, path: ./t}}
        artifact_routing:
          Metrics: {{log_to_tracker: true}}
        """,
    )
    assert list(loaded.config.stacks) == ["default"]
    assert loaded.config.active_stack == "default"
    rule = loaded.config.stacks["default"].rule_for(ArtifactKind.METRICS)
    assert rule is not None and rule.log_to_tracker


def test_active_stack_defaults_to_the_first_stack(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        f"""\
        stacks:
          first: {{{LOCAL_STORE}}}
          second: {{{LOCAL_STORE}}}
        """,
    )
    assert loaded.config.active_stack == "first"


# --- interpolation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${BUCKET}", {"BUCKET": "prod"}, "prod"),
        ("${BUCKET:-fallback}", {}, "fallback"),
        ("${BUCKET:-fallback}", {"BUCKET": "prod"}, "prod"),
        ("${BUCKET:-}", {}, ""),
        ("gs://${BUCKET}/${PREFIX:-runs}/x", {"BUCKET": "b"}, "gs://b/runs/x"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("cost: $$5", {}, "cost: $5"),
        ("$HOME stays", {}, "$HOME stays"),
        ("${URL:-http://h:5000/x}", {}, "http://h:5000/x"),
        ("${EMPTY}", {"EMPTY": ""}, ""),
    ],
)
def test_interpolation(tmp_path: Path, template: str, env: dict[str, str], expected: str) -> None:
    path = json.dumps(template)  # a JSON string is a YAML double-quoted scalar
    text = f"stacks:\n  s:\n    artifact_store:\n      type: local\n      path: {path}\n"
    loaded = load_text(tmp_path, text, env=env)
    store = loaded.config.stacks["s"].artifact_store
    assert store is not None and store.settings["path"] == expected


def test_interpolation_reaches_lists_and_nested_keys(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        """\
        router:
          mqtt: {topics: ["${TOPIC}/#", "other/#"], username: "${MQTT_USER:-router}"}
        """,
        env={"TOPIC": "ml"},
    )
    mqtt = loaded.config.router.mqtt
    assert mqtt is not None and mqtt.topics == ["ml/#", "other/#"] and mqtt.username == "router"


def test_interpolation_defaults_to_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROUTER_TEST_SPOOL", "/srv/spool")
    loaded = load_config(write(tmp_path, "router: {spool: '${ROUTER_TEST_SPOOL}'}\n"))
    assert loaded.config.router.spool == Path("/srv/spool")


def test_every_unset_variable_is_reported_with_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(
            tmp_path,
            """\
            router:
              spool: "${SPOOL_DIR}"
              mqtt: {host: "${BROKER}", topics: ["${TOPIC}/#"]}
            """,
        )
    fields = {(p.field, p.value) for p in info.value.problems}
    assert fields == {
        ("router.spool", "${SPOOL_DIR}"),
        ("router.mqtt.host", "${BROKER}"),
        ("router.mqtt.topics[0]", "${TOPIC}"),
    }
    text = str(info.value)
    assert "SPOOL_DIR is not set" in text and "${SPOOL_DIR:-default}" in text


# --- refused configs ------------------------------------------------------------------

# (id, config text, field the problem names, value it shows or None, words in the message)
BAD_CONFIGS: list[tuple[str, str, str, Any, str]] = [
    (
        "unknown rule key",
        one_stack("Model: {stor: local}\n"),
        "stacks.s.artifact_routing.Model.stor",
        None,
        "did you mean 'store'",
    ),
    (
        "unknown routing type",
        one_stack("Modle: {store: local}\n"),
        "stacks.s.artifact_routing.Modle",
        "Modle",
        "did you mean 'Model'",
    ),
    (
        "rule for the same type twice",
        one_stack("Model: {store: local}\nmodel: {store: archive}\n"),
        "stacks.s.artifact_routing.model",
        "model",
        "second rule",
    ),
    (
        "store not in stack",
        one_stack("Model: {store: gcs}\n"),
        "stacks.s.artifact_routing.Model.store",
        "gcs",
        "names no store",
    ),
    (
        # two deliveries with one key: the journal could take no batch holding it
        "store listed twice",
        one_stack("Model: {store: [local, archive, local]}\n"),
        "stacks.s.artifact_routing.Model.store",
        ["local", "archive", "local"],
        "lists the store artifact_store twice ('local' and 'local'); list each store once",
    ),
    (
        "store typo",
        one_stack("Model: {store: archiv}\n"),
        "stacks.s.artifact_routing.Model.store",
        "archiv",
        "did you mean 'archive'",
    ),
    (
        "empty store list",
        one_stack("Model: {store: []}\n"),
        "stacks.s.artifact_routing.Model.store",
        [],
        "routes nowhere",
    ),
    (
        "unknown placeholder",
        one_stack("Model: {path: '{run}/{name}'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "{run}/{name}",
        "unknown placeholder {run} (did you mean 'run_id'?)",
    ),
    (
        "placeholder with attribute",
        one_stack("Model: {path: '{name.upper}'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "{name.upper}",
        "unknown placeholder",
    ),
    (
        "placeholder format spec",
        one_stack("Model: {path: '{version:>8}'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "{version:>8}",
        "no format spec",
    ),
    (
        "unbalanced brace",
        one_stack("Model: {path: 'm/{name'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "m/{name",
        "bad template",
    ),
    (
        "path climbs out",
        one_stack("Model: {path: '../{name}'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "../{name}",
        "no '..'",
    ),
    (
        "absolute path",
        one_stack("Model: {path: '/etc/{name}'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "/etc/{name}",
        "no leading '/'",
    ),
    (
        "backslash path",
        one_stack("Model: {path: 'a\\{name}'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "a\\{name}",
        "no backslashes",
    ),
    (
        "empty path",
        one_stack("Model: {path: ''}\n"),
        "stacks.s.artifact_routing.Model.path",
        "",
        "empty path",
    ),
    (
        "dot path",
        one_stack("Model: {path: './.'}\n"),
        "stacks.s.artifact_routing.Model.path",
        "./.",
        "names no directory",
    ),
    (
        "bad deploy_condition",
        one_stack("Model: {deploy: true, deploy_condition: always}\n"),
        "stacks.s.artifact_routing.Model.deploy_condition",
        "always",
        "'manual', 'auto' or 'on_approval'",
    ),
    (
        "bad on_conflict",
        one_stack("Model: {on_conflict: replace}\n"),
        "stacks.s.artifact_routing.Model.on_conflict",
        "replace",
        "'fail', 'overwrite' or 'version'",
    ),
    (
        "metric bound not a number",
        one_stack("Model: {deploy_min_metrics: {accuracy: high}}\n"),
        "stacks.s.artifact_routing.Model.deploy_min_metrics.accuracy",
        "high",
        "not a number",
    ),
    (
        "metric bound typo",
        one_stack("Model: {deploy_min_metrics: {loss: {maxx: 0.1}}}\n"),
        "stacks.s.artifact_routing.Model.deploy_min_metrics.loss.maxx",
        0.1,
        "did you mean 'max'",
    ),
    (
        "metric bound empty",
        one_stack("Model: {deploy_min_metrics: {loss: {}}}\n"),
        "stacks.s.artifact_routing.Model.deploy_min_metrics.loss",
        {},
        "give 'min'",
    ),
    (
        "metric bounds crossed",
        one_stack("Model: {deploy_min_metrics: {auc: {min: 0.9, max: 0.8}}}\n"),
        "stacks.s.artifact_routing.Model.deploy_min_metrics.auc",
        {"min": 0.9, "max": 0.8},
        "no value can pass",
    ),
    (
        "register without registry",
        f"stacks: {{s: {{{LOCAL_STORE}, artifact_routing: {{Model: {{register: true}}}}}}}}\n",
        "stacks.s.artifact_routing.Model.register",
        True,
        "has no model_registry",
    ),
    (
        "deploy without deployer",
        f"stacks: {{s: {{{LOCAL_STORE}, artifact_routing: {{Model: {{deploy: true}}}}}}}}\n",
        "stacks.s.artifact_routing.Model.deploy",
        True,
        "has no model_deployer",
    ),
    (
        "register not a bool",
        one_stack("Model: {register: often}\n"),
        "stacks.s.artifact_routing.Model.register",
        "often",
        "boolean",
    ),
    (
        "unknown stack key",
        "stacks: {s: {artifact_stor: {type: local, path: ./a}}}\n",
        "stacks.s.artifact_stor",
        None,
        "did you mean 'artifact_store'",
    ),
    (
        "unknown top-level key",
        "stackz: {}\n",
        "stackz",
        None,
        "did you mean 'stacks'",
    ),
    (
        "unknown component type",
        "stacks: {s: {artifact_store: {type: locl, path: ./a}}}\n",
        "stacks.s.artifact_store.type",
        "locl",
        "did you mean 'local'",
    ),
    (
        "component type missing",
        "stacks: {s: {artifact_store: {path: ./a}}}\n",
        "stacks.s.artifact_store.type",
        None,
        "type: local",
    ),
    (
        "component in the wrong role",
        "stacks: {s: {artifact_store: {type: jsonl, path: ./a}}}\n",
        "stacks.s.artifact_store.type",
        "jsonl",
        "not a artifact_store type",
    ),
    (
        "bucket twice",
        "stacks: {s: {artifact_store: {type: gcs, bucket: a, bucket_name: b}}}\n",
        "stacks.s.artifact_store.bucket",
        "a",
        "not both",
    ),
    (
        "component retry typo",
        "stacks: {s: {artifact_store: {type: local, path: ./a, retry: {max_atempts: 3}}}}\n",
        "stacks.s.artifact_store.retry.max_atempts",
        3,
        "did you mean 'max_attempts'",
    ),
    (
        "active stack unknown",
        f"active_stack: prdo\nstacks: {{prod: {{{LOCAL_STORE}}}}}\n",
        "active_stack",
        "prdo",
        "did you mean 'prod'",
    ),
    (
        "stack not a mapping",
        "stacks: {s: [artifact_store]}\n",
        "stacks.s",
        ["artifact_store"],
        "must be a mapping",
    ),
    ("stacks empty", "stacks: {}\n", "stacks", {}, "must map stack names"),
    (
        "top-level routing beside stacks",
        f"stacks: {{s: {{{LOCAL_STORE}}}}}\nartifact_routing: {{Model: {{store: local}}}}\n",
        "artifact_routing",
        None,
        "move it under stacks.<name>.artifact_routing",
    ),
    ("router key typo", "router: {retyr: {}}\n", "router.retyr", None, "did you mean 'retry'"),
    (
        "mqtt key typo",
        "router: {mqtt: {hots: x}}\n",
        "router.mqtt.hots",
        None,
        "did you mean 'host'",
    ),
    (
        "retry delays crossed",
        "router: {retry: {base_delay: 10, max_delay: 1}}\n",
        "router.retry",
        {"base_delay": 10, "max_delay": 1},
        "base_delay 10 is above max_delay 1",
    ),
    (
        "concurrency zero",
        "router: {concurrency: 0}\n",
        "router.concurrency",
        0,
        "greater than or equal to 1",
    ),
    (
        "mqtt port",
        "router: {mqtt: {port: 70000}}\n",
        "router.mqtt.port",
        70000,
        "less than or equal to 65535",
    ),
    ("mqtt qos", "router: {mqtt: {qos: 3}}\n", "router.mqtt.qos", 3, "0, 1 or 2"),
    (
        "unset variable",
        "router: {spool: '${SPOOL_ROOT}'}\n",
        "router.spool",
        "${SPOOL_ROOT}",
        "SPOOL_ROOT is not set",
    ),
    (
        "malformed variable",
        "router: {spool: '${SPOOL-ROOT}'}\n",
        "router.spool",
        "${SPOOL-ROOT}",
        "malformed variable reference",
    ),
    ("duplicate key", "router: {}\nrouter: {}\n", "line 2", "router", "first on line 1"),
    ("not YAML", "stacks: [unclosed\n", "line 2, column 1", None, "not valid YAML"),
    ("not a mapping", "- a\n- b\n", "(file)", "list", "must be a YAML mapping"),
]


@pytest.mark.parametrize(
    ("text", "field", "value", "words"),
    [b[1:] for b in BAD_CONFIGS],
    ids=[b[0] for b in BAD_CONFIGS],
)
def test_bad_config_names_file_key_value_and_fix(
    tmp_path: Path, text: str, field: str, value: Any, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    error = info.value
    assert error.source == str(path)
    matching = [p for p in error.problems if p.field == field]
    assert matching, f"no problem names {field!r}: {[p.render() for p in error.problems]}"
    assert matching[0].value == value
    assert words in matching[0].message
    rendered = str(error)
    assert str(path) in rendered and field in rendered
    if value is not None:
        assert repr(value) in rendered


def test_all_problems_of_a_config_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(
            tmp_path,
            one_stack("Model: {stor: local}\nDataset: {lgo_to_tracker: true}\n").replace(
                "active_stack: s", "active_stack: s\nrouter: {spol: x}"
            ),
        )
    assert {p.field for p in info.value.problems} == {
        "stacks.s.artifact_routing.Model.stor",
        "stacks.s.artifact_routing.Dataset.lgo_to_tracker",
        "router.spol",
    }


# --- discovery ------------------------------------------------------------------------


def _touch_config(path: Path, spool: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"router: {{spool: {spool}}}\n")
    return path


def test_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    explicit = _touch_config(tmp_path / "etc" / "explicit.yaml", "explicit")
    router_env = _touch_config(tmp_path / "etc" / "router-env.yaml", "router-env")
    flowyml_env = _touch_config(tmp_path / "etc" / "flowyml-env.yaml", "flowyml-env")
    env = {"ROUTER_CONFIG": str(router_env), "FLOWYML_CONFIG": str(flowyml_env)}
    assert discover_config(explicit, env) == explicit
    assert discover_config(None, env) == router_env
    assert discover_config(None, {"FLOWYML_CONFIG": str(flowyml_env)}) == flowyml_env
    assert discover_config(None, {}) is None
    for name in (
        ".flowyml.yml",
        ".flowyml.yaml",
        "flowyml.yml",
        "flowyml.yaml",
        "router.yml",
        "router.yaml",
    ):
        _touch_config(tmp_path / name, name)
        assert discover_config(None, {}) == tmp_path / name  # each beats the ones before
    assert load_config(env={}).config.router.spool == Path("router.yaml")


def test_explicit_missing_config_is_an_error_naming_its_origin(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    for explicit, env, origin in (
        (missing, {}, "--config"),
        (None, {"ROUTER_CONFIG": str(missing)}, "ROUTER_CONFIG"),
        (None, {"FLOWYML_CONFIG": str(missing)}, "FLOWYML_CONFIG"),
    ):
        with pytest.raises(ConfigError) as info:
            discover_config(explicit, env, cwd=tmp_path)
        assert info.value.problems[0].field == origin
        assert info.value.problems[0].value == str(missing)


# --- stack selection ------------------------------------------------------------------


@pytest.fixture
def three_stacks(tmp_path: Path) -> RouterConfig:
    return load_text(
        tmp_path,
        f"""\
        active_stack: active
        stacks:
          active: {{{LOCAL_STORE}}}
          flag: {{{LOCAL_STORE}}}
          router-env: {{{LOCAL_STORE}}}
          flowyml-env: {{{LOCAL_STORE}}}
          manifest: {{{LOCAL_STORE}}}
        """,
    ).config


@pytest.mark.parametrize(
    ("flag", "env", "manifest", "expected"),
    [
        (
            "flag",
            {"ROUTER_STACK": "router-env", "FLOWYML_STACK": "flowyml-env"},
            "manifest",
            "flag",
        ),
        (
            None,
            {"ROUTER_STACK": "router-env", "FLOWYML_STACK": "flowyml-env"},
            "manifest",
            "router-env",
        ),
        (None, {"FLOWYML_STACK": "flowyml-env"}, "manifest", "flowyml-env"),
        (None, {}, "manifest", "manifest"),
        (None, {}, None, "active"),
        ("", {"ROUTER_STACK": ""}, None, "active"),
    ],
)
def test_stack_precedence(
    three_stacks: RouterConfig,
    flag: str | None,
    env: dict[str, str],
    manifest: str | None,
    expected: str,
) -> None:
    assert select_stack(three_stacks, flag=flag, manifest_stack=manifest, env=env) == expected


def test_select_stack_reads_the_process_environment(
    three_stacks: RouterConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWYML_STACK", "flowyml-env")
    assert select_stack(three_stacks) == "flowyml-env"


def test_unknown_stack_is_refused_with_a_suggestion(three_stacks: RouterConfig) -> None:
    with pytest.raises(KeyError, match="did you mean 'manifest'"):
        select_stack(three_stacks, manifest_stack="manifset", env={})
    with pytest.raises(KeyError, match="no stack named 'nope'"):
        select_stack(three_stacks, env={"ROUTER_STACK": "nope"})


def test_use_stack_nests_and_restores() -> None:
    assert current_stack() is None
    with use_stack("outer") as name:
        assert name == "outer" and current_stack() == "outer"
        with use_stack("inner"):
            assert current_stack() == "inner"
        assert current_stack() == "outer"
    assert current_stack() is None


def test_use_stack_restores_after_an_exception() -> None:
    with use_stack("outer"):
        with pytest.raises(RuntimeError), use_stack("inner"):
            raise RuntimeError("step failed")
        assert current_stack() == "outer"
    assert current_stack() is None


async def test_use_stack_is_isolated_between_asyncio_tasks() -> None:
    seen: dict[str, list[str | None]] = {}
    both_inside = asyncio.Barrier(2)

    async def step(name: str) -> None:
        with use_stack(name):
            await both_inside.wait()  # both blocks are open at once
            seen[name] = [current_stack()]
            await asyncio.sleep(0)
            seen[name].append(current_stack())
        seen[name].append(current_stack())

    with use_stack("parent"):
        await asyncio.gather(step("a"), step("b"))
        assert current_stack() == "parent"
    assert seen == {"a": ["a", "a", "parent"], "b": ["b", "b", "parent"]}


# --- stack set ------------------------------------------------------------------------


def test_set_active_stack_changes_one_line_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "flowyml.yaml"
    original = EXAMPLE_FLOWYML.read_text()
    path.write_text(original)
    path.chmod(0o640)
    set_active_stack(path, "gcp-prod")
    after = path.read_text()
    changed = [
        (a, b) for a, b in zip(original.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert changed == [("active_stack: local", "active_stack: gcp-prod")]
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert load_config(path, env={}).config.active_stack == "gcp-prod"
    assert not [p for p in tmp_path.iterdir() if p.name != "flowyml.yaml"]  # no temp files


def test_set_active_stack_adds_the_key_when_absent(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
        # team config
        stacks:
            a: {{{LOCAL_STORE}}}   # the first
            b: {{{LOCAL_STORE}}}
        """,
    )
    set_active_stack(path, "b")
    text = path.read_text()
    assert "# team config" in text and "# the first" in text
    assert "    a: {" in text  # indentation kept
    assert load_config(path, env={}).config.active_stack == "b"


def test_set_active_stack_refuses_unknown_names_and_leaves_the_file(tmp_path: Path) -> None:
    path = tmp_path / "flowyml.yaml"
    path.write_text(EXAMPLE_FLOWYML.read_text())
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        set_active_stack(path, "gcp-prd")
    problem = info.value.problems[0]
    assert (problem.field, problem.value) == ("active_stack", "gcp-prd")
    assert "did you mean 'gcp-prod'" in problem.message
    assert str(path) in str(info.value)
    assert path.read_bytes() == before


MIXED_LAYOUT = """\
# shared by the team; do not reformat
active_stack:   a      # the default
stacks:
  a:
    artifact_store: {type: local, path: x}
    experiment_tracker:
      - type: jsonl
        path: t1
  b:   {artifact_store: {type: local, path: 'y'}}
  "yes": {artifact_store: {type: local, path: z}}
  "1.5": {artifact_store: {type: local, path: z}}
router:
  mqtt:
    topics:
    - a/#
    - "b/#"
"""


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("b", "active_stack: b      # the default"),
        ("yes", 'active_stack: "yes"      # the default'),
        ("1.5", 'active_stack: "1.5"      # the default'),
    ],
)
def test_set_active_stack_keeps_a_hand_written_file_byte_for_byte(
    tmp_path: Path, name: str, line: str
) -> None:
    path = write(tmp_path, MIXED_LAYOUT)
    set_active_stack(path, name)
    expected = MIXED_LAYOUT.replace("active_stack:   a      # the default", line)
    assert path.read_text() == expected
    assert load_config(path, env={}).config.active_stack == name  # read back as text


def test_set_active_stack_on_a_flow_style_document_keeps_the_comment(tmp_path: Path) -> None:
    path = write(tmp_path, "{stacks: {a: {}, b: {}}, active_stack: a}  # flow style\n")
    set_active_stack(path, "b")
    assert "# flow style" in path.read_text()
    assert yaml.safe_load(path.read_text()) == {"stacks": {"a": {}, "b": {}}, "active_stack": "b"}


def test_set_active_stack_on_the_legacy_layout(tmp_path: Path) -> None:
    path = write(tmp_path, f"plugins:\n  {LOCAL_STORE}\n")
    set_active_stack(path, "default")
    assert load_config(path, env={}).config.active_stack == "default"
    with pytest.raises(ConfigError):
        set_active_stack(path, "prod")


def test_set_active_stack_does_not_expand_variables(tmp_path: Path) -> None:
    path = tmp_path / "flowyml.yaml"
    path.write_text(EXAMPLE_FLOWYML.read_text())
    set_active_stack(path, "aws-staging")
    assert '"${GCP_PROJECT:-my-project}"' in path.read_text()


# --- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ({"password": "hunter2"}, {"password": "***"}),
        ({"aws_secret_access_key": "abc"}, {"aws_secret_access_key": "***"}),
        ({"aws_access_key_id": "AKIA123"}, {"aws_access_key_id": "AKIA123"}),
        ({"api_key": "k", "apiKey": "k2"}, {"api_key": "***", "apiKey": "***"}),
        (
            {"token": "t", "token_uri": "https://oauth2"},
            {"token": "***", "token_uri": "https://oauth2"},
        ),
        ({"credentials_file": "/etc/sa.json"}, {"credentials_file": "/etc/sa.json"}),
        ({"service_account_credentials": "{...}"}, {"service_account_credentials": "***"}),
        ({"password": None, "secret": ""}, {"password": None, "secret": ""}),
        (
            {"mqtt": {"username": "u", "password": "p"}},
            {"mqtt": {"username": "u", "password": "***"}},
        ),
        (
            {"trackers": [{"type": "wandb", "api_key": "x"}]},
            {"trackers": [{"type": "wandb", "api_key": "***"}]},
        ),
        (
            {"journal_url": "postgresql+asyncpg://router:s3cr3t@db:5432/router"},
            {"journal_url": "postgresql+asyncpg://router:***@db:5432/router"},
        ),
        ({"tracking_uri": "http://mlflow:5000"}, {"tracking_uri": "http://mlflow:5000"}),
        ({"bucket_name": "prod"}, {"bucket_name": "prod"}),
    ],
)
def test_mask_secrets(given: dict[str, Any], shown: dict[str, Any]) -> None:
    assert mask_secrets(given) == shown


def test_mask_secrets_leaves_the_original_alone() -> None:
    config = {"mqtt": {"password": "p"}}
    mask_secrets(config)
    assert config == {"mqtt": {"password": "p"}}


def test_masked_stack_show_hides_the_interpolated_secret(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        f"""\
        stacks:
          s:
            {LOCAL_STORE}
            experiment_tracker:
              type: mlflow
              tracking_uri: "http://u:${{MLFLOW_PW}}@m:5000"
              token: "${{MLFLOW_TOKEN}}"
        """,
        env={"MLFLOW_PW": "pw-123", "MLFLOW_TOKEN": "tok-456"},
    )
    shown = repr(mask_secrets(loaded.config.stacks["s"].model_dump(mode="json")))
    assert "pw-123" not in shown and "tok-456" not in shown
    assert re.search(r"http://u:\*\*\*@m:5000", shown)


@pytest.mark.parametrize(
    ("mqtt", "field", "needle"),
    [
        ({"receipt_topic": "r/{run}"}, "router.mqtt.receipt_topic", "{event_id}"),
        ({"receipt_topic": "r/+/x"}, "router.mqtt.receipt_topic", "wildcards"),
        ({"topics": ["a/#/b"]}, "router.mqtt.topics", "last level"),
        ({"topics": ["$share/g/a/#"]}, "router.mqtt.topics", "shared_group"),
        ({"topics": []}, "router.mqtt.topics", "at least one"),
        ({"shared_group": "a/b"}, "router.mqtt.shared_group", "one topic level"),
    ],
)
def test_bad_mqtt_topics_are_config_errors(
    tmp_path: Path, mqtt: dict[str, object], field: str, needle: str
) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"router": {"mqtt": mqtt}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert field in str(caught.value) and needle in str(caught.value)
