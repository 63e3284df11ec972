"""Security checks: path traversal, file:// outside allowed roots, secrets, loopback binding.

* Every user-controlled field (pipeline, run id, step name, artifact names, versions, file
  names and paths, ids), rendered through templates using every placeholder, is routed by
  a real daemon to local stores: nothing is written outside a store root, and each event
  is either delivered under the root or rejected with a reason.
* `file://` URIs outside `router.mqtt.allowed_roots` are refused (the MQTT source's check,
  called directly).
* Secrets set through `${VAR}` in the config never appear in the daemon's log, `stack
  show`, `/metrics`, `status`, the catalog listings or any error.json.
* `/healthz` and `/metrics` bind to loopback for a bare `:port`, and to what is configured
  otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from router.config import MqttSettings
from router.delivery import (
    Action,
    ArtifactView,
    DeliveryContext,
    DeliveryItem,
    PermanentError,
    StagedFile,
)
from router.manifest import ManifestError, parse_manifest
from router.metrics import RouterMetrics
from router.rules import FILE_SLOT, object_key, render_path
from router.sources.mqtt import MqttSource
from sinks.stores.local import LocalStore, LocalStoreSettings
from sinks.trackers.jsonl import JsonlTracker, JsonlTrackerSettings
from tests.conftest import Workspace, free_port, write_bundle

Start = Callable[..., Any]


# --- helpers ----------------------------------------------------------------------------------


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:
                continue
            hexip, hexport = local.split(":")
            raw = bytes.fromhex(hexip)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                address = socket.inet_ntop(socket.AF_INET6, raw)
            else:
                address = socket.inet_ntop(socket.AF_INET, raw[::-1])
            found.append((address, int(hexport, 16)))
    return found


def non_loopback_ipv4() -> str | None:
    """An address of this host other than loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
            address: str = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def entries_under(root: Path) -> list[Path]:
    """Every file, directory and symlink below `root` (symlinks are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [Path(dirpath) / name for name in dirnames + filenames]
    return out


# --- path traversal through every user-controlled field ----------------------------------------

MARK = f"ESC{uuid.uuid4().hex[:8]}"
HOSTILE = [
    "..", ".", "...", "....", ". .", " ..", ".. ", f"{MARK}..", f"../{MARK}",
    f"../../../../../../../../../../tmp/{MARK}", f"..\\..\\{MARK}", f"/tmp/{MARK}",
    f"//{MARK}", f"a/../../{MARK}", "~", f"~/{MARK}", "$HOME", "${HOME}", f"%2e%2e%2f{MARK}",
    f"..%2f{MARK}", "\u2024\u2024", "\uff0e\uff0e", f"\u2215{MARK}", f"\uff0f{MARK}", "\x00",
    f"a\n{MARK}", "\x1b[31m", "\u202e", "{file}", "{run_id}", "{0}", "{__class__}", "%s", "-rf",
    "*", "?", "[a]", ".git", ".hidden", "CON", "nul", "x" * 300, "y" * 256, "\u00e9" * 100,
    f"sub/./{MARK}", "a b",
]
FIELDS = ["pipeline", "run_id", "step_name", "name", "version", "file_name", "file_path", "id"]

ROUTING = {
    "Model": {"store": ["local", "versions"], "on_conflict": "version",
              "path": "{pipeline}/{run_id}/{step_name}/{artifact_name}/{name}/{version}/{date}/"
                      "{file}"},
    "Dataset": {"store": "local", "path": "{name}.{version}/{run_id}{step_name}/{pipeline}-{file}"},
    "Report": {"store": "local", "path": "{pipeline}.{run_id}"},
    "Metrics": {"log_to_tracker": True},
    "Parameters": {"log_to_tracker": True},
    "default": {"store": "local", "path": "{pipeline}/{run_id}-{name}"},
}


def hostile_bundle(index: int, field: str, value: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    def artifact(kind: str, name: str, file: str) -> dict[str, Any]:
        return {"type": kind, "name": name, "version": "1", "upload": True,
                "files": [{"path": file}]}

    doc: dict[str, Any] = {
        "manifest_version": 1, "pipeline": f"p{index}", "run_id": f"r{index}",
        "step_name": "train",
        "artifacts": [
            artifact("model", "clf", "model.pkl"),
            artifact("dataset", "ds", "data.csv"),
            artifact("report", "rep", "r.pdf"),
            artifact("artifact", "gen", "g.bin"),
            {"type": "metrics", "name": "m", "values": {"acc": 0.5}},
        ],
    }
    files = {"model.pkl": f"m{index}".encode(), "data.csv": b"a,b\n", "r.pdf": b"%PDF",
             "g.bin": b"g"}
    if field in ("pipeline", "run_id", "step_name", "id"):
        doc[field] = value
    elif field in ("name", "version"):
        for a in doc["artifacts"]:
            a[field] = value
    elif field == "file_name":
        for a in doc["artifacts"][:4]:
            a["files"][0].update(name=value, type="bin")
    elif field == "file_path":
        doc["artifacts"][0]["files"][0] = {"path": value, "type": "bin"}
        if (
            "\x00" not in value and not value.startswith("/") and ".." not in value.split("/")
            and all(0 < len(seg.encode()) <= 200 for seg in value.split("/"))
            and os.path.normpath(value) != "."
        ):
            files[value] = b"hostile path"  # else the manifest names a file that is not there
    return doc, files


def expected_outcome(doc: dict[str, Any]) -> str:
    try:
        parse_manifest(doc)
    except ManifestError:
        return "rejected"
    return "done"


def test_hostile_values_in_every_field_never_write_outside_a_store_root(
    tmp_path: Path, start_daemon: Start
) -> None:
    ws = Workspace(tmp_path)
    deep = tmp_path / "a" / "b" / "c"
    store, versions, tracking = deep / "store", deep / "versions", deep / "tracking"
    ws.stack = {
        "artifact_store": {"type": "local", "path": str(store)},
        "artifact_stores": {"versions": {"type": "local", "path": str(versions)}},
        "experiment_tracker": {"type": "jsonl", "path": str(tracking)},
        "artifact_routing": ROUTING,
    }
    ws.write()
    daemon = start_daemon(ws)

    expected: dict[str, str] = {}
    index = 0
    for field in FIELDS:
        for value in HOSTILE:
            doc, files = hostile_bundle(index, field, value)
            name = f"b{index:04d}-{field}"
            write_bundle(ws.spool, name, doc, files)
            outcome = expected_outcome(doc)
            if field == "file_path" and outcome == "done" and value not in files:
                outcome = "rejected"
            expected[name] = outcome
            index += 1

    done = sum(1 for o in expected.values() if o == "done")
    status = ws.wait_settled(len(expected), timeout=150)
    assert daemon.proc.poll() is None
    assert status["events"] == {"done": done, "rejected": len(expected) - done}, status
    assert status["deliveries"]["dead"] == 0
    assert done >= 150  # most hostile values are legal names: they must still be routed

    for name, outcome in expected.items():
        state_dir = ws.spool / ("done" if outcome == "done" else "rejected") / name
        assert state_dir.is_dir(), (name, outcome)
        if outcome == "rejected":
            error = json.loads((state_dir / "error.json").read_text())
            assert error["errors"] and all(e["field"] and e["message"] for e in error["errors"])

    # nothing outside the roots the config names (plus the spool, state, config and logs)
    allowed = [store, versions, tracking, ws.spool, tmp_path / "state"]
    for path in entries_under(tmp_path):
        if path.parent == tmp_path and (path.name == "router.yaml" or path.name.endswith(".log")):
            continue
        if path.is_dir() and not path.is_symlink() and any(
                r.is_relative_to(path) for r in allowed):
            continue  # a directory above a root
        assert any(path.is_relative_to(r) for r in allowed), f"stray: {path}"
    for root in (store, versions, tracking):
        for path in entries_under(root):
            assert not path.is_symlink(), path
            real = Path(os.path.realpath(path))
            assert real.is_relative_to(root.resolve()), (path, real)
    # an escaped write would carry the marker: look around the tmp root and in the usual
    # targets of `..` and absolute paths
    for around in (tmp_path.parent, tmp_path.parent.parent, Path("/tmp"), Path("/"),
                   Path.home()):
        assert not [p for p in around.iterdir() if MARK in p.name], around
    for path in entries_under(tmp_path.parent):
        if MARK in path.name and not any(path.is_relative_to(r) for r in allowed):
            raise AssertionError(f"escaped write: {path}")

    # every catalogued location is inside a store root
    rows = json.loads(ws.cli("artifacts", "--json").stdout)
    assert rows
    for row in rows:
        for loc in row.get("locations") or []:
            uri = loc.get("uri") or ""
            if uri.startswith("file://"):
                where = Path(uri.removeprefix("file://"))
                assert any(where.is_relative_to(r) for r in (store, versions, tracking)), uri
    assert listening_sockets(daemon.proc.pid) == []  # no router.listen: no HTTP at all
    assert daemon.terminate() == 0


def _item(target: str, files: list[StagedFile], run_id: str = "r") -> DeliveryItem:
    return DeliveryItem(
        key="ev/0/store/local", action=Action.STORE, sink_id="local.artifact_store",
        context=DeliveryContext(event_id="ev", pipeline="p", run_id=run_id, step_name="s",
                                received_at=datetime.now(UTC)),
        artifact=ArtifactView(index=0, kind="model", name="m", version="1", files=files),
        target=target,
    )


def _staged(directory: Path, name: str, data: bytes) -> StagedFile:
    path = directory / hashlib.sha256(name.encode()).hexdigest()
    path.write_bytes(data)
    return StagedFile(name=name, type="bin", path=path, sha256=hashlib.sha256(data).hexdigest(),
                      size=len(data))


def test_a_symlink_planted_in_the_store_root_is_not_followed_out(tmp_path: Path) -> None:
    root, outside, src = tmp_path / "store", tmp_path / "outside", tmp_path / "src"
    for d in (root, outside, src):
        d.mkdir()
    (root / "p").symlink_to(outside)  # e.g. left by an operator, or another tool
    store = LocalStore("local.artifact_store", LocalStoreSettings(path=root))
    item = _item("p/r/m", [_staged(src, "model.pkl", b"data")])
    with pytest.raises(PermanentError, match="outside the store root"):
        asyncio.run(store.deliver(item))
    assert list(outside.iterdir()) == []


def test_a_stored_file_named_like_a_temp_file_is_never_deleted(tmp_path: Path) -> None:
    root, src = tmp_path / "store", tmp_path / "src"
    src.mkdir()
    store = LocalStore("local.artifact_store", LocalStoreSettings(path=root))
    parse_manifest({"manifest_version": 1, "pipeline": "p", "run_id": "r", "step_name": "s",
                    "artifacts": [{"type": "model", "name": "m", "files": [
                        {"path": "a.pkl", "name": ".tmp-x-model.pkl"},
                        {"path": "model.pkl"}]}]})  # the manifest allows both names
    first = _staged(src, ".tmp-x-model.pkl", b"first artifact's file")
    asyncio.run(store.deliver(_item("p/r/m", [first])))
    second = _staged(src, "model.pkl", b"another artifact")
    asyncio.run(store.deliver(_item("p/r/m", [second], run_id="r2")))
    assert (root / "p" / "r" / "m" / ".tmp-x-model.pkl").read_bytes() == b"first artifact's file"


def test_long_non_ascii_names_fit_the_file_system(tmp_path: Path) -> None:
    value = "\u00e9" * 200
    parse_manifest({"manifest_version": 1, "pipeline": value, "run_id": value,
                    "step_name": "s", "artifacts": [{"type": "model", "name": value,
                                                     "files": [{"path": "m.pkl"}]}]})
    key = object_key(render_path("{run_id}/{name}", {"run_id": value, "name": value,
                                                      "file": FILE_SLOT}), value + ".pkl")
    assert all(len(seg.encode()) <= 255 for seg in key.split("/")), key
    tracker = JsonlTracker("local.t", JsonlTrackerSettings(path=tmp_path / "t"))
    assert len(tracker.file_for(value, value).name.encode()) <= 255
    src = tmp_path / "src"
    src.mkdir()
    store = LocalStore("local.artifact_store", LocalStoreSettings(path=tmp_path / "store"))
    asyncio.run(store.deliver(_item(key.rsplit("/", 1)[0], [_staged(src, value + ".pkl", b"x")])))


@pytest.mark.parametrize("value", ["run\x9b2J", "a\x85b", "\x90x"])
def test_c1_control_characters_are_refused_in_names(value: str) -> None:
    with pytest.raises(ManifestError, match="control characters"):
        parse_manifest({"manifest_version": 1, "pipeline": "p", "run_id": value,
                        "step_name": "s", "artifacts": [{"type": "metrics", "name": "m",
                                                         "values": {"a": 1}}]})


# --- file:// outside the allowed roots -----------------------------------------------------------


def _mqtt_source(tmp_path: Path, roots: list[Path]) -> MqttSource:
    return MqttSource(
        MqttSettings(allowed_roots=[str(r) for r in roots]),
        None,  # type: ignore[arg-type]  # the URI check needs no journal
        None,  # type: ignore[arg-type]
        preflight=lambda _event: None,
        metrics=RouterMetrics(),
        state_dir=tmp_path / "state",
    )


def test_file_uris_outside_the_allowed_roots_are_refused(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    sibling = tmp_path / "allowed-evil"
    for d in (allowed / "sub", outside, sibling):
        d.mkdir(parents=True)
    (allowed / "sub" / "ok.bin").write_bytes(b"ok")
    (outside / "secret.txt").write_text("secret")
    (sibling / "x.bin").write_bytes(b"x")
    (allowed / "escape").symlink_to(outside)
    (allowed / "escape.txt").symlink_to(outside / "secret.txt")
    (allowed / "inside.bin").symlink_to(allowed / "sub" / "ok.bin")
    # the allowed root reached through a symlink is still that root
    (tmp_path / "root-link").symlink_to(allowed)
    source = _mqtt_source(tmp_path, [tmp_path / "root-link"])

    def check(uri: str) -> str | None:
        resolved, problem = source._resolve_file_uri(uri, "artifacts[0].files[0].uri")
        if problem is None:
            assert resolved is not None and resolved.path.is_relative_to(allowed)
            return None
        assert problem.field == "artifacts[0].files[0].uri" and problem.value == uri
        return problem.message

    assert check((allowed / "sub" / "ok.bin").as_uri()) is None
    assert check(f"file://localhost{allowed}/sub/ok.bin") is None
    assert check((allowed / "inside.bin").as_uri()) is None
    refused = {
        "file:///etc/passwd": "outside",
        "file:///": "outside",
        f"file://{allowed}/../outside/secret.txt": "outside",
        f"file://{allowed}/sub/../../outside/secret.txt": "outside",
        f"file://{allowed}/%2e%2e/outside/secret.txt": "outside",
        f"file://{allowed}/%2E%2E%2Foutside%2Fsecret.txt": "outside",
        f"file://{allowed}/escape/secret.txt": "outside",
        f"file://{allowed}/escape.txt": "outside",
        (sibling / "x.bin").as_uri(): "outside",
        f"file://{allowed}-evil/x.bin": "outside",
        f"file://{tmp_path}/root-link/../outside/secret.txt": "outside",
        "file://attacker.example/etc/passwd": "names host",
        f"file://127.0.0.1{allowed}/sub/ok.bin": "names host",
        f"file://{allowed}/sub/ok.bin#frag": "query or fragment",
        f"file://{allowed}/sub/ok.bin%00.txt": "absolute path",
        f"file://{allowed}/sub": "not a regular file",
        f"file://{allowed}/sub/missing.bin": "no such file",
    }
    for uri, words in refused.items():
        message = check(uri)
        assert message is not None and words in message, (uri, message)

    nothing_allowed = _mqtt_source(tmp_path, [])
    _, problem = nothing_allowed._resolve_file_uri((allowed / "sub" / "ok.bin").as_uri(), "u")
    assert problem is not None and "no router.mqtt.allowed_roots" in problem.message


# --- secrets -----------------------------------------------------------------------------------


def test_secrets_never_appear_in_logs_stack_show_metrics_or_errors(
    tmp_path: Path, start_daemon: Start
) -> None:
    secrets = {name: f"{name.lower()}-{uuid.uuid4().hex}" for name in
               ("MLFLOW_TOKEN", "MLFLOW_PASSWORD", "AWS_SECRET", "AWS_TOKEN", "MQTT_PASSWORD",
                "URL_PASSWORD")}
    dead = free_port()  # nothing listens here: every remote sink fails and logs why
    port = free_port()
    fast = {"max_attempts": 2, "base_delay": 0.05, "max_delay": 0.1}
    ws = Workspace(tmp_path, listen=f":{port}",
                   mqtt={"host": "127.0.0.1", "port": free_port(), "username": "router",
                         "password": "${MQTT_PASSWORD}"})
    ws.env.update(secrets)
    ws.stack["model_registry"] = {"type": "mlflow", "tracking_uri": f"http://127.0.0.1:{dead}",
                                  "token": "${MLFLOW_TOKEN}", "retry": fast}
    ws.stack["experiment_tracker"] = [
        {"type": "jsonl", "path": str(ws.tracking)},
        {"type": "mlflow", "tracking_uri": f"http://router:${{URL_PASSWORD}}@127.0.0.1:{dead}",
         "retry": fast},
    ]
    ws.stack["artifact_routing"]["Model"]["register"] = True
    aws = {
        "artifact_store": {"type": "s3", "bucket_name": "ml-bucket", "region": "us-east-1",
                           "endpoint_url": f"http://127.0.0.1:{dead}",
                           "aws_access_key_id": "AKIAROUTERTEST",
                           "aws_secret_access_key": "${AWS_SECRET}",
                           "aws_session_token": "${AWS_TOKEN}", "max_attempts": 1,
                           "connect_timeout": 1, "retry": fast},
        "model_registry": {"type": "mlflow", "tracking_uri": "http://mlflow.internal:5000",
                           "username": "router", "password": "${MLFLOW_PASSWORD}"},
        "artifact_routing": {"default": {"store": "s3", "path": "{pipeline}/{name}"}},
    }
    ws.config_path.write_text(json.dumps(
        {"active_stack": "local", "stacks": {"local": ws.stack, "aws": aws},
         "router": ws.router}))
    daemon = start_daemon(ws)

    write_bundle(ws.spool, "model", {
        "manifest_version": 1, "pipeline": "sec", "run_id": "r1", "step_name": "train",
        "artifacts": [{"type": "model", "name": "clf", "upload": True,
                       "files": [{"path": "model.pkl"}]},
                      {"type": "metrics", "name": "eval", "values": {"acc": 0.9}}]},
        {"model.pkl": b"model"})
    write_bundle(ws.spool, "to-s3", {
        "manifest_version": 1, "pipeline": "sec", "run_id": "r2", "step_name": "train",
        "stack": "aws", "artifacts": [{"type": "dataset", "name": "ds", "upload": True,
                                       "files": [{"path": "d.csv"}]}]}, {"d.csv": b"a\n"})
    write_bundle(ws.spool, "bad-stack", {
        "manifest_version": 1, "pipeline": "sec", "run_id": "r3", "step_name": "train",
        "stack": "aws-prod", "artifacts": [{"type": "metrics", "name": "m",
                                            "values": {"a": 1}}]})
    write_bundle(ws.spool, "bad-json", {"manifest_version": 1, "pipeline": 5})
    status = ws.wait_settled(4, timeout=120)
    assert status["events"] == {"failed": 2, "rejected": 2}, status
    assert status["deliveries"]["dead"] == 3, status["dead_letters"]

    seen: dict[str, str] = {}
    seen["/metrics"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    try:
        seen["/healthz"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read() \
            .decode()
    except urllib.error.HTTPError as exc:  # degraded: the MQTT broker is unreachable
        seen["/healthz"] = exc.read().decode()
    assert "router_component_errors_total" in seen["/metrics"]
    assert "MqttSource" in seen["/healthz"]  # the source holding the MQTT password ran
    for args in (("stack", "show"), ("stack", "show", "--json"), ("stack", "show", "aws"),
                 ("stack", "show", "aws", "--json"), ("stack", "list"),
                 ("stack", "list", "--json"), ("status", "--json"), ("artifacts", "--json"),
                 ("artifacts", "--rejected", "--json"), ("runs", "--json"),
                 ("validate", "--json")):
        out = ws.cli(*args, check=False)
        seen[" ".join(args)] = out.stdout + out.stderr
    assert "***" in seen["stack show aws"] and "***" in seen["stack show --json"]
    assert "AKIAROUTERTEST" in seen["stack show aws"]  # an access key id is not a secret
    assert ws.cli("stack", "show", "aws", "--json").returncode == 0
    for error in (ws.spool / "rejected").glob("*/error.json"):
        seen[str(error)] = error.read_text()
    assert len([k for k in seen if k.endswith("error.json")]) == 2

    # loopback only for a bare ":port"
    sockets = listening_sockets(daemon.proc.pid)
    assert sockets == [("127.0.0.1", port)], sockets
    assert connects("127.0.0.1", port)
    other = non_loopback_ipv4()
    if other is not None:
        assert not connects(other, port), f"{other}:{port} answers"

    assert daemon.terminate() == 0
    seen["daemon log"] = daemon.log()
    assert "delivery will be retried" in seen["daemon log"] or "dead" in seen["daemon log"]
    for where, text in seen.items():
        for name, secret in secrets.items():
            assert secret not in text, f"{name} leaked into {where}"


def _outputs(ws: Workspace, *commands: tuple[str, ...]) -> dict[str, str]:
    """stdout and stderr of each CLI command (wide, so no secret is wrapped in two)."""
    ws.env["COLUMNS"] = "400"
    seen = {}
    for args in commands:
        out = ws.cli(*args, check=False)
        seen[" ".join(args)] = out.stdout + out.stderr
    return seen


@pytest.mark.parametrize("section", ["sink settings", "router section"])
def test_a_settings_error_names_the_field_and_the_fix_but_never_a_secret(
    tmp_path: Path, section: str
) -> None:
    """A model-level error's input is the whole section, secrets included: `validate`,
    `run` and `stack show` name the field and the fix and show no secret, not even a
    password inside a URL."""
    secret = f"pw-{uuid.uuid4().hex}"
    ws = Workspace(tmp_path)
    ws.env["PW"] = secret
    url = "http://router:${PW}@127.0.0.1:9"
    stacks: dict[str, Any] = {"local": ws.stack}
    expected: dict[str, str] = {}  # field -> words of its message
    if section == "sink settings":
        stacks |= {
            "aws": {"artifact_store": {"type": "s3", "bucket": "ml-archive",
                                       "aws_secret_access_key": "${PW}"}},
            "kms": {"artifact_store": {"type": "s3", "bucket": "ml-archive",
                                       "aws_access_key_id": "AKIAROUTERTEST",
                                       "aws_secret_access_key": "${PW}", "kms_key_id": "k1"}},
            "sm": {"model_registry": {"type": "sagemaker_model_registry", "region": "us-east-1",
                                      "endpoint_url": url, "aws_secret_access_key": "${PW}"}},
            "vx": {"model_registry": {"type": "vertex_model_registry", "project": "p",
                                      "service_file": "/sa.json", "access_token": "${PW}"}},
            "vxurl": {"model_registry": {"type": "vertex_model_registry", "project": "p",
                                         "api_endpoint": "ftp://router:${PW}@127.0.0.1:9"}},
            "ml": {"model_registry": {"type": "mlflow", "tracking_uri": url,
                                      "password": ["${PW}"]}},
        }
        expected = {
            "stacks.aws.artifact_store": "aws_access_key_id",
            "stacks.kms.artifact_store": "kms_key_id needs sse",
            "stacks.sm.model_registry.endpoint_url": "user name or password",
            "stacks.vx.model_registry": "service_file or access_token",
            "stacks.vxurl.model_registry.api_endpoint": "http(s) URL",
            "stacks.ml.model_registry.password": "valid string",
        }
    else:
        ws.router["mqtt"] = {"host": "127.0.0.1", "username": "router", "password": "${PW}",
                             "protocol": "3.1.1", "shared_group": "g", "takeover_after": 5}
        expected = {"router.mqtt": "takeover_after"}
    ws.config_path.write_text(json.dumps(
        {"active_stack": "local", "stacks": stacks, "router": ws.router}))

    seen = _outputs(ws, ("validate",), ("validate", "--json"), ("run",), ("stack", "show"),
                    ("stack", "show", "aws", "--json"))
    for where, text in seen.items():
        assert secret not in text, f"the secret leaked into {where}: {text}"
        assert "stacks." in text or "router.mqtt" in text, (where, text)
    errors = json.loads(seen["validate --json"])["errors"]
    assert {e["field"] for e in errors} == set(expected), errors
    for error in errors:
        assert expected[error["field"]] in error["message"], error
    assert "***" in seen["validate --json"]  # what is shown of a secret is masked


def test_the_log_redacts_any_url_password_even_one_not_in_the_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A library's message or a redirect can quote a URL the config never held."""
    import structlog

    from router.logs import configure_logging

    configure_logging(secrets=["configured-secret"], json=True)
    try:
        structlog.get_logger("router").warning(
            "delivery will be retried", error="at https://bob:Hunter2Secret@host:9/x: refused",
            extra=["postgresql://u:p%40ss@db/router", "configured-secret"])
    finally:
        structlog.reset_defaults()
    line = json.loads(capsys.readouterr().err)
    assert line["error"] == "at https://bob:***@host:9/x: refused"
    assert line["extra"] == ["postgresql://u:***@db/router", "***"]


def test_the_log_redacts_a_token_given_as_a_url_user_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`https://<token>@host` (git hosts, many HTTP APIs) has no password: the user name
    is the secret, and the log shows only the host."""
    import structlog

    from router.logs import configure_logging

    configure_logging(secrets=[], json=True)
    try:
        structlog.get_logger("router").warning(
            "delivery will be retried",
            error="GET https://ghp_1a2B3c4D5e6F7g8H@mlflow.example.com/api: 401",
            journal="postgresql+asyncpg://svc-token-9f8e@db:5432/router")
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    line = json.loads(err)
    assert line["error"] == "GET https://***@mlflow.example.com/api: 401"
    assert line["journal"] == "postgresql+asyncpg://***@db:5432/router"
    assert "ghp_1a2B3c4D5e6F7g8H" not in err and "svc-token-9f8e" not in err


def test_http_binds_where_configured(tmp_path: Path, start_daemon: Start) -> None:
    port = free_port()
    ws = Workspace(tmp_path, listen=f"0.0.0.0:{port}")
    daemon = start_daemon(ws)
    assert listening_sockets(daemon.proc.pid) == [("0.0.0.0", port)]
    assert connects("127.0.0.1", port)
    assert daemon.terminate() == 0


def test_the_http_file_endpoint_serves_absolute_paths_only_under_intake_roots(
    tmp_path: Path,
) -> None:
    """A catalogued absolute path (MQTT intake) is served only while it, symlinks
    resolved, is under the state directory's inline folders or an allowed root."""
    from router.catalog import ArtifactRow
    from router.http_api import LocalCopies, _local_file

    state, allowed, outside = tmp_path / "state", tmp_path / "allowed", tmp_path / "outside"
    for folder in (state / "mqtt" / "e1" / "0", allowed, outside):
        folder.mkdir(parents=True)
    (state / "mqtt" / "e1" / "0" / "a.csv").write_bytes(b"inline")
    (allowed / "b.bin").write_bytes(b"referenced")
    (outside / "secret").write_bytes(b"not an artifact")
    (allowed / "link").symlink_to(outside / "secret")
    copies = LocalCopies(state_dir=state, allowed_roots=(allowed,))

    def served(path: Path) -> Path | None:
        row = ArtifactRow(id=1, event_id="e1", pipeline="p", run_id="r", step_name="s",
                          name="n", kind="dataset", version="1", upload=False, created_at=0,
                          files=[{"name": "f", "path": str(path)}])
        return _local_file(row, "f", {}, copies)

    assert served(state / "mqtt" / "e1" / "0" / "a.csv") == (state / "mqtt" / "e1" / "0" / "a.csv")
    assert served(allowed / "b.bin") == allowed / "b.bin"
    assert served(outside / "secret") is None
    assert served(allowed / "link") is None  # resolves outside every root
    assert served(Path("/etc/passwd")) is None
    # delivered inline files are found where they were retired to
    retired = state / "mqtt-done" / "e1" / "0"
    retired.mkdir(parents=True)
    os.replace(state / "mqtt" / "e1" / "0" / "a.csv", retired / "a.csv")
    assert served(state / "mqtt" / "e1" / "0" / "a.csv") == retired / "a.csv"
