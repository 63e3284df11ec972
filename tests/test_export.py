"""`export_to_dataset:` completed datasets become numbered snapshots of a named dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from router.config import load_config
from router.errors import ConfigError
from tests.conftest import Workspace, write_bundle


def dataset_manifest(run_id: str, step: str = "prep") -> dict[str, object]:
    return {"manifest_version": 1, "pipeline": "fraud", "run_id": run_id, "step_name": step,
            "artifacts": [{"type": "DATA", "name": "train_data", "upload": True,
                           "files": [{"path": "train.csv"}, {"path": "schema.json"}]}]}


def test_each_completed_dataset_becomes_the_next_snapshot(
    tmp_path: Path, start_daemon,  # type: ignore[no-untyped-def]
) -> None:
    workspace = Workspace(tmp_path)
    lake = tmp_path / "lake"
    workspace.stack["artifact_stores"] = {"lake": {"type": "local", "path": str(lake)}}
    workspace.stack["artifact_routing"]["Dataset"] = {
        "store": "local", "path": "{pipeline}/{run_id}/{name}",
        "export_to_dataset": {"name": "fraud-train", "store": "lake",
                              "path": "datasets/{dataset}/v{snapshot}"},
    }
    workspace.write()
    start_daemon(workspace)
    for i in (1, 2, 3):
        write_bundle(workspace.spool, f"d{i}", dataset_manifest(f"run-{i}"),
                     {"train.csv": f"a,b\n{i},{i}\n".encode(), "schema.json": b"{}"})
        workspace.wait_settled(i)  # one after the other: snapshots follow completion order
    snapshots = sorted(p.name for p in (lake / "datasets" / "fraud-train").iterdir())
    assert snapshots == ["v1", "v2", "v3"]
    assert (lake / "datasets" / "fraud-train" / "v2" / "train.csv").read_text() == "a,b\n2,2\n"
    catalog = json.loads(workspace.cli("artifacts", "--json").stdout)
    for artifact in catalog:
        exports = [loc for loc in artifact["locations"] if loc["action"] == "export"]
        run = artifact["run_id"].split("-")[1]
        assert {loc["file_name"] for loc in exports} == {"train.csv", "schema.json"}
        assert all(f"/datasets/fraud-train/v{run}/" in loc["uri"] for loc in exports)


@pytest.mark.parametrize(
    ("rule", "field", "needle"),
    [
        ({"Model": {"export_to_dataset": {"name": "x"}}}, "Model.export_to_dataset",
         "only dataset rules"),
        ({"Dataset": {"export_to_dataset": {"name": "x", "path": "d/{dataset}"}}},
         "export_to_dataset.path", "{snapshot}"),
        ({"Dataset": {"export_to_dataset": {"name": "x", "store": "laek"}}},
         "export_to_dataset.store", "names no store"),
        ({"Dataset": {"export_to_dataset": {"name": "x", "path": "{snapshot}/{bogus}"}}},
         "export_to_dataset.path", "{bogus}"),
    ],
)
def test_bad_exports_are_config_errors(tmp_path: Path, rule: dict[str, object], field: str,
                                       needle: str) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"active_stack": "s", "stacks": {"s": {
        "artifact_store": {"type": "local", "path": str(tmp_path)},
        "artifact_stores": {"lake": {"type": "local", "path": str(tmp_path)}},
        "artifact_routing": rule}}}))
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    text = str(caught.value)
    assert field in text and needle in text
