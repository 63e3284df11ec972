"""`artifact-router`: a thin typer layer over the library.  Every listing takes --json."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import faulthandler
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from router.config import LoadedConfig, load_config, mask_secrets, mask_url_passwords
from router.errors import ConfigError, did_you_mean

app = typer.Typer(
    help="Route ML pipeline artifacts from a spool directory or MQTT to stores, "
    "registries and trackers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stack_app = typer.Typer(help="List, show and select stacks.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
model_app = typer.Typer(help="Model versions and their deploy decisions.", no_args_is_help=True)
app.add_typer(model_app, name="model")

EX_CONFIG = 78  # sysexits.h, as `vector validate` uses

def _width(stream: Any) -> int | None:
    """A terminal's own width; piped output (a log, `| grep`) gets room for whole values,
    where rich would squeeze tables into 80 columns and cut names and URIs short."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 1000


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config file (default: $ROUTER_CONFIG, ./router.yaml, "
                 "./flowyml.yaml, else the embedded defaults)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
T = TypeVar("T")


def _load(config: Path | None) -> LoadedConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        err_console.print(f"[red]{exc}[/red]", markup=True, highlight=False)
        raise typer.Exit(EX_CONFIG) from None


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro_fn())  # type: ignore[arg-type]


def _run_loop(coro: Any) -> Any:
    """The daemon's event loop: uvloop where installed (about 20 % more bundles/s in
    bench small-to-local), asyncio's own otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _fail(code: int, message: str) -> typer.Exit:
    """Print one line for a shell user (no traceback); raise the returned Exit."""
    err_console.print(message, highlight=False, markup=False, soft_wrap=True)
    return typer.Exit(code)


async def _with_journal(loaded: LoadedConfig, fn: Callable[[Any], Awaitable[T]]) -> T:
    from sqlalchemy.exc import SQLAlchemyError

    from router.db import Database
    from router.journal import DeliveryJournal

    url = loaded.config.router.database_url()
    db = Database(url)
    try:
        await db.migrate()
        return await fn(DeliveryJournal(db))
    except (SQLAlchemyError, OSError) as exc:
        # A corrupt file, a directory, a server that is down: say which setting, not where.
        cause = getattr(exc, "orig", None) or exc
        setting = ("router.journal_url" if loaded.config.router.journal_url
                   else "router.journal_url (unset: SQLite under router.state_dir)")
        raise _fail(1, mask_url_passwords(
            f"cannot open the journal {setting}={url}: {type(cause).__name__}: {cause}; "
            "check that it names a SQLite file or a reachable PostgreSQL database"
        )) from None
    finally:
        with contextlib.suppress(SQLAlchemyError, OSError):
            await db.dispose()


# --- run / validate / schema ------------------------------------------------------------


@app.command()
def run(
    config: ConfigOpt = None,
    stack: Annotated[str | None, typer.Option("--stack", "-s", help="route every event "
                                              "through this stack")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the daemon until SIGTERM or SIGINT (then drain and exit 0).

    SIGHUP reloads the config file; SIGUSR1 writes every thread's stack to stderr."""
    # First of all: a signal that arrives while the daemon starts (the imports, the
    # config, the journal's migrations) is noted here and acted on by the daemon once it
    # has started, instead of killing it (SIGHUP's and SIGTERM's default action).
    noted = _note_signals()
    _dump_stacks_on_sigusr1()
    from router.daemon import Daemon
    from router.logs import configure_logging, secret_values

    loaded = _load(config)
    configure_logging(log_level, secrets=secret_values(loaded.raw))
    # The stack the daemon routes to by default, by select_stack's precedence: an unknown
    # name is a config error whether it comes from the flag or the environment.
    for origin, name in (("--stack", stack), ("ROUTER_STACK", os.environ.get("ROUTER_STACK")),
                         ("FLOWYML_STACK", os.environ.get("FLOWYML_STACK"))):
        if name:
            if name not in loaded.config.stacks:
                raise _fail(EX_CONFIG, f"{origin}: no stack named {name!r}"
                            f"{did_you_mean(name, loaded.config.stacks)}; known: "
                            f"{', '.join(loaded.config.stacks)}")
            break
    for warning in loaded.warnings:
        import structlog

        structlog.get_logger("router").info("config note", note=warning)

    async def main() -> int:
        daemon = Daemon(loaded, stack=stack)
        from router.sources import mqtt_enabled

        if mqtt_enabled(loaded.config):
            from router.sources.mqtt import MqttSource

            daemon.extra_sources.append(MqttSource.from_daemon(daemon))
        return await daemon.run(noted_signals=noted)

    raise typer.Exit(_run_loop(main()))


def _note_signals() -> list[int]:
    """SIGHUP, SIGTERM and SIGINT noted, in the order they arrive, until the daemon's
    event loop handles them (`Daemon.run(noted_signals=...)` then reads the list)."""
    noted: list[int] = []
    for name in ("SIGHUP", "SIGTERM", "SIGINT"):
        sig = getattr(signal, name, None)  # no SIGHUP on Windows
        if sig is not None:
            # Only the main thread may set handlers (ValueError elsewhere).
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, lambda signum, _frame: noted.append(signum))
    return noted


def _dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 <pid>`: every thread's Python stack to stderr, and the daemon runs
    on. For a daemon that seems stuck: faulthandler writes from the signal itself, so it
    answers with the event loop blocked too. Frames only (file, line, function), no
    values, so no secret can show. Not on Windows (no SIGUSR1)."""
    sig = getattr(signal, "SIGUSR1", None)
    if sig is not None:
        # A stderr without a file descriptor (a test runner's capture) has none to write to.
        with contextlib.suppress(OSError, ValueError, RuntimeError, AttributeError):
            faulthandler.register(sig, file=sys.stderr, all_threads=True)


@app.command()
def validate(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Check a config file; exit 78 (EX_CONFIG) when it is not usable."""
    try:
        loaded = load_config(config)
    except ConfigError as exc:
        if as_json:
            _emit_json(
                {"valid": False, "source": exc.source,
                 "errors": [p.model_dump(mode="json") for p in exc.problems]}
            )
        else:
            err_console.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(EX_CONFIG) from None
    cfg = loaded.config
    if as_json:
        _emit_json(
            {"valid": True, "source": loaded.source, "stacks": sorted(cfg.stacks),
             "active_stack": cfg.active_stack, "warnings": loaded.warnings}
        )
        return
    console.print(f"{loaded.source}: valid ({len(cfg.stacks)} stacks, active: "
                  f"{cfg.active_stack})", highlight=False)
    for warning in loaded.warnings:
        console.print(f"  note: {warning}", highlight=False)


@app.command()
def schema() -> None:
    """Print the manifest v1 JSON Schema (generated from the pydantic models)."""
    from router.manifest import manifest_json_schema

    _emit_json(manifest_json_schema())


# --- stacks ---------------------------------------------------------------------------


@stack_app.command("list")
def stack_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Stacks in the config; the active one is marked."""
    cfg = _load(config).config
    rows: list[dict[str, Any]] = [
        {"name": name, "active": name == cfg.active_stack,
         "artifact_store": s.artifact_store.type if s.artifact_store else None,
         "stores": sorted(s.artifact_stores),
         "trackers": [c.type for _, c in s.trackers],
         "model_registry": s.model_registry.type if s.model_registry else None,
         "model_deployer": s.model_deployer.type if s.model_deployer else None}
        for name, s in cfg.stacks.items()
    ]
    if as_json:
        _emit_json(rows)
        return
    table = Table("", "stack", "artifact store", "trackers", "registry", "deployer")
    for r in rows:
        table.add_row("*" if r["active"] else "", r["name"], r["artifact_store"] or "-",
                      ", ".join(r["trackers"]) or "-", r["model_registry"] or "-",
                      r["model_deployer"] or "-")
    console.print(table)


@stack_app.command("show")
def stack_show(
    name: Annotated[str | None, typer.Argument(help="default: the active stack")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One stack's components and routing rules, secrets masked."""
    cfg = _load(config).config
    name = name or cfg.active_stack
    try:
        stack = cfg.stack(name)
    except KeyError as exc:
        err_console.print(str(exc.args[0]))
        raise typer.Exit(1) from None
    data = mask_secrets(stack.model_dump(mode="json", exclude_none=True))
    if as_json:
        _emit_json(data)
    else:
        import yaml

        console.print(yaml.safe_dump(data, sort_keys=False), highlight=False, markup=False)


@stack_app.command("set")
def stack_set(name: str, config: ConfigOpt = None) -> None:
    """Make NAME the active_stack, rewriting only that line of the config file."""
    from router.config import discover_config, set_active_stack

    path = discover_config(config)
    if path is None:
        err_console.print("no config file to edit; create router.yaml (see config/router.yaml)")
        raise typer.Exit(EX_CONFIG)
    try:
        set_active_stack(path, name)
    except ConfigError as exc:
        err_console.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(EX_CONFIG) from None
    console.print(f"active stack: {name} ({path})", highlight=False)


# --- emit -----------------------------------------------------------------------------

_KV = re.compile(r"^([^=]+)=(.*)$")


def _parse_kv(pairs: list[str], numeric: bool, option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        match = _KV.match(pair)
        if not match:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        key, raw = match.group(1).strip(), match.group(2)
        if numeric:
            try:
                out[key] = float(raw)
            except ValueError:
                raise typer.BadParameter(f"{key}={raw!r}: metric values must be numbers",
                                         param_hint=option) from None
        else:
            try:
                out[key] = json.loads(raw)
            except ValueError:
                out[key] = raw
    return out


@app.command()
def emit(
    files: Annotated[list[Path] | None, typer.Argument(help="files of the artifact")] = None,
    pipeline: Annotated[str, typer.Option(help="pipeline name")] = ...,  # type: ignore[assignment]
    run_id: Annotated[str, typer.Option("--run-id", help="run id")] = ...,  # type: ignore[assignment]
    step: Annotated[str, typer.Option(help="step name")] = ...,  # type: ignore[assignment]
    type_: Annotated[str, typer.Option("--type", help="model, dataset, metrics, parameters, "
                                       "report, artifact")] = "artifact",
    name: Annotated[str | None, typer.Option(help="artifact name (default: the type)")] = None,
    version: Annotated[str | None, typer.Option(help="version (default: next integer)")] = None,
    upload: Annotated[bool, typer.Option("--upload/--no-upload", help="copy files to the "
                                         "store")] = False,
    metric: Annotated[list[str] | None, typer.Option(help="KEY=NUMBER, repeatable")] = None,
    param: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
    input_: Annotated[list[str] | None, typer.Option("--input", help="lineage ref "
                                                     "pipeline/run/step/artifact")] = None,
    metric_step: Annotated[int | None, typer.Option("--metric-step", help="step of the "
                                                    "metrics")] = None,
    stack: Annotated[str | None, typer.Option(help="stack for this event")] = None,
    run_status: Annotated[str | None, typer.Option(
        "--run-status", help="this step ends the run: finished, failed or killed")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="event id (default: "
                                                 "generated)")] = None,
    spool: Annotated[Path | None, typer.Option(help="spool dir (default: from config)")] = None,
    mqtt: Annotated[bool, typer.Option("--mqtt", help="publish to the configured MQTT "
                                       "broker instead of writing a bundle")] = False,
    topic: Annotated[str | None, typer.Option(help="MQTT topic (default: "
                                              "artifacts/<pipeline>/<run>/<step>)")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one bundle atomically into the spool, for bash, R or any non-Python job.

    With --mqtt, publish it instead (small files inlined, others by file:// URI)."""
    from router.manifest import ManifestError, parse_manifest

    loaded = _load(config) if spool is None or mqtt else None
    if spool is None:
        assert loaded is not None
        spool = loaded.config.router.spool
    kind = type_.lower()
    artifacts: list[dict[str, Any]] = []
    main: dict[str, Any] = {"type": type_, "name": name or kind}
    if version:
        main["version"] = version
    metrics = _parse_kv(metric or [], True, "--metric")
    params = _parse_kv(param or [], False, "--param")
    if kind == "metrics":
        main["values"] = metrics
        if metric_step is not None:
            main["step"] = metric_step
        metrics = {}
    elif kind == "parameters":
        main["values"] = params
        params = {}
    if files:
        main["files"] = [{"path": Path(f).name} for f in files]
        main["upload"] = upload
    if kind not in ("metrics", "parameters"):
        artifacts.append(main)
        if metrics:
            main.setdefault("metadata", {})["metrics"] = metrics
            artifacts.append({"type": "metrics", "name": f"{main['name']}_metrics",
                              "values": metrics, **({"step": metric_step} if metric_step
                                                    is not None else {})})
    else:
        artifacts.append(main)
    if params:
        artifacts.append({"type": "parameters", "name": f"{main['name']}_params",
                          "values": params})
    bundle_name = event_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    manifest: dict[str, Any] = {
        "manifest_version": 1, "id": bundle_name, "pipeline": pipeline, "run_id": run_id,
        "step_name": step, "artifacts": artifacts,
    }
    if stack:
        manifest["stack"] = stack
    if input_:
        manifest["inputs"] = list(input_)
    if run_status:
        manifest["run_status"] = run_status
    try:
        parse_manifest(manifest)
    except ManifestError as exc:
        err_console.print(f"invalid artifact: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    if mqtt:
        _emit_mqtt(loaded, manifest, [Path(f).resolve() for f in files or []], topic, as_json)
        return
    if bundle_name.startswith("."):  # DESIGN 2: the daemon never reads dot-names
        raise _fail(2, f"--id {bundle_name!r}: a bundle name starting with '.' is never "
                       "read by the daemon; choose an --id that does not start with '.'")
    incoming = Path(spool) / "incoming"
    _write_bundle(incoming, bundle_name, files or [], manifest)
    if as_json:
        _emit_json({"event_id": bundle_name, "bundle": str(incoming / bundle_name)})
    else:
        print(f"emitted {bundle_name} -> {incoming / bundle_name}")


def _write_bundle(incoming: Path, bundle_name: str, files: list[Path],
                  manifest: dict[str, Any]) -> None:
    """Build `incoming/.tmp-<id>/`, then rename it to `incoming/<id>`; a taken id or an
    unusable spool is one line on stderr and a non-zero exit, never a traceback."""
    final, tmp = incoming / bundle_name, incoming / f".tmp-{bundle_name}"
    taken = (f"--id {bundle_name!r} is taken: {final} exists (the daemon has not picked "
             "it up yet); choose another --id")
    try:
        incoming.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _fail(1, f"spool {incoming.parent} is unusable: cannot create {incoming} "
                       f"({exc.strerror or exc}); fix --spool or router.spool") from None
    if final.exists():
        raise _fail(2, taken)
    try:
        tmp.mkdir()
    except FileExistsError:
        raise _fail(2, f"--id {bundle_name!r}: {tmp} exists (an emit of this id is running "
                       "or was interrupted); remove it or choose another --id") from None
    except OSError as exc:
        raise _fail(1, f"spool {incoming.parent} is unusable: cannot create {tmp} "
                       f"({exc.strerror or exc}); fix --spool or router.spool") from None
    try:
        for f in files:
            if not f.is_file():
                raise typer.BadParameter(f"{f}: no such file", param_hint="FILES")
            shutil.copyfile(f, tmp / f.name)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.rename(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and final.exists():
            raise _fail(2, taken) from None  # another emit of this id won the race
        raise _fail(1, f"cannot write the bundle {tmp}: {exc.strerror or exc} "
                       f"({exc.filename or tmp})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _emit_mqtt(loaded: LoadedConfig | None, manifest: dict[str, Any], files: list[Path],
               topic: str | None, as_json: bool) -> None:
    from router.sources.mqtt import build_publication, publish_manifest

    settings = loaded.config.router.mqtt if loaded is not None else None
    if settings is None:
        err_console.print("--mqtt needs a router.mqtt section in the config (host, port, "
                          "credentials); see the README's MQTT section")
        raise typer.Exit(EX_CONFIG)
    try:
        target, _ = build_publication(settings, manifest, files, topic)
        asyncio.run(publish_manifest(settings, manifest, files, target))
    except Exception as exc:  # the reason is the message; no traceback for a shell user
        err_console.print(f"could not publish: {exc}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    if as_json:
        _emit_json({"event_id": manifest["id"], "topic": target})
    else:
        print(f"published {manifest['id']} -> {target}")


# --- status / retry / runs / artifacts --------------------------------------------------


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Events and deliveries by state, per sink; oldest pending age; dead letters."""
    loaded = _load(config)
    report = asyncio.run(_with_journal(loaded, lambda j: j.status()))
    if as_json:
        _emit_json(report.model_dump(mode="json"))
        return
    console.print("events: " + (", ".join(f"{k} {v}" for k, v in sorted(report.events.items()))
                                or "none"), highlight=False)
    table = Table("sink", "pending", "in flight", "done", "dead")
    for sink_id, c in sorted(report.sinks.items()):
        table.add_row(sink_id, str(c.pending), str(c.in_flight), str(c.done), str(c.dead))
    console.print(table)
    if report.oldest_pending_age_seconds is not None:
        console.print(f"oldest pending: {report.oldest_pending_age_seconds:.1f}s ago")
    if report.held_messages:
        console.print(f"held: {report.held_messages} MQTT messages, events once their "
                      "file:// files are hashed")
    for dead in report.dead_letters[:20]:
        console.print(f"[red]dead[/red] {dead['key']}: {dead['last_error']}", highlight=False)
    for rej in report.rejected[:20]:
        console.print(f"[yellow]rejected[/yellow] {rej['id']}: {rej['error']}", highlight=False)


@app.command()
def retry(
    key: Annotated[str | None, typer.Argument(help="delivery key or event id")] = None,
    all_: Annotated[bool, typer.Option("--all", help="every dead delivery")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-queue dead-lettered deliveries; a running daemon picks them up."""
    if not all_ and key is None:
        err_console.print("give a delivery key or event id, or --all")
        raise typer.Exit(2)
    loaded = _load(config)
    n = asyncio.run(_with_journal(loaded, lambda j: j.retry_dead(None if all_ else key)))
    if as_json:
        _emit_json({"requeued": n})
    else:
        console.print(f"re-queued {n} deliveries")


@app.command()
def runs(
    pipeline: Annotated[str | None, typer.Option(help="only this pipeline")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pipeline runs in the catalog, newest first."""
    from router.catalog import list_runs

    loaded = _load(config)

    async def fetch(journal: Any) -> Any:
        async with journal.db.read() as conn:
            return await list_runs(conn, pipeline=pipeline)

    rows = asyncio.run(_with_journal(loaded, fetch))
    if as_json:
        _emit_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("pipeline", "run", "artifacts", "created", "status")
    for r in rows:
        table.add_row(r.pipeline, r.run_id, str(r.artifacts),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
                      r.status or "open")
    console.print(table)


@app.command()
def artifacts(
    pipeline: Annotated[str | None, typer.Option(help="only this pipeline")] = None,
    run: Annotated[str | None, typer.Option("--run", help="only this run id")] = None,
    rejected: Annotated[bool, typer.Option("--rejected", help="show rejected inputs "
                                           "instead")] = False,
    limit: Annotated[int, typer.Option(help="at most this many rows, newest first")] = 1000,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Catalogued artifacts with versions, checksums and locations."""
    from router.catalog_read import query_artifacts

    loaded = _load(config)
    if rejected:
        report = asyncio.run(_with_journal(loaded, lambda j: j.status(dead_limit=limit)))
        if as_json:
            _emit_json(report.rejected)
        else:
            for rej in report.rejected:
                console.print(f"{rej['id']} ({rej['source']}): {rej['error']}", highlight=False)
        return

    async def fetch(journal: Any) -> Any:
        async with journal.db.read() as conn:
            return await query_artifacts(conn, pipeline=pipeline, run_id=run, limit=limit)

    rows = asyncio.run(_with_journal(loaded, fetch))
    if as_json:
        _emit_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("pipeline", "run", "step", "type", "name", "version", "sha256", "locations")
    for r in rows:
        table.add_row(r.pipeline, r.run_id, r.step_name, r.kind, r.name, r.version,
                      (r.checksum or "")[:12], "\n".join(loc.uri for loc in r.locations) or "-")
    console.print(table)


# --- models ---------------------------------------------------------------------------

VersionOpt = Annotated[str, typer.Option("--version", "-v", help="model version")]
PipelineOpt = Annotated[str | None, typer.Option(help="pipeline, when the name is ambiguous")]


@model_app.command("list")
def model_list(
    pending: Annotated[bool, typer.Option("--pending", help="only those awaiting a "
                                          "decision")] = False,
    pipeline: PipelineOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Every model version under a deploy rule: metrics, state, decision, who decided."""
    loaded = _load(config)
    rows = asyncio.run(_with_journal(
        loaded, lambda j: j.decisions(pipeline=pipeline, pending=pending)))
    if as_json:
        _emit_json([r.model_dump(mode="json") for r in rows])
        return
    table = Table("pipeline", "model", "version", "condition", "state", "metrics", "reason",
                  "decided by")
    for r in rows:
        table.add_row(r.pipeline, r.name, r.version, r.condition, r.state,
                      ", ".join(f"{k}={v:g}" for k, v in r.metrics.items()), r.reason or "",
                      r.decided_by or "")
    console.print(table)


def _decide(action: str, name: str, version: str, pipeline: str | None, by: str | None,
            comment: str | None, force: bool, config: Path | None, as_json: bool) -> None:
    from router.approvals import DecisionError
    from router.manifest import ArtifactKind

    loaded = _load(config)

    def endpoint(stack: str) -> str | None:
        found = loaded.config.stacks.get(stack)
        rule = found.rule_for(ArtifactKind.MODEL) if found else None
        return rule.endpoint_name if rule else None

    try:
        row = asyncio.run(_with_journal(loaded, lambda j: j.decide(
            action=action, name=name, version=version, pipeline=pipeline,
            by=by or os.environ.get("USER"), comment=comment, force=force,
            endpoint_name=endpoint)))
    except DecisionError as exc:
        err_console.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(1) from None
    if as_json:
        _emit_json(row.model_dump(mode="json"))
    else:
        console.print(f"{row.name} {row.version}: {row.state}", highlight=False)


@model_app.command("deploy")
def model_deploy(
    name: str, version: VersionOpt, pipeline: PipelineOpt = None,
    force: Annotated[bool, typer.Option("--force", help="replace a newer deployed "
                                        "version (roll back), or deploy a version that "
                                        "awaits approval or was rejected")] = False,
    by: Annotated[str | None, typer.Option(help="who asks (default $USER)")] = None,
    config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Deploy a registered version (manual condition, or overriding a blocked auto)."""
    _decide("deploy", name, version, pipeline, by, None, force, config, as_json)


@model_app.command("approve")
def model_approve(
    name: str, version: VersionOpt, pipeline: PipelineOpt = None,
    by: Annotated[str | None, typer.Option(help="approver (default $USER)")] = None,
    comment: Annotated[str | None, typer.Option(help="why")] = None,
    force: Annotated[bool, typer.Option("--force", help="even if a newer version is "
                                        "deployed")] = False,
    config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Approve a version pending approval: it is deployed through the journal."""
    _decide("approve", name, version, pipeline, by, comment, force, config, as_json)


@model_app.command("reject")
def model_reject(
    name: str, version: VersionOpt, pipeline: PipelineOpt = None,
    by: Annotated[str | None, typer.Option(help="who rejects (default $USER)")] = None,
    comment: Annotated[str | None, typer.Option(help="why")] = None,
    config: ConfigOpt = None, as_json: JsonOpt = False,
) -> None:
    """Reject a version pending approval: it is closed and never deployed."""
    _decide("reject", name, version, pipeline, by, comment, False, config, as_json)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
