"""`python -m bench [--quick] [--json FILE] [SCENARIO...]`: the router against its peers.

Each scenario starts the servers it needs (as the tests do), runs the router and its
peer tool side by side in the same run, alternating, at least three repetitions, and
reports medians, the ratio and peak RSS.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.filesystem import workdir_filesystem
from bench.harness import write_json
from bench.scenarios import PEER_TOOLS, SCENARIOS
from tests.servers_common import locate_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs (< 5 minutes)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("scenarios", nargs="*", choices=[[], *SCENARIOS], metavar="SCENARIO",
                        help=f"default: all of {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    if args.json:
        # Found out now, not after minutes of benchmarking (bench/out/ is not committed).
        # Nothing is written yet: a run that fails leaves no empty file behind.
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(args.json if args.json.exists() else args.json.parent, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            parser.error(f"--json {args.json}: cannot write there ({exc.strerror}); "
                         "give a path in a writable directory")
    names = args.scenarios or list(SCENARIOS)
    missing = sorted({t for n in names for t in PEER_TOOLS.get(n, ()) if locate_script(t) is None})
    if missing:  # found out now, not after the scenarios before the one that needs them
        parser.error(f"peer tools not installed: {', '.join(missing)}; "
                     "run pip install -e '.[bench]'")
    reps = max(3, args.reps)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file: 80 columns would cut every cell short
    results = []
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="router-bench-", dir=args.workdir) as tmp:
        filesystem = workdir_filesystem(Path(tmp))
        if filesystem is not None and filesystem.warning:
            console.print(f"[yellow]{filesystem.warning}[/yellow]")
        for name in names:
            # The scenario before may leave hundreds of MiB to write back (large-to-s3's
            # objects); flushed during the next one, it stalled mqtt-intake's fsyncs for
            # 0.5 s and that was its p99 (bench/RESULTS.md, session 27).
            os.sync()
            console.print(f"[bold]{name}[/bold] ...")
            results += SCENARIOS[name](Path(tmp) / name, args.quick, reps)
    table = Table("scenario", "unit", "router", "peer", "peer value", "ratio",
                  "router RSS MiB", "peer RSS MiB", "target", "met")
    for r in results:
        table.add_row(r.scenario, r.unit, f"{r.router:.1f}", r.peer, f"{r.peer_value:.1f}",
                      f"{r.ratio:.2f}x", f"{r.router_peak_rss_mib:.0f}",
                      f"{r.peer_peak_rss_mib:.0f}", r.target, "yes" if r.met else "NO")
    console.print(table)
    if filesystem is not None and filesystem.warning:  # again, next to the figures it qualifies
        console.print(f"[yellow]{filesystem.warning}[/yellow]")
    for r in results:
        if r.details:
            shown = {k: (round(v, 2) if isinstance(v, float) else v)
                     for k, v in r.details.items() if not k.endswith("_runs")}
            console.print(f"{r.scenario}: {shown}")
    meta = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
            "workdir_filesystem": filesystem.describe() if filesystem is not None else None,
            "python": sys.version.split()[0], "quick": args.quick, "reps": reps,
            "seconds": round(time.time() - started, 1), "argv": sys.argv[1:]}
    if args.json:
        write_json(args.json, results, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
