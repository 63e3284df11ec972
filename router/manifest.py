"""Manifest v1: the language-neutral contract between pipeline steps and the router.

Every emitter (bash, R, Spark, the Python SDK, an MQTT publisher) writes this JSON.
The models here are the single source of truth: `artifact-router schema` prints the
JSON Schema generated from them, and intake validates against them.
"""

from __future__ import annotations

import os
import posixpath
import re
from enum import StrEnum
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

from router.errors import Problem

__all__ = [
    "LIMITS",
    "AnyArtifact",
    "ArtifactKind",
    "DatasetArtifact",
    "FileEntry",
    "GenericArtifact",
    "Manifest",
    "ManifestError",
    "MetricsArtifact",
    "ModelArtifact",
    "ParametersArtifact",
    "ReportArtifact",
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


LIMITS = Limits()

# Names end up in object keys and file paths: no control characters, no slashes.
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\]")


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if _NAME_FORBIDDEN.search(value):
        raise ValueError("must not contain '/', '\\' or control characters")
    return value


Name = Annotated[str, Field(min_length=1, max_length=LIMITS.name_length), BeforeValidator(str)]
SafeName = Annotated[
    str,
    Field(min_length=1, max_length=LIMITS.name_length),
    BeforeValidator(lambda v: _check_name(str(v)) if isinstance(v, str | int) else v),
]


def _normalise_kind(value: Any) -> Any:
    if isinstance(value, str):
        kind = _KIND_ALIASES.get(value.strip().lower())
        if kind is None:
            raise ValueError(
                f"unknown artifact type {value!r}; use one of "
                "model, dataset (or data), metrics, parameters, report, artifact"
            )
        return kind.value
    return value


def _kind_schema(*spellings: str) -> dict[str, Any]:
    """Case-insensitive JSON Schema pattern, portable to validators without (?i)."""
    alts = "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in s) for s in spellings)
    return {"type": "string", "pattern": f"^({alts})$"}


def _kind_field(kind: ArtifactKind, *spellings: str) -> Any:
    return Annotated[
        Literal[kind.value],  # type: ignore[valid-type]
        BeforeValidator(_normalise_kind),
        WithJsonSchema(_kind_schema(*(spellings or (kind.value,)))),
    ]


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


class FileEntry(BaseModel):
    """One file of an artifact: by bundle path, by URI (MQTT) or inline (MQTT, small)."""

    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, Field(max_length=LIMITS.path_length)] | None = None
    uri: Annotated[str, Field(max_length=LIMITS.path_length)] | None = None
    content_base64: str | None = None
    name: SafeName | None = Field(default=None, description="defaults to the basename")
    type: Annotated[str, Field(max_length=32)] | None = Field(
        default=None, description="defaults to the extension; required when the name has none"
    )

    @field_validator("path")
    @classmethod
    def _path_inside_bundle(cls, value: str | None) -> str | None:
        return None if value is None else check_relative_path(value)

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(file|s3|gs)://", value):
            raise ValueError("must start with file://, s3:// or gs://")
        return value

    @model_validator(mode="after")
    def _one_source_and_derived_fields(self) -> FileEntry:
        given = [k for k in ("path", "uri", "content_base64") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of 'path' (spool bundles), 'uri' or 'content_base64' "
                f"(MQTT); got {', '.join(given) or 'none'}"
            )
        if self.name is None:
            source = self.path or self.uri or ""
            base = posixpath.basename(source.rstrip("/"))
            if not base:
                raise ValueError("'name' is required when it cannot be taken from 'path' or 'uri'")
            self.name = _check_name(base)
        if self.type is None:
            ext = os.path.splitext(self.name)[1].lstrip(".").lower()
            if not ext:
                raise ValueError(
                    f"file {self.name!r} has no extension: add 'type' (for example \"txt\")"
                )
            self.type = ext
        return self


Metadata = Annotated[dict[str, Any], Field(default_factory=dict)]


class _ArtifactBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: SafeName
    version: Annotated[str, Field(max_length=128), BeforeValidator(str)] | None = None
    upload: bool = False
    files: Annotated[list[FileEntry], Field(max_length=LIMITS.files_per_artifact)] = Field(
        default_factory=list
    )
    metadata: Metadata

    @field_validator("version")
    @classmethod
    def _version_is_safe(cls, value: str | None) -> str | None:
        return None if value is None else _check_name(value)

    @model_validator(mode="after")
    def _unique_file_names(self) -> Any:
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.files):
            assert entry.name is not None
            if entry.name in seen:
                first = seen[entry.name]
                raise ValueError(
                    f"file name {entry.name!r} appears twice: files[{first}] "
                    f"({_describe(self.files[first])}) and files[{index}] "
                    f"({_describe(entry)}); give one of them a different 'name'"
                )
            seen[entry.name] = index
        return self

    @property
    def kind(self) -> ArtifactKind:
        return ArtifactKind(self.type)  # type: ignore[attr-defined]

    def metrics(self) -> dict[str, float]:
        """Numeric metrics attached to this artifact (used by deploy conditions)."""
        raw = self.metadata.get("metrics", {})
        if not isinstance(raw, dict):
            return {}
        return {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}


def _describe(entry: FileEntry) -> str:
    if entry.path is not None:
        return f"path {entry.path!r}"
    if entry.uri is not None:
        return f"uri {entry.uri!r}"
    return "inline content"


class ModelArtifact(_ArtifactBase):
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


Number = Annotated[float, Field(allow_inf_nan=False)]


class MetricsArtifact(_ArtifactBase):
    type: _kind_field(ArtifactKind.METRICS)  # type: ignore[valid-type]
    values: Annotated[dict[str, Number], Field(max_length=LIMITS.values_per_artifact)]
    step: Annotated[int, Field(ge=0)] | None = None


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
    kind = _KIND_ALIASES.get(raw.strip().lower())
    return kind.value if kind else None


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
        custom_error_message=(
            "unknown or missing artifact 'type'; use one of model, dataset (or data), "
            "metrics, parameters, report, artifact"
        ),
    ),
]

_LINEAGE_REF = re.compile(r"^[^/\x00]+/[^/\x00]+/[^/\x00]+/[^/\x00]+$")


def _check_lineage(value: str) -> str:
    if not _LINEAGE_REF.match(value):
        raise ValueError("must be 'pipeline/run_id/step_name/artifact_name'")
    return value


class Manifest(BaseModel):
    """A step's hand-over: who produced what, and the files that carry it."""

    model_config = ConfigDict(
        extra="forbid",
        title="artifact-router manifest v1",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    manifest_version: Literal[1]
    id: SafeName | None = Field(
        default=None,
        description="idempotency key; defaults to the bundle directory name",
    )
    pipeline: SafeName
    run_id: SafeName
    step_name: SafeName
    stack: SafeName | None = None
    inputs: Annotated[
        list[Annotated[str, BeforeValidator(_check_lineage)]],
        Field(max_length=LIMITS.inputs_per_manifest),
    ] = Field(default_factory=list)
    artifacts: Annotated[
        list[AnyArtifact], Field(min_length=1, max_length=LIMITS.artifacts_per_manifest)
    ]


class ManifestError(Exception):
    """A manifest that cannot be accepted, with one actionable problem per field."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("; ".join(p.render() for p in problems))


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS:
            continue  # discriminator tags add noise to the path a person reads
        else:
            out += f".{part}" if out else str(part)
    return out or "(manifest)"


_TAGS = {"model", "dataset", "metrics", "parameters", "report", "artifact"}


def problems_from_validation(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling against `artifact-router schema`"
        elif err["type"] == "missing":
            message = "required field is missing"
        value = err.get("input")
        problems.append(
            Problem(
                field=_loc(tuple(err["loc"])),
                value=None if err["type"] == "missing" else _preview(value),
                message=message,
            )
        )
    return problems


def _preview(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 120:
        return value[:117] + "..."
    if isinstance(value, dict | list):
        text = repr(value)
        return text if len(text) <= 120 else text[:117] + "..."
    return value


def parse_manifest(data: bytes | str | dict[str, Any]) -> Manifest:
    """Parse and validate a manifest; raise ManifestError naming every bad field."""
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
    if data.get("manifest_version") not in (1, None) and "manifest_version" in data:
        raise ManifestError(
            [
                Problem(
                    field="manifest_version",
                    value=data.get("manifest_version"),
                    message="this router reads manifest_version 1; upgrade the router or "
                    "emit version 1",
                )
            ]
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(problems_from_validation(exc)) from None


def upload_override(env: dict[str, str] | None = None) -> bool | None:
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
