"""Fuzz target for the manifest parser (`router.manifest.parse_manifest`).

Run by hand, from the repository root:

    .venv/bin/pip install atheris          # a prebuilt wheel exists for CPython 3.11 on x86-64
    .venv/bin/python fuzz/manifest_fuzz.py -runs=100000
    .venv/bin/python fuzz/manifest_fuzz.py -max_total_time=600 -jobs=2

With atheris (coverage-guided libFuzzer), the router's modules are instrumented and the
run starts from a seed directory built from `tests/corpus/` (every bundle manifest and
MQTT payload) plus a valid manifest; pass directories of your own as arguments to use
them instead (libFuzzer writes new inputs into the first one, so never point it at
`tests/corpus/` itself).  Without atheris the file still imports and runs: a plain
random-mutation loop over the same seeds (`-runs=N`, `-seed=S`), which is what the test
suite exercises.

The contract checked for every input: `parse_manifest` returns a Manifest or raises
`ManifestError` whose problems each name a field and a message and serialise as
error.json does; any other exception, or a broken problem, is a crash.  Paths of a
parsed manifest never climb out of the bundle.  A crash input is saved by libFuzzer as
`crash-<sha1>` (or by the plain loop as `fuzz-crash-<n>.bin`) in the current directory;
reproduce it with `python fuzz/manifest_fuzz.py crash-<sha1>`.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # the plain loop below still runs
    atheris = None

if atheris is not None and __name__ == "__main__":  # instrument only a fuzzing run
    with atheris.instrument_imports(include=["router", "pydantic"]):
        from router.intake import Rejection
        from router.manifest import ManifestError, parse_manifest
else:
    from router.intake import Rejection
    from router.manifest import ManifestError, parse_manifest

CORPUS = ROOT / "tests" / "corpus"

VALID = {
    "manifest_version": 1,
    "pipeline": "fraud",
    "run_id": "run-42",
    "step_name": "train",
    "inputs": ["fraud/run-42/prep/train_data"],
    "artifacts": [
        {"type": "model", "name": "det", "version": "1.0.0", "upload": True,
         "files": [{"path": "model.pkl"}], "metadata": {"metrics": {"accuracy": 0.97}}},
        {"type": "metrics", "name": "evaluation", "values": {"accuracy": 0.97}, "step": 100},
        {"type": "parameters", "name": "hparams", "values": {"lr": 0.001}},
        {"type": "DATA", "name": "train", "files": [{"path": "train.parquet"}]},
        {"type": "report", "name": "r", "files": [{"path": "rel", "name": "r1", "type": "pdf"},
                                                  {"uri": "s3://b/k.pdf"},
                                                  {"content_base64": "aGk=", "name": "i.txt"}]},
    ],
}

# Tokens worth splicing in: they sit on the parser's decision boundaries.
INTERESTING = [
    b"..", b"/", b"\\", b"\x00", b"\n", b'"', b"{}", b"[]", b"null", b"true", b"-1", b"1e999",
    b"NaN", b"\xff", b"\xef\xbb\xbf", b"\\ud800", b'"model"', b'"DATA"', b'"../x"',
    b'"/etc/passwd"', b'"file:///etc/passwd"', b'"http://x"', b'"aGk"', b"0", b"2", b'"1"',
    b'"manifest_version"', b'"artifacts"', b'"files"', b'"path"', b'"type"', b'"name"',
]


def seed_inputs() -> list[bytes]:
    """Every corpus manifest and payload that is a regular file, plus a valid manifest."""
    seeds = [json.dumps(VALID).encode()]
    for path in sorted(CORPUS.glob("bundles/*/manifest.json")):
        if path.is_file() and not path.is_symlink():
            seeds.append(path.read_bytes())
    for path in sorted(CORPUS.glob("mqtt/*.payload")):
        seeds.append(path.read_bytes())
    return seeds


def test_one_input(data: bytes) -> None:
    """Raise on anything but a Manifest or a well-formed ManifestError."""
    try:
        manifest = parse_manifest(data)
    except ManifestError as exc:
        if not exc.problems:
            raise AssertionError("ManifestError without problems") from None
        for problem in exc.problems:
            if not (problem.field.strip() and problem.message.strip()):
                raise AssertionError(f"problem without field or message: {problem!r}") from None
            problem.render()
        Rejection(source="spool", problems=exc.problems).model_dump_json()
        return
    for artifact in manifest.artifacts:
        for entry in artifact.files:
            if entry.path is not None and (
                entry.path.startswith("/") or ".." in entry.path.split("/")
            ):
                raise AssertionError(f"accepted a path out of the bundle: {entry.path!r}")
            if not entry.name or "/" in entry.name or entry.name in (".", ".."):
                raise AssertionError(f"accepted an unsafe file name: {entry.name!r}")


def mutate(data: bytes, seeds: list[bytes], rng: random.Random) -> bytes:
    """One to four random edits: flips, inserts, deletes, duplicates, splices, tokens."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(out))
        op = rng.randrange(6)
        if op == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del out[at:at + rng.randint(1, 16)]
        elif op == 3 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start:start + rng.randint(1, 32)]
        elif op == 4:
            other = rng.choice(seeds)
            start = rng.randrange(len(other) + 1)
            out[at:] = other[start:start + rng.randint(1, 256)]
        else:
            token = rng.choice(INTERESTING)
            out[at:at + rng.randint(0, len(token))] = token
    return bytes(out)


def random_loop(seeds: list[bytes], runs: int, rng: random.Random | None = None) -> int:
    """The fallback fuzzer: mutate seeds at random, `runs` times; return inputs tried."""
    rng = rng or random.Random()
    pool = list(seeds)
    for n in range(runs):
        data = mutate(rng.choice(pool), seeds, rng)
        try:
            test_one_input(data)
        except BaseException:
            Path(f"fuzz-crash-{n}.bin").write_bytes(data)
            sys.stderr.write(f"crash input saved to fuzz-crash-{n}.bin\n")
            raise
        if len(pool) < 2000 and rng.random() < 0.05:
            pool.append(data)  # keep some mutants: deeper mutations over time
    return runs


def _flag(argv: list[str], name: str, default: int) -> int:
    for arg in argv:
        if arg.startswith(f"-{name}="):
            return int(arg.split("=", 1)[1])
    return default


def main(argv: list[str]) -> int:
    inputs = [a for a in argv[1:] if not a.startswith("-")]
    if atheris is not None:
        args = list(argv)
        if not inputs:
            seed_dir = Path(tempfile.mkdtemp(prefix="manifest-fuzz-"))
            for i, seed in enumerate(seed_inputs()):
                (seed_dir / f"seed-{i:04d}").write_bytes(seed)
            args.append(str(seed_dir))
            sys.stderr.write(f"seeds and new inputs in {seed_dir}\n")
        atheris.Setup(args, test_one_input)
        atheris.Fuzz()
        return 0
    files = [Path(a) for a in inputs if Path(a).is_file()]
    if files:  # reproduce given inputs
        for path in files:
            test_one_input(path.read_bytes())
        sys.stderr.write(f"{len(files)} input(s): no crash\n")
        return 0
    runs = _flag(argv, "runs", 100_000)
    seed = _flag(argv, "seed", random.randrange(2**32))
    sys.stderr.write(f"atheris not installed: plain random mutation, {runs} runs, seed {seed}\n")
    done = random_loop(seed_inputs(), runs, random.Random(seed))
    sys.stderr.write(f"{done} inputs: no crash\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
