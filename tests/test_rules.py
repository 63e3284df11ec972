"""The rule engine: (manifest, stack) -> RoutePlan, path templates and deploy decisions."""

from __future__ import annotations

import posixpath
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from router.config import StackConfig, _check_template, load_config
from router.delivery import Action
from router.errors import Problem
from router.manifest import Manifest, ManifestError, parse_manifest
from router.rules import (
    FILE_SLOT,
    DeployDecision,
    RoutePlan,
    delivery_key,
    object_key,
    plan_event,
    render_path,
    sanitise_segment,
)

ROOT = Path(__file__).resolve().parent.parent
RECEIVED = datetime(2024, 5, 6, 23, 59, tzinfo=UTC)

STACK_TEXT = """\
stacks:
  s:
    artifact_store: {type: local, path: ./artifacts}
    artifact_stores:
      archive: {type: local, path: ./archive}
    model_registry: {type: vertex_model_registry}
    model_deployer: {type: vertex_endpoint}
    experiment_tracker:
      - {type: jsonl, path: ./t1}
      - {type: jsonl, path: ./t2}
    artifact_routing:
"""


def stack(tmp_path: Path, routing: str, base: str = STACK_TEXT) -> StackConfig:
    """A stack loaded (and so validated) from YAML, as the daemon gets it."""
    path = tmp_path / "router.yaml"
    path.write_text(base + textwrap.indent(textwrap.dedent(routing), "      "))
    config = load_config(path, env={}).config
    return next(iter(config.stacks.values()))


def manifest(*artifacts: dict[str, Any], **top: Any) -> Manifest:
    return parse_manifest(
        {
            "manifest_version": 1,
            "pipeline": "fraud",
            "run_id": "run-42",
            "step_name": "train",
            **top,
            "artifacts": list(artifacts),
        }
    )


MODEL = {
    "type": "model",
    "name": "detector",
    "version": "1.0.0",
    "upload": True,
    "files": [{"path": "model.pkl"}],
}


def plan(
    m: Manifest, s: StackConfig, upload_all: bool | None = None, event_id: str = "ev-1"
) -> RoutePlan:
    return plan_event(
        m,
        event_id=event_id,
        stack=s,
        versions=[str(i + 1) for i in range(len(m.artifacts))],
        received_at=RECEIVED,
        upload_all=upload_all,
    )


def actions(p: RoutePlan, index: int = 0) -> list[tuple[str, str]]:
    return [(d.action.value, d.component) for d in p.artifacts[index].deliveries]


# --- path templates -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{run_id}", "run-42"),
        ("{step_name}", "train"),
        ("{artifact_name}", "model"),  # the type name, lowercase, as FlowyML
        ("{pipeline}", "fraud"),
        ("{name}", "detector"),
        ("{version}", "1"),  # the catalog's version for this delivery
        ("{date}", "2024-05-06"),
        ("{file}", FILE_SLOT),  # filled per file by object_key
        ("{run_id}/{step_name}/{artifact_name}", "run-42/train/model"),
        ("models/{name}/v{version}/{file}", "models/detector/v1/{file}"),
        ("./latest/{name}", "latest/detector"),
    ],
)
def test_each_placeholder_renders(tmp_path: Path, template: str, expected: str) -> None:
    s = stack(tmp_path, f"Model: {{store: local, path: '{template}'}}\n")
    p = plan(manifest(MODEL), s)
    (store,) = [d for d in p.deliveries if d.action is Action.STORE]
    assert store.target == expected


def test_default_path_is_flowymls(tmp_path: Path) -> None:
    s = stack(tmp_path, "Metrics: {log_to_tracker: true}\n")  # no rule for models
    p = plan(manifest(MODEL), s)
    assert p.deliveries[0].target == "run-42/train/model"
    assert p.deliveries[0].component == "artifact_store"


def test_object_key_fills_the_file_slot_or_appends() -> None:
    assert object_key("models/m/{file}", "model.pkl") == "models/m/model.pkl"
    assert object_key("models/m/{file}.bak", "model.pkl") == "models/m/model.pkl.bak"
    assert object_key("models/m", "model.pkl") == "models/m/model.pkl"
    assert object_key("models/m", "../../etc/passwd") == "models/m/.._.._etc_passwd"
    assert object_key("models/m", "..") == "models/m/__"


@pytest.mark.parametrize(
    ("value", "safe"),
    [
        ("run-42", "run-42"),
        ("../../etc", ".._.._etc"),
        ("..", "__"),
        (".", "_"),
        ("", "_"),
        ("/abs/path", "_abs_path"),
        ("a\\b", "a_b"),
        ("C:\\Windows", "C:_Windows"),
        ("nul\x00byte", "nul_byte"),
        ("new\nline", "new_line"),
        ("c1\x85control", "c1_control"),
        ("ünïcødé-模型", "ünïcødé-模型"),
        ("x" * 300, "x" * 200),
    ],
)
def test_sanitise_segment(value: str, safe: str) -> None:
    assert sanitise_segment(value) == safe


def test_values_cannot_add_a_file_slot() -> None:
    target = render_path(
        "{run_id}/{name}/{file}", {"run_id": "{file}", "name": "m", "file": FILE_SLOT}
    )
    assert target.count(FILE_SLOT) == 1
    assert object_key(target, "model.pkl") == "(file)/m/model.pkl"


def test_render_path_refuses_a_template_that_climbs_out() -> None:
    # Config validation rejects these at load; render_path still refuses them.
    with pytest.raises(ValueError, match="unsafe path"):
        render_path("../{name}", {"name": "x"})
    with pytest.raises(ValueError, match="unsafe path"):
        render_path(".", {})


# Tokens templates are built from: placeholders, separators and literal text, including
# the pieces an attacker or a typo would use.
_TOKENS = st.sampled_from(
    [
        "{run_id}",
        "{step_name}",
        "{artifact_name}",
        "{pipeline}",
        "{name}",
        "{version}",
        "{date}",
        "{file}",
        "/",
        ".",
        "..",
        "-",
        "v",
        "models",
        "\\",
        "~",
    ]
)
_VALUE = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["..", ".", "/", "\\", "\x00", "../..", "/etc/passwd", "..\\..", "", "{file}"]),
    st.lists(st.sampled_from(["..", "/", "\\", "\x00", "é", "模", "."]), max_size=8).map("".join),
)
ROOT_DIR = "/srv/store/root"


def _accepted(template: str) -> bool:
    problems: list[Problem] = []
    _check_template(template, "path", problems)
    return not problems


def _inside_root(key: str) -> None:
    assert key and not key.startswith("/")
    assert "\x00" not in key and "\\" not in key
    segments = key.split("/")
    assert all(seg not in ("", ".", "..") for seg in segments), key
    assert posixpath.normpath(key) == key
    joined = posixpath.normpath(posixpath.join(ROOT_DIR, key))
    assert joined.startswith(ROOT_DIR + "/"), (key, joined)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    tokens=st.lists(_TOKENS, min_size=1, max_size=8),
    values=st.fixed_dictionaries(
        {
            k: _VALUE
            for k in ("run_id", "step_name", "artifact_name", "pipeline", "name", "version", "date")
        }
    ),
    file_name=_VALUE,
)
def test_no_rendered_path_leaves_the_store_root(
    tokens: list[str], values: dict[str, str], file_name: str
) -> None:
    template = "".join(tokens)
    assume(_accepted(template))  # what a config can hold
    target = render_path(template, {**values, "file": FILE_SLOT})
    key = object_key(target, file_name)
    _inside_root(key)
    if FILE_SLOT not in file_name:
        assert FILE_SLOT not in key  # the slot is always filled


@settings(max_examples=300, deadline=None)
@given(target=st.lists(_VALUE, min_size=1, max_size=4), file_name=_VALUE)
def test_object_key_stays_inside_whatever_the_names(target: list[str], file_name: str) -> None:
    prefix = render_path(
        "{pipeline}/{name}",
        {
            "pipeline": target[0],
            "name": "/".join(target[1:]),
        },
    )
    _inside_root(object_key(prefix, file_name))


# --- deploy decisions -----------------------------------------------------------------

# (condition, bounds, model metrics, Metrics artifact values, outcome, failures as
#  (metric, bound, actual, by))
DEPLOY_CASES: list[
    tuple[str, str, dict[str, Any] | None, dict[str, float] | None, str, list[tuple[Any, ...]]]
] = [
    ("manual", "{accuracy: 0.9}", {"accuracy": 0.99}, None, "awaiting_manual", []),
    ("on_approval", "{accuracy: 0.9}", {"accuracy": 0.99}, None, "pending_approval", []),
    ("auto", "{}", None, None, "deploy", []),
    ("auto", "{accuracy: 0.9}", {"accuracy": 0.97}, None, "deploy", []),
    ("auto", "{accuracy: 0.9}", {"accuracy": 0.9}, None, "deploy", []),  # bounds are inclusive
    (
        "auto",
        "{accuracy: 0.9}",
        {"accuracy": 0.85},
        None,
        "blocked",
        [("accuracy", "min", 0.85, 0.05)],
    ),
    ("auto", "{loss: {max: 0.1}}", {"loss": 0.05}, None, "deploy", []),
    ("auto", "{loss: {max: 0.1}}", {"loss": 0.25}, None, "blocked", [("loss", "max", 0.25, 0.15)]),
    (
        "auto",
        "{auc: {min: 0.8, max: 0.99}}",
        {"auc": 0.999},
        None,
        "blocked",
        [("auc", "max", 0.999, 0.009)],
    ),
    ("auto", "{accuracy: 0.9}", None, None, "blocked", [("accuracy", "min", None, None)]),
    (
        "auto",
        "{accuracy: 0.9}",
        {"accuracy": "high"},
        None,
        "blocked",
        [("accuracy", "min", None, None)],
    ),
    (
        "auto",
        "{accuracy: 0.9}",
        {"accuracy": float("nan")},
        None,
        "blocked",
        [("accuracy", "min", None, None)],
    ),
    ("auto", "{accuracy: 0.9}", None, {"accuracy": 0.95}, "deploy", []),  # from a Metrics artifact
    (
        "auto",
        "{accuracy: 0.9}",
        {"accuracy": 0.8},
        {"accuracy": 0.95},
        "blocked",
        [("accuracy", "min", 0.8, 0.1)],
    ),  # the model's own wins
    (
        "auto",
        "{accuracy: 0.9, f1_score: 0.8, loss: {max: 0.2}}",
        {"accuracy": 0.7, "f1_score": 0.85},
        {"loss": 0.5},
        "blocked",
        [("accuracy", "min", 0.7, 0.2), ("loss", "max", 0.5, 0.3)],
    ),
]


@pytest.mark.parametrize(
    ("condition", "bounds", "model_metrics", "metrics_values", "outcome", "failures"), DEPLOY_CASES
)
def test_deploy_decision(
    tmp_path: Path,
    condition: str,
    bounds: str,
    model_metrics: dict[str, Any] | None,
    metrics_values: dict[str, float] | None,
    outcome: str,
    failures: list[tuple[Any, ...]],
) -> None:
    s = stack(
        tmp_path,
        f"Model: {{store: local, register: true, deploy: true, deploy_condition: {condition}, "
        f"deploy_min_metrics: {bounds}, endpoint_name: fraud-ep}}\n",
    )
    model = {**MODEL, "metadata": {"metrics": model_metrics}} if model_metrics else MODEL
    arts: list[dict[str, Any]] = [model]
    if metrics_values:
        arts.append({"type": "metrics", "name": "eval", "values": metrics_values})
    p = plan(manifest(*arts), s)
    decision = p.artifacts[0].decision
    assert isinstance(decision, DeployDecision)
    assert decision.condition == condition and decision.outcome == outcome
    got = [(f.metric, f.bound, f.actual, f.by) for f in decision.failures]
    assert len(got) == len(failures)
    for (metric, bound, actual, by), expected in zip(got, failures, strict=True):
        assert (metric, bound) == expected[:2]
        assert actual == pytest.approx(expected[2]) if expected[2] is not None else actual is None
        assert by == pytest.approx(expected[3]) if expected[3] is not None else by is None
    deploys = [d for d in p.deliveries if d.action is Action.DEPLOY]
    if outcome == "deploy":
        assert len(deploys) == 1 and deploys[0].params == {"endpoint_name": "fraud-ep"}
    else:
        assert deploys == []
    # Registration does not wait for the decision.
    assert [d.action for d in p.deliveries if d.action is Action.REGISTER] == [Action.REGISTER]


def test_blocked_reason_names_the_metric_and_the_gap(tmp_path: Path) -> None:
    s = stack(
        tmp_path,
        "Model: {store: local, deploy: true, deploy_condition: auto, "
        "deploy_min_metrics: {accuracy: 0.9, loss: {max: 0.1}}}\n",
    )
    p = plan(manifest({**MODEL, "metadata": {"metrics": {"accuracy": 0.85}}}), s)
    reason = p.artifacts[0].decision.reason  # type: ignore[union-attr]
    assert "accuracy=0.85 is 0.05 below the minimum 0.9" in reason
    assert "loss is missing" in reason


@pytest.mark.parametrize(
    ("condition", "words"),
    [("manual", "model deploy"), ("on_approval", "model approve")],
)
def test_waiting_decisions_say_what_to_run(tmp_path: Path, condition: str, words: str) -> None:
    s = stack(tmp_path, f"Model: {{store: local, deploy: true, deploy_condition: {condition}}}\n")
    decision = plan(manifest(MODEL), s).artifacts[0].decision
    assert decision is not None and words in decision.reason


def test_no_decision_without_deploy(tmp_path: Path) -> None:
    s = stack(tmp_path, "Model: {store: local, register: true, deploy_condition: auto}\n")
    p = plan(manifest(MODEL), s)
    assert p.artifacts[0].decision is None
    assert actions(p) == [("store", "artifact_store"), ("register", "model_registry")]


# --- deliveries -----------------------------------------------------------------------


def test_store_register_deploy_chain(tmp_path: Path) -> None:
    s = stack(
        tmp_path,
        "Model: {store: local, register: true, deploy: true, deploy_condition: auto, "
        "metadata: {team: risk}, on_conflict: version}\n",
    )
    p = plan(manifest(MODEL), s)
    store, register, deploy = p.deliveries
    assert (store.action, register.action, deploy.action) == (
        Action.STORE,
        Action.REGISTER,
        Action.DEPLOY,
    )
    assert store.key == delivery_key("ev-1", 0, Action.STORE, "s.artifact_store")
    assert store.params == {"on_conflict": "version"}
    assert register.after == store.key and register.params == {"metadata": {"team": "risk"}}
    assert deploy.after == register.key
    assert store.sink_id == "s.artifact_store" and deploy.sink_id == "s.model_deployer"


def test_deploy_without_register_waits_for_the_store(tmp_path: Path) -> None:
    s = stack(tmp_path, "Model: {store: local, deploy: true, deploy_condition: auto}\n")
    store, deploy = plan(manifest(MODEL), s).deliveries
    assert deploy.action is Action.DEPLOY and deploy.after == store.key


def test_several_stores_each_get_a_delivery(tmp_path: Path) -> None:
    s = stack(tmp_path, "Dataset: {store: [local, archive], path: 'data/{name}'}\n")
    p = plan(
        manifest({"type": "data", "name": "d", "upload": True, "files": [{"path": "d.csv"}]}), s
    )
    assert [(d.component, d.target) for d in p.deliveries] == [
        ("artifact_store", "data/d"),
        ("artifact_stores.archive", "data/d"),
    ]
    assert len({d.key for d in p.deliveries}) == 2


def test_a_store_named_twice_gets_one_delivery() -> None:
    """A stack built in code skips config validation (which refuses the list): the plan
    still holds each key once, or the journal could not take the event."""
    s = StackConfig.model_validate({
        "name": "s", "artifact_store": {"type": "local", "path": "./a"},
        "artifact_stores": {"archive": {"type": "local", "path": "./b"}},
        "artifact_routing": {"Model": {"store": ["local", "archive", "local", "archive"]}},
    })
    p = plan(manifest(MODEL), s)
    assert actions(p) == [("store", "artifact_store"), ("store", "artifact_stores.archive")]
    assert len({d.key for d in p.deliveries}) == len(p.deliveries)


def test_upload_false_is_catalog_only(tmp_path: Path) -> None:
    s = stack(tmp_path, "Model: {store: local}\nMetrics: {log_to_tracker: true}\n")
    p = plan(
        manifest(
            {**MODEL, "upload": False},
            {"type": "metrics", "name": "eval", "values": {"acc": 0.9}},
        ),
        s,
    )
    model = p.artifacts[0]
    assert model.upload is False and model.deliveries == [] and model.errors == []
    # Metrics are logged where the rules say, uploaded or not.
    assert actions(p, 1) == [("track", "experiment_tracker[0]"), ("track", "experiment_tracker[1]")]


@pytest.mark.parametrize(
    ("own", "override", "stored"),
    [(True, None, True), (False, None, False), (False, True, True), (True, False, False)],
)
def test_upload_all_overrides_each_artifact(
    tmp_path: Path, own: bool, override: bool | None, stored: bool
) -> None:
    s = stack(tmp_path, "Model: {store: local}\n")
    p = plan(manifest({**MODEL, "upload": own}), s, upload_all=override)
    assert p.artifacts[0].upload is stored
    assert bool(p.deliveries) is stored


@pytest.mark.parametrize("rule", ["register: true", "deploy: true", "register: true, deploy: true"])
def test_register_or_deploy_without_upload_is_a_plan_error(tmp_path: Path, rule: str) -> None:
    s = stack(tmp_path, f"Model: {{store: local, {rule}}}\n")
    p = plan(manifest({**MODEL, "upload": False}), s)
    assert p.deliveries == []
    (error,) = p.artifacts[0].errors
    assert "upload: false" in error and "FLOWYML_UPLOAD_ALL_ARTIFACTS=true" in error


def test_register_a_model_without_files_is_a_plan_error(tmp_path: Path) -> None:
    s = stack(tmp_path, "Model: {store: local, register: true}\n")
    p = plan(manifest({**MODEL, "files": []}), s)
    assert p.deliveries == []
    assert "no file of this model was stored" in p.artifacts[0].errors[0]


def test_register_applies_to_models_only(tmp_path: Path) -> None:
    s = stack(tmp_path, "default: {store: local, register: true, deploy: true}\n")
    p = plan(
        manifest({"type": "report", "name": "r", "upload": True, "files": [{"path": "r.pdf"}]}), s
    )
    assert actions(p) == [("store", "artifact_store")]


@pytest.mark.parametrize(
    ("artifact", "tracked"),
    [
        ({"type": "metrics", "name": "m", "values": {"a": 1}}, True),
        ({"type": "parameters", "name": "p", "values": {"lr": 0.1}}, True),
        ({**MODEL, "upload": False, "metadata": {"metrics": {"acc": 0.9}}}, True),
        ({**MODEL, "upload": False}, False),
        ({"type": "dataset", "name": "d", "files": [{"path": "d.csv"}]}, False),
    ],
)
def test_log_to_tracker(tmp_path: Path, artifact: dict[str, Any], tracked: bool) -> None:
    s = stack(tmp_path, "default: {log_to_tracker: true}\n")
    p = plan(manifest(artifact), s)
    tracks = [d.component for d in p.deliveries if d.action is Action.TRACK]
    assert tracks == (["experiment_tracker[0]", "experiment_tracker[1]"] if tracked else [])


def test_log_to_tracker_without_a_tracker_is_reported(tmp_path: Path) -> None:
    base = "stacks:\n  bare:\n    artifact_store: {type: local, path: ./a}\n    artifact_routing:\n"
    s = stack(tmp_path, "Metrics: {log_to_tracker: true}\n", base=base)
    p = plan(manifest({"type": "metrics", "name": "m", "values": {"a": 1}}), s)
    assert p.deliveries == []
    assert "no experiment_tracker" in p.artifacts[0].errors[0]


def test_upload_in_a_stack_without_a_store_is_reported(tmp_path: Path) -> None:
    base = (
        "stacks:\n  bare:\n    experiment_tracker: {type: jsonl, path: ./t}\n"
        "    artifact_routing:\n"
    )
    s = stack(tmp_path, "Metrics: {log_to_tracker: true}\n", base=base)
    p = plan(manifest(MODEL), s)
    assert p.deliveries == []
    assert "has no artifact_store" in p.artifacts[0].errors[0]


def test_planning_is_pure_and_keys_are_stable(tmp_path: Path) -> None:
    s = stack(
        tmp_path,
        "Model: {store: [local, archive], register: true}\nMetrics: {log_to_tracker: true}\n",
    )
    m = manifest(MODEL, {"type": "metrics", "name": "m", "values": {"a": 1}})
    first, second = plan(m, s), plan(m, s)
    assert first == second
    keys = [d.key for d in first.deliveries]
    assert len(keys) == len(set(keys))
    assert all(k.startswith("ev-1/") for k in keys)
    assert {d.key for d in plan(m, s, event_id="ev-2").deliveries}.isdisjoint(keys)


def test_design_example_on_the_example_gcp_stack() -> None:
    config = load_config(ROOT / "config" / "flowyml.yaml", env={}).config
    from tests.test_manifest import DESIGN_EXAMPLE

    m = parse_manifest(DESIGN_EXAMPLE)
    p = plan(m, config.stacks["gcp-prod"])
    model = p.artifacts[0]
    assert [(d.action.value, d.component) for d in model.deliveries] == [
        ("store", "artifact_store"),
        ("register", "model_registry"),
        ("deploy", "model_deployer"),  # accuracy 0.97 >= 0.9
    ]
    assert model.decision is not None and model.decision.outcome == "deploy"
    assert actions(p, 1) == [("track", "experiment_tracker")]  # Metrics: log_to_tracker
    assert p.artifacts[3].deliveries == []  # the dataset is not uploaded


def test_a_run_status_tells_every_tracker_once_and_nothing_else(tmp_path: Path) -> None:
    """An event-level delivery, one per tracker, carried by the last artifact's plan
    (keys stay unique per event, artifact, action and sink)."""
    s = stack(tmp_path, """
        model: {store: local, log_to_tracker: true}
        metrics: {log_to_tracker: true}
    """)
    ended = plan(manifest(MODEL, {"type": "metrics", "name": "eval", "values": {"auc": 0.9}},
                          run_status="Failed"), s)
    open_run = plan(manifest(MODEL), s)

    ends = [d for d in ended.deliveries if d.action is Action.END_RUN]
    assert [(d.artifact_index, d.sink_id) for d in ends] == [
        (1, "s.experiment_tracker[0]"), (1, "s.experiment_tracker[1]")]
    assert [d.key for d in ends] == [
        delivery_key("ev-1", 1, Action.END_RUN, f"s.experiment_tracker[{i}]") for i in (0, 1)]
    assert len({d.key for d in ended.deliveries}) == len(ended.deliveries)
    assert not any(d.action is Action.END_RUN for d in open_run.deliveries)
    no_trackers = stack(tmp_path, "model: {store: local}\n", base=STACK_TEXT.replace(
        "    experiment_tracker:\n      - {type: jsonl, path: ./t1}\n"
        "      - {type: jsonl, path: ./t2}\n", ""))
    assert plan(manifest(MODEL, run_status="finished"), no_trackers).deliveries == [
        d for d in plan(manifest(MODEL), no_trackers).deliveries]


@pytest.mark.parametrize("value", ["done", "", "FINISH"])
def test_an_unknown_run_status_names_the_field_the_value_and_the_fix(value: str) -> None:
    with pytest.raises(ManifestError) as err:
        manifest(MODEL, run_status=value)
    (problem,) = err.value.problems
    assert problem.field == "run_status"
    assert "finished, failed or killed" in problem.render() and repr(value) in problem.render()
