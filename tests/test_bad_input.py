"""Bad input: a committed corpus of malformed bundles and MQTT payloads, and fuzzing.

The corpus lives in `tests/corpus/` (see its README):

* `bundles/<flaw>/` - a bundle named after its flaw: `manifest.json` and the files it
  names, `expect.txt` (every line must appear in the rejection), an optional `SETUP`
  (filesystem objects git cannot hold, and inputs too big to commit, made at run time)
  and, for inputs that expose a known product bug, a `BUG` file saying what goes wrong.
* `mqtt/<flaw>.payload` with `<flaw>.expect` and an optional `<flaw>.setup`.

Each bundle goes through intake (`load_bundle`, then the daemon's preflight), and the
whole corpus, interleaved with valid bundles, through one real daemon process.  The
manifest parser and the path templates are fuzzed with hypothesis; `fuzz/manifest_fuzz.py`
is the atheris target for longer runs by hand.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.config import MqttSettings, load_config
from router.daemon import Daemon
from router.errors import Problem
from router.intake import AcceptedEvent, Rejection, load_bundle
from router.manifest import Manifest, ManifestError, parse_manifest
from router.metrics import RouterMetrics
from router.rules import FILE_SLOT, object_key, plan_event, render_path
from router.sources.mqtt import MqttSource
from sinks.stores.keys import versioned_key
from sinks.stores.local import LocalStore, LocalStoreSettings
from tests.conftest import ROOT, Workspace, write_bundle

CORPUS = Path(__file__).resolve().parent / "corpus"
BUNDLES = CORPUS / "bundles"
PAYLOADS = CORPUS / "mqtt"


# --- the corpus -----------------------------------------------------------------------------


def bundle_names() -> list[str]:
    return sorted(p.name for p in BUNDLES.iterdir() if p.is_dir())


def payload_names() -> list[str]:
    return sorted(p.stem for p in PAYLOADS.glob("*.payload"))


def expectations(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _locate(doc: Any, path: str) -> tuple[Any, Any]:
    """(container, key) of a dotted path such as `artifacts[0].files`; creates dicts."""
    keys: list[Any] = [
        int(index) if index else name for name, index in _TOKEN.findall(path)
    ]
    node = doc
    for key in keys[:-1]:
        if isinstance(key, str) and key not in node:
            node[key] = {}
        node = node[key]
    return node, keys[-1]


_NEST = "@NEST@"


def apply_json_setup(raw: bytes, lines: list[str]) -> bytes:
    """The SETUP verbs that generate big or deep manifests (see tests/corpus/README.md)."""
    verbs = [line.split(" ", 1)[0] for line in lines]
    if not {"repeat", "fill", "string", "nest", "pad"} & set(verbs):
        return raw
    doc = json.loads(raw)
    nest_depth = 0
    pad_to = 0
    for line in lines:
        verb, _, rest = line.partition(" ")
        if verb == "repeat":
            path, count, template = rest.split(" ", 2)
            parent, key = _locate(doc, path)
            parent[key] = [
                json.loads(template.replace("{i}", str(i))) for i in range(int(count))
            ]
        elif verb == "fill":
            path, count, value = rest.split(" ", 2)
            parent, key = _locate(doc, path)
            parent[key] = {f"k{i}": json.loads(value) for i in range(int(count))}
        elif verb == "string":
            path, length, char = rest.split(" ", 2)
            parent, key = _locate(doc, path)
            parent[key] = char * int(length)
        elif verb == "nest":
            path, depth = rest.split(" ")
            parent, key = _locate(doc, path)
            parent[key] = _NEST
            nest_depth = int(depth)
        elif verb == "pad":
            pad_to = int(rest)
    text = json.dumps(doc)
    if nest_depth:
        text = text.replace(f'"{_NEST}"', "[" * nest_depth + "]" * nest_depth)
    out = text.encode()
    if pad_to > len(out):
        out += b" " * (pad_to - len(out))  # trailing whitespace: still valid JSON
    return out


def _make_socket(path: Path) -> None:
    # AF_UNIX paths are limited to ~108 bytes: bind somewhere short, then move it in.
    short = Path(tempfile.mkdtemp(prefix="sk", dir="/tmp"))
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(short / "s"))
        os.rename(short / "s", path)
    finally:
        shutil.rmtree(short, ignore_errors=True)


def apply_fs_setup(directory: Path, lines: list[str], outside: Path) -> None:
    for line in lines:
        verb, _, rest = line.partition(" ")
        rest = rest.replace("@OUTSIDE@", str(outside))
        if verb == "symlink":
            link, target = (s.strip() for s in rest.split("->"))
            (directory / link).unlink(missing_ok=True)
            os.symlink(target, directory / link)
        elif verb == "fifo":
            os.mkfifo(directory / rest)
        elif verb == "socket":
            _make_socket(directory / rest)
        elif verb == "mkdir":
            (directory / rest).mkdir(parents=True)


def materialise(name: str, dest: Path, outside: Path) -> Path:
    """Copy corpus bundle `name` to `dest` and run its SETUP."""
    src = BUNDLES / name
    dest.mkdir(parents=True)
    for item in src.iterdir():
        if item.name in ("expect.txt", "SETUP", "BUG"):
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name, symlinks=True)
        else:
            shutil.copy2(item, dest / item.name, follow_symlinks=False)
    setup = src / "SETUP"
    lines = expectations(setup) if setup.exists() else []
    manifest = dest / "manifest.json"
    if lines and manifest.is_file() and not manifest.is_symlink():
        manifest.write_bytes(apply_json_setup(manifest.read_bytes(), lines))
    apply_fs_setup(dest, lines, outside)
    return dest


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside every bundle, holding a file no input may read."""
    path = tmp_path_factory.mktemp("outside")
    (path / "secret.txt").write_text("top secret: never routed\n")
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """A daemon object (not running) for its preflight: the config-dependent checks."""
    ws = Workspace(tmp_path_factory.mktemp("preflight"))
    return Daemon(load_config(ws.config_path))


def _load_with_timeout(bundle: Path, timeout: float = 5.0) -> AcceptedEvent | Rejection:
    """load_bundle in a thread, so an input that hangs it fails the test instead."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(load_bundle(bundle, time.time()))
        except BaseException as exc:  # reported below, with the input that caused it
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        # Unblock a reader stuck on a FIFO so the thread ends with the test.
        for fifo in bundle.iterdir():
            if fifo.is_fifo():
                try:
                    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                os.close(fd)
        thread.join(5)
        pytest.fail(f"load_bundle({bundle.name}) did not return within {timeout}s")
    if isinstance(result[0], BaseException):
        raise AssertionError(f"load_bundle raised instead of rejecting: {result[0]!r}") \
            from result[0]
    value: AcceptedEvent | Rejection = result[0]
    return value


def intake_rejection(bundle: Path, daemon: Daemon) -> Rejection | None:
    """What the spool source does: load_bundle, then the daemon's preflight."""
    result = _load_with_timeout(bundle)
    if isinstance(result, Rejection):
        return result
    problem = daemon.preflight(result)
    if problem is None:
        return None
    return Rejection(source="spool", bundle=bundle.name, event_id=result.event_id,
                     problems=[problem])


def assert_names_the_flaw(problems: list[Problem], summary: str, expect: list[str],
                          what: str) -> None:
    assert problems, f"{what}: rejected without a problem"
    for p in problems:
        assert p.field.strip() and p.message.strip(), (what, p)
    for needle in expect:
        assert needle in summary, f"{what}: {summary!r} lacks {needle!r}"


def test_the_corpus_is_big_enough_and_well_formed() -> None:
    names = bundle_names()
    assert len(names) >= 45
    assert len(payload_names()) >= 20
    for name in names:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert expectations(BUNDLES / name / "expect.txt"), name
        files = {p.name for p in (BUNDLES / name).iterdir()}
        assert "manifest.json" in files or "SETUP" in files, name
    for name in payload_names():
        assert expectations(PAYLOADS / f"{name}.expect"), name


def test_a_valid_bundle_passes_the_same_harness(tmp_path: Path, daemon: Daemon,
                                                outside: Path) -> None:
    """The harness itself rejects nothing valid (else every corpus test passes vacuously)."""
    bundle = write_bundle(tmp_path, "valid", {
        "manifest_version": 1, "pipeline": "corpus", "run_id": "run-1", "step_name": "train",
        "artifacts": [{"type": "model", "name": "clf", "upload": True,
                       "files": [{"path": "model.pkl"}]}]}, {"model.pkl": b"m"})
    assert intake_rejection(bundle, daemon) is None


@pytest.mark.parametrize("name", bundle_names())
def test_corpus_bundle_is_rejected_naming_the_flaw(name: str, tmp_path: Path, daemon: Daemon,
                                                   outside: Path) -> None:
    bundle = materialise(name, tmp_path / name, outside)
    rejection = intake_rejection(bundle, daemon)
    assert rejection is not None, f"{name}: accepted"
    expect = expectations(BUNDLES / name / "expect.txt")
    assert_names_the_flaw(rejection.problems, rejection.summary, expect, name)
    # error.json is written from this: it must serialise, and never leak file contents
    body = json.dumps([p.model_dump(mode="json") for p in rejection.problems], default=str)
    assert "top secret" not in body


def test_whole_corpus_interleaved_with_valid_work_through_one_daemon(
    workspace: Workspace, start_daemon: Callable[..., Any], outside: Path
) -> None:
    names = bundle_names()
    daemon = start_daemon(workspace)
    incoming = workspace.spool / "incoming"
    valid: list[str] = []
    for i, name in enumerate(names):
        if i % 3 == 0:
            good = f"valid-{i:03d}"
            write_bundle(workspace.spool, good, {
                "manifest_version": 1, "pipeline": "corpus", "run_id": good,
                "step_name": "train",
                "artifacts": [{"type": "model", "name": "clf", "upload": True,
                               "files": [{"path": "model.pkl"}]},
                              {"type": "metrics", "name": "eval", "values": {"acc": 0.9}}]},
                {"model.pkl": good.encode()})
            valid.append(good)
        tmp = materialise(name, incoming / f".tmp-{name}", outside)
        os.rename(tmp, incoming / name)

    status = workspace.wait_settled(len(valid) + len(names), timeout=150)
    assert daemon.proc.poll() is None, "the daemon died"
    assert status["events"].get("done") == len(valid), status["events"]
    assert status["events"].get("rejected") == len(names), status["events"]
    assert status["deliveries"]["dead"] == 0
    assert not list(incoming.iterdir())
    for name in names:
        error = json.loads((workspace.spool / "rejected" / name / "error.json").read_text())
        problems = [Problem(**e) for e in error["errors"]]
        expect = expectations(BUNDLES / name / "expect.txt")
        assert_names_the_flaw(problems, error["summary"], expect, name)
        assert error["bundle"] == name
    for good in valid:
        stored = workspace.store / "corpus" / good / "train" / "clf" / "model.pkl"
        assert stored.read_bytes() == good.encode()
    assert "top secret" not in "".join(
        p.read_text() for p in (workspace.spool / "rejected").glob("*/error.json"))
    assert "Traceback" not in daemon.log()
    assert daemon.terminate() == 0


def _wedge_check(workspace: Workspace, start_daemon: Callable[..., Any], outside: Path,
                 name: str) -> None:
    daemon = start_daemon(workspace)
    incoming = workspace.spool / "incoming"
    tmp = materialise(name, incoming / f".tmp-{name}", outside)
    os.rename(tmp, incoming / name)
    for i in range(3):
        write_bundle(workspace.spool, f"valid-{i}", {
            "manifest_version": 1, "pipeline": "corpus", "run_id": f"r{i}", "step_name": "s",
            "artifacts": [{"type": "metrics", "name": "eval", "values": {"acc": 0.9}}]})
    try:
        status = workspace.wait_settled(4, timeout=10)
        assert status["events"] == {"done": 3, "rejected": 1}
    finally:
        for fifo in (incoming / name, workspace.spool / "rejected" / name):
            if (fifo / "manifest.json").is_fifo():  # let a stuck reader go
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo / "manifest.json", os.O_WRONLY | os.O_NONBLOCK))
    assert daemon.proc.poll() is None


def test_a_symlink_loop_does_not_wedge_intake(
    workspace: Workspace, start_daemon: Callable[..., Any], outside: Path
) -> None:
    _wedge_check(workspace, start_daemon, outside, "symlink-loop")


def test_a_fifo_manifest_does_not_wedge_intake(
    workspace: Workspace, start_daemon: Callable[..., Any], outside: Path
) -> None:
    _wedge_check(workspace, start_daemon, outside, "manifest-json-is-a-fifo")


def test_a_huge_sparse_manifest_is_refused_without_reading_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    bundle = tmp_path / "huge"
    bundle.mkdir()
    with open(bundle / "manifest.json", "wb") as fh:
        fh.truncate(3 * 1024**3)  # sparse: no disk used
    script = (
        "import resource, sys, time\n"
        "from pathlib import Path\n"
        "from router.intake import load_bundle\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "r = load_bundle(Path(sys.argv[1]), time.time())\n"
        "print(type(r).__name__, getattr(r, 'summary', ''))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(bundle)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("Rejection") and "byte limit" in out.stdout


# --- simulated races: a bundle changed between intake's checks and its reads ---------------


def _swap_after_check(monkeypatch: pytest.MonkeyPatch, victim: str,
                      swap: Callable[[Path], None]) -> None:
    """Simulated race: `swap` the bundle file `victim` right after intake checked it
    (lstat, resolve) and before it is hashed, exactly where a concurrent writer could."""
    import router.intake as intake

    real = intake._resolve_in_bundle

    def checked_then_swapped(bundle: Path, rel: str, field: str) -> Any:
        result = real(bundle, rel, field)
        if rel == victim:
            swap(bundle / rel)
        return result

    monkeypatch.setattr(intake, "_resolve_in_bundle", checked_then_swapped)


def _to_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("size", [1, 9 * 1024 * 1024], ids=["small", "parallel-hashing"])
@pytest.mark.parametrize("swap", ["fifo", "symlink-outside", "another-file"])
def test_a_file_swapped_after_its_check_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str, size: int
) -> None:
    """Simulated race (see _swap_after_check): the file hashed must be the one checked.
    A FIFO swapped in blocked the reader forever; a symlink to a file outside the bundle,
    or another file renamed over it, was hashed and accepted. With four 9 MiB files the
    bundle is hashed on several threads (sha256_files' parallel path). Fails without the
    fix: the FIFO case times out, the others are accepted."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"outside the bundle")
    files = {f"shard-{i}.bin": bytes([i + 1]) * size for i in range(4)}
    bundle = write_bundle(tmp_path / "spool", "b1", {
        "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
        "artifacts": [{"type": "artifact", "name": "a", "files": [
            {"path": name} for name in files]}]}, files)

    def swapped(path: Path) -> None:
        if swap == "fifo":
            _to_fifo(path)
        elif swap == "symlink-outside":
            path.unlink()
            path.symlink_to(secret)
        else:
            (path.parent / "new").write_bytes(b"other bytes")
            os.replace(path.parent / "new", path)

    _swap_after_check(monkeypatch, "shard-2.bin", swapped)
    result = _load_with_timeout(bundle)
    assert isinstance(result, Rejection), result
    (problem,) = result.problems
    assert (problem.field, problem.value) == ("artifacts[0].files[2].path", "shard-2.bin")
    assert "changed while the router read it" in problem.message


def test_a_file_removed_after_its_check_says_to_write_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated race: the file vanishes after its check, before its hash. The fix given is
    the one for a missing file. Fails without the fix: 'make it readable'."""
    bundle = write_bundle(tmp_path / "spool", "b1", {
        "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
        "artifacts": [{"type": "artifact", "name": "a", "files": [{"path": "m.bin"}]}]},
        {"m.bin": b"m"})
    _swap_after_check(monkeypatch, "m.bin", Path.unlink)
    result = _load_with_timeout(bundle)
    assert isinstance(result, Rejection), result
    assert "no such file in the bundle; write it before manifest.json" in result.summary
    assert "readable" not in result.summary


def test_a_manifest_swapped_for_a_fifo_after_its_check_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated race: manifest.json passes its lstat (a regular file), then a FIFO takes
    its place before it is opened. Fails without the fix: the open blocked forever."""
    bundle = write_bundle(tmp_path / "spool", "b1", {
        "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
        "artifacts": [{"type": "metrics", "name": "m", "values": {"a": 1}}]})
    real_lstat = Path.lstat
    swapped: list[bool] = []

    def lstat_then_swap(path: Path) -> os.stat_result:
        result = real_lstat(path)
        if path.name == "manifest.json" and not swapped:
            swapped.append(True)
            _to_fifo(path)
        return result

    monkeypatch.setattr(Path, "lstat", lstat_then_swap)
    result = _load_with_timeout(bundle)
    assert swapped
    assert isinstance(result, Rejection), result
    (problem,) = result.problems
    assert problem.field == "manifest.json"
    assert "replaced or removed while the router read it" in problem.message


@pytest.mark.parametrize("name", ["run\x01\n1", "tab\there", "del\x7f", " "])
def test_a_bundle_name_standing_in_for_the_id_follows_the_id_rules(
    tmp_path: Path, name: str
) -> None:
    """Without a manifest `id` the directory name is the event id: control characters (or
    a blank name) are refused as they are in `id`; with an `id` the bundle is accepted.
    Fails without the fix: the name became the event id as it was."""
    manifest: dict[str, Any] = {
        "manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
        "artifacts": [{"type": "metrics", "name": "m", "values": {"a": 1}}]}
    bundle = write_bundle(tmp_path / "spool", name, manifest)
    result = _load_with_timeout(bundle)
    assert isinstance(result, Rejection), result
    (problem,) = result.problems
    assert problem.field == "id" and problem.value == name
    assert "the bundle directory name is the event id" in problem.message
    assert "set 'id' in the manifest or rename the directory" in problem.message
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "id": "fine"}))
    assert isinstance(_load_with_timeout(bundle), AcceptedEvent)


# --- MQTT payload corpus -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mqtt_env(tmp_path_factory: pytest.TempPathFactory, daemon: Daemon) -> Iterator[
        tuple[MqttSource, Path]]:
    """An MqttSource (not connected) with allowed_roots, and the files payloads point at."""
    base = tmp_path_factory.mktemp("mqtt")
    allowed, outside_dir, evil = base / "allowed", base / "outside", base / "allowed-evil"
    for d in (allowed / "subdir", outside_dir, evil):
        d.mkdir(parents=True)
    (allowed / "model.bin").write_bytes(b"model")
    (evil / "model.bin").write_bytes(b"evil")
    (outside_dir / "secret.txt").write_text("top secret: never routed\n")
    (allowed / "escape.txt").symlink_to(outside_dir / "secret.txt")
    os.mkfifo(allowed / "pipe")
    settings = MqttSettings(allowed_roots=[str(allowed)], inline_max_bytes=1024)
    source = MqttSource(
        settings,
        daemon.journal,
        daemon.plan,
        preflight=daemon.preflight,
        metrics=RouterMetrics(),
        state_dir=base / "state",
    )
    yield source, allowed


def mqtt_outcome(source: MqttSource, payload: bytes) -> AcceptedEvent | Rejection:
    """The MQTT source's own validation, without a broker: parse, check, stage."""
    message = aiomqtt.Message("artifacts/corpus", payload, qos=1, retain=False, mid=1,
                              properties=None)
    item = source._parse(message, time.time())
    if item.rejection is not None:
        return item.rejection
    assert item.event is not None
    staged = source._stage(item.event)
    if isinstance(staged, list):
        return Rejection(source="mqtt", event_id=item.event_id, problems=staged)
    return staged


def load_payload(name: str, allowed: Path) -> bytes:
    raw = (PAYLOADS / f"{name}.payload").read_bytes()
    raw = raw.replace(b"@ALLOWED@", str(allowed).encode())
    setup = PAYLOADS / f"{name}.setup"
    if setup.exists():
        raw = apply_json_setup(raw, expectations(setup))
    return raw


def test_a_valid_payload_passes_the_same_harness(mqtt_env: tuple[MqttSource, Path]) -> None:
    source, allowed = mqtt_env
    doc = {"manifest_version": 1, "pipeline": "corpus", "run_id": "r", "step_name": "s",
           "artifacts": [{"type": "report", "name": "r", "upload": True, "files": [
               {"content_base64": "aGk=", "name": "a.txt"},
               {"uri": (allowed / "model.bin").as_uri()}]}]}
    assert isinstance(mqtt_outcome(source, json.dumps(doc).encode()), AcceptedEvent)


@pytest.mark.parametrize("name", payload_names())
def test_corpus_payload_is_rejected_naming_the_flaw(
    name: str, mqtt_env: tuple[MqttSource, Path]
) -> None:
    source, allowed = mqtt_env
    outcome = mqtt_outcome(source, load_payload(name, allowed))
    assert isinstance(outcome, Rejection), f"{name}: accepted"
    expect = expectations(PAYLOADS / f"{name}.expect")
    assert_names_the_flaw(outcome.problems, outcome.summary, expect, name)
    assert "top secret" not in json.dumps(
        [p.model_dump(mode="json") for p in outcome.problems], default=str)


# --- hypothesis: the manifest parser ---------------------------------------------------------

_SCALARS = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["model", "Model", "DATA", "metrics", "..", "/", "a/b", "", " ",
                       "model.pkl", "../x", "s3://b/k", "file:///etc/passwd", "aGk=", "1"])
)
_KEYS = st.text(max_size=8) | st.sampled_from(
    ["manifest_version", "id", "pipeline", "run_id", "step_name", "stack", "inputs",
     "artifacts", "type", "name", "version", "files", "path", "uri", "content_base64",
     "values", "step", "metadata", "upload", "framework", "format", "schema"])
JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=25,
)

VALID: dict[str, Any] = {
    "manifest_version": 1,
    "id": "ev-1",
    "pipeline": "fraud",
    "run_id": "run-42",
    "step_name": "train",
    "stack": "local",
    "inputs": ["fraud/run-42/prep/train_data"],
    "artifacts": [
        {"type": "model", "name": "det", "version": "1.0.0", "framework": "sklearn",
         "upload": True, "files": [{"path": "model.pkl"}, {"path": "sub/w.bin", "name": "w.bin"}],
         "metadata": {"metrics": {"accuracy": 0.97}}, "serving_config": {},
         "input_schema": {}, "output_schema": None},
        {"type": "metrics", "name": "evaluation", "values": {"accuracy": 0.97}, "step": 100},
        {"type": "parameters", "name": "hparams", "values": {"lr": 0.001, "tag": "x"}},
        {"type": "DATA", "name": "train_data", "format": "parquet",
         "files": [{"path": "train.parquet"}], "schema": {}, "statistics": {}},
        {"type": "Report", "name": "TFL Reports",
         "files": [{"path": "t.pdf"}, {"path": "rel", "name": "t_rel", "type": "pdf"}]},
        {"type": "artifact", "name": "blob", "files": [{"uri": "s3://bucket/k.bin"},
                                                        {"content_base64": "aGk=",
                                                         "name": "i.txt"}]},
    ],
}


def check_parse(data: bytes | str | dict[str, Any]) -> Manifest | None:
    """The parser's contract: a Manifest, or ManifestError with actionable problems."""
    try:
        manifest = parse_manifest(data)
    except ManifestError as exc:
        assert exc.problems, "ManifestError without problems"
        for p in exc.problems:
            assert isinstance(p.field, str) and p.field.strip(), p
            assert isinstance(p.message, str) and p.message.strip(), p
            assert p.render()
        # error.json and the journal's rejection record serialise these
        Rejection(source="spool", problems=exc.problems).model_dump_json()
        json.dumps([p.model_dump(mode="json") for p in exc.problems], default=str)
        return None
    for artifact in manifest.artifacts:
        for entry in artifact.files:
            if entry.path is not None:
                assert not entry.path.startswith("/") and ".." not in entry.path.split("/")
            assert entry.name and "/" not in entry.name and entry.name not in (".", "..")
    return manifest


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    paths = _paths(doc)
    path = data.draw(st.sampled_from(paths), label="path")
    op = data.draw(st.sampled_from(["replace", "delete", "add", "duplicate", "case"]),
                   label="op")
    if not path:
        return data.draw(JSON) if op == "replace" else doc
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "replace":
        parent[key] = data.draw(JSON, label="value")
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent[key], dict):
        parent[key][data.draw(_KEYS, label="key")] = data.draw(JSON, label="value")
    elif op == "add" and isinstance(parent[key], list):
        parent[key].append(data.draw(JSON, label="value"))
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    elif op == "case" and isinstance(parent[key], str):
        parent[key] = parent[key].swapcase()
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JSON)
def test_arbitrary_json_only_ever_raises_manifest_error(value: Any) -> None:
    if isinstance(value, dict):
        check_parse(value)
    check_parse(json.dumps(value).encode())


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rounds=st.integers(min_value=1, max_value=4))
def test_mutated_valid_manifest_only_ever_raises_manifest_error(
    data: st.DataObject, rounds: int
) -> None:
    doc = copy.deepcopy(VALID)
    for _ in range(rounds):
        doc = _mutate(doc, data)
    if isinstance(doc, dict):
        check_parse(copy.deepcopy(doc))
    check_parse(json.dumps(doc).encode())


@settings(max_examples=600, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(min_value=0), st.sampled_from(["insert", "overwrite", "delete"]),
                  st.binary(min_size=1, max_size=8)),
        min_size=1, max_size=6,
    )
)
def test_byte_mutations_of_a_valid_manifest_only_ever_raise_manifest_error(
    edits: list[tuple[int, str, bytes]]
) -> None:
    raw = bytearray(json.dumps(VALID).encode())
    for at, op, blob in edits:
        at %= len(raw) + 1
        if op == "insert":
            raw[at:at] = blob
        elif op == "overwrite":
            raw[at:at + len(blob)] = blob
        else:
            del raw[at:at + len(blob)]
    check_parse(bytes(raw))


def test_the_fuzz_target_runs_over_the_corpus_without_atheris() -> None:
    """fuzz/manifest_fuzz.py stays importable and its plain loop finds nothing."""
    spec = importlib.util.spec_from_file_location(
        "manifest_fuzz", ROOT / "fuzz" / "manifest_fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seeds = module.seed_inputs()
    assert len(seeds) >= 45
    for seed in seeds:
        module.test_one_input(seed)
    module.random_loop(seeds, runs=1500, rng=random.Random(8))


# --- hypothesis: path templates through a real local store -------------------------------------

TEMPLATES = [
    "{pipeline}/{run_id}/{step_name}/{name}",
    "{artifact_name}/{name}/{version}/{date}/{file}",
    "{pipeline}{run_id}{step_name}{name}{version}",
    "{run_id}.{step_name}/{name}-{version}.{file}",
    "./{pipeline}/../{run_id}/{file}",  # `..` in the template itself is refused at load
    "latest/{name}",
]
HOSTILE = st.text(min_size=1, max_size=40) | st.sampled_from([
    ".", "..", "...", "../..", "../../../../etc/passwd", "..\\..", "/", "//", "/abs",
    "{file}", "{run_id}", "{0}", "{__class__}", "~", "$HOME", "%2e%2e%2f", "\x00", "\n",
    ".. ", " ..", "\u2024\u2024", "\uff0e\uff0e", "\u2215..", "a\u0085b", "x" * 300,
])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> LocalStore:
    root = tmp_path_factory.mktemp("store") / "deep" / "root"
    root.mkdir(parents=True)
    return LocalStore("local.artifact_store", LocalStoreSettings(path=root))


def _under(root: Path, path: Path) -> None:
    assert path == root or root in path.parents, (root, path)
    assert Path(os.path.commonpath([root, path])) == root


# What a manifest lets through as `version` (the catalog's own versions are integers):
# versioned_key() uses it unsanitised, so the manifest's rule is what keeps it safe.
MANIFEST_VERSION = HOSTILE.filter(
    lambda v: len(v) <= 128 and bool(v.strip()) and v not in (".", "..")
    and not re.search(r"[\x00-\x1f\x7f/\\]", v))


@settings(max_examples=500, deadline=None)
@given(template=st.sampled_from(TEMPLATES), values=st.fixed_dictionaries({
    k: HOSTILE for k in ("run_id", "step_name", "artifact_name", "pipeline", "name", "version",
                         "date")}), file_name=HOSTILE, version=MANIFEST_VERSION)
def test_local_store_paths_stay_under_a_real_root(
    store: LocalStore, template: str, values: dict[str, str], file_name: str, version: str
) -> None:
    try:
        target = render_path(template, {**values, "file": FILE_SLOT})
    except ValueError:
        assert ".." in template.split("/")  # only a template that climbs out is refused
        return
    for key in (object_key(target, file_name), versioned_key(object_key(target, file_name),
                                                               version)):
        path = store._path_for(key)  # raises PermanentError if it would leave the root
        _under(store.root, path)
        assert path != store.root


# Mostly names a manifest accepts, made of the characters that matter to paths.
_PATHISH = st.text(
    alphabet=st.sampled_from(list(".~{}%$ -_aZ09\u00e9\u2024\uff0e\u2215\u202e\x85\x9b"))
    | st.characters(blacklist_categories=("Cc", "Cs")),
    min_size=1, max_size=30,
)
_NAMES = _PATHISH | st.text(min_size=1, max_size=30) | st.sampled_from(
    ["...", "....", ".a", "a.", "{file}", "{name}", "~", "-rf", "%2e", "\u2024\u2024",
     "\uff0e\uff0e", "\u2215etc", "a\u0085b", "CON", ".git", " ", "x" * 256])

PLAN_ROUTING = {
    "Model": {"store": ["local", "versions"], "on_conflict": "version",
              "path": "{pipeline}/{run_id}/{step_name}/{artifact_name}/{name}/{version}/{date}/"
                      "{file}"},
    "Dataset": {"store": "local", "path": "{name}.{version}/{run_id}{step_name}/{pipeline}-{file}"},
    "Report": {"store": "local", "path": "{pipeline}.{run_id}"},
    "default": {"store": "local", "path": "{pipeline}/{name}"},
}


@pytest.fixture(scope="module")
def plan_stack(tmp_path_factory: pytest.TempPathFactory, store: LocalStore) -> Any:
    """A stack loaded (so validated) from a config, using every placeholder."""
    path = tmp_path_factory.mktemp("plan") / "router.yaml"
    path.write_text(json.dumps({"active_stack": "s", "stacks": {"s": {
        "artifact_store": {"type": "local", "path": str(store.root)},
        "artifact_stores": {"versions": {"type": "local", "path": str(store.root)}},
        "experiment_tracker": {"type": "jsonl", "path": str(store.root / "tracking")},
        "artifact_routing": PLAN_ROUTING}}}))
    return load_config(path, env={}).config.stacks["s"]


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipeline=_NAMES, run_id=_NAMES, step=_NAMES, name=_NAMES, version=_NAMES,
       file_names=st.lists(_NAMES, min_size=1, max_size=3, unique=True))
def test_manifest_to_plan_to_key_never_leaves_the_root(
    store: LocalStore, plan_stack: Any, pipeline: str, run_id: str, step: str, name: str,
    version: str, file_names: list[str]
) -> None:
    files = [{"path": f"f{i}.bin", "name": n, "type": "bin"} for i, n in enumerate(file_names)]
    doc = {"manifest_version": 1, "pipeline": pipeline, "run_id": run_id, "step_name": step,
           "artifacts": [{"type": kind, "name": name, "version": version, "upload": True,
                          "files": files} for kind in ("model", "dataset", "report", "artifact")]}
    manifest = check_parse(doc)
    if manifest is None:
        return
    versions = [a.version or "1" for a in manifest.artifacts]
    plan = plan_event(manifest, event_id="ev", stack=plan_stack, versions=versions,
                      received_at=datetime(2024, 1, 2, tzinfo=UTC))
    stores = [d for d in plan.deliveries if d.target is not None]
    assert len(stores) == 5 and not [e for a in plan.artifacts for e in a.errors]
    for delivery in stores:
        assert delivery.target is not None
        for entry in manifest.artifacts[delivery.artifact_index].files:
            assert entry.name is not None
            key = object_key(delivery.target, entry.name)
            if delivery.params.get("on_conflict") == "version":
                key = versioned_key(key, versions[delivery.artifact_index])
            _under(store.root, store._path_for(key))
