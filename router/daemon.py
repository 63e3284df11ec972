"""Daemon: wires sources -> journal -> dispatcher -> sinks, and serves /healthz, /metrics.

SIGTERM or SIGINT: stop taking new work, let in-flight deliveries finish within
`router.drain_seconds`, then exit 0.  Anything cut off stays in the journal and is
resumed at the next start.  SIGHUP: re-read the config file (`Daemon.reload`).

Signals are handled from the moment `run` begins (and, through `noted_signals`, from
whenever its caller began noting them): one that arrives while the daemon starts is
acted on once it has started, before it takes any work.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.config import (
    LoadedConfig,
    RouterConfig,
    config_secrets,
    load_config,
    mask_url_passwords,
    select_stack,
)
from router.db import Database
from router.dispatcher import Dispatcher, SinkPool
from router.errors import ConfigError, Problem, did_you_mean
from router.intake import AcceptedEvent
from router.journal import DeliveryJournal, FinishedEvent
from router.logs import add_secrets
from router.manifest import upload_override
from router.metrics import RouterMetrics
from router.rules import RoutePlan, plan_event
from router.sources.spool import SpoolPaths, SpoolSource
from sinks.registry import SINK_TYPES

__all__ = ["Daemon", "parse_listen"]

# The collector's thresholds once started. Python's default young generation (700
# allocations) is collected while an intake batch's objects are still alive: each pass
# walked them, and each tenth promoted them towards full passes over the whole heap.
# That was 12 % of the daemon's CPU under an MQTT burst; with 20,000 the batch is gone
# when a pass comes, and full passes wait for 100 middle ones (bench/RESULTS.md,
# session 27). Cyclic garbage still goes within 20,000 allocations.
GC_THRESHOLDS = (20_000, 10, 100)

log = structlog.get_logger("router.daemon")


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port`; a bare `:port` binds loopback, never all interfaces by accident."""
    host, _, port = value.rpartition(":")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class Daemon:
    def __init__(self, loaded: LoadedConfig, *, stack: str | None = None) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.stack_flag = stack
        settings = self.config.router
        self.metrics = RouterMetrics()
        self.db = Database(settings.database_url())
        # Who holds in-flight work: unique per daemon of a pool (same host, same spool
        # path, different MQTT client ids), stable across its restarts.
        owner = f"{socket.gethostname()}:{settings.spool.resolve()}"
        if settings.mqtt is not None:
            owner += f":{settings.mqtt.client_id}"
        self.journal = DeliveryJournal(self.db, owner=owner)
        self.spool_paths = SpoolPaths(settings.spool)
        self.pool = SinkPool(self.config)
        self.dispatcher = Dispatcher(
            self.journal,
            self.pool,
            self.config,
            locate_bundles=lambda bundles: self.spool.locate_many(bundles),
            on_finished=self._on_finished,
            metrics=self.metrics,
        )
        self.spool = SpoolSource(
            self.spool_paths,
            self.journal,
            self.plan,
            preflight=self.preflight,
            metrics=self.metrics,
            handoff=self.dispatcher,
            batch_size=settings.intake_batch,
            rescan_seconds=settings.rescan_seconds,
            retention_days=settings.retention_days,
        )
        self.extra_sources: list[Any] = []
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._warm_up: asyncio.Task[None] | None = None
        # SIGHUPs coalesce into one reload at a time (see request_reload).
        self._reload_lock = asyncio.Lock()
        self._reload_wanted = False
        self._reloader: asyncio.Task[None] | None = None
        self._started = False  # reloads asked for before this wait for it
        self.upload_all = upload_override()
        # Read once, like the flag: os.environ lookups were 3 % of MQTT intake's CPU.
        self.stack_env = {k: os.environ[k] for k in ("ROUTER_STACK", "FLOWYML_STACK")
                          if k in os.environ}

    # --- planning -------------------------------------------------------------------

    def stack_for(self, config: RouterConfig, manifest_stack: str | None = None) -> str:
        """The stack an event asking for `manifest_stack` (or by default) is routed to."""
        return select_stack(config, flag=self.stack_flag, manifest_stack=manifest_stack,
                            env=self.stack_env)

    def preflight(self, event: AcceptedEvent) -> Problem | None:
        """Checks that need the config: the stack an event asks for must exist."""
        try:
            self.stack_for(self.config, event.manifest.stack)
        except KeyError:
            name = event.manifest.stack or ""
            return Problem(
                field="stack",
                value=name,
                message=f"names no configured stack{did_you_mean(name, self.config.stacks)}; "
                f"known: {', '.join(sorted(self.config.stacks))}",
            )
        return None

    def plan(self, event: AcceptedEvent, versions: list[str]) -> RoutePlan:
        name = self.stack_for(self.config, event.manifest.stack)
        return plan_event(
            event.manifest,
            event_id=event.event_id,
            stack=self.config.stacks[name],
            versions=versions,
            received_at=datetime.fromtimestamp(event.received_at, UTC),
            upload_all=self.upload_all,
        )

    async def _on_finished(self, finished: list[FinishedEvent]) -> None:
        await self.spool.on_finished(finished)
        for source in self.extra_sources:
            handler = getattr(source, "on_finished", None)
            if handler is not None:
                await handler(finished)

    # --- lifecycle ------------------------------------------------------------------

    def missing_sinks(self, config: RouterConfig) -> tuple[str, list[str]]:
        """The stack this daemon routes to by default, and its components whose sink type
        this build lacks."""
        name = self.stack_for(config)
        return name, [
            f"{path} type {comp.type!r}"
            for path, comp in config.stacks[name].components()
            if comp.type not in SINK_TYPES
        ]

    def check_sinks(self) -> None:
        """Refuse to start when the default stack needs a sink this build lacks."""
        name, missing = self.missing_sinks(self.config)
        if missing:
            raise SystemExit(
                f"stack {name!r}: {', '.join(missing)} not available in this build; "
                "choose another stack with --stack or ROUTER_STACK"
            )

    async def start(self) -> None:
        self.check_sinks()
        # In the background: the first artifact should not wait for SDK imports, client
        # set-up and capability probes, and a sink that is down must not delay start.
        self._warm_up = asyncio.create_task(
            self.pool.warm_up(self.stack_for(self.config)), name="warm-up"
        )
        await self.db.migrate()
        listen = self.config.router.listen
        if listen:
            host, port = parse_listen(listen)
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/metrics", self._metrics)
            from router.http_api import add_routes, local_store_roots
            from router.sources import LocalCopies

            add_routes(app, self.db, copies=LocalCopies.of(self.config.router),
                       store_roots=lambda: local_store_roots(self.config))
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, host, port).start()
            log.info("http listening", address=f"{host}:{port}")

    def _handle_signals(self) -> dict[int, Callable[[], None]]:
        """SIGTERM and SIGINT stop, SIGHUP reloads: from before start(), which may take
        a while (a journal to migrate), so that none of them meets its default action
        (death for SIGTERM and SIGHUP) while the daemon starts.  Returns what each
        signal does."""
        loop = asyncio.get_running_loop()
        handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop}
        if hasattr(signal, "SIGHUP"):  # not on Windows: reload by restarting there
            handlers[signal.SIGHUP] = self.request_reload
        for sig, handler in handlers.items():
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError, ValueError):
                # Windows: a plain handler that hands over to the loop (in place of the
                # CLI's, which only notes signals while starting). Off the main thread
                # there is none either (ValueError): stop via request_stop().
                def forward(_sig: int, _frame: Any, call: Callable[[], None] = handler) -> None:
                    loop.call_soon_threadsafe(call)

                with contextlib.suppress(ValueError, OSError):
                    signal.signal(sig, forward)
        return handlers

    async def run(self, *, noted_signals: Sequence[int] = ()) -> int:
        """Start, route until request_stop() (SIGTERM, SIGINT), drain, close; the exit
        code.  `noted_signals`: signals the caller caught (and noted, in order) before
        this loop handled them, such as the CLI while it loaded the config; read once
        the loop's own handlers are in place, so that none falls between the two."""
        loop = asyncio.get_running_loop()
        # Sinks and intake do blocking file I/O (copy, fsync, hash) in threads; the
        # default pool (cores + 4) would cap deliveries in flight far below the limits.
        loop.set_default_executor(
            ThreadPoolExecutor(max_workers=32, thread_name_prefix="router-io")
        )
        handlers = self._handle_signals()
        for sig in list(noted_signals):
            if sig in handlers:
                handlers[sig]()
        # A stop asked for while starting is honoured once start() is done (a migration
        # is not cut off), before any work is taken: what waits stays where it is.
        if not self._stop.is_set():
            await self.start()
        if self._stop.is_set():
            log.info("stop requested while starting; no work was taken")
            await self.close()
            log.info("stopped")
            return 0
        self._started = True
        if self._reload_wanted:
            # A SIGHUP while starting: the newest file is in force before the first event.
            self.request_reload()
            if self._reloader is not None:
                await self._reloader
        # Everything built so far (modules, models, the schema) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise stop
        # every thread for 60-80 ms and were the tail of intake latency.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        log.info(
            "artifact-router started",
            config=self.loaded.source,
            spool=str(self.spool_paths.root),
            journal=mask_url_passwords(self.db.url),
            stack=self.stack_for(self.config),
            pid=os.getpid(),
        )
        for source in self.extra_sources:
            # Events that finished while we were down (or whose receipt was cut off).
            name = getattr(source, "source_name", None)
            if name and hasattr(source, "on_finished"):
                await source.on_finished(await self.journal.unmoved(name))
        dispatcher = asyncio.create_task(self.dispatcher.run(), name="dispatcher")
        sources = [asyncio.create_task(self.spool.run(), name="spool")]
        sources += [asyncio.create_task(s.run(), name=type(s).__name__) for s in self.extra_sources]
        stopper = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait(
            {stopper, dispatcher, *sources}, return_when=asyncio.FIRST_COMPLETED
        )
        crashed = [t for t in done if t is not stopper and t.exception() is not None]
        for task in crashed:
            log.error("component crashed", task=task.get_name(), error=repr(task.exception()))
        log.info("stopping: no new work; draining", in_flight=self.dispatcher.in_flight)
        self.spool.stop()
        for source in self.extra_sources:
            source.stop()
        await asyncio.gather(*sources, return_exceptions=True)
        await self.dispatcher.stop(self.config.router.drain_seconds)
        await asyncio.gather(dispatcher, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.journal.flush_moved()
        await self.close()
        log.info("stopped")
        return 1 if crashed else 0

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: re-read the config file (see `reload`), one reload at a time.

        Requests coalesce: a reload reads the file after the requests before it, and
        those that arrive while it runs are served by one more reload once it is done,
        so after a burst of SIGHUPs the file as it was at the last one is in force (a
        reload that read an older file is never applied after one that read a newer).
        Before the daemon has started, the reload waits for it (see `run`)."""
        self._reload_wanted = True
        if self._started and (self._reloader is None or self._reloader.done()):
            self._reloader = asyncio.get_running_loop().create_task(
                self._reload_while_wanted(), name="reload")

    async def _reload_while_wanted(self) -> None:
        while self._reload_wanted:
            self._reload_wanted = False  # before the file is read: later SIGHUPs count
            try:
                await self.reload()
            except Exception as exc:  # the running config stays; the next SIGHUP retries
                log.error("config reload failed; the running config stays",
                          error=repr(exc))
                self.metrics.errors.labels(
                    component="daemon", error_type="config", stage="reload").inc()

    async def reload(self) -> bool:
        """Re-read the config: its stacks and routing rules apply to events accepted from
        now on (journaled events keep the plan they were accepted with). `router:`
        settings (spool, journal, MQTT, concurrency) need a restart and are kept. A file
        that does not load, or whose default stack needs a sink this build lacks, is
        refused with the reason, and the running config stays.

        One at a time: a reload waits for the one running (its read, the sinks it
        replaces and their warm-up) before it reads the file."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> bool:
        # Before anything is logged about the new file: its secrets are redacted too.
        add_secrets(await asyncio.to_thread(config_secrets, self.loaded.path))
        try:
            loaded = await asyncio.to_thread(load_config, self.loaded.path)
            name, missing = self.missing_sinks(loaded.config)
            if missing:
                raise ConfigError(loaded.source, [Problem(
                    field=f"stacks.{name}", message=f"needs sinks this build lacks: "
                    f"{', '.join(missing)}")])
        except (ConfigError, KeyError) as exc:
            log.error("config reload refused; the running config stays", error=str(exc))
            self.metrics.errors.labels(
                component="daemon", error_type="config", stage="reload").inc()
            return False
        if loaded.config.router != self.config.router:
            changed = sorted(
                k for k, v in loaded.config.router.model_dump().items()
                if self.config.router.model_dump().get(k) != v
            )
            log.warning("router settings changed; they apply after a restart",
                        settings=changed)
        config = loaded.config.model_copy(update={"router": self.config.router})
        self.loaded = loaded.model_copy(update={"config": config})
        self.config = config
        self.pool.replace_config(config)
        await self.pool.warm_up(self.stack_for(config))
        log.info("config reloaded", config=loaded.source, stack=self.stack_for(config),
                 warnings=loaded.warnings or None)
        return True

    async def close(self) -> None:
        pending = [t for t in (self._warm_up, self._reloader) if t is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pool.close()
        await self.db.dispose()

    # --- http -------------------------------------------------------------------------

    async def _healthz(self, _request: web.Request) -> web.Response:
        # The slow checks first (a hung sink takes up to its timeout), then the flags:
        # the answer tells how things are when it is sent, not when it was asked for
        # (a request made while the daemon starts would otherwise say "not ready").
        sinks = await self.pool.health()
        try:
            await self.journal.known_events(["-healthz-"])
            journal = True
        except Exception:
            journal = False
        checks: dict[str, Any] = {
            "spool": self.spool.healthy,
            "dispatcher": self.dispatcher.healthy,
            "journal": journal,
        }
        for source in self.extra_sources:
            checks[type(source).__name__] = bool(getattr(source, "healthy", True))
        checks["sinks"] = sinks
        ok = all(v for k, v in checks.items() if k != "sinks")  # sinks: reported, not required
        return web.json_response(
            {"status": "ok" if ok else "degraded", "checks": checks}, status=200 if ok else 503
        )

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


