"""The emit side for Python steps: typed artifacts, `emit`, `@step`, serializers.

    from router import Model, Dataset, Metrics, emit, step

    @step
    def train(data: Dataset) -> tuple[Model, Metrics]:
        clf = fit(data.data)
        return Model.create(data=clf, name="clf", upload=True), Metrics(accuracy=0.97)

Objects are written with a well-kept library chosen by their type (pandas/polars
DataFrames to parquet through pyarrow, numpy arrays to .npy, sklearn-like models with
joblib, torch objects with torch.save, plain data as JSON, text and bytes as they are,
pickle only as the last resort); the choice is recorded in the artifact's metadata
(`router.serializer`, `router.files`) so the read API (router.client) loads each file
back the same way.  A step's artifacts become one bundle, built under
`incoming/.tmp-<id>/` and renamed into place (the spool contract), or one MQTT message
when the SDK is configured for MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
import time
import typing
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar, overload

from router.config import current_stack
from router.manifest import ManifestError, _check_name, parse_manifest

__all__ = [
    "DATA",
    "MODEL",
    "REPORT",
    "SERIALIZERS",
    "TRUST_PICKLE_ENV",
    "Artifact",
    "Dataset",
    "Emission",
    "FileSlot",
    "FileValue",
    "Metrics",
    "Model",
    "Parameters",
    "Report",
    "UntrustedFileError",
    "content_key",
    "emit",
    "load_file",
    "resolve_context",
    "run_context",
    "step",
]

# Domino Flows' artifact type constants (the manifest also accepts "DATA").
DATA = "dataset"
MODEL = "model"
REPORT = "report"

_KINDS = {"model", "dataset", "data", "report", "artifact"}
META_SERIALIZER = "router.serializer"
META_PYTHON_TYPE = "router.python_type"
META_FILES = "router.files"
META_LAYOUT = "router.layout"  # "object": one object in one file; "files": named files
META_CACHE_KEY = "router.cache_key"

T = TypeVar("T")


# --- serializers ------------------------------------------------------------------------


def _type_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _top_module(obj: Any) -> str:
    return type(obj).__module__.split(".", 1)[0]


def _is_pandas_frame(obj: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(obj, pd.DataFrame)


def _is_polars_frame(obj: Any) -> bool:
    pl = sys.modules.get("polars")
    return pl is not None and isinstance(obj, pl.DataFrame)


def _is_ndarray(obj: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(obj, np.ndarray) and obj.dtype != object


def _is_torch(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module | torch.Tensor)


_ESTIMATOR_MODULES = {"sklearn", "xgboost", "lightgbm", "catboost", "statsmodels", "imblearn"}


def _is_estimator(obj: Any) -> bool:
    """sklearn-like: a known estimator library, or anything with fit and predict/transform."""
    if _top_module(obj) in _ESTIMATOR_MODULES:
        return True
    return callable(getattr(obj, "fit", None)) and (
        callable(getattr(obj, "predict", None)) or callable(getattr(obj, "transform", None))
    )


def _is_figure(obj: Any) -> bool:
    return _top_module(obj) in ("matplotlib", "plotly") and callable(
        getattr(obj, "savefig", None) or getattr(obj, "write_image", None)
    )


def _json_round_trips(obj: Any) -> bool:
    """JSON only when reading it back gives an equal object of the same type."""
    if obj is None or isinstance(obj, bool | int | str):
        return True
    if isinstance(obj, float):
        return math.isfinite(obj)
    if not isinstance(obj, dict | list):
        return False
    try:
        text = json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError):
        return False
    back = json.loads(text)
    return bool(back == obj) and _same_shape(back, obj)


def _same_shape(a: Any, b: Any) -> bool:
    if type(a) is not type(b) and not (isinstance(a, int | float) and isinstance(b, int | float)):
        return False
    if isinstance(a, dict):
        return all(_same_shape(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return all(_same_shape(x, y) for x, y in zip(a, b, strict=True))
    return True


def _dump_parquet(obj: Any, path: Path) -> None:
    if _is_polars_frame(obj):
        obj.write_parquet(path)
    else:
        obj.to_parquet(path, engine="pyarrow")


def _load_parquet(path: Path, python_type: str | None) -> Any:
    if python_type and python_type.startswith("polars."):
        import polars

        return polars.read_parquet(path)
    import pandas

    return pandas.read_parquet(path, engine="pyarrow")


def _dump_csv(obj: Any, path: Path) -> None:
    if _is_polars_frame(obj):
        obj.write_csv(path)
    else:
        obj.to_csv(path, index=False)


def _load_csv(path: Path, python_type: str | None) -> Any:
    if python_type and python_type.startswith("polars."):
        import polars

        return polars.read_csv(path)
    import pandas

    return pandas.read_csv(path)


def _dump_npy(obj: Any, path: Path) -> None:
    import numpy

    with open(path, "wb") as fh:
        numpy.save(fh, obj, allow_pickle=False)


def _load_npy(path: Path, _python_type: str | None) -> Any:
    import numpy

    return numpy.load(path, allow_pickle=False)


def _dump_joblib(obj: Any, path: Path) -> None:
    import joblib

    joblib.dump(obj, path)


def _load_joblib(path: Path, _python_type: str | None) -> Any:
    import joblib

    return joblib.load(path)


def _dump_skops(obj: Any, path: Path) -> None:
    import skops.io

    skops.io.dump(obj, path)


def _load_skops(path: Path, _python_type: str | None) -> Any:
    import skops.io

    # Only for a reader that trusts the artifact's writer (as joblib): every type the
    # file names is allowed, and those types' constructors run.
    return skops.io.load(path, trusted=skops.io.get_untrusted_types(file=path))


def _load_skops_safe(path: Path, _python_type: str | None) -> Any:
    import skops.io
    from skops.io.exceptions import UntrustedTypesFoundException

    try:
        return skops.io.load(path)  # skops' default trusted types only (sklearn, numpy)
    except UntrustedTypesFoundException:
        return _UNSAFE


def _dump_torch(obj: Any, path: Path) -> None:
    import torch

    torch.save(obj, path)


def _load_torch(path: Path, _python_type: str | None) -> Any:
    import torch

    return torch.load(path, weights_only=False)


def _load_torch_safe(path: Path, _python_type: str | None) -> Any:
    import torch

    try:  # tensors and state dicts; a whole module needs the full (pickle) load
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        return _UNSAFE


def _dump_json(obj: Any, path: Path) -> None:
    if not _json_round_trips(obj):
        raise TypeError(f"{_type_name(obj)} does not round-trip through JSON")
    path.write_text(json.dumps(obj, allow_nan=False, indent=1), encoding="utf-8")


def _load_json(path: Path, _python_type: str | None) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _dump_text(obj: Any, path: Path) -> None:
    if not isinstance(obj, str):
        raise TypeError("text files hold a str")
    path.write_text(obj, encoding="utf-8")


def _load_text(path: Path, _python_type: str | None) -> Any:
    return path.read_text(encoding="utf-8")


def _dump_lines(obj: Any, path: Path) -> None:
    if not isinstance(obj, list | tuple) or not all(
        isinstance(x, str) and "\n" not in x for x in obj
    ):
        raise TypeError("lines are a list of one-line strings")
    path.write_text("".join(f"{x}\n" for x in obj), encoding="utf-8")


def _load_lines(path: Path, _python_type: str | None) -> Any:
    return path.read_text(encoding="utf-8").splitlines()


def _dump_bytes(obj: Any, path: Path) -> None:
    if not isinstance(obj, bytes | bytearray | memoryview):
        raise TypeError("raw files hold bytes")
    path.write_bytes(bytes(obj))


def _load_bytes(path: Path, _python_type: str | None) -> Any:
    return path.read_bytes()


def _dump_file(obj: Any, path: Path) -> None:
    source = Path(obj)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    shutil.copyfile(source, path)


def _load_path(path: Path, _python_type: str | None) -> Any:
    return path


def _dump_png(obj: Any, path: Path) -> None:
    if callable(getattr(obj, "savefig", None)):
        obj.savefig(path, format="png")
    else:
        obj.write_image(str(path), format="png")


def _dump_pickle(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def _load_pickle(path: Path, _python_type: str | None) -> Any:
    with open(path, "rb") as fh:
        return pickle.load(fh)


@dataclass(frozen=True)
class Serializer:
    """How one kind of object becomes a file, and back."""

    name: str
    extension: str
    dump: Callable[[Any, Path], None]
    load: Callable[[Path, str | None], Any]
    dataset_format: str | None = None
    # `load` can run code from the file (pickle underneath): only for a trusting reader.
    runs_code: bool = False
    # What such a format can still load without running code; _UNSAFE when it cannot.
    safe_load: Callable[[Path, str | None], Any] | None = None


SERIALIZERS: dict[str, Serializer] = {
    s.name: s
    for s in (
        Serializer("parquet", "parquet", _dump_parquet, _load_parquet, "parquet"),
        Serializer("csv", "csv", _dump_csv, _load_csv, "csv"),
        Serializer("npy", "npy", _dump_npy, _load_npy, "numpy"),
        Serializer("joblib", "joblib", _dump_joblib, _load_joblib, runs_code=True),
        Serializer("skops", "skops", _dump_skops, _load_skops, runs_code=True,
                   safe_load=_load_skops_safe),
        Serializer("torch", "pt", _dump_torch, _load_torch, runs_code=True,
                   safe_load=_load_torch_safe),
        Serializer("json", "json", _dump_json, _load_json, "json"),
        Serializer("text", "txt", _dump_text, _load_text, "text"),
        Serializer("lines", "txt", _dump_lines, _load_lines, "text"),
        Serializer("bytes", "bin", _dump_bytes, _load_bytes),
        Serializer("file", "", _dump_file, _load_path),
        Serializer("png", "png", _dump_png, _load_path),
        Serializer("pickle", "pkl", _dump_pickle, _load_pickle, "pickle", runs_code=True),
    )
}

# What a file's extension asks for, when a declared file name gives one.
_BY_EXTENSION = {
    "parquet": "parquet", "pq": "parquet", "csv": "csv", "npy": "npy", "joblib": "joblib",
    "skops": "skops", "pt": "torch", "pth": "torch", "json": "json", "png": "png",
    "pkl": "pickle", "pickle": "pickle", "bin": "bytes",
}
_TEXT_TYPES = {"txt", "md", "html", "htm", "csv", "tsv", "yaml", "yml", "xml", "log", "sql"}


def _candidates(obj: Any, hint: str | None) -> list[str]:
    """Serializers to try for `obj`, best first; pickle is always the last resort."""
    if isinstance(obj, Path):
        return ["file"]
    out: list[str] = []
    wanted = _BY_EXTENSION.get(hint or "")
    if isinstance(obj, bytes | bytearray | memoryview):
        out.append("bytes")
    elif isinstance(obj, str) and (hint in _TEXT_TYPES or hint is None or wanted is None):
        out.append("text")
    elif hint in _TEXT_TYPES and isinstance(obj, list | tuple):
        out.append("lines")
    if wanted == "pickle" and _is_estimator(obj):
        wanted = "joblib"  # model.pkl holding an estimator: joblib's pickle-compatible file
    if wanted:
        out.append(wanted)
    if hint == "csv" and (_is_pandas_frame(obj) or _is_polars_frame(obj)):
        out.append("csv")
    if _is_pandas_frame(obj) or _is_polars_frame(obj):
        out.append("parquet")
    elif _is_ndarray(obj):
        out.append("npy")
    elif _is_torch(obj):
        out.append("torch")
    elif _is_figure(obj):
        out.append("png")
    elif _is_estimator(obj):
        out.append("joblib")
    elif _json_round_trips(obj):
        out.append("json")
    out.append("pickle")
    return list(dict.fromkeys(out))


@dataclass
class _Written:
    file_name: str
    serializer: str
    python_type: str


def _write_object(
    obj: Any, directory: Path, *, stem: str, file_name: str | None, requested: str | None
) -> _Written:
    """Write `obj` into `directory` with the first serializer that takes it."""
    hint = None
    if file_name and "." in file_name:
        hint = file_name.rsplit(".", 1)[1].lower()
    if requested is not None:
        if requested not in SERIALIZERS:
            raise ValueError(
                f"unknown serializer {requested!r}; use one of {', '.join(SERIALIZERS)}"
            )
        names = [requested]
    else:
        names = _candidates(obj, hint)
    errors: list[str] = []
    for name in names:
        ser = SERIALIZERS[name]
        if file_name:
            target = file_name
        elif name == "file":
            target = Path(obj).name
        else:
            target = f"{stem}.{ser.extension}"
        _check_plain_name(target, "file_name", "a plain file name such as 'model.pkl'")
        path = directory / target
        try:
            ser.dump(obj, path)
        except (ImportError, TypeError, ValueError, AttributeError, pickle.PicklingError) as exc:
            path.unlink(missing_ok=True)
            errors.append(f"{name}: {exc}")
            continue
        return _Written(
            file_name=target,
            serializer=name,
            python_type="pathlib.Path" if name == "file" else _type_name(obj),
        )
    raise TypeError(
        f"cannot serialize {_type_name(obj)} ({'; '.join(errors)}); pass serializer= "
        f"(one of {', '.join(SERIALIZERS)}) or a pathlib.Path to a file"
    )


def _check_plain_name(value: str, field: str, fix: str) -> None:
    """`value` names one entry in a bundle folder (no '/', '..', absolute path): checked
    before anything is written, so a bad name never writes outside the spool."""
    try:
        _check_name(value)
    except ValueError as exc:
        raise ValueError(f"{field}={value!r} {exc}; give {fix}") from None


TRUST_PICKLE_ENV = "ROUTER_TRUST_PICKLE"
_UNSAFE = object()  # a safe_load's answer: this file needs the code-running loader


class UntrustedFileError(PermissionError):
    """A file whose recorded format runs code when loaded, read without opting in."""


def load_file(
    path: Path, serializer: str | None, python_type: str | None = None, *,
    trusted: bool = False, what: str | None = None,
) -> Any:
    """Read one file back as its recorded serializer wrote it.

    Formats whose loader can run code from the file (pickle, joblib, skops beyond its
    default types, torch beyond tensors and state dicts) load only when `trusted`:
    the record naming the serializer is manifest metadata, which whoever writes to the
    spool or publishes a manifest sets; otherwise UntrustedFileError.
    Without a recorded serializer (a bash or foreign emitter), plain data formats are
    read (parquet, npy, json, text) and anything else, or a file that does not parse
    as its extension says, is returned as its local Path.
    """
    if serializer is None:
        ext = path.suffix.lstrip(".").lower()
        loader = {"parquet": _load_parquet, "npy": _load_npy, "json": _load_json,
                  "txt": _load_text}.get(ext)
        if loader is None:
            return path
        try:  # a foreign file is only named by its extension: a latin-1 log, JSON lines
            return loader(path, python_type)
        except (ValueError, OSError, ImportError):  # UnicodeDecodeError, JSONDecodeError
            return path
    ser = SERIALIZERS.get(serializer)
    if ser is None:
        return path
    if not ser.runs_code or trusted:
        return ser.load(path, python_type)
    if ser.safe_load is not None and (value := ser.safe_load(path, python_type)) is not _UNSAFE:
        return value
    raise UntrustedFileError(
        f"{what or path}: recorded serializer {serializer!r} can run arbitrary code when "
        "loading, and that record is only manifest metadata: anyone who can write to the "
        "spool or publish a manifest can forge it, so it was not loaded. If you trust "
        "who wrote this artifact, opt in with Client(trust_pickle=True) or "
        f"{TRUST_PICKLE_ENV}=1; or load it yourself from its local file ({path}, also "
        "the artifact's .path())"
    )


def content_key(*parts: Any) -> str:
    """A stable hex key over `parts`, for `cache_key=`: data, files (by content), objects.

    JSON-able values hash by their canonical JSON, bytes as they are, a Path by its
    file's bytes, DataFrames by pandas' row hashes, anything else by the file its
    serializer writes.
    """
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def _feed(digest: Any, part: Any) -> None:
    digest.update(b"\x00")
    if isinstance(part, bytes | bytearray):
        digest.update(bytes(part))
    elif isinstance(part, Path):
        with open(part, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    elif _json_round_trips(part):
        digest.update(json.dumps(part, sort_keys=True).encode())
    elif isinstance(part, list | tuple):
        digest.update(f"seq{len(part)}".encode())
        for item in part:
            _feed(digest, item)
    elif _is_pandas_frame(part):
        import pandas

        digest.update(json.dumps([str(c) for c in part.columns]).encode())
        digest.update(pandas.util.hash_pandas_object(part, index=True).values.tobytes())
    elif _is_ndarray(part):
        digest.update(str((part.dtype, part.shape)).encode())
        digest.update(part.tobytes())
    else:
        with tempfile.TemporaryDirectory(prefix="router-key-") as tmp:
            written = _write_object(part, Path(tmp), stem="x", file_name=None, requested=None)
            digest.update((Path(tmp) / written.file_name).read_bytes())


# --- typed artifacts --------------------------------------------------------------------


def _framework_of(obj: Any) -> str | None:
    return {
        "sklearn": "sklearn", "xgboost": "xgboost", "lightgbm": "lightgbm",
        "catboost": "catboost", "torch": "pytorch", "keras": "keras", "tf_keras": "keras",
        "tensorflow": "tensorflow", "statsmodels": "statsmodels", "onnx": "onnx",
    }.get(_top_module(obj)) if obj is not None and not isinstance(obj, Path) else None


class _Emittable:
    """What `emit` needs from any artifact: a manifest entry and the files behind it."""

    ref: str | None = None
    event_id: str | None = None

    def _bind(self, ref: str, event_id: str) -> None:
        self.ref, self.event_id = ref, event_id


class _ObjectArtifact(_Emittable):
    """An artifact holding one object (or one file), written by a serializer."""

    kind: ClassVar[str] = "artifact"
    default_name: ClassVar[str] = "artifact"
    stem: ClassVar[str] = "artifact"

    def __init__(
        self,
        data: Any = None,
        name: str | None = None,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        upload: bool = False,
        serializer: str | None = None,
        file_name: str | None = None,
    ) -> None:
        self.data = data
        self.name = name or self.default_name
        self.version = None if version is None else str(version)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.upload = upload
        self.serializer = serializer
        self.file_name = file_name

    @classmethod
    def create(cls, data: Any = None, name: str | None = None, **kwargs: Any) -> Self:
        """FlowyML's spelling: `Model.create(data=clf, name="clf", upload=True)`."""
        return cls(data=data, name=name, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, data={type(self.data).__name__})"

    def _fields(self) -> dict[str, Any]:
        return {}

    def _entry(self, directory: Path, rel: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.kind, "name": self.name, "upload": self.upload}
        if self.version is not None:
            entry["version"] = self.version
        metadata = dict(self.metadata)
        if self.data is not None:
            directory.mkdir(parents=True, exist_ok=True)
            written = _write_object(
                self.data, directory, stem=self.stem, file_name=self.file_name,
                requested=self.serializer,
            )
            entry["files"] = [{"path": f"{rel}/{written.file_name}"}]
            metadata[META_LAYOUT] = "object"
            metadata[META_SERIALIZER] = written.serializer
            metadata[META_PYTHON_TYPE] = written.python_type
            metadata[META_FILES] = {
                written.file_name: {
                    "serializer": written.serializer, "python_type": written.python_type,
                }
            }
            self._after_write(entry, written)
        entry.update({k: v for k, v in self._fields().items() if v is not None})
        entry["metadata"] = metadata
        return entry

    def _after_write(self, entry: dict[str, Any], written: _Written) -> None:
        return None


class Model(_ObjectArtifact):
    """A trained model: FlowyML's Model fields; framework detected from the object."""

    kind = "model"
    default_name = "model"
    stem = "model"

    def __init__(
        self,
        data: Any = None,
        name: str | None = None,
        version: str | None = None,
        framework: str | None = None,
        serving_config: Mapping[str, Any] | None = None,
        input_schema: Mapping[str, Any] | None = None,
        output_schema: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        upload: bool = False,
        serializer: str | None = None,
        file_name: str | None = None,
    ) -> None:
        super().__init__(
            data, name, version, metadata, upload=upload, serializer=serializer,
            file_name=file_name,
        )
        self.framework = framework or _framework_of(data)
        self.serving_config = dict(serving_config or {})
        self.input_schema = dict(input_schema) if input_schema is not None else None
        self.output_schema = dict(output_schema) if output_schema is not None else None

    def _fields(self) -> dict[str, Any]:
        return {
            "framework": self.framework,
            "serving_config": self.serving_config or None,
            "input_schema": self.input_schema,
            "output_schema": self.output_schema,
        }


def _frame_schema(obj: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if _is_pandas_frame(obj) or _is_polars_frame(obj):
        schema = {str(c): str(t) for c, t in zip(obj.columns, list(obj.dtypes), strict=True)}
        return schema, {"num_rows": int(obj.shape[0]), "num_columns": int(obj.shape[1])}
    if _is_ndarray(obj):
        return {"dtype": str(obj.dtype), "shape": list(obj.shape)}, {"num_rows": len(obj)}
    return None, None


class Dataset(_ObjectArtifact):
    """Data: FlowyML's Dataset fields; format, schema and size statistics detected."""

    kind = "dataset"
    default_name = "dataset"
    stem = "data"

    def __init__(
        self,
        data: Any = None,
        name: str | None = None,
        version: str | None = None,
        format: str | None = None,
        schema: Mapping[str, Any] | None = None,
        statistics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        upload: bool = False,
        serializer: str | None = None,
        file_name: str | None = None,
    ) -> None:
        super().__init__(
            data, name, version, metadata, upload=upload, serializer=serializer,
            file_name=file_name,
        )
        self.format = format
        auto_schema, auto_stats = _frame_schema(data)
        self.schema = dict(schema) if schema is not None else auto_schema
        self.statistics = dict(statistics) if statistics is not None else auto_stats

    def _fields(self) -> dict[str, Any]:
        return {"format": self.format, "schema": self.schema, "statistics": self.statistics}

    def _after_write(self, entry: dict[str, Any], written: _Written) -> None:
        if self.format is None:
            self.format = SERIALIZERS[written.serializer].dataset_format


class Report(_ObjectArtifact):
    """A report: a file (Path), HTML or text (str), bytes, or a matplotlib figure."""

    kind = "report"
    default_name = "report"
    stem = "report"

    def _entry(self, directory: Path, rel: str) -> dict[str, Any]:
        if self.file_name is None and isinstance(self.data, str):
            self.file_name = "report.html" if self.data.lstrip().startswith("<") else "report.txt"
        return super()._entry(directory, rel)


class _ValuesArtifact(dict[str, Any], _Emittable):
    kind: ClassVar[str] = "parameters"
    default_name: ClassVar[str] = "parameters"

    def __init__(
        self,
        values: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        /,
        *,
        name: str | None = None,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> None:
        super().__init__(values or {}, **more)
        self.name = name or self.default_name
        self.version = None if version is None else str(version)
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def values_dict(self) -> dict[str, Any]:
        return dict(self)

    def with_metadata(self, **metadata: Any) -> Self:
        """Attach metadata (returns the same object, for chaining)."""
        self.metadata.update(metadata)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)}, name={self.name!r})"

    def _entry(self, directory: Path, rel: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": self.kind, "name": self.name, "values": dict(self),
            "metadata": dict(self.metadata),
        }
        if self.version is not None:
            entry["version"] = self.version
        return entry


class Metrics(_ValuesArtifact):
    """Numbers of a step: `Metrics(accuracy=0.97).at_step(100).with_metadata(split="test")`."""

    kind = "metrics"
    default_name = "metrics"

    def __init__(
        self,
        values: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        /,
        *,
        name: str | None = None,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        step: int | None = None,
        **more: Any,
    ) -> None:
        super().__init__(values, name=name, version=version, metadata=metadata, **more)
        self.step = step

    def at_step(self, step: int) -> Metrics:
        """The training step (epoch, iteration) these values belong to."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, not {step!r}")
        self.step = step
        return self

    def _entry(self, directory: Path, rel: str) -> dict[str, Any]:
        entry = super()._entry(directory, rel)
        if self.step is not None:
            entry["step"] = self.step
        return entry


class Parameters(_ValuesArtifact):
    """Hyperparameters and settings of a step: `Parameters(lr=0.001, epochs=10)`."""

    kind = "parameters"
    default_name = "parameters"


# --- Domino-style flow artifacts ---------------------------------------------------------


class FileSlot:
    """One declared file of a named Artifact; call it with the data to emit."""

    def __init__(
        self,
        artifact: Artifact,
        name: str,
        type: str | None,
        serializer: str | None,
        declared_type: str | None = None,
    ) -> None:
        self.artifact = artifact
        self.name = name
        self.type = type  # as declared, else the extension
        self.serializer = serializer
        self._declared_type = declared_type

    def __repr__(self) -> str:
        type_part = f", type={self._declared_type!r}" if self._declared_type else ""
        return f"{self.artifact.name!r}.File(name={self.name!r}{type_part})"

    def __call__(self, data: Any) -> FileValue:
        return FileValue(self, data)

    def from_path(self, path: str | os.PathLike[str]) -> FileValue:
        """This file's content is the file at `path` (copied into the bundle)."""
        return FileValue(self, Path(path))


class FileValue(_Emittable):
    """A declared file with its content: what a step returns for an Artifact's File."""

    def __init__(self, slot: FileSlot, data: Any) -> None:
        self.slot = slot
        self.data = data

    @property
    def artifact(self) -> Artifact:
        return self.slot.artifact

    def __repr__(self) -> str:
        return f"{self.slot!r}({type(self.data).__name__})"


class Artifact(_ObjectArtifact):
    """A named artifact, as in Domino Flows: `Artifact(name="My Model", type=MODEL)`.

    Declare its files with `.File(name="model.pkl")` / `.File(name="classes", type="txt")`
    and emit `slot(data)` values from any step: files of one artifact emitted by
    different steps are gathered under one catalog entry by the read API.  It can also
    hold one object directly (`Artifact(name="config", data={...})`), as FlowyML's
    generic Artifact does.
    """

    kind = "artifact"
    default_name = "artifact"
    stem = "artifact"

    def __init__(
        self,
        name: str | None = None,
        type: str = "artifact",
        data: Any = None,
        version: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        upload: bool = False,
        serializer: str | None = None,
        file_name: str | None = None,
    ) -> None:
        kind = str(type).strip().lower()
        if kind not in _KINDS:
            raise ValueError(
                f"Artifact type {type!r} is not one of DATA, MODEL, REPORT or 'artifact'"
            )
        super().__init__(
            data, name, version, metadata, upload=upload, serializer=serializer,
            file_name=file_name,
        )
        self.kind = "dataset" if kind == "data" else kind  # type: ignore[misc]
        self.files: dict[str, FileSlot] = {}

    def __repr__(self) -> str:
        return f"Artifact(name={self.name!r}, type={self.kind.upper()})"

    def File(
        self, name: str, type: str | None = None, *, serializer: str | None = None
    ) -> FileSlot:
        """Declare one file of this artifact; the same name twice is an error."""
        from router.manifest import FileEntry

        try:
            entry = FileEntry(path="x", name=name, type=type)
        except Exception as exc:  # pydantic's ValidationError, in the manifest's words
            raise ValueError(f"{self!r}.File(name={name!r}): {_first_error(exc)}") from None
        slot = FileSlot(self, name, entry.type if type is None else type, serializer, type)
        if name in self.files:
            raise ValueError(
                f"file name {name!r} is declared twice in {self!r}: first as "
                f"{self.files[name]!r}, again as {slot!r}; give one of them another name"
            )
        self.files[name] = slot
        return slot


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        for err in errors():
            ctx = err.get("ctx") or {}
            return str(ctx.get("message") or err.get("msg"))
    return str(exc)


def _files_entry(artifact: Artifact, values: list[FileValue], directory: Path, rel: str
                 ) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    recorded: dict[str, Any] = {}
    for value in values:
        slot = value.slot
        hint_name = slot.name if "." in slot.name else f"{slot.name}.{slot.type}"
        written = _write_object(
            value.data, directory, stem=slot.name, file_name=hint_name,
            requested=slot.serializer,
        )
        # Written under the declared name (the hint only chose the serializer).
        if written.file_name != slot.name:
            os.replace(directory / written.file_name, directory / slot.name)
        file_entry: dict[str, Any] = {"path": f"{rel}/{slot.name}", "name": slot.name}
        if slot.type:
            file_entry["type"] = slot.type
        files.append(file_entry)
        recorded[slot.name] = {"serializer": written.serializer, "python_type": written.python_type}
    entry: dict[str, Any] = {
        "type": artifact.kind, "name": artifact.name, "upload": artifact.upload, "files": files,
        "metadata": {**artifact.metadata, META_LAYOUT: "files", META_FILES: recorded},
    }
    if artifact.version is not None:
        entry["version"] = artifact.version
    return entry


# --- run context ------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    pipeline: str
    run_id: str
    step_name: str


_run_context: ContextVar[dict[str, str] | None] = ContextVar("router_run", default=None)
_process_run_id: str | None = None
_process_lock = threading.Lock()


@contextlib.contextmanager
def run_context(
    pipeline: str | None = None, run_id: str | None = None
) -> Iterator[dict[str, str]]:
    """Emit everything inside the block under this pipeline and run id (nests)."""
    outer = _run_context.get() or {}
    inner = dict(outer)
    if pipeline is not None:
        inner["pipeline"] = pipeline
    if run_id is not None:
        inner["run_id"] = run_id
    token = _run_context.set(inner)
    try:
        yield inner
    finally:
        _run_context.reset(token)


def _generated_run_id() -> str:
    global _process_run_id
    with _process_lock:
        if _process_run_id is None:
            _process_run_id = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        return _process_run_id


def _argo_template_name(env: Mapping[str, str]) -> str | None:
    raw = env.get("ARGO_TEMPLATE")
    if not raw:
        return None
    try:
        name = json.loads(raw).get("name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def resolve_context(
    pipeline: str | None = None,
    run_id: str | None = None,
    step_name: str | None = None,
    *,
    default_step: str | None = None,
    env: Mapping[str, str] | None = None,
) -> StepContext:
    """Where an emit belongs: arguments, then `run_context`, then the environment.

    pipeline: ROUTER_PIPELINE, then Airflow's AIRFLOW_CTX_DAG_ID.
    run_id: ROUTER_RUN_ID, then AIRFLOW_CTX_DAG_RUN_ID, then Argo's ARGO_WORKFLOW_NAME,
    then one id generated per process (so the steps of one script share a run).
    step: ROUTER_STEP_NAME, then AIRFLOW_CTX_TASK_ID, then the name in Argo's
    ARGO_TEMPLATE, then `default_step` (the function name under @step).
    """
    env = os.environ if env is None else env
    ctx = _run_context.get() or {}
    pipeline = (
        pipeline or ctx.get("pipeline") or env.get("ROUTER_PIPELINE")
        or env.get("AIRFLOW_CTX_DAG_ID")
    )
    if not pipeline:
        raise ValueError(
            "no pipeline name: pass pipeline=, use router.sdk.run_context(pipeline=...), or "
            "set ROUTER_PIPELINE (Airflow's AIRFLOW_CTX_DAG_ID is used when present)"
        )
    run_id = (
        run_id or ctx.get("run_id") or env.get("ROUTER_RUN_ID")
        or env.get("AIRFLOW_CTX_DAG_RUN_ID") or env.get("ARGO_WORKFLOW_NAME")
        or _generated_run_id()
    )
    step_name = (
        step_name or env.get("ROUTER_STEP_NAME") or env.get("AIRFLOW_CTX_TASK_ID")
        or _argo_template_name(env) or default_step
    )
    if not step_name:
        raise ValueError(
            "no step name: pass step_name= or set ROUTER_STEP_NAME (Airflow's "
            "AIRFLOW_CTX_TASK_ID and Argo's ARGO_TEMPLATE are used when present)"
        )
    return StepContext(pipeline=str(pipeline), run_id=str(run_id), step_name=str(step_name))


# --- emit -------------------------------------------------------------------------------


@dataclass
class Emission:
    """What `emit` handed over: the event id, the manifest, where it went."""

    event_id: str
    manifest: dict[str, Any]
    transport: str
    bundle: Path | None = None
    topic: str | None = None
    refs: list[str] = field(default_factory=list)


def _flatten(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, list | tuple):
            out.extend(_flatten(item))
        elif item is not None:
            out.append(item)
    return out


def _input_refs(value: Any, *, strings: bool = True) -> list[str]:
    """Lineage references named by `value`: a ref string (when `strings`), an emitted
    artifact, a read artifact or step (router.client), or a list/tuple/dict of those."""
    if isinstance(value, str):
        return [value] if strings else []
    if isinstance(value, list | tuple | set | frozenset):
        return [r for v in value for r in _input_refs(v, strings=strings)]
    if isinstance(value, dict) and not isinstance(value, _ValuesArtifact):
        return [r for v in value.values() for r in _input_refs(v, strings=strings)]
    refs = getattr(value, "artifact_refs", None)
    if isinstance(refs, list):
        return [r for r in refs if isinstance(r, str)]
    ref = getattr(value, "ref", None)
    return [ref] if isinstance(ref, str) else []


def _resolve_spool(spool: str | os.PathLike[str] | None) -> Path:
    if spool is not None:
        return Path(spool)
    if os.environ.get("ROUTER_SPOOL"):
        return Path(os.environ["ROUTER_SPOOL"])
    from router.config import load_config

    return Path(load_config().config.router.spool)


_last_ns = 0


def _new_event_id(ctx: StepContext) -> str:
    """Sortable by emission time (the spool takes a batch of bundles in name order)."""
    global _last_ns
    with _process_lock:
        now = max(time.time_ns(), _last_ns + 1000)
        _last_ns = now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 1_000_000_000))
    micros = (now // 1000) % 1_000_000
    step = re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.step_name)[:40]
    return f"{stamp}.{micros:06d}Z-{step}-{uuid.uuid4().hex[:8]}"


def _build(
    artifacts: list[Any], directory: Path, cache_key: str | None
) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """Manifest entries (files written under `directory`) and (object, name) pairs."""
    entries: list[dict[str, Any]] = []
    owners: list[tuple[Any, str]] = []
    grouped: dict[int, tuple[Artifact, list[FileValue]]] = {}
    order: list[Any] = []
    for item in artifacts:
        if isinstance(item, FileValue):
            art = item.artifact
            if id(art) not in grouped:
                grouped[id(art)] = (art, [])
                order.append(art)
            grouped[id(art)][1].append(item)
        elif isinstance(item, _ObjectArtifact | _ValuesArtifact):
            order.append(item)
        else:
            raise TypeError(
                f"cannot emit {type(item).__name__}: wrap it in Model, Dataset, Metrics, "
                "Parameters, Report or Artifact (or an Artifact's File)"
            )
    for index, item in enumerate(order):
        rel = f"a{index}"
        if isinstance(item, Artifact) and id(item) in grouped:
            values = grouped[id(item)][1]
            if item.data is not None:
                raise ValueError(f"{item!r} holds data and declared files; use one or the other")
            entry = _files_entry(item, values, directory / rel, rel)
            owners.extend((v, item.name) for v in values)
        else:
            if isinstance(item, Artifact) and item.data is None:
                raise ValueError(
                    f"{item!r} has no data: emit its files (slot(data)) or give data="
                )
            entry = item._entry(directory / rel, rel)
        owners.append((item, item.name))
        if cache_key is not None:
            entry.setdefault("metadata", {})[META_CACHE_KEY] = cache_key
        entries.append(entry)
    return entries, owners


def emit(
    *artifacts: Any,
    run_id: str | None = None,
    step_name: str | None = None,
    pipeline: str | None = None,
    inputs: Iterable[Any] = (),
    stack: str | None = None,
    spool: str | os.PathLike[str] | None = None,
    cache_key: str | None = None,
    event_id: str | None = None,
    transport: str | None = None,
    topic: str | None = None,
    run_status: str | None = None,
) -> Emission:
    """Hand artifacts to the router as one event (one bundle, or one MQTT message).

    `run_status` ("finished", "failed" or "killed") says this is the run's last step:
    the catalog and the trackers that keep a run status record how the run ended.

    Spool: `spool=`, else $ROUTER_SPOOL, else the config's `router.spool`.  The stack is
    `stack=`, else the innermost `router.use_stack(...)` block.  `transport="mqtt"` (or
    ROUTER_TRANSPORT=mqtt) publishes through the config's `router.mqtt` settings instead.
    """
    items = _flatten(artifacts)
    if not items:
        raise ValueError("nothing to emit: pass at least one artifact")
    ctx = resolve_context(pipeline, run_id, step_name)
    return _emit(items, ctx, inputs=_input_refs(list(inputs)), stack=stack, spool=spool,
                 cache_key=cache_key, event_id=event_id, transport=transport, topic=topic,
                 run_status=run_status)


def _emit(
    items: list[Any],
    ctx: StepContext,
    *,
    inputs: list[str],
    stack: str | None,
    spool: str | os.PathLike[str] | None,
    cache_key: str | None,
    event_id: str | None,
    transport: str | None,
    topic: str | None,
    run_status: str | None = None,
) -> Emission:
    transport = (transport or os.environ.get("ROUTER_TRANSPORT") or "spool").lower()
    if transport not in ("spool", "mqtt"):
        raise ValueError(f"transport {transport!r} is not 'spool' or 'mqtt'")
    event_id = event_id or _new_event_id(ctx)
    # Both name folders (incoming/.tmp-<id>, the MQTT staging folder): check first.
    _check_plain_name(event_id, "event_id", "another event_id")
    if transport == "spool" and event_id.startswith("."):
        raise ValueError(f"event_id={event_id!r}: the daemon never reads a bundle whose name "
                         "starts with '.' (DESIGN 2); give an event_id without a leading '.'")
    stack = stack or current_stack()
    if transport == "mqtt":
        return _emit_mqtt(items, ctx, inputs=inputs, stack=stack, cache_key=cache_key,
                          event_id=event_id, topic=topic or os.environ.get("ROUTER_MQTT_TOPIC"),
                          run_status=run_status)
    incoming = _resolve_spool(spool) / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    final = incoming / event_id
    if final.exists():
        raise FileExistsError(f"{final} already exists: give this event another id")
    tmp = incoming / f".tmp-{event_id}"
    tmp.mkdir()
    try:
        manifest, owners = _manifest(items, ctx, tmp, inputs, stack, cache_key, event_id,
                                     run_status)
        _write_durably(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _emitted(Emission(event_id, manifest, "spool", bundle=final), ctx, owners)


def _manifest(
    items: list[Any], ctx: StepContext, directory: Path, inputs: list[str],
    stack: str | None, cache_key: str | None, event_id: str, run_status: str | None = None,
) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    entries, owners = _build(items, directory, cache_key)
    manifest: dict[str, Any] = {
        "manifest_version": 1, "id": event_id, "pipeline": ctx.pipeline,
        "run_id": ctx.run_id, "step_name": ctx.step_name, "artifacts": entries,
    }
    if stack:
        manifest["stack"] = stack
    if inputs:
        manifest["inputs"] = list(dict.fromkeys(inputs))
    if run_status is not None:
        manifest["run_status"] = run_status
    try:
        parse_manifest(manifest)
    except ManifestError as exc:
        raise ManifestError(exc.problems) from None
    return manifest, owners


def _emitted(emission: Emission, ctx: StepContext, owners: list[tuple[Any, str]]) -> Emission:
    for obj, name in owners:
        ref = f"{ctx.pipeline}/{ctx.run_id}/{ctx.step_name}/{name}"
        obj._bind(ref, emission.event_id)
        if ref not in emission.refs:
            emission.refs.append(ref)
    return emission


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="router-emit")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return typing.cast(T, box["value"])


def _emit_mqtt(
    items: list[Any], ctx: StepContext, *, inputs: list[str], stack: str | None,
    cache_key: str | None, event_id: str, topic: str | None, run_status: str | None = None,
) -> Emission:
    from router.config import load_config

    loaded = load_config()
    settings = loaded.config.router.mqtt
    if settings is None:
        raise ValueError(
            f"transport mqtt needs a router.mqtt section in the config ({loaded.source})"
        )
    from router.sources.mqtt import publish_manifest  # lazily: only MQTT users need it

    # Files above the inline cap travel as file:// URIs, so they must outlive this call:
    # they are staged under ROUTER_MQTT_STAGING (default <state_dir>/outbox), which must
    # be one of the router's router.mqtt.allowed_roots.
    staging_root = Path(
        os.environ.get("ROUTER_MQTT_STAGING") or loaded.config.router.state_dir / "outbox"
    )
    staging = staging_root / event_id
    staging.mkdir(parents=True)
    try:
        manifest, owners = _manifest(items, ctx, staging, inputs, stack, cache_key, event_id,
                                     run_status)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        resolved_topic = topic
        _run_coroutine(lambda: publish_manifest(settings, manifest, files, resolved_topic))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if all(p.stat().st_size <= settings.inline_max_bytes for p in files):
        shutil.rmtree(staging, ignore_errors=True)  # everything travelled inline
    return _emitted(
        Emission(event_id, manifest, "mqtt", bundle=None, topic=topic), ctx, owners
    )


# --- @step ------------------------------------------------------------------------------


def _annotated_slots(
    fn: Callable[..., Any], scope: Mapping[str, Any] | None = None
) -> list[FileSlot | None] | None:
    """`-> SLOT` or `-> tuple[SLOT_A, SLOT_B]`: the declared files a step returns.

    String annotations (`from __future__ import annotations`) are evaluated in the
    function's globals and `scope` (the locals where the decorator was applied).
    """
    try:
        hints = inspect.get_annotations(fn, eval_str=True, locals=dict(scope or {}))
    except Exception:
        return None
    ret = hints.get("return")
    if isinstance(ret, FileSlot):
        return [ret]
    args = typing.get_args(ret)
    if args and typing.get_origin(ret) is tuple and any(isinstance(a, FileSlot) for a in args):
        return [a if isinstance(a, FileSlot) else None for a in args]
    return None


def _wrap_result(result: Any, slots: list[FileSlot | None] | None) -> Any:
    """Plain values returned for declared files become those files' values."""
    if slots is None:
        return result
    if len(slots) == 1:
        slot = slots[0]
        return result if slot is None or isinstance(result, _Emittable) else slot(result)
    if not isinstance(result, tuple) or len(result) != len(slots):
        raise TypeError(f"the step declares {len(slots)} outputs; return a tuple of them")
    return tuple(
        v if s is None or isinstance(v, _Emittable) else s(v)
        for s, v in zip(slots, result, strict=True)
    )


def _emittables(result: Any, step_name: str) -> list[Any]:
    if isinstance(result, list | tuple):
        items = [x for x in _flatten(result) if isinstance(x, _Emittable)]
    else:
        items = [result] if isinstance(result, _Emittable) else []
    if not items and result is not None:
        warnings.warn(
            f"step {step_name!r} returned {type(result).__name__} and no artifact, so it "
            "emitted nothing; wrap values in Model, Dataset, Metrics, ... or declare the "
            "files it returns with outputs= (or a return annotation)",
            stacklevel=3,
        )
    return items


F = TypeVar("F", bound=Callable[..., Any])


@overload
def step(fn: F, /) -> F: ...


@overload
def step(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    pipeline: str | None = None,
    run_id: str | None = None,
    inputs: Iterable[Any] = (),
    stack: str | None = None,
    spool: str | os.PathLike[str] | None = None,
    cache_key: str | Callable[..., str] | None = None,
    transport: str | None = None,
    outputs: Iterable[FileSlot] | None = None,
) -> Callable[[F], F]: ...


def step(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    pipeline: str | None = None,
    run_id: str | None = None,
    inputs: Iterable[Any] = (),
    stack: str | None = None,
    spool: str | os.PathLike[str] | None = None,
    cache_key: str | Callable[..., str] | None = None,
    transport: str | None = None,
    outputs: Iterable[FileSlot] | None = None,
) -> F | Callable[[F], F]:
    """Emit what the function returns (an artifact, or a tuple of them) as one event.

    The step name is `name=`, else ROUTER_STEP_NAME (or the orchestrator's own, see
    `resolve_context`), else the function's name.  Emitted artifacts (and artifacts read
    through router.client) passed as arguments become the event's lineage inputs.
    `cache_key` (a string, or a function of the step's arguments) is recorded in every
    artifact's metadata for `router.cached`.  Coroutine functions work too.

    Domino-style: a step may return plain values for declared files, named by
    `outputs=[slot, ...]` or by its return annotation (`-> slot` or
    `-> tuple[slot_a, slot_b]`); each value is emitted as that file.
    """
    scope = dict(sys._getframe(1).f_locals)  # for annotations naming local slots

    def decorate(func: F) -> F:
        slots: list[FileSlot | None] | None = (
            list(outputs) if outputs is not None else _annotated_slots(func, scope)
        )

        def prepare(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[StepContext,
                                                                              list[str],
                                                                              str | None]:
            ctx = resolve_context(pipeline, run_id, name, default_step=func.__name__)
            # Arguments count by the artifacts they carry; plain strings are just values.
            refs = _input_refs(list(inputs)) + _input_refs(
                [*args, *kwargs.values()], strings=False
            )
            key = cache_key(*args, **kwargs) if callable(cache_key) else cache_key
            return ctx, list(dict.fromkeys(refs)), key

        def finish(result: Any, ctx: StepContext, refs: list[str], key: str | None) -> Any:
            result = _wrap_result(result, slots)
            items = _emittables(result, ctx.step_name)
            if items:
                _emit(items, ctx, inputs=refs, stack=stack, spool=spool, cache_key=key,
                      event_id=None, transport=transport, topic=None)
            return result

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx, refs, key = prepare(args, kwargs)
                result = await func(*args, **kwargs)
                return await asyncio.to_thread(finish, result, ctx, refs, key)

            return typing.cast(F, async_wrapper)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx, refs, key = prepare(args, kwargs)
            return finish(func(*args, **kwargs), ctx, refs, key)

        return typing.cast(F, wrapper)

    if fn is not None:
        return decorate(fn)
    return decorate
