"""One router-only run of a scenario's load, with the daemon's CPU: for before/after
comparisons of a change, alternating with a worktree of the commit before.

    PYTHONPATH=<tree> python bench/probe.py small-to-local [N]    # 4 KiB bundles
    PYTHONPATH=<tree> python bench/probe.py small-to-s3 [N]       # 16 KiB, rclone serve s3
    PYTHONPATH=<tree> python bench/probe.py mqtt-intake [N]       # inline metrics, mosquitto
    PYTHONPATH=<tree> python bench/probe.py large-to-s3 [MiB]     # one file, and s5cmd's time
    PYTHONPATH=<tree> python bench/probe.py behind-large [MiB]    # 50 small bundles after a large
    PYTHONPATH=<tree> python bench/probe.py mqtt-behind-large [MiB]  # the same over MQTT

PROBE_PROFILE=FILE records the daemon with py-spy (`--gil`, collapsed stacks) while the
load runs: `py-spy record -f raw`, for flame graphs or summing per function.
PROBE_SETTINGS='{"concurrency": 1024}' adds `router:` settings (mqtt-intake, small-to-local,
small-to-s3).
PROBE_CALLGRIND=1 runs the daemon under valgrind's callgrind (mqtt-intake) and reports
the instructions it ran per message from the first publish to the last done, start-up
and stop left out: the same from run to run of one build within about 1 %, where its
CPU seconds vary by 15 % or more on this machine (2,000 messages take about a minute);
PROBE_CALLGRIND_OUT=FILE keeps callgrind's profile for callgrind_annotate.
PROBE_OVERWRITE=1 routes small-to-s3 with `on_conflict: overwrite` (no presence check).
PROBE_UNSYNCED=1 leaves behind-large's big file unwritten-back, as a step that just
wrote it would: the local store's flushes then compete with its write-back.
The S3 server's CPU is reported too: on 2 cores it competes with the daemon.
The run writes under $TMPDIR: on ext4 without a journal (this machine's /tmp) put it on a
journaled filesystem for figures that hold elsewhere (bench/filesystem.py says why).

The daemon, and the bench helpers, come from the tree `PYTHONPATH` names: this checkout,
or a worktree of an older commit (`git worktree add /tmp/base <commit>`) that has no
probe of its own. Nothing is compared with a peer here: that is `python -m bench`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import DaemonUnderTest
from bench.scenarios import LOCAL_STACK, _bin, _route, _s3_server, _s3_stack, _stage_bundles


def _cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@contextlib.contextmanager
def _profiled(pid: int) -> Iterator[None]:
    """py-spy on the daemon while the block runs, when PROBE_PROFILE names an output."""
    out = os.environ.get("PROBE_PROFILE")
    if not out:
        yield
        return
    spy = subprocess.Popen([_bin("py-spy"), "record", "--gil", "-r", "200",
                            "-f", "raw", "-o", out, "--pid", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the load starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def probe(scenario: str, n: int) -> str:
    if scenario not in ("small-to-local", "small-to-s3", "mqtt-intake", "large-to-s3",
                        "behind-large", "mqtt-behind-large"):
        raise SystemExit(f"unknown scenario {scenario!r}: small-to-local, small-to-s3, "
                         "mqtt-intake, large-to-s3, behind-large or mqtt-behind-large")
    work = Path(tempfile.mkdtemp(prefix="probe-"))
    server = None
    try:
        if scenario == "mqtt-intake":
            return _probe_mqtt(work, n)
        if scenario == "behind-large":
            return _probe_behind_large(work, n)
        if scenario == "mqtt-behind-large":
            return _probe_mqtt_behind_large(work, n)
        if scenario == "large-to-s3":
            server = _s3_server(work)
            return _probe_large(work, server, n)
        if scenario == "small-to-local":
            bundles = _stage_bundles(work / "staging", n, 4096)
            stack = LOCAL_STACK(work / "store")
        else:
            server = _s3_server(work)
            bundles = _stage_bundles(work / "staging", n, 16 * 1024)
            rule = {"on_conflict": "overwrite"} if os.environ.get("PROBE_OVERWRITE") else {}
            stack = _s3_stack(server, "probe", **rule)
        daemon = DaemonUnderTest(work / "router", stack,
                                 json.loads(os.environ.get("PROBE_SETTINGS") or "{}"))
        daemon.start()
        assert daemon.proc is not None
        user0, sys0 = _cpu(daemon.proc.pid)
        s0 = sum(_cpu(server.proc.pid)) if server is not None else 0.0
        with _profiled(daemon.proc.pid):
            seconds = _route(daemon, bundles)
        user1, sys1 = _cpu(daemon.proc.pid)
        s1 = sum(_cpu(server.proc.pid)) if server is not None else 0.0
        server_cpu = f"; server CPU {s1 - s0:.2f} s" if server is not None else ""
        daemon.stop()
        user, system = user1 - user0, sys1 - sys0
        return (f"{scenario}: {n / seconds:.0f} bundles/s; daemon CPU user {user:.2f} s, "
                f"sys {system:.2f} s, {(user + system) / n * 1000:.2f} ms per bundle{server_cpu}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _probe_behind_large(work: Path, mib: int) -> str:
    """A `mib` MiB bundle renamed into the spool, then 50 small bundles of another run
    50 ms later: how long the small ones take, rename to done, next to the large one."""
    big = work / "staging" / "big"
    _write_random(big / "model.bin", mib)
    (big / "manifest.json").write_text(json.dumps({
        "manifest_version": 1, "pipeline": "bench", "run_id": "train", "step_name": "train",
        "artifacts": [{"type": "model", "name": "big", "files": [{"path": "model.bin"}]}]}))
    small = _stage_bundles(work / "small", 50, 4096)
    if not os.environ.get("PROBE_UNSYNCED"):
        os.sync()  # written back first, unless the test is of flushing behind it
    daemon = DaemonUnderTest(work / "router", LOCAL_STACK(work / "store"))
    daemon.start()
    incoming = daemon.spool / "incoming"
    t0 = time.time()
    os.rename(big, incoming / "big")
    time.sleep(0.05)
    t1 = time.time()
    for bundle in small:
        os.rename(bundle, incoming / bundle.name)
    daemon.wait_done(51)
    finished = daemon.finished_at()
    daemon.stop()
    waits = sorted(at - t1 for name, at in finished.items() if name != "big")
    return (f"behind-large {mib} MiB: the large bundle done {finished['big'] - t0:.2f} s after "
            f"its rename; 50 small bundles of another run renamed 50 ms after it: median "
            f"{waits[len(waits) // 2] * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms")


def _write_random(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1024 * 1024))


def _probe_mqtt_behind_large(work: Path, mib: int) -> str:
    """A `mib` MiB checkpoint published by file:// URI, then 50 metrics messages of other
    runs 50 ms later: how long those take, publish to done, next to the checkpoint."""
    from bench.scenarios_mqtt import MqttDaemon, _broker, _payloads, _publish_burst

    model = work / "files" / "model.bin"
    _write_random(model, mib)
    os.sync()
    checkpoint = json.dumps({
        "manifest_version": 1, "id": "big", "pipeline": "bench", "run_id": "train",
        "step_name": "train", "artifacts": [
            {"type": "model", "name": "big", "files": [{"uri": model.as_uri()}]}]}).encode()
    broker = _broker(work / "broker")
    try:
        daemon = MqttDaemon(work / "router", broker, mqtt={"allowed_roots": [str(model.parent)]})
        daemon.start()
        t0, _ = _publish_burst(broker.port, [("big", "artifacts/bench/train/train", checkpoint)])
        time.sleep(0.05)
        t1, _ = _publish_burst(broker.port, _payloads(50, "small"))
        daemon.wait_done(51)
        finished = daemon.finished_at()
        daemon.stop()
    finally:
        broker.stop()
    waits = sorted(at - t1 for name, at in finished.items() if name != "big")
    return (f"mqtt-behind-large {mib} MiB: the checkpoint done {finished['big'] - t0:.2f} s "
            f"after its publish; 50 metrics messages of other runs published 50 ms after it: "
            f"median {waits[len(waits) // 2] * 1000:.0f} ms, max {waits[-1] * 1000:.0f} ms")


def _probe_large(work: Path, server: Any, mib: int) -> str:
    """One `mib` MiB file through the daemon, then through s5cmd against the same server.

    The daemon's time is split at the journal commit (the delivery row's created_at):
    before it, intake (manifest, sha256 of the file); after it, the upload. Each side's
    CPU and the server's are given: on 2 cores the three compete.
    """
    from bench.scenarios import _peer_s3

    src = work / "large"
    _write_random(src / "model.bin", mib)
    staging = work / "staging" / "big"
    staging.mkdir(parents=True)
    os.link(src / "model.bin", staging / "model.bin")
    (staging / "manifest.json").write_text(json.dumps({
        "manifest_version": 1, "pipeline": "bench", "run_id": "probe", "step_name": "train",
        "artifacts": [{"type": "model", "name": "big", "upload": True,
                       "files": [{"path": "model.bin"}]}]}))
    daemon = DaemonUnderTest(work / "router", _s3_stack(server, "probe"))
    daemon.start()
    assert daemon.proc is not None
    user0, sys0 = _cpu(daemon.proc.pid)
    s0 = sum(_cpu(server.proc.pid))
    t0 = time.time()
    seconds = _route(daemon, [staging])
    user1, sys1 = _cpu(daemon.proc.pid)
    s1 = sum(_cpu(server.proc.pid))
    journaled = float(daemon._query("select min(created_at) from deliveries")[0][0])
    daemon.stop()
    s2 = sum(_cpu(server.proc.pid))
    c2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peer_seconds, _ = _peer_s3("s5cmd", server, src, "probe-s5cmd")
    c3 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s3 = sum(_cpu(server.proc.pid))
    return (f"large-to-s3 {mib} MiB: router {seconds:.2f} s ({mib / seconds:.0f} MiB/s: intake "
            f"{journaled - t0:.2f} s, upload {seconds - journaled + t0:.2f} s), CPU user "
            f"{user1 - user0:.2f} s sys {sys1 - sys0:.2f} s, server CPU {s1 - s0:.2f} s; "
            f"s5cmd {peer_seconds:.2f} s ({mib / peer_seconds:.0f} MiB/s), CPU user "
            f"{c3.ru_utime - c2.ru_utime:.2f} s sys {c3.ru_stime - c2.ru_stime:.2f} s, server "
            f"CPU {s3 - s2:.2f} s")


def _probe_mqtt(work: Path, n: int) -> str:
    """A burst of `n` messages at QoS 1, first publish to last catalogued."""
    from bench.scenarios_mqtt import MqttDaemon, _broker, _payloads, _publish_burst, _wait_done

    messages = _payloads(n, "probe")
    broker = _broker(work / "broker")
    try:
        daemon = MqttDaemon(work / "router", broker,
                            **json.loads(os.environ.get("PROBE_SETTINGS") or "{}"))
        counting = bool(os.environ.get("PROBE_CALLGRIND"))
        if counting:
            out = os.environ.get("PROBE_CALLGRIND_OUT", "/dev/null")  # for callgrind_annotate
            daemon.command_prefix = [_valgrind(), "--tool=callgrind", "--instr-atstart=no",
                                     f"--callgrind-out-file={out}"]
            daemon.start_timeout = 900.0
        daemon.start()
        assert daemon.proc is not None
        user0, sys0 = _cpu(daemon.proc.pid)
        with _profiled(daemon.proc.pid), _counted(daemon.proc.pid, counting):
            t0, _ = _publish_burst(broker.port, messages)
            _wait_done([daemon], n, timeout=3600)
        seconds = daemon.last_finished() - t0
        user1, sys1 = _cpu(daemon.proc.pid)
        daemon.stop()
    finally:
        broker.stop()
    if counting:
        found = re.search(r"Collected : (\d+)", daemon.log.read_text())
        assert found, daemon.log.read_text()[-2000:]
        return (f"mqtt-intake: {int(found.group(1)) / n:,.0f} instructions per message "
                f"(callgrind, {n} messages)")
    user, system = user1 - user0, sys1 - sys0
    return (f"mqtt-intake: {n / seconds:.0f} msg/s; daemon CPU user {user:.2f} s, "
            f"sys {system:.2f} s, {(user + system) / n * 1000:.3f} ms per message")


def _valgrind() -> str:
    found = shutil.which("valgrind")
    if found is None:
        raise SystemExit("PROBE_CALLGRIND needs valgrind on PATH")
    return found


@contextlib.contextmanager
def _counted(pid: int, counting: bool) -> Iterator[None]:
    """Callgrind's instrumentation on while the block runs (the daemon started with it
    off): start-up, imports and the stop are not counted."""
    if not counting:
        yield
        return
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=False,
                       stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        raise SystemExit(__doc__)
    print(probe(args[0], int(args[1]) if len(args) > 1 else 5000))
