"""Framework and format detection from file names and leading bytes.

Never unpickles or imports anything: a model file from an untrusted step is only
ever read as bytes here.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

__all__ = ["detect_dataset_format", "detect_framework"]

_HEAD_BYTES = 64 * 1024

_DATASET_FORMATS = {
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
    "tsv": "tsv",
    "json": "json",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "npy": "numpy",
    "npz": "numpy",
    "feather": "feather",
    "arrow": "arrow",
    "avro": "avro",
    "orc": "orc",
    "h5": "hdf5",
    "hdf5": "hdf5",
    "tfrecord": "tfrecord",
    "xlsx": "excel",
    "txt": "text",
    "pkl": "pickle",
    "pickle": "pickle",
    "zarr": "zarr",
    "db": "sqlite",
    "sqlite": "sqlite",
}

_COMPRESSED = {"gz", "bz2", "xz", "zst", "snappy", "lz4"}


def detect_dataset_format(file_name: str) -> str | None:
    """Dataset format from the extension (`train.csv.gz` is csv)."""
    parts = file_name.lower().split(".")[1:]
    while parts and parts[-1] in _COMPRESSED:
        parts.pop()
    return _DATASET_FORMATS.get(parts[-1]) if parts else None


def _pickle_framework(head: bytes) -> str | None:
    # Pickles name the modules of the classes they hold, in clear text near the start.
    for needle, framework in (
        (b"sklearn", "sklearn"),
        (b"xgboost", "xgboost"),
        (b"lightgbm", "lightgbm"),
        (b"catboost", "catboost"),
        (b"torch", "pytorch"),
        (b"keras", "keras"),
        (b"statsmodels", "statsmodels"),
    ):
        if needle in head:
            return framework
    return "pickle"


def _zip_framework(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()[:200]
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("data.pkl") or "/data/" in n for n in names):
        return "pytorch"
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "keras"
    if "metadata.json" in names and "config.json" in names:
        return "keras"
    if "schema.json" in names:  # skops archives
        return "sklearn"
    return None


def _safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= 100_000_000 and head[8:9] == b"{"


def detect_framework(path: str | os.PathLike[str], file_name: str | None = None) -> str | None:
    """Best guess of the ML framework that wrote a model file, or None."""
    p = Path(path)
    name = (file_name or p.name).lower()
    ext = name.rsplit(".", 1)[-1] if "." in name else ""
    try:
        with open(p, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError:
        head = b""

    if ext == "onnx" or name.endswith(".onnx"):
        return "onnx"
    if ext == "safetensors" or _safetensors(head) and ext not in ("pkl", "joblib"):
        return "safetensors"
    if ext in ("pt", "pth"):
        return "pytorch"
    if ext == "keras":
        return "keras"
    if head.startswith(b"\x89HDF\r\n\x1a\n") or ext in ("h5", "hdf5"):
        return "keras"
    if head.startswith(b"PK\x03\x04"):
        found = _zip_framework(p)
        if found:
            return found
    if ext in ("xgb", "ubj") or head.startswith(b"binf") or b'"learner"' in head[:4096]:
        return "xgboost"
    if head.startswith(b"tree\nversion=") or ext == "lgb":
        return "lightgbm"
    if ext == "cbm" or head.startswith(b"CBM1"):
        return "catboost"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= 5:  # pickle protocol 2-5
        return _pickle_framework(head)
    if head[:2] in (b"\x1f\x8b", b"x\x9c", b"x\x01", b"x\xda") or head.startswith(b"\x28\xb5\x2f\xfd"):
        # joblib's compressed pickles: gzip, zlib or zstd around a pickle.
        return "sklearn" if ext == "joblib" else None
    if ext in ("joblib", "pkl", "pickle"):
        return _pickle_framework(head)
    if ext == "json":
        try:
            doc = json.loads(head.decode("utf-8", "replace")) if len(head) < _HEAD_BYTES else None
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "learner" in doc:
            return "xgboost"
    if ext in ("pb", "savedmodel"):
        return "tensorflow"
    return None
