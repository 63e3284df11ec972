"""The JSON Schema emitters validate against: generated from the models, committed, and
in agreement with what the router itself accepts."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from router.manifest import ManifestError, manifest_json_schema, parse_manifest
from tests.test_manifest import DESIGN_EXAMPLE

COMMITTED = Path(__file__).resolve().parent.parent / "config" / "manifest.schema.json"
REGENERATE = (
    '.venv/bin/python -c "import json; from router.manifest import manifest_json_schema; '
    "open('config/manifest.schema.json', 'w').write("
    "json.dumps(manifest_json_schema(), indent=2) + '\\n')\""
)


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(COMMITTED.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_committed_schema_matches_the_models() -> None:
    committed = json.loads(COMMITTED.read_text())
    assert committed == manifest_json_schema(), (
        "config/manifest.schema.json is out of date with router/manifest.py; regenerate it "
        f"with: {REGENERATE}"
    )


def test_schema_names_its_dialect_and_required_fields() -> None:
    schema = manifest_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "artifact-router manifest v1"
    assert set(schema["required"]) == {
        "manifest_version",
        "pipeline",
        "run_id",
        "step_name",
        "artifacts",
    }


def test_schema_accepts_the_design_example(validator: jsonschema.Draft202012Validator) -> None:
    assert list(validator.iter_errors(DESIGN_EXAMPLE)) == []


@pytest.mark.parametrize(
    "spelling",
    [
        "model",
        "Model",
        "MODEL",
        "mOdEl",
        "DATA",
        "data",
        "Dataset",
        "DATASET",
        "Report",
        "ARTIFACT",
    ],
)
def test_schema_accepts_every_spelling_of_the_types(
    validator: jsonschema.Draft202012Validator, spelling: str
) -> None:
    data = copy.deepcopy(DESIGN_EXAMPLE)
    data["artifacts"] = [{"type": spelling, "name": "x", "files": [{"path": "x.bin"}]}]
    assert list(validator.iter_errors(data)) == []
    parse_manifest(data)  # and the router agrees


def _variant(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(DESIGN_EXAMPLE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


# Manifests both the schema and the router refuse: an emitter that validates first
# learns of the mistake before writing.
REFUSED = {
    "unknown type": _variant(artifacts__0__type="modle"),
    "metrics without values": _variant(artifacts__1={"type": "metrics", "name": "m"}),
    "file without source": _variant(artifacts__0__files=[{"name": "m.pkl"}]),
    "file with two sources": _variant(
        artifacts__0__files=[{"path": "m.pkl", "uri": "s3://b/m.pkl"}]
    ),
    "unknown field": _variant(artifacts__0__frameworkk="x"),
    "unknown top field": _variant(runid="x"),
    "manifest_version 2": _variant(manifest_version=2),
    "slash in name": _variant(artifacts__0__name="a/b"),
    "bad lineage": _variant(inputs=["a/b"]),
    "no artifacts": _variant(artifacts=[]),
    "metric not a number": _variant(artifacts__1__values={"accuracy": "high"}),
    "negative step": _variant(artifacts__1__step=-1),
    "bad file type": _variant(artifacts__0__files=[{"path": "m", "type": "p/df"}]),
}


@pytest.mark.parametrize("data", list(REFUSED.values()), ids=list(REFUSED))
def test_schema_and_router_refuse_the_same_mistakes(
    validator: jsonschema.Draft202012Validator, data: dict[str, Any]
) -> None:
    assert list(validator.iter_errors(data)) != []
    with pytest.raises(ManifestError):
        parse_manifest(data)


# Manifests both accept, with the optional parts left out or spelled differently.
ACCEPTED = {
    "minimal": {
        "manifest_version": 1,
        "pipeline": "p",
        "run_id": "r",
        "step_name": "s",
        "artifacts": [{"type": "artifact", "name": "a"}],
    },
    "uri and inline files": _variant(
        artifacts__0__files=[
            {"uri": "s3://b/k/model.pkl"},
            {"content_base64": "aGVsbG8=", "name": "hello.txt"},
        ]
    ),
    "nulls for optional fields": _variant(id=None, stack=None, artifacts__0__version=None),
    "unicode names": _variant(pipeline="détection-模型", artifacts__0__name="modèle"),
}


@pytest.mark.parametrize("data", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_what_the_schema_accepts_the_router_accepts(
    validator: jsonschema.Draft202012Validator, data: dict[str, Any]
) -> None:
    assert list(validator.iter_errors(data)) == []
    parse_manifest(data)


def test_schema_describes_the_file_entry() -> None:
    file_entry = manifest_json_schema()["$defs"]["FileEntry"]
    assert set(file_entry["properties"]) == {"path", "uri", "content_base64", "name", "type"}
    assert file_entry["additionalProperties"] is False
    assert {"required": ["path"]} in file_entry["oneOf"]
