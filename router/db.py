"""The database behind the journal and the catalog: one schema, SQLite or PostgreSQL.

Tables are SQLAlchemy Core; Alembic owns their history (router/migrations).  Times
are epoch seconds (floats) so that comparisons are cheap and identical on both backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import operator
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import orjson
import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

__all__ = ["Database", "execute_many", "metadata"]

log = structlog.get_logger("router.db")
P = ParamSpec("P")
T = TypeVar("T")

# sqlite3 binds int, float, str and bytes directly; any other value (None, a bool) it
# first offers to adapters, and with none registered, looks for `__adapt__` on its
# protocol class, which fails with a formatted AttributeError: about 200 ns a NULL, and
# a journaled metrics message binds some 40 of them. These adapters give what sqlite3
# would bind anyway (NULL; 1 and 0), without the failed lookups.
def _null(value: None) -> None:
    return None


sqlite3.register_adapter(type(None), _null)
sqlite3.register_adapter(bool, int)

metadata = sa.MetaData()

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String(300), primary_key=True),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("bundle", sa.String(300)),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("stack", sa.String(200)),
    sa.Column("pipeline", sa.String(300)),
    sa.Column("run_id", sa.String(300)),
    sa.Column("step_name", sa.String(300)),
    sa.Column("digest", sa.String(64)),
    sa.Column("record", sa.JSON, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("moved", sa.Boolean, nullable=False, server_default=sa.false()),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("key", sa.String(800), primary_key=True),
    sa.Column("event_id", sa.String(300), nullable=False, index=True),
    sa.Column("artifact_index", sa.Integer, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("stack", sa.String(200), nullable=False),
    sa.Column("component", sa.String(200), nullable=False),
    sa.Column("sink_id", sa.String(400), nullable=False, index=True),
    sa.Column("target", sa.Text),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("after", sa.String(800)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("owner", sa.String(200)),
    sa.Column("lease_until", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("result", sa.JSON),
    sa.Index("ix_deliveries_ready", "state", "next_attempt_at"),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("pipeline", sa.String(300), primary_key=True),
    sa.Column("run_id", sa.String(300), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    # A manifest's run_status: finished, failed or killed; NULL while the run is open.
    sa.Column("status", sa.String(16)),
    sa.Column("ended_at", sa.Float),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(300), nullable=False, index=True),
    sa.Column("artifact_index", sa.Integer, nullable=False),
    sa.Column("pipeline", sa.String(300), nullable=False),
    sa.Column("run_id", sa.String(300), nullable=False),
    sa.Column("step_name", sa.String(300), nullable=False),
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("upload", sa.Boolean, nullable=False),
    sa.Column("framework", sa.String(64)),
    sa.Column("format", sa.String(32)),
    sa.Column("checksum", sa.String(64)),
    sa.Column("size", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("values", sa.JSON),
    sa.Column("step", sa.BigInteger),  # a manifest's step is up to 2**63 - 1
    sa.Column("files", sa.JSON, nullable=False),
    sa.Column("decision", sa.JSON),
    sa.Column("plan_errors", sa.JSON),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("event_id", "artifact_index", name="uq_artifacts_event_index"),
    sa.Index("ix_artifacts_run", "pipeline", "run_id", "step_name"),
    sa.Index("ix_artifacts_name", "pipeline", "name"),
)

locations = sa.Table(
    "locations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("artifact_id", sa.Integer, nullable=False, index=True),
    sa.Column("delivery_key", sa.String(800), nullable=False),
    sa.Column("sink_id", sa.String(400), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("file_name", sa.String(300)),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64)),
    sa.Column("size", sa.BigInteger),
    sa.Column("version_id", sa.String(200)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("delivery_key", "file_name", name="uq_locations_delivery_file"),
)

lineage = sa.Table(
    "lineage",
    metadata,
    sa.Column("artifact_id", sa.Integer, primary_key=True),
    sa.Column("input_ref", sa.String(1200), primary_key=True),
)

version_counters = sa.Table(
    "version_counters",
    metadata,
    sa.Column("pipeline", sa.String(300), primary_key=True),
    sa.Column("name", sa.String(300), primary_key=True),
    sa.Column("last", sa.Integer, nullable=False),
)

# One row per model artifact whose rule has `deploy: true`: the deploy condition's state,
# persisted so that approvals survive restarts and act through the journal.
model_decisions = sa.Table(
    "model_decisions",
    metadata,
    sa.Column("artifact_id", sa.Integer, primary_key=True),
    sa.Column("event_id", sa.String(300), nullable=False),
    sa.Column("artifact_index", sa.Integer, nullable=False),
    sa.Column("pipeline", sa.String(300), nullable=False),
    sa.Column("name", sa.String(300), nullable=False),
    sa.Column("version", sa.String(128), nullable=False),
    sa.Column("stack", sa.String(200), nullable=False),
    sa.Column("condition", sa.String(16), nullable=False),
    sa.Column("state", sa.String(24), nullable=False, index=True),
    sa.Column("reason", sa.Text),
    sa.Column("metrics", sa.JSON),
    sa.Column("params", sa.JSON),
    sa.Column("deploy_key", sa.String(800)),
    sa.Column("decided_by", sa.String(200)),
    sa.Column("comment", sa.Text),
    sa.Column("forced", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_model_decisions_model", "pipeline", "name"),
)


# MQTT messages acknowledged before their event is journaled: a `file://` checkpoint
# whose hash takes seconds is held here (one row per consumer batch), so the broker's
# messages behind it need not wait for that hash; the holder journals them afterwards,
# and again at its next start if it stopped first (router/sources/mqtt.py).
held_messages = sa.Table(
    "held_messages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("holder", sa.String(300), nullable=False, index=True),
    sa.Column("held_at", sa.Float, nullable=False),
    sa.Column("record", sa.JSON, nullable=False),
)

# orjson: JSON columns (event records, plans, results) are on the hot path.
_JSON: dict[str, Any] = {
    "json_serializer": lambda value: orjson.dumps(value).decode(),
    "json_deserializer": orjson.loads,
}


def execute_many(
    conn: sa.Connection, statement: sa.Insert | sa.Update, rows: Sequence[Mapping[str, Any]]
) -> None:
    """`conn.execute(statement, rows)` for an INSERT or UPDATE without RETURNING or
    `IN` lists, sent as the driver's own executemany of one tuple per row, or on SQLite
    as a few statements of many rows each.

    SQLAlchemy's executemany builds and processes a parameter dict per row, about a
    third of a journal insert's CPU (bench/RESULTS.md, session 27), and every event
    pays it several times over. Here the statement is compiled once per dialect and
    parameter set, and each parameter's own bind processor (JSON serialization) is
    applied, so what is stored is the same. Every row has the first row's keys, as
    SQLAlchemy's executemany requires too.
    """
    if not rows:
        return
    many = _compiled_many(statement, conn.dialect, tuple(rows[0]))
    multi = many.multi
    if multi is not None and (len(rows) == 1 or (
            multi.distinct is not None and len({r[multi.distinct] for r in rows}) < len(rows))):
        multi = None
    # An UPDATE's rows carry their own values only: the fixed ones follow them once.
    per_row = many.own if multi is not None and multi.fixed else many.values
    try:
        data = [per_row(row) for row in rows]
    except Exception as exc:  # a value its column cannot take: as SQLAlchemy reports it
        raise sa.exc.StatementError(str(exc), many.sql, None, exc) from exc
    if multi is None:
        conn.exec_driver_sql(many.sql, data)
        return
    # SQLite: many rows per statement, a power of two at a time. sqlite3's executemany
    # steps the statement once per row and lets go of the GIL at each step; while the
    # event loop thread is busy, taking it back costs the journal's thread up to a
    # switch interval per row (bench/RESULTS.md, session 29: 256 rows inserted in
    # 258-407 ms against 12-15 ms as one statement, next to a busy thread; session 30:
    # 64 rows updated in 6.5 ms against 0.3 ms). Powers of two keep the statements few
    # and cached by sqlite3.
    start = 0
    while start < len(data):
        count = min(multi.rows_at_most, 1 << ((len(data) - start).bit_length() - 1))
        chunk = data[start:start + count]
        conn.exec_driver_sql(_rows_sql(multi.head, multi.group, multi.tail, count),
                             (*itertools.chain.from_iterable(chunk), *multi.fixed))
        start += count


# Bound parameters one SQLite statement may hold: 32,766 from SQLite 3.32, 999 before.
_SQLITE_VARIABLES = 32_766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999
_SQLITE_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
_ROWS_PER_STATEMENT = 256


@functools.lru_cache(maxsize=256)
def _rows_sql(head: str, group: str, tail: str, count: int) -> str:
    return head + ", ".join([group] * count) + tail


class _MultiRow(NamedTuple):
    """One SQLite statement for many rows: `head + group, group, ... + tail`.

    INSERT: the VALUES row repeated. UPDATE: `WITH _rows(c0, ...) AS (VALUES ...)
    UPDATE ... FROM _rows WHERE ...`, each row parameter read from `_rows`; the
    parameters fixed in the statement follow the rows once (`fixed`).
    """

    head: str
    group: str
    tail: str
    rows_at_most: int
    fixed: tuple[Any, ...] = ()
    # UPDATE: the row key compared with the table's primary key. Two rows naming the
    # same table row would be applied one after the other by executemany, but only one
    # (either) by UPDATE ... FROM: such a batch goes by executemany.
    distinct: str | None = None


class _Many(NamedTuple):
    """A statement compiled for execute_many, and how a row becomes its parameters."""

    sql: str
    get: Callable[[Mapping[str, Any]], Any]  # the row's values in position order (C code)
    single: bool  # one value: itemgetter returns it bare, not in a tuple
    processed: tuple[tuple[int, Callable[[Any], Any]], ...]  # (index, bind processor)
    fixed: tuple[tuple[int, Any], ...]  # (position, processed value) fixed in the statement
    multi: _MultiRow | None = None  # SQLite: how to send many rows per statement

    def own(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row's own parameters, processed, in position order."""
        got = self.get(row)
        if self.single:
            got = (got,)
        if not self.processed:
            return tuple(got)
        values = list(got)
        for index, process in self.processed:
            values[index] = process(values[index])
        return tuple(values)

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """Every parameter of the statement: the row's own and the fixed ones."""
        if not self.fixed:
            return self.own(row)
        values = list(self.own(row))
        for position, value in self.fixed:  # in ascending order
            values.insert(position, value)
        return tuple(values)


@functools.lru_cache(maxsize=256)
def _compiled_many(
    statement: sa.Insert | sa.Update, dialect: sa.Dialect, keys: tuple[str, ...]
) -> _Many:
    """The SQL, and per positional parameter either a row key (with the column's bind
    processor, if any) or a value fixed in the statement (`state="done"`), processed."""
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    assert compiled.positiontup is not None and not any(
        b.expanding for b in compiled.binds.values()), "positional, no IN lists"
    keyed: list[str] = []
    processed: list[tuple[int, Callable[[Any], Any]]] = []
    fixed: list[tuple[int, Any]] = []
    for position, name in enumerate(compiled.positiontup):
        bind = compiled.binds[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if name in keys:
            if process is not None:
                processed.append((len(keyed), process))
            keyed.append(name)
        else:
            value = bind.effective_value
            fixed.append((position, value if process is None else process(value)))
    get = operator.itemgetter(*keyed) if keyed else (lambda row: ())
    sql = str(compiled)
    multi = None
    if dialect.name == "sqlite" and keyed:
        if isinstance(statement, sa.Insert):
            multi = _insert_rows(sql, len(compiled.positiontup))
        elif _SQLITE_UPDATE_FROM:
            multi = _update_rows(sql, compiled.positiontup, keyed, fixed,
                                 _primary_key_parameter(statement, keyed))
    return _Many(sql, get, len(keyed) == 1, tuple(processed), tuple(fixed), multi)


def _at_most(parameters_per_row: int) -> int:
    """Rows per statement: a power of two, as the chunks are, within SQLite's limit."""
    fit = min(_ROWS_PER_STATEMENT, _SQLITE_VARIABLES // max(1, parameters_per_row))
    return 1 << (fit.bit_length() - 1)


def _insert_rows(sql: str, parameters: int) -> _MultiRow | None:
    """`INSERT ... VALUES (?, ?, ...) [ON CONFLICT ...]` with the VALUES row repeated,
    when that row holds every parameter of the statement (an upsert's SET with
    parameters of its own does not qualify) and appears once."""
    start = sql.find(" VALUES (")
    if start < 0:
        return None
    start += len(" VALUES ")
    end = sql.find(")", start)
    group = sql[start:end + 1]
    if ("(" in group[1:] or sql.count(group) != 1 or group.count("?") != parameters
            or sql.count("?") != parameters):
        return None
    return _MultiRow(sql[:start], group, sql[end + 1:], _at_most(parameters))


def _update_rows(
    sql: str, positions: Sequence[str], keyed: list[str], fixed: list[tuple[int, Any]],
    distinct: str | None,
) -> _MultiRow | None:
    """`UPDATE t SET a=? WHERE t.k = ?` as `WITH _rows(c0, c1) AS (VALUES (?, ?), ...)
    UPDATE t SET a=_rows.c0 FROM _rows WHERE t.k = _rows.c1`, when the statement's
    `?` are its parameters alone and it has one WHERE (no subqueries)."""
    pieces = sql.split("?")
    if (distinct is None or len(pieces) != len(positions) + 1 or sql.count(" WHERE ") != 1
            or " FROM " in sql or "SELECT" in sql):
        return None
    at = {name: index for index, name in enumerate(keyed)}
    text = pieces[0]
    for name, piece in zip(positions, pieces[1:], strict=True):
        text += (f"_rows.c{at[name]}" if name in at else "?") + piece
    columns = ", ".join(f"c{i}" for i in range(len(keyed)))
    where = text.index(" WHERE ")
    return _MultiRow(
        f"WITH _rows({columns}) AS (VALUES ", "(" + ", ".join("?" * len(keyed)) + ")",
        f") {text[:where]} FROM _rows{text[where:]}", _at_most(len(keyed)),
        fixed=tuple(value for _, value in fixed), distinct=distinct,
    )


def _primary_key_parameter(statement: sa.Update, keyed: list[str]) -> str | None:
    """The row key an UPDATE compares its table's one-column primary key with, in a
    WHERE of plain ANDed terms; None if there is none."""
    primary = list(statement.table.primary_key)
    where = statement.whereclause
    if len(primary) != 1 or where is None:
        return None
    terms = where.clauses if isinstance(where, sa.BooleanClauseList) else [where]
    for term in terms:
        if (isinstance(term, sa.BinaryExpression) and term.operator is operator.eq
                and term.left is primary[0] and isinstance(term.right, sa.BindParameter)
                and term.right.key in keyed):
            return term.right.key
    return None


class Database:
    """Async engine for reads; each write transaction runs as one synchronous function.

    A write is `await db.run_write(fn, *args)`: `fn(conn, *args)` runs whole on a sync
    `Connection` inside one transaction, so no transaction is held open across event
    loop turns and each costs one hop instead of one per statement.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._writer: sa.Engine | None = None
        self._executor: ThreadPoolExecutor | None = None
        if self.is_sqlite:
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                url, connect_args={"timeout": 60}, pool_size=4, max_overflow=4, **_JSON
            )
            _sqlite_pragmas(self.engine.sync_engine)
            # SQLite allows one writer: one pysqlite connection on the same file, used by
            # one writer at a time, so our own writers queue in order instead of spinning
            # on SQLITE_BUSY.
            self._writer = sa.create_engine(
                sa.make_url(url).set(drivername="sqlite"), connect_args={"timeout": 60},
                pool_size=1, max_overflow=0, **_JSON,
            )
            _sqlite_pragmas(self._writer)
        else:
            # asyncpg prepares statements; a generic plan chosen while the tables are
            # small and unanalysed keeps scanning them as they grow (bench: +50 % msg/s).
            self.engine = create_async_engine(
                url, pool_size=8, max_overflow=8, pool_pre_ping=True,
                connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}},
                **_JSON,
            )

    async def run_write(
        self, fn: Callable[Concatenate[sa.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `fn(conn, *args)` as one write transaction, committed when it returns."""
        if self._writer is None:
            async with self.engine.begin() as conn:
                return await conn.run_sync(fn, *args, **kwargs)
        # One dedicated writer thread: fsync and busy waits (the CLI writing) never stall
        # the loop, and writers queue in order.  Bench: running `fn` inline on the loop
        # was about as fast, with a worse p99.
        call = functools.partial(self._sqlite_write, self._writer, fn, *args, **kwargs)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="router-journal")
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    @staticmethod
    def _sqlite_write(
        engine: sa.Engine,
        fn: Callable[Concatenate[sa.Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        with engine.connect() as conn:
            # IMMEDIATE takes the write lock up front, so a transaction that reads then
            # writes never fails with SQLITE_BUSY half-way because another process (the
            # CLI, a second daemon) wrote in between.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                result = fn(conn, *args, **kwargs)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            return result

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from router.migrations import upgrade_head

        async with contextlib.AsyncExitStack() as stack:
            if self.is_sqlite:
                await stack.enter_async_context(_sqlite_migration_lock(self.url))
            conn = await stack.enter_async_context(self.engine.begin())
            if self.is_sqlite:
                # One transaction for all of it (our connections autocommit, so begin()
                # alone sends no BEGIN): a migration cut off by a crash leaves nothing
                # half-made that the next start would trip over.
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                # Several daemons may start at once against one PostgreSQL.
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(727274)"))
            await conn.run_sync(upgrade_head)

    async def dispose(self) -> None:
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown)
            self._executor = None
        if self._writer is not None:
            self._writer.dispose()
        await self.engine.dispose()


@contextlib.asynccontextmanager
async def _sqlite_migration_lock(url: str) -> AsyncIterator[None]:
    """One migrating process at a time per SQLite file (the daemon starting while a CLI
    command runs): a lock file next to it. BEGIN IMMEDIATE alone still lost the race
    to "database is locked" when both started the transaction at once."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.migrate-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


async def until_it_answers(
    operation: Callable[[], Awaitable[T]], what: str, set_healthy: Callable[[bool], None]
) -> T:
    """`await operation()` until it succeeds, unhealthy meanwhile, backing off to 10 s.

    For the start-up steps that read the journal (recover in-flight work, finish moves a
    crash cut off): a journal that is busy or down when the daemon starts is a state to
    report and wait out, as during a run, not a reason to exit.
    """
    delay = 0.5
    while True:
        try:
            result = await operation()
        except Exception as exc:
            set_healthy(False)
            log.warning(f"{what} failed; retrying", error=str(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        else:
            set_healthy(True)
            return result


def _sqlite_pragmas(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # We issue BEGIN IMMEDIATE ourselves for writes (Database.run_write); reads
        # autocommit.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
