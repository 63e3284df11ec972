"""Manifest v1: what emitters may write, what the router infers, and how it refuses."""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from router.manifest import (
    LIMITS,
    ArtifactKind,
    DatasetArtifact,
    Manifest,
    ManifestError,
    MetricsArtifact,
    ModelArtifact,
    ParametersArtifact,
    apply_detection,
    parse_manifest,
    upload_override,
)

# The example of DESIGN.md section 3, verbatim apart from the placeholder strings.
DESIGN_EXAMPLE: dict[str, Any] = {
    "manifest_version": 1,
    "id": "run-42-train",
    "pipeline": "fraud_training",
    "run_id": "run-42",
    "step_name": "train",
    "stack": "local",
    "inputs": ["fraud_training/run-42/prep/train_data"],
    "artifacts": [
        {
            "type": "model",
            "name": "fraud_detector",
            "version": "1.0.0",
            "framework": "sklearn",
            "upload": True,
            "files": [{"path": "model.pkl"}],
            "metadata": {"metrics": {"accuracy": 0.97, "f1_score": 0.91}},
        },
        {"type": "metrics", "name": "evaluation", "values": {"accuracy": 0.97}, "step": 100},
        {"type": "parameters", "name": "hparams", "values": {"lr": 0.001}},
        {
            "type": "dataset",
            "name": "train_data",
            "format": "parquet",
            "files": [{"path": "train.parquet"}],
            "schema": {},
            "statistics": {},
        },
        {
            "type": "report",
            "name": "TFL Reports",
            "files": [{"path": "t_vscat.pdf"}, {"path": "rel", "name": "t_ae_rel", "type": "pdf"}],
        },
    ],
}


def example() -> dict[str, Any]:
    return copy.deepcopy(DESIGN_EXAMPLE)


def minimal(*artifacts: dict[str, Any]) -> dict[str, Any]:
    return {
        "manifest_version": 1,
        "pipeline": "p",
        "run_id": "r1",
        "step_name": "s",
        "artifacts": list(artifacts) or [{"type": "artifact", "name": "a"}],
    }


# --- accepted manifests ---------------------------------------------------------------


def test_design_example_parses_with_every_field_kept() -> None:
    m = parse_manifest(json.dumps(DESIGN_EXAMPLE))
    assert (m.pipeline, m.run_id, m.step_name, m.stack, m.id) == (
        "fraud_training",
        "run-42",
        "train",
        "local",
        "run-42-train",
    )
    assert m.inputs == ["fraud_training/run-42/prep/train_data"]
    model, metrics, params, dataset, report = m.artifacts
    assert isinstance(model, ModelArtifact)
    assert model.framework == "sklearn" and model.version == "1.0.0" and model.upload is True
    assert model.metrics() == {"accuracy": 0.97, "f1_score": 0.91}
    assert isinstance(metrics, MetricsArtifact)
    assert metrics.values == {"accuracy": 0.97} and metrics.step == 100
    assert isinstance(params, ParametersArtifact) and params.values == {"lr": 0.001}
    assert isinstance(dataset, DatasetArtifact)
    assert dataset.format == "parquet" and dataset.schema_ == {} and dataset.statistics == {}
    assert [(f.name, f.type) for f in report.files] == [("t_vscat.pdf", "pdf"), ("t_ae_rel", "pdf")]
    assert [a.kind for a in m.artifacts] == [
        ArtifactKind.MODEL,
        ArtifactKind.METRICS,
        ArtifactKind.PARAMETERS,
        ArtifactKind.DATASET,
        ArtifactKind.REPORT,
    ]


@pytest.mark.parametrize("data", [json.dumps(DESIGN_EXAMPLE), json.dumps(DESIGN_EXAMPLE).encode()])
def test_text_bytes_and_dict_inputs_agree(data: str | bytes) -> None:
    assert parse_manifest(data) == parse_manifest(example())


@pytest.mark.parametrize(
    ("spelling", "kind"),
    [
        ("model", ArtifactKind.MODEL),
        ("Model", ArtifactKind.MODEL),
        ("MODEL", ArtifactKind.MODEL),
        ("dataset", ArtifactKind.DATASET),
        ("Dataset", ArtifactKind.DATASET),
        ("DATA", ArtifactKind.DATASET),
        ("data", ArtifactKind.DATASET),
        ("Metrics", ArtifactKind.METRICS),
        ("PARAMETERS", ArtifactKind.PARAMETERS),
        ("REPORT", ArtifactKind.REPORT),
        ("Artifact", ArtifactKind.ARTIFACT),
    ],
)
def test_types_are_case_insensitive_and_data_means_dataset(spelling: str, kind: str) -> None:
    art: dict[str, Any] = {"type": spelling, "name": "x"}
    if kind in (ArtifactKind.METRICS, ArtifactKind.PARAMETERS):
        art["values"] = {"a": 1}
    m = parse_manifest(minimal(art))
    assert m.artifacts[0].kind == kind
    assert m.artifacts[0].type == kind.value  # type: ignore[union-attr]


def test_model_fields_follow_flowyml() -> None:
    m = parse_manifest(
        minimal(
            {
                "type": "Model",
                "name": "m",
                "version": 3,
                "serving_config": {"replicas": 2},
                "input_schema": {"x": "float"},
                "output_schema": {"y": "int"},
                "metadata": {"owner": "ds-team"},
            }
        )
    )
    model = m.artifacts[0]
    assert isinstance(model, ModelArtifact)
    assert model.version == "3"  # numbers are read as text
    assert model.serving_config == {"replicas": 2}
    assert (model.input_schema, model.output_schema) == ({"x": "float"}, {"y": "int"})
    assert model.metadata == {"owner": "ds-team"}
    assert model.framework is None  # detected later, from the file (apply_detection)


def test_defaults_upload_false_name_from_basename_type_from_extension() -> None:
    m = parse_manifest(
        minimal({"type": "report", "name": "r", "files": [{"path": "out/Plots/Summary.PDF"}]})
    )
    art = m.artifacts[0]
    assert art.upload is False
    assert art.files[0].name == "Summary.PDF"
    assert art.files[0].type == "pdf"
    assert art.files[0].path == "out/Plots/Summary.PDF"


def test_paths_are_normalised_inside_the_bundle() -> None:
    m = parse_manifest(
        minimal({"type": "artifact", "name": "a", "files": [{"path": "./x//y.txt"}]})
    )
    assert m.artifacts[0].files[0].path == "x/y.txt"


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("train.parquet", "parquet"),
        ("part-0001.PQ", "parquet"),
        ("rows.csv", "csv"),
        ("rows.csv.gz", "csv"),
        ("rows.tsv", "tsv"),
        ("events.jsonl", "jsonl"),
        ("events.ndjson.zst", "jsonl"),
        ("arr.npy", "numpy"),
        ("frame.feather", "feather"),
        ("t.arrow", "arrow"),
        ("t.avro", "avro"),
        ("t.orc", "orc"),
        ("t.h5", "hdf5"),
        ("t.tfrecord", "tfrecord"),
        ("sheet.xlsx", "excel"),
        ("blob.bin", None),
    ],
)
def test_dataset_format_detected_from_extension(file_name: str, expected: str | None) -> None:
    m = parse_manifest(minimal({"type": "DATA", "name": "d", "files": [{"path": file_name}]}))
    assert m.artifacts[0].format == expected  # type: ignore[union-attr]


def test_dataset_format_given_wins_over_extension() -> None:
    m = parse_manifest(
        minimal({"type": "dataset", "name": "d", "format": "delta", "files": [{"path": "a.csv"}]})
    )
    assert m.artifacts[0].format == "delta"  # type: ignore[union-attr]


def test_dataset_format_from_explicit_file_type() -> None:
    m = parse_manifest(
        minimal({"type": "dataset", "name": "d", "files": [{"path": "export", "type": "csv"}]})
    )
    assert m.artifacts[0].format == "csv"  # type: ignore[union-attr]


def test_file_entry_by_uri_and_inline_content() -> None:
    content = base64.b64encode(b"hello").decode()
    m = parse_manifest(
        minimal(
            {
                "type": "artifact",
                "name": "a",
                "files": [
                    {"uri": "s3://bucket/runs/1/model.onnx"},
                    {"uri": "gs://b/x/data.csv"},
                    {"uri": "file:///srv/share/notes.txt"},
                    {"content_base64": content, "name": "hello.txt"},
                ],
            }
        )
    )
    assert [(f.name, f.type) for f in m.artifacts[0].files] == [
        ("model.onnx", "onnx"),
        ("data.csv", "csv"),
        ("notes.txt", "txt"),
        ("hello.txt", "txt"),
    ]


def test_same_basename_allowed_when_names_differ() -> None:
    m = parse_manifest(
        minimal(
            {
                "type": "artifact",
                "name": "a",
                "files": [{"path": "a/model.pkl"}, {"path": "b/model.pkl", "name": "model_b.pkl"}],
            }
        )
    )
    assert [f.name for f in m.artifacts[0].files] == ["model.pkl", "model_b.pkl"]


def test_same_file_name_in_two_artifacts_is_fine() -> None:
    m = parse_manifest(
        minimal(
            {"type": "model", "name": "a", "files": [{"path": "a/model.pkl"}]},
            {"type": "model", "name": "b", "files": [{"path": "b/model.pkl"}]},
        )
    )
    assert len(m.artifacts) == 2


def test_numbers_are_accepted_as_names() -> None:
    data = minimal()
    data["run_id"] = 42
    assert parse_manifest(data).run_id == "42"


# --- refused manifests ----------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets a dotted path (`artifacts.0.files.1.name`) in the example."""

    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return apply


def _drop(path: str) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return apply


def _add_file(index: int, entry: dict[str, Any]) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        d["artifacts"][index].setdefault("files", []).append(entry)

    return apply


# (id, mutation of the DESIGN example, field the problem names, value it shows or None,
#  words the message must hold)
BAD: list[tuple[str, Mutation, str, Any, str]] = [
    (
        "type typo",
        _set("artifacts.0.type", "modle"),
        "artifacts[0].type",
        "modle",
        "did you mean 'model'",
    ),
    (
        "type unknown",
        _set("artifacts.2.type", "hyperparams"),
        "artifacts[2].type",
        "hyperparams",
        "use one of",
    ),
    ("type missing", _drop("artifacts.1.type"), "artifacts[1].type", None, "missing"),
    ("type not text", _set("artifacts.0.type", 7), "artifacts[0].type", 7, "unknown artifact type"),
    ("artifact not object", _set("artifacts.1", "metrics"), "artifacts[1]", "metrics", "object"),
    ("no artifacts", _set("artifacts", []), "artifacts", "[]", "at least one"),
    ("artifacts missing", _drop("artifacts"), "artifacts", None, "missing"),
    ("pipeline missing", _drop("pipeline"), "pipeline", None, "missing"),
    ("run_id missing", _drop("run_id"), "run_id", None, "missing"),
    ("step_name missing", _drop("step_name"), "step_name", None, "missing"),
    ("version 2", _set("manifest_version", 2), "manifest_version", 2, "manifest_version 1"),
    ("version text", _set("manifest_version", "1"), "manifest_version", "1", "number 1"),
    ("version bool", _set("manifest_version", True), "manifest_version", True, "number 1"),
    ("version missing", _drop("manifest_version"), "manifest_version", None, "missing"),
    ("unknown top field", _set("run", "x"), "run", "x", "did you mean 'run_id'"),
    (
        "unknown model field",
        _set("artifacts.0.frameworkk", "x"),
        "artifacts[0].frameworkk",
        "x",
        "did you mean 'framework'",
    ),
    (
        "framework on dataset",
        _set("artifacts.3.framework", "sklearn"),
        "artifacts[3].framework",
        "sklearn",
        "unknown field",
    ),
    (
        "unknown file field",
        _set("artifacts.0.files.0.nmae", "m.pkl"),
        "artifacts[0].files[0].nmae",
        "m.pkl",
        "did you mean 'name'",
    ),
    ("slash in run_id", _set("run_id", "a/b"), "run_id", "a/b", "'/'"),
    ("backslash in step", _set("step_name", "a\\b"), "step_name", "a\\b", "'\\'"),
    ("dotdot pipeline", _set("pipeline", ".."), "pipeline", "..", "'..'"),
    ("blank name", _set("artifacts.0.name", "  "), "artifacts[0].name", "  ", "blank"),
    (
        "control char in name",
        _set("artifacts.0.name", "a\x00b"),
        "artifacts[0].name",
        "a\x00b",
        "control",
    ),
    (
        "long name",
        _set("artifacts.0.name", "n" * 300),
        "artifacts[0].name",
        "300 characters",
        "256",
    ),
    (
        "version object",
        _set("artifacts.0.version", {"major": 1}),
        "artifacts[0].version",
        "{'major': 1}",
        "string",
    ),
    ("version slash", _set("artifacts.0.version", "1/2"), "artifacts[0].version", "1/2", "'/'"),
    (
        "upload not bool",
        _set("artifacts.0.upload", "sometimes"),
        "artifacts[0].upload",
        "sometimes",
        "boolean",
    ),
    (
        "metric text",
        _set("artifacts.1.values.accuracy", "high"),
        "artifacts[1].values.accuracy",
        "high",
        "number",
    ),
    (
        "metric bool",
        _set("artifacts.1.values.model", True),
        "artifacts[1].values.model",
        True,
        "not true/false",
    ),
    (
        "metric nan",
        _set("artifacts.1.values.loss", float("nan")),
        "artifacts[1].values.loss",
        "nan",
        "finite",
    ),
    ("metrics values missing", _drop("artifacts.1.values"), "artifacts[1].values", None, "missing"),
    (
        "negative step",
        _set("artifacts.1.step", -1),
        "artifacts[1].step",
        -1,
        "greater than or equal to 0",
    ),
    (
        "parameters not object",
        _set("artifacts.2.values", [1, 2]),
        "artifacts[2].values",
        "[1, 2]",
        "dictionary",
    ),
    (
        "huge parameter",
        _set("artifacts.2.values.blob", "x" * (LIMITS.string_value_length + 1)),
        "artifacts[2].values.blob",
        "x" * 117 + "...",
        "over the limit",
    ),
    (
        "absolute path",
        _set("artifacts.0.files.0.path", "/etc/passwd"),
        "artifacts[0].files[0].path",
        "/etc/passwd",
        "absolute",
    ),
    (
        "windows path",
        _set("artifacts.0.files.0.path", "C:/x/model.pkl"),
        "artifacts[0].files[0].path",
        "C:/x/model.pkl",
        "absolute",
    ),
    (
        "dotdot path",
        _set("artifacts.0.files.0.path", "../../model.pkl"),
        "artifacts[0].files[0].path",
        "../../model.pkl",
        "'..'",
    ),
    (
        "inner dotdot path",
        _set("artifacts.0.files.0.path", "a/../../b.pkl"),
        "artifacts[0].files[0].path",
        "a/../../b.pkl",
        "'..'",
    ),
    (
        "backslash path",
        _set("artifacts.0.files.0.path", "a\\model.pkl"),
        "artifacts[0].files[0].path",
        "a\\model.pkl",
        "separator",
    ),
    (
        "NUL path",
        _set("artifacts.0.files.0.path", "model.pkl\x00.txt"),
        "artifacts[0].files[0].path",
        "model.pkl\x00.txt",
        "NUL",
    ),
    (
        "dot path",
        _set("artifacts.0.files.0.path", "."),
        "artifacts[0].files[0].path",
        ".",
        "inside the bundle",
    ),
    (
        "bad uri scheme",
        _set("artifacts.0.files.0", {"uri": "http://x/model.pkl"}),
        "artifacts[0].files[0].uri",
        "http://x/model.pkl",
        "s3://",
    ),
    (
        "bad base64",
        _set("artifacts.0.files.0", {"content_base64": "%%%", "name": "m.pkl"}),
        "artifacts[0].files[0].content_base64",
        "%%%",
        "base64",
    ),
    (
        "path and uri",
        _set("artifacts.0.files.0", {"path": "m.pkl", "uri": "s3://b/m.pkl"}),
        "artifacts[0].files[0]",
        "['path', 'uri']",
        "exactly one",
    ),
    (
        "no source",
        _set("artifacts.0.files.0", {"name": "m.pkl"}),
        "artifacts[0].files[0]",
        None,
        "exactly one",
    ),
    (
        "no extension no type",
        _add_file(4, {"path": "plots/README"}),
        "artifacts[4].files[2].name",
        "README",
        "'type' is required",
    ),
    (
        "bad file type",
        _add_file(4, {"path": "x", "type": "p/df"}),
        "artifacts[4].files[2].type",
        "p/df",
        "file type",
    ),
    (
        "duplicate file name",
        _add_file(4, {"path": "old/t_vscat.pdf"}),
        "artifacts[4].files[2].name",
        "t_vscat.pdf",
        "files[0] (path 't_vscat.pdf') and files[2] (path 'old/t_vscat.pdf')",
    ),
    (
        "duplicate explicit name",
        _add_file(4, {"path": "other.pdf", "name": "t_ae_rel", "type": "pdf"}),
        "artifacts[4].files[2].name",
        "t_ae_rel",
        "files[1] (path 'rel') and files[2] (path 'other.pdf')",
    ),
    (
        "bad lineage",
        _set("inputs", ["fraud_training/run-42/train_data"]),
        "inputs[0]",
        "fraud_training/run-42/train_data",
        "pipeline/run_id/step_name/artifact_name",
    ),
    ("inputs not list", _set("inputs", "a/b/c/d"), "inputs", "a/b/c/d", "list"),
    ("stack blank", _set("stack", ""), "stack", "", "blank"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "value", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_manifest_names_field_and_value(
    mutate: Mutation, field: str, value: Any, words: str
) -> None:
    data = example()
    mutate(data)
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    problems = info.value.problems
    matching = [p for p in problems if p.field == field]
    assert matching, f"no problem names {field!r}: {[p.render() for p in problems]}"
    problem = matching[0]
    assert problem.value == value
    assert words in problem.message
    # The exception text a person reads carries both the field and the value.
    assert field in str(info.value)
    if value is not None:
        assert repr(value) in str(info.value)


def test_every_problem_is_reported_at_once() -> None:
    data = example()
    data["run_id"] = "a/b"
    data["artifacts"][0]["type"] = "modle"
    data["artifacts"][1]["values"]["x"] = "y"
    with pytest.raises(ManifestError) as info:
        parse_manifest(data)
    assert {p.field for p in info.value.problems} == {
        "run_id",
        "artifacts[0].type",
        "artifacts[1].values.x",
    }


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"manifest"', "must be a JSON object"),
    ],
)
def test_unreadable_manifests(raw: bytes, words: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw)
    assert info.value.problems[0].field == "(manifest)"
    assert words in info.value.problems[0].message


def test_manifest_over_the_size_limit_is_refused_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(LIMITS, "manifest_bytes", 100)
    with pytest.raises(ManifestError) as info:
        parse_manifest(json.dumps(DESIGN_EXAMPLE))
    assert "byte limit" in info.value.problems[0].message
    assert "bytes" in str(info.value.problems[0].value)


@pytest.mark.parametrize(
    ("build", "field", "limit"),
    [
        (
            lambda: minimal(*[{"type": "artifact", "name": f"a{i}"} for i in range(1001)]),
            "artifacts",
            LIMITS.artifacts_per_manifest,
        ),
        (
            lambda: {**minimal(), "inputs": [f"p/r/s/a{i}" for i in range(1001)]},
            "inputs",
            LIMITS.inputs_per_manifest,
        ),
        (
            lambda: minimal(
                {"type": "metrics", "name": "m", "values": {f"k{i}": i for i in range(10_001)}}
            ),
            "artifacts[0].values",
            LIMITS.values_per_artifact,
        ),
        (
            lambda: minimal(
                {
                    "type": "artifact",
                    "name": "a",
                    "files": [{"path": f"f{i}.txt"} for i in range(10_001)],
                }
            ),
            "artifacts[0].files",
            LIMITS.files_per_artifact,
        ),
    ],
    ids=["artifacts", "inputs", "values", "files"],
)
def test_count_limits_name_the_limit(
    build: Callable[[], dict[str, Any]], field: str, limit: int
) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(build())
    problem = next(p for p in info.value.problems if p.field == field)
    assert f"the limit is {limit}" in problem.message
    assert problem.value == f"{limit + 1} items"


# --- upload override ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("off", False),
    ],
)
def test_upload_all_override(value: str | None, expected: bool | None) -> None:
    env = {} if value is None else {"FLOWYML_UPLOAD_ALL_ARTIFACTS": value}
    assert upload_override(env) is expected


def test_upload_override_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWYML_UPLOAD_ALL_ARTIFACTS", "true")
    assert upload_override() is True
    monkeypatch.delenv("FLOWYML_UPLOAD_ALL_ARTIFACTS")
    assert upload_override() is None


def test_upload_override_refuses_non_booleans() -> None:
    with pytest.raises(ValueError, match="FLOWYML_UPLOAD_ALL_ARTIFACTS='maybe'"):
        upload_override({"FLOWYML_UPLOAD_ALL_ARTIFACTS": "maybe"})


# --- framework detection on a bundle --------------------------------------------------


def _sklearn_pickle() -> bytes:
    # The bytes of a pickled sklearn object name its module near the start.
    return pickle.dumps(("sklearn.linear_model._logistic", "LogisticRegression", [0.1]), protocol=4)


def test_apply_detection_fills_missing_framework_from_the_files(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(_sklearn_pickle())
    (tmp_path / "net.onnx").write_bytes(b"\x08\x07")
    (tmp_path / "notes.txt").write_text("hello")
    m = parse_manifest(
        minimal(
            {"type": "model", "name": "a", "files": [{"path": "notes.txt"}, {"path": "model.pkl"}]},
            {"type": "model", "name": "b", "files": [{"path": "net.onnx"}]},
            {"type": "model", "name": "c", "framework": "custom", "files": [{"path": "net.onnx"}]},
            {"type": "dataset", "name": "d", "files": [{"path": "notes.txt"}]},
        ),
        bundle_dir=tmp_path,
    )
    frameworks = [getattr(a, "framework", "-") for a in m.artifacts]
    assert frameworks == ["sklearn", "onnx", "custom", "-"]


def test_apply_detection_inline_content_and_uri(tmp_path: Path) -> None:
    encoded = base64.b64encode(_sklearn_pickle()).decode()
    m = Manifest.model_validate(
        minimal(
            {"type": "model", "name": "a", "files": [{"content_base64": encoded, "name": "m.bin"}]},
            {"type": "model", "name": "b", "files": [{"uri": "s3://bucket/m/model.safetensors"}]},
        )
    )
    apply_detection(m, tmp_path)
    assert [a.framework for a in m.artifacts] == ["sklearn", "safetensors"]  # type: ignore[union-attr]


def test_apply_detection_plain_pickle_is_the_fallback(tmp_path: Path) -> None:
    (tmp_path / "state.pkl").write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    m = parse_manifest(
        minimal({"type": "model", "name": "a", "files": [{"path": "state.pkl"}]}),
        bundle_dir=tmp_path,
    )
    assert m.artifacts[0].framework == "pickle"  # type: ignore[union-attr]


def test_apply_detection_never_reads_through_a_symlink_out_of_the_bundle(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(_sklearn_pickle())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.symlink(outside / "secret.bin", bundle / "model.bin")
    m = parse_manifest(
        minimal({"type": "model", "name": "a", "files": [{"path": "model.bin"}]}), bundle_dir=bundle
    )
    # Judged by its name only: a .bin says nothing, so nothing is claimed.
    assert m.artifacts[0].framework is None  # type: ignore[union-attr]
