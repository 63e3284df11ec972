"""Manifest v1: the language-neutral contract between pipeline steps and the router.

Every emitter (bash, R, Spark, the Python SDK, an MQTT publisher) writes this JSON.
The models here are the single source of truth: `artifact-router schema` prints the
JSON Schema generated from them (`manifest_json_schema`), and intake validates
against them (`parse_manifest`).
"""

from __future__ import annotations

import binascii
import math
import os
import posixpath
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.detect import detect_dataset_format, detect_framework, detect_framework_bytes
from router.errors import Problem, did_you_mean

__all__ = [
    "LIMITS",
    "AnyArtifact",
    "ArtifactKind",
    "DatasetArtifact",
    "FileEntry",
    "GenericArtifact",
    "Limits",
    "Manifest",
    "ManifestError",
    "MetricsArtifact",
    "ModelArtifact",
    "ParametersArtifact",
    "ReportArtifact",
    "apply_detection",
    "manifest_json_schema",
    "parse_manifest",
    "upload_override",
]


class ArtifactKind(StrEnum):
    MODEL = "model"
    DATASET = "dataset"
    METRICS = "metrics"
    PARAMETERS = "parameters"
    REPORT = "report"
    ARTIFACT = "artifact"


# Aliases accepted on input, compared case-insensitively.  DATA is Domino Flows' name.
_KIND_ALIASES = {kind.value: kind for kind in ArtifactKind} | {"data": ArtifactKind.DATASET}
_KIND_TAGS = {alias: kind.value for alias, kind in _KIND_ALIASES.items()}  # no enum access
_KIND_HELP = "use one of model, dataset (or data), metrics, parameters, report, artifact"


class Limits(BaseModel):
    """Hard caps that keep one bad manifest from costing memory or time."""

    manifest_bytes: int = 16 * 1024 * 1024
    artifacts_per_manifest: int = 1_000
    files_per_artifact: int = 10_000
    inputs_per_manifest: int = 1_000
    values_per_artifact: int = 10_000
    name_length: int = 256
    path_length: int = 1_024
    string_value_length: int = 65_536
    version_length: int = 128
    file_type_length: int = 32


LIMITS = Limits()

# Names end up in object keys and file paths: no control characters, no slashes.
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f/\\]")  # C0, DEL and C1 controls
_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f/\\]+$"


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if _NAME_FORBIDDEN.search(value):
        raise ValueError("must not contain '/', '\\' or control characters")
    if value in (".", ".."):
        raise ValueError("must not be '.' or '..'")
    return value


def _name_input(value: Any) -> Any:
    # Numbers are accepted as names (run_id: 42) and read as text; anything else is
    # left to the str validator, which names the wrong type.
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return _check_name(value) if isinstance(value, str) else value


SafeName = Annotated[
    str,
    Field(min_length=1, max_length=LIMITS.name_length, pattern=_NAME_PATTERN),
    BeforeValidator(_name_input),
]


def _kind_schema(*spellings: str) -> dict[str, Any]:
    """Case-insensitive JSON Schema pattern, portable to validators without (?i)."""
    alts = "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in s) for s in spellings)
    return {"type": "string", "pattern": f"^({alts})$"}


def _normalise_kind(value: Any) -> Any:
    if isinstance(value, str):
        kind = _KIND_ALIASES.get(value.strip().lower())
        if kind is None:
            raise ValueError(f"unknown artifact type {value!r}; {_KIND_HELP}")
        return kind.value
    return value


def _kind_field(kind: ArtifactKind, *spellings: str) -> Any:
    return Annotated[
        Literal[kind.value],
        BeforeValidator(_normalise_kind),
        WithJsonSchema(_kind_schema(*(spellings or (kind.value,)))),
    ]


def _located(message: str, at: str = "", value: Any = None) -> PydanticCustomError:
    """A validation error that names a field below the model raising it (`files[1].name`)."""
    context = {"message": message, "at": at, "value": value}
    return PydanticCustomError("located", "{message}", context)


def check_relative_path(value: str) -> str:
    """A bundle-relative path: never absolute, never climbing out, never ambiguous."""
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    if "\\" in value:
        raise ValueError("must use '/' as separator, not '\\'")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        raise ValueError("must be relative to the bundle, not absolute")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError("must not contain '..'; keep every file inside the bundle")
    normalised = posixpath.normpath(value)
    if normalised in (".", ""):
        raise ValueError("must name a file inside the bundle")
    return normalised


_FILE_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _check_file_type(value: Any) -> Any:
    if isinstance(value, str) and not _FILE_TYPE.match(value):
        raise ValueError(
            "must be a file type such as 'pdf' or 'csv': letters, digits, '.', '_', "
            "'+' and '-' only"
        )
    return value


class FileEntry(BaseModel):
    """One file of an artifact: by bundle path, by URI (MQTT) or inline (MQTT, small).

    Give exactly one of `path`, `uri` and `content_base64`.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["path"]},
                {"required": ["uri"]},
                {"required": ["content_base64"]},
            ]
        },
    )

    path: Annotated[str, Field(max_length=LIMITS.path_length)] | None = Field(
        default=None, description="relative to the bundle directory; no '..', not absolute"
    )
    uri: Annotated[str, Field(max_length=LIMITS.path_length)] | None = Field(
        default=None, description="file:// (under an allowed root), s3:// or gs://"
    )
    content_base64: str | None = Field(
        default=None, description="the file's bytes, base64; small files only (MQTT)"
    )
    name: SafeName | None = Field(default=None, description="defaults to the basename")
    type: (
        Annotated[
            str,
            Field(max_length=LIMITS.file_type_length, pattern=_FILE_TYPE.pattern),
            BeforeValidator(_check_file_type),
        ]
        | None
    ) = Field(
        default=None, description="defaults to the extension; required when the name has none"
    )

    @field_validator("path")
    @classmethod
    def _path_inside_bundle(cls, value: str | None) -> str | None:
        return None if value is None else check_relative_path(value)

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^(file|s3|gs)://", value):
            raise ValueError("must start with file://, s3:// or gs://")
        if "\x00" in value:
            raise ValueError("must not contain NUL bytes")
        return value

    @field_validator("content_base64")
    @classmethod
    def _is_base64(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError) as exc:
            raise ValueError(f"is not valid base64 ({exc})") from None
        return value

    @model_validator(mode="after")
    def _one_source_and_derived_fields(self) -> FileEntry:
        given = [k for k in ("path", "uri", "content_base64") if getattr(self, k) is not None]
        if len(given) != 1:
            raise _located(
                "give exactly one of 'path' (spool bundles), 'uri' or 'content_base64' "
                f"(MQTT); got {', '.join(given) or 'none'}",
                value=given or None,
            )
        if self.name is None:
            source = self.path or self.uri or ""
            base = posixpath.basename(source.rstrip("/"))
            try:
                self.name = _check_name(base)
            except ValueError:
                raise _located(
                    "cannot be taken from 'path' or 'uri'; give 'name'", at="name", value=base
                ) from None
        if self.type is None:
            ext = os.path.splitext(self.name)[1].lstrip(".").lower()
            if not ext:
                raise _located(
                    f"file {self.name!r} has no extension, so 'type' is required: add "
                    '"type" (for example "txt" or "pdf")',
                    at="name",
                    value=self.name,
                )
            self.type = ext
        return self

    @property
    def source(self) -> str:
        """Where the bytes come from, as a person reads it."""
        if self.path is not None:
            return f"path {self.path!r}"
        if self.uri is not None:
            return f"uri {self.uri!r}"
        return "inline content_base64"


Metadata = Annotated[dict[str, Any], Field(default_factory=dict)]


def _version_input(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    return _check_name(value) if isinstance(value, str) else value


class _ArtifactBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: SafeName
    version: (
        Annotated[
            str,
            Field(max_length=LIMITS.version_length, pattern=_NAME_PATTERN),
            BeforeValidator(_version_input),
        ]
        | None
    ) = None
    upload: bool = Field(
        default=False,
        description="copy the files to the stack's store; FLOWYML_UPLOAD_ALL_ARTIFACTS "
        "overrides it",
    )
    files: Annotated[list[FileEntry], Field(max_length=LIMITS.files_per_artifact)] = Field(
        default_factory=list
    )
    metadata: Metadata

    @model_validator(mode="after")
    def _unique_file_names(self) -> Any:
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.files):
            assert entry.name is not None
            if entry.name in seen:
                first = seen[entry.name]
                raise _located(
                    f"file name {entry.name!r} appears twice in this artifact: files[{first}] "
                    f"({self.files[first].source}) and files[{index}] ({entry.source}); "
                    "give one of them a different 'name'",
                    at=f"files[{index}].name",
                    value=entry.name,
                )
            seen[entry.name] = index
        return self

    @property
    def kind(self) -> ArtifactKind:
        return _KIND_ALIASES[self.type]  # type: ignore[attr-defined]  # no enum call per access

    def metrics(self) -> dict[str, float]:
        """Numeric metrics attached to this artifact (used by deploy conditions)."""
        raw = self.metadata.get("metrics", {})
        if not isinstance(raw, dict):
            return {}
        return {
            str(k): float(v)
            for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


class ModelArtifact(_ArtifactBase):
    """FlowyML's Model: version, framework, serving_config, input/output schema, metadata."""

    type: _kind_field(ArtifactKind.MODEL)  # type: ignore[valid-type]
    framework: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="detected from the model file when absent"
    )
    serving_config: dict[str, Any] = Field(default_factory=dict)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


class DatasetArtifact(_ArtifactBase):
    type: _kind_field(ArtifactKind.DATASET, "dataset", "data")  # type: ignore[valid-type]
    format: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="detected from the file extension when absent"
    )
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    statistics: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _format_from_extension(self) -> DatasetArtifact:
        if self.format is None:
            for entry in self.files:
                found = detect_dataset_format(entry.name or "") or detect_dataset_format(
                    f"file.{entry.type}"
                )
                if found:
                    self.format = found
                    break
        return self


MAX_STEP = 2**63 - 1


def _finite(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


Number = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_finite)]


class MetricsArtifact(_ArtifactBase):
    type: _kind_field(ArtifactKind.METRICS)  # type: ignore[valid-type]
    values: Annotated[dict[str, Number], Field(max_length=LIMITS.values_per_artifact)]
    # Up to a signed 64-bit integer: what the catalog and every tracker store a step as.
    step: Annotated[int, Field(ge=0, le=MAX_STEP)] | None = None


def _bounded_value(value: Any) -> Any:
    if isinstance(value, str) and len(value) > LIMITS.string_value_length:
        raise ValueError(
            f"string of {len(value)} characters is over the limit of "
            f"{LIMITS.string_value_length}; store large values as a file"
        )
    return value


class ParametersArtifact(_ArtifactBase):
    type: _kind_field(ArtifactKind.PARAMETERS)  # type: ignore[valid-type]
    values: Annotated[
        dict[str, Annotated[Any, BeforeValidator(_bounded_value)]],
        Field(max_length=LIMITS.values_per_artifact),
    ]


class ReportArtifact(_ArtifactBase):
    type: _kind_field(ArtifactKind.REPORT)  # type: ignore[valid-type]


class GenericArtifact(_ArtifactBase):
    type: _kind_field(ArtifactKind.ARTIFACT)  # type: ignore[valid-type]


def _artifact_tag(value: Any) -> str | None:
    raw = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(raw, str):
        return None
    return _KIND_TAGS.get(raw.strip().lower())


AnyArtifact = Annotated[
    Annotated[ModelArtifact, Tag("model")]
    | Annotated[DatasetArtifact, Tag("dataset")]
    | Annotated[MetricsArtifact, Tag("metrics")]
    | Annotated[ParametersArtifact, Tag("parameters")]
    | Annotated[ReportArtifact, Tag("report")]
    | Annotated[GenericArtifact, Tag("artifact")],
    Discriminator(
        _artifact_tag,
        custom_error_type="artifact_type",
        custom_error_message=f"unknown or missing artifact 'type'; {_KIND_HELP}",
    ),
]

_LINEAGE_REF = re.compile(r"^[^/\x00-\x1f]+/[^/\x00-\x1f]+/[^/\x00-\x1f]+/[^/\x00-\x1f]+$")


def _check_lineage(value: Any) -> Any:
    if isinstance(value, str) and not _LINEAGE_REF.match(value):
        raise ValueError("must be 'pipeline/run_id/step_name/artifact_name'")
    return value


def _check_manifest_version(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be the number 1, not true/false")
    return value


_RUN_STATUSES = ("finished", "failed", "killed")  # MLflow's terminal RunStatus values


def _normalise_run_status(value: Any) -> Any:
    if isinstance(value, str):
        status = value.strip().lower()
        if status not in _RUN_STATUSES:
            raise ValueError(f"unknown run_status {value!r}; use finished, failed or killed "
                             "(any case), or leave it out while the run goes on")
        return status
    return value


class Manifest(BaseModel):
    """A step's hand-over: who produced what, and the files that carry it."""

    model_config = ConfigDict(
        extra="forbid",
        title="artifact-router manifest v1",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    manifest_version: Annotated[Literal[1], BeforeValidator(_check_manifest_version)]
    id: SafeName | None = Field(
        default=None,
        description="idempotency key; defaults to the bundle directory name",
    )
    pipeline: SafeName
    run_id: SafeName
    step_name: SafeName
    stack: SafeName | None = Field(
        default=None, description="stack for this event; --stack and ROUTER_STACK win over it"
    )
    inputs: Annotated[
        list[
            Annotated[
                str,
                Field(pattern=_LINEAGE_REF.pattern, max_length=4 * LIMITS.name_length + 3),
                BeforeValidator(_check_lineage),
            ]
        ],
        Field(max_length=LIMITS.inputs_per_manifest),
    ] = Field(default_factory=list, description="lineage: pipeline/run_id/step_name/artifact_name")
    artifacts: Annotated[
        list[AnyArtifact], Field(min_length=1, max_length=LIMITS.artifacts_per_manifest)
    ]
    run_status: Annotated[
        Literal["finished", "failed", "killed"] | None,
        BeforeValidator(_normalise_run_status),
        WithJsonSchema({"anyOf": [_kind_schema(*_RUN_STATUSES), {"type": "null"}]}),
    ] = Field(
        default=None,
        description="set by a run's last step: the run has ended, and how (finished, failed "
        "or killed; any case). Trackers that keep a run status are told (MLflow: status "
        "and end time; W&B: exit code; jsonl: a run_end line), and the catalog records it",
    )

    def linked_runs(self) -> list[tuple[str, str]]:
        """Its own (pipeline, run_id), then the runs its inputs name: an event is
        journaled after the held-back large events of these runs, so lineage finds them."""
        named = (tuple(ref.split("/")[:2]) for ref in self.inputs)
        return list(dict.fromkeys([
            (self.pipeline, self.run_id), *((r[0], r[1]) for r in named if len(r) == 2)]))


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest v1 (what `artifact-router schema` prints)."""
    return Manifest.model_json_schema()


class ManifestError(Exception):
    """A manifest that cannot be accepted, with one actionable problem per field."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(p.render() for p in problems))


_TAGS = {"model", "dataset", "metrics", "parameters", "report", "artifact"}


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            part in _TAGS
            and i >= 2
            and parts[i - 2] == "artifacts"
            and isinstance(parts[i - 1], int)
        ):
            continue  # the discriminator tag adds noise to the path a person reads
        elif not str(part).isidentifier():
            out += f"[{str(part)!r}]"  # an odd key (spaces, control characters) stays visible
        else:
            out += f".{part}" if out else str(part)
    return out or "(manifest)"


def _join(field: str, at: str) -> str:
    if not at:
        return field
    if field == "(manifest)":
        return at
    return field + at if at.startswith("[") else f"{field}.{at}"


def _type_problem(field: str, value: Any) -> Problem:
    if not isinstance(value, dict):
        return Problem(
            field=field,
            value=_preview(value),
            message="each artifact must be an object with a 'type' and a 'name'",
        )
    if "type" not in value:
        return Problem(field=f"{field}.type", message=f"required field is missing; {_KIND_HELP}")
    raw = value["type"]
    hint = did_you_mean(raw.strip().lower(), _KIND_ALIASES) if isinstance(raw, str) else ""
    return Problem(
        field=f"{field}.type",
        value=_preview(raw),
        message=f"unknown artifact type{hint}; {_KIND_HELP}",
    )


_TAG_MODELS: dict[str, type[_ArtifactBase]] = {
    "model": ModelArtifact,
    "dataset": DatasetArtifact,
    "metrics": MetricsArtifact,
    "parameters": ParametersArtifact,
    "report": ReportArtifact,
    "artifact": GenericArtifact,
}


def _fields_around(loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the object an unknown key was found in (for a did-you-mean)."""
    if len(loc) == 1:
        return list(Manifest.model_fields)
    if len(loc) >= 4 and loc[0] == "artifacts" and str(loc[2]) in _TAG_MODELS:
        model = _TAG_MODELS[str(loc[2])]
        if len(loc) == 4:
            return [f.alias or name for name, f in model.model_fields.items()]
        if len(loc) == 6 and loc[3] == "files":
            return list(FileEntry.model_fields)
    return []


def _message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        loc = tuple(err["loc"])
        hint = did_you_mean(str(loc[-1]), _fields_around(loc)) if loc else ""
        return (
            f"unknown field{hint}; remove it or check its spelling against `artifact-router schema`"
        )
    if kind == "missing":
        return "required field is missing"
    if kind == "too_long" and "max_length" in ctx:
        return f"has {ctx.get('actual_length')} items; the limit is {ctx['max_length']}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must hold at least one item"
    if kind == "string_too_long":
        return f"is longer than the limit of {ctx.get('max_length')} characters"
    if kind == "less_than_equal" and err["loc"][-1:] == ("step",):
        return (f"is over the largest step, {MAX_STEP} (a signed 64-bit integer); "
                "count steps from 0 (epochs, batches or a timestamp in seconds)")
    if kind == "literal_error" and err["loc"] == ("manifest_version",):
        return "must be the number 1"
    message: str = err["msg"].removeprefix("Value error, ")
    return message


def problems_from_validation(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        field = _loc(tuple(err["loc"]))
        value = err.get("input")
        if err["type"] == "artifact_type":
            problems.append(_type_problem(field, value))
            continue
        if err["type"] == "located":
            ctx = err.get("ctx") or {}
            problems.append(
                Problem(
                    field=_join(field, ctx.get("at", "")),
                    value=_preview(ctx.get("value")),
                    message=str(ctx.get("message", err["msg"])),
                )
            )
            continue
        if err["type"] in ("string_too_long", "too_long") and isinstance(value, str | list | dict):
            shown: Any = f"{len(value)} {'characters' if isinstance(value, str) else 'items'}"
        else:
            shown = None if err["type"] == "missing" else _preview(value)
        problems.append(Problem(field=field, value=shown, message=_message(err)))
    return problems


def _preview(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 120:
        return value[:117] + "..."
    if isinstance(value, dict | list):
        text = repr(value)
        return text if len(text) <= 120 else text[:117] + "..."
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def parse_manifest(
    data: bytes | str | dict[str, Any], *, bundle_dir: str | os.PathLike[str] | None = None
) -> Manifest:
    """Parse and validate a manifest; raise ManifestError naming every bad field.

    With `bundle_dir`, fields left out are then detected from the bundle's files
    (see `apply_detection`).
    """
    import orjson

    if isinstance(data, bytes | str):
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > LIMITS.manifest_bytes:
            raise ManifestError(
                [
                    Problem(
                        field="(manifest)",
                        value=f"{len(raw)} bytes",
                        message=f"manifest is over the {LIMITS.manifest_bytes} byte limit; "
                        "put large values in files",
                    )
                ]
            )
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(
                [Problem(field="(manifest)", value=None, message=f"not UTF-8 text: {exc}")]
            ) from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ManifestError(
                [Problem(field="(manifest)", value=None, message=f"not valid JSON: {exc}")]
            ) from None
    if not isinstance(data, dict):
        raise ManifestError(
            [
                Problem(
                    field="(manifest)",
                    value=_preview(data),
                    message="must be a JSON object with manifest_version, pipeline, run_id, "
                    "step_name and artifacts",
                )
            ]
        )
    version = data.get("manifest_version")
    if (
        "manifest_version" in data
        and isinstance(version, int)
        and not isinstance(version, bool)
        and version != 1
    ):
        raise ManifestError(
            [
                Problem(
                    field="manifest_version",
                    value=version,
                    message="this router reads manifest_version 1; upgrade the router or "
                    "emit version 1",
                )
            ]
        )
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(problems_from_validation(exc)) from None
    if bundle_dir is not None:
        apply_detection(manifest, bundle_dir)
    return manifest


def _inside(root: Path, path: Path) -> bool:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return False
    return resolved == root or root in resolved.parents


def apply_detection(manifest: Manifest, bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Fill `framework` of models that leave it out, from their files (in place).

    Reads at most the first 64 KiB of each bundle file (never unpickles), the decoded
    head of inline content, or only the name of a URI.  A file whose real path leaves
    the bundle is not opened.  The first specific answer wins over a plain 'pickle'.
    """
    import base64

    root = Path(bundle_dir).resolve()
    for artifact in manifest.artifacts:
        if not isinstance(artifact, ModelArtifact) or artifact.framework is not None:
            continue
        fallback: str | None = None
        for entry in artifact.files:
            found: str | None
            if entry.path is not None and _inside(root, root / entry.path):
                found = detect_framework(root / entry.path, entry.name)
            elif entry.content_base64 is not None:
                found = detect_framework_bytes(
                    base64.b64decode(entry.content_base64), entry.name or ""
                )
            else:
                found = detect_framework_bytes(b"", entry.name or "")
            if found and found != "pickle":
                artifact.framework = found
                break
            fallback = fallback or found
        else:
            artifact.framework = fallback
    return manifest


def upload_override(env: Mapping[str, str] | None = None) -> bool | None:
    """FLOWYML_UPLOAD_ALL_ARTIFACTS=true|false overrides every artifact's `upload`."""
    raw = (env if env is not None else os.environ).get("FLOWYML_UPLOAD_ALL_ARTIFACTS")
    if raw is None or raw.strip() == "":
        return None
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(
        f"FLOWYML_UPLOAD_ALL_ARTIFACTS={raw!r} is not a boolean; set it to true or false"
    )
