"""Framework and format detection from file names and leading bytes.

Never unpickles or imports anything: a model file from an untrusted step is only
ever read as bytes here (at most the first 64 KiB, plus a zip's table of contents,
plus at most 64 KiB of a gzip/zlib stream decompressed in memory).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO

__all__ = ["detect_dataset_format", "detect_framework", "detect_framework_bytes"]

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
    "ipc": "arrow",
    "avro": "avro",
    "orc": "orc",
    "h5": "hdf5",
    "hdf5": "hdf5",
    "tfrecord": "tfrecord",
    "tfrecords": "tfrecord",
    "xlsx": "excel",
    "xls": "excel",
    "txt": "text",
    "pkl": "pickle",
    "pickle": "pickle",
    "zarr": "zarr",
    "db": "sqlite",
    "sqlite": "sqlite",
    "delta": "delta",
}

_COMPRESSED = {"gz", "bz2", "xz", "zst", "snappy", "lz4", "zip"}


def detect_dataset_format(file_name: str) -> str | None:
    """Dataset format from the extension (`train.csv.gz` is csv), or None."""
    parts = file_name.lower().split(".")[1:]
    while parts and parts[-1] in _COMPRESSED:
        parts.pop()
    return _DATASET_FORMATS.get(parts[-1]) if parts else None


# Pickles name the modules of the classes they hold, in clear text near the start.  A
# module counts where it is a top-level package ("xgboost.sklearn" is xgboost, not
# sklearn; "pytorch_lightning" is not torch); the first one named wins, so a sklearn
# Pipeline around an XGBClassifier is sklearn.
_PICKLE_MODULES = {
    b"sklearn": "sklearn",
    b"xgboost": "xgboost",
    b"lightgbm": "lightgbm",
    b"catboost": "catboost",
    b"torch": "pytorch",
    b"keras": "keras",
    b"tf_keras": "keras",
    b"tensorflow": "tensorflow",
    b"statsmodels": "statsmodels",
}
# Before the name: a length byte or opcode (protocol 4's STACK_GLOBAL strings), or the
# GLOBAL opcode `c` of protocols 0-3 (`csklearn.tree._classes\nDecisionTreeClassifier\n`).
_PICKLE_MODULE = re.compile(
    rb"(?:(?<![A-Za-z0-9_.])|(?<=c))(" + b"|".join(_PICKLE_MODULES) + rb")(?![A-Za-z0-9_])"
)


def _pickle_framework(head: bytes) -> str:
    found = _PICKLE_MODULE.search(head)
    return _PICKLE_MODULES[found.group(1)] if found else "pickle"


def _is_pickle(head: bytes) -> bool:
    # PROTO opcode then protocol 2..5 (protocols 0 and 1 have no header to recognise).
    return len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5


def _zip_framework(source: IO[bytes]) -> str | None:
    try:
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()[:500]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "pytorch"  # torch.save's zip format: <archive>/data.pkl, <archive>/data/0
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "keras"
    if "metadata.json" in names and "config.json" in names:
        return "keras"
    if "schema.json" in names:  # skops archives
        return "sklearn"
    return None


def _safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object.
    if len(head) < 10:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    if not (2 <= header_len <= 100_000_000 and head[8:9] == b"{"):
        return False
    if 8 + header_len <= len(head):
        try:
            return isinstance(json.loads(head[8 : 8 + header_len]), dict)
        except ValueError:
            return False
    return True


def _inflate(head: bytes) -> bytes | None:
    """The first bytes of a gzip or zlib stream (joblib's compressed pickles)."""
    wbits = 16 + zlib.MAX_WBITS if head[:2] == b"\x1f\x8b" else zlib.MAX_WBITS
    try:
        return zlib.decompressobj(wbits).decompress(head, _HEAD_BYTES)
    except zlib.error:
        return None


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1] if "." in name else ""


def _by_head(head: bytes, name: str, zip_source: IO[bytes] | None) -> str | None:
    ext = _ext(name)
    if ext == "onnx":
        return "onnx"
    if ext == "safetensors" or (_safetensors(head) and ext not in ("pkl", "joblib", "pickle")):
        return "safetensors"
    if ext in ("pt", "pth"):
        return "pytorch"
    if ext == "keras":
        return "keras"
    if ext == "gguf" or head.startswith(b"GGUF"):
        return "gguf"
    if ext == "tflite" or head[4:8] == b"TFL3":
        return "tflite"
    if head.startswith(b"\x89HDF\r\n\x1a\n") or ext in ("h5", "hdf5"):
        return "keras"
    if head.startswith(b"PK\x03\x04") and zip_source is not None:
        found = _zip_framework(zip_source)
        if found:
            return found
    if ext in ("xgb", "ubj") or head.startswith(b"binf") or b'"learner"' in head[:4096]:
        return "xgboost"
    if head.startswith(b"tree\nversion=") or ext == "lgb":
        return "lightgbm"
    if ext == "cbm" or head.startswith(b"CBM1"):
        return "catboost"
    if _is_pickle(head):
        return _pickle_framework(head)
    if head[:2] in (b"\x1f\x8b", b"x\x9c", b"x\x01", b"x\xda"):
        inner = _inflate(head)
        if inner is not None and _is_pickle(inner):
            return _pickle_framework(inner)
        return "sklearn" if ext == "joblib" else None
    if head.startswith(b"\x28\xb5\x2f\xfd"):  # zstd: no stdlib decoder; joblib is sklearn's
        return "sklearn" if ext == "joblib" else None
    if ext in ("joblib", "pkl", "pickle"):
        return _pickle_framework(head) if head else ("sklearn" if ext == "joblib" else "pickle")
    if ext in ("pb", "savedmodel"):
        return "tensorflow"
    return None


def detect_framework_bytes(data: bytes, file_name: str) -> str | None:
    """Best guess of the ML framework from a file's name and bytes (or its first bytes)."""
    name = file_name.lower()
    head = data[:_HEAD_BYTES]
    zip_source = io.BytesIO(data) if data.startswith(b"PK\x03\x04") else None
    return _by_head(head, name, zip_source)


def detect_framework(path: str | os.PathLike[str], file_name: str | None = None) -> str | None:
    """Best guess of the ML framework that wrote a model file, or None.

    `file_name` is the name the manifest gives the file (its extension decides when the
    bytes say nothing); a file that cannot be read is judged by its name alone.
    """
    p = Path(path)
    name = (file_name or p.name).lower()
    try:
        with open(p, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
            if head.startswith(b"PK\x03\x04"):
                fh.seek(0)
                return _by_head(head, name, fh)
    except OSError:
        head = b""
    return _by_head(head, name, None)
