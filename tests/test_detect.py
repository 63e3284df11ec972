"""Framework detection from real (small) files: by extension and by magic bytes, never
by unpickling or importing anything."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from router.detect import detect_dataset_format, detect_framework, detect_framework_bytes

PICKLE_HEADER = b"\x80\x04\x95"  # PROTO 4, FRAME


def pickle_naming(module: str) -> bytes:
    """A real pickle whose bytes name `module`, as a pickled estimator's do."""
    return pickle.dumps({"__module__": module, "coef_": [0.5, 1.5]}, protocol=4)


def torch_zip() -> bytes:
    """The layout torch.save writes: a zip with <name>/data.pkl and tensor storages."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps({"w": "torch._utils._rebuild_tensor_v2"}))
        archive.writestr("model/data/0", b"\x00" * 16)
        archive.writestr("model/version", b"3\n")
    return buf.getvalue()


def keras_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.3.3"}))
        archive.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        archive.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 32)
    return buf.getvalue()


def plain_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("readme.txt", "just files")
    return buf.getvalue()


def safetensors_blob() -> bytes:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {}}
    ).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)


HDF5 = b"\x89HDF\r\n\x1a\n" + b"\x00" * 64
LIGHTGBM = b"tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\n"
XGBOOST_JSON = json.dumps(
    {"learner": {"attributes": {}, "gradient_booster": {"name": "gbtree"}}, "version": [2, 0, 3]}
).encode()

CASES = [
    # (file name, bytes, framework): extension and bytes agree
    ("model.pkl", PICKLE_HEADER + b"\x00csklearn.linear_model\nLogisticRegression\n", "sklearn"),
    ("model.pkl", pickle_naming("sklearn.ensemble._forest"), "sklearn"),
    ("model.joblib", pickle_naming("sklearn.svm._classes"), "sklearn"),
    ("booster.pkl", pickle_naming("xgboost.core"), "xgboost"),
    ("booster.pkl", pickle_naming("lightgbm.sklearn"), "lightgbm"),
    ("cat.pkl", pickle_naming("catboost.core"), "catboost"),
    ("model.pkl", pickle_naming("statsmodels.regression"), "statsmodels"),
    ("weights.pkl", pickle.dumps([1, 2, 3], protocol=2), "pickle"),
    ("model.joblib", zlib.compress(pickle_naming("sklearn.tree._classes")), "sklearn"),
    ("model.joblib", gzip.compress(pickle_naming("xgboost.core")), "xgboost"),
    ("model.pt", torch_zip(), "pytorch"),
    ("model.pth", b"anything", "pytorch"),
    ("model.onnx", b"\x08\x07\x12\x07pytorch", "onnx"),
    ("model.h5", HDF5, "keras"),
    ("model.keras", keras_zip(), "keras"),
    ("model.safetensors", safetensors_blob(), "safetensors"),
    ("model.txt", LIGHTGBM, "lightgbm"),
    ("model.json", XGBOOST_JSON, "xgboost"),
    ("model.ubj", b"{L\x00\x00\x00\x07learner", "xgboost"),
    ("model.cbm", b"CBM1" + b"\x00" * 16, "catboost"),
    ("model.gguf", b"GGUF\x03\x00\x00\x00", "gguf"),
    ("model.tflite", b"\x1c\x00\x00\x00TFL3" + b"\x00" * 8, "tflite"),
    ("saved_model.pb", b"\x08\x01", "tensorflow"),
    # the bytes decide when the name says nothing
    ("model.bin", torch_zip(), "pytorch"),
    ("artifact", HDF5, "keras"),
    ("weights.bin", safetensors_blob(), "safetensors"),
    ("model", LIGHTGBM, "lightgbm"),
    ("booster.model", b"binf" + b"\x00" * 16, "xgboost"),
    ("booster.raw", XGBOOST_JSON, "xgboost"),
    ("estimator", pickle_naming("sklearn.pipeline"), "sklearn"),
    ("archive.zip", keras_zip(), "keras"),
    # nothing to go on
    ("data.bin", b"\x00\x01\x02\x03", None),
    ("notes.txt", b"hello world", None),
    ("bundle.zip", plain_zip(), None),
    ("random.json", b'{"weights": [1, 2]}', None),
]


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_detect_from_a_real_file(
    tmp_path: Path, name: str, data: bytes, expected: str | None
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    assert detect_framework(path) == expected


@pytest.mark.parametrize(("name", "data", "expected"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_detect_from_bytes_agrees_with_file(name: str, data: bytes, expected: str | None) -> None:
    assert detect_framework_bytes(data, name) == expected


def test_manifest_name_decides_over_the_staged_file_name(tmp_path: Path) -> None:
    # Intake stages files under other names; the manifest's name carries the extension.
    staged = tmp_path / "blob-0001"
    staged.write_bytes(b"\x08\x07")
    assert detect_framework(staged) is None
    assert detect_framework(staged, "model.onnx") == "onnx"


def test_unreadable_file_is_judged_by_its_name(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    assert detect_framework(missing) == "pytorch"
    assert detect_framework(tmp_path / "nope.bin") is None
    assert detect_framework(tmp_path) is None  # a directory


def test_a_pickle_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Exploit(), protocol=4)
    path = tmp_path / "model.pkl"
    path.write_bytes(payload)
    assert detect_framework(path) == "pickle"
    assert detect_framework_bytes(payload, "model.pkl") == "pickle"
    compressed = tmp_path / "model.joblib"
    compressed.write_bytes(zlib.compress(payload))
    detect_framework(compressed)
    assert not marker.exists()
    # ... while loading it would have run code: the test's payload is real.
    pickle.loads(payload).close()
    assert marker.exists()


def test_only_the_head_of_a_large_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.pkl"
    with open(path, "wb") as fh:
        fh.write(pickle_naming("sklearn.linear_model"))
        fh.write(b"\x00" * (8 * 1024 * 1024))
        fh.write(b"xgboost")  # past the head: must not change the answer
    assert detect_framework(path) == "sklearn"


def test_truncated_safetensors_header_is_not_trusted(tmp_path: Path) -> None:
    bad = struct.pack("<Q", 20) + b"{not json at all!!!}"
    assert detect_framework_bytes(bad, "weights.bin") is None
    assert detect_framework_bytes(bad, "weights.safetensors") == "safetensors"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train.parquet", "parquet"),
        ("TRAIN.PARQUET", "parquet"),
        ("a.b.csv", "csv"),
        ("rows.csv.gz", "csv"),
        ("rows.csv.bz2", "csv"),
        ("x.jsonl.zst", "jsonl"),
        ("x.npz", "numpy"),
        ("db.sqlite", "sqlite"),
        ("noext", None),
        ("archive.gz", None),
        ("weird.xyz", None),
    ],
)
def test_dataset_format_from_extension(name: str, expected: str | None) -> None:
    assert detect_dataset_format(name) == expected


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        (["xgboost.sklearn"], "xgboost"),  # XGBClassifier lives in xgboost.sklearn
        (["lightgbm.sklearn"], "lightgbm"),
        (["sklearn.pipeline", "xgboost.sklearn"], "sklearn"),  # the outer object wins
        (["pytorch_lightning.core"], "pickle"),
        (["torch._utils"], "pytorch"),
        (["tf_keras.src.engine"], "keras"),
        (["mylib.sklearn_helpers"], "pickle"),
    ],
)
def test_pickle_modules_count_as_top_level_packages(modules: list[str], expected: str) -> None:
    data = pickle.dumps([{"__module__": m} for m in modules], protocol=4)
    assert detect_framework_bytes(data, "model.pkl") == expected


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_pickled_class_references_in_every_protocol(protocol: int) -> None:
    # A pickled *class* is written with GLOBAL (protocols 0-3) or STACK_GLOBAL (4-5).
    data = pickle.dumps(zipfile.ZipInfo, protocol=protocol).replace(b"zipfile", b"sklearn")
    assert b"sklearn" in data
    assert detect_framework_bytes(data, "model.pkl") == "sklearn"
    if protocol >= 2:
        assert detect_framework_bytes(data, "model.bin") == "sklearn"  # by the bytes alone
