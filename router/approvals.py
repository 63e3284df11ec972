"""Deploy conditions as persisted state: manual, auto and on_approval, with an audit trail.

FlowyML only logs a warning for on_approval.  Here every model whose rule says
`deploy: true` gets a row in `model_decisions`; `model deploy` / `model approve` turn
it into a deploy delivery in the journal (so a deploy requested while the deployer is
down is retried, not lost), and deploys of one model are ordered: an older version
approved late never replaces a newer deployed one unless forced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from router.db import artifacts, deliveries, events, model_decisions
from router.delivery import Action
from router.rules import ArtifactPlan, delivery_key

__all__ = [
    "DecisionError",
    "DecisionRow",
    "decide",
    "deploy_may_start",
    "deploy_superseded",
    "list_decisions",
    "record_decision",
    "record_deploy_outcome",
]

# plan outcome -> persisted state
_INITIAL = {
    "deploy": "deploying",
    "awaiting_manual": "awaiting_manual",
    "pending_approval": "pending_approval",
    "blocked": "blocked",
}
PENDING_STATES = ("awaiting_manual", "pending_approval")


class DecisionError(Exception):
    """A model command that cannot be carried out, with the reason and the fix."""


class DecisionRow(BaseModel):
    artifact_id: int
    event_id: str
    pipeline: str
    name: str
    version: str
    stack: str
    condition: str
    state: str
    reason: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    deploy_key: str | None = None
    decided_by: str | None = None
    comment: str | None = None
    forced: bool = False
    created_at: float
    updated_at: float


def record_decision(
    conn: sa.Connection,
    *,
    artifact_id: int,
    event_id: str,
    pipeline: str,
    stack: str,
    plan: ArtifactPlan,
    now: float,
) -> None:
    """Called while an event is journaled, for each model with a deploy decision."""
    decision = plan.decision
    if decision is None:
        return
    deploy = next((d for d in plan.deliveries if d.action is Action.DEPLOY), None)
    conn.execute(
        sa.insert(model_decisions).values(
            artifact_id=artifact_id,
            event_id=event_id,
            artifact_index=plan.index,
            pipeline=pipeline,
            name=plan.name,
            version=plan.version,
            stack=stack,
            condition=decision.condition,
            state=_INITIAL[decision.outcome],
            reason=decision.reason,
            metrics=decision.metrics,
            params=deploy.params if deploy else None,
            deploy_key=deploy.key if deploy else None,
            forced=False,
            created_at=now,
            updated_at=now,
        )
    )


def list_decisions(
    conn: sa.Connection,
    *,
    pipeline: str | None = None,
    name: str | None = None,
    pending: bool = False,
) -> list[DecisionRow]:
    query = sa.select(model_decisions).order_by(model_decisions.c.artifact_id.desc())
    if pipeline is not None:
        query = query.where(model_decisions.c.pipeline == pipeline)
    if name is not None:
        query = query.where(model_decisions.c.name == name)
    if pending:
        query = query.where(model_decisions.c.state.in_(PENDING_STATES))
    return [
        DecisionRow.model_validate({**r._mapping, "metrics": r.metrics or {}})
        for r in conn.execute(query).all()
    ]


def _find(
    conn: sa.Connection, name: str, version: str, pipeline: str | None
) -> DecisionRow:
    rows = [r for r in list_decisions(conn, pipeline=pipeline, name=name)
            if r.version == version]
    if not rows:
        known = sorted({r.version for r in list_decisions(conn, name=name)})
        hint = f"; known versions: {', '.join(known)}" if known else (
            "; no model of that name has a deploy rule (deploy: true)"
        )
        raise DecisionError(f"no model {name!r} version {version!r}{hint}")
    pipelines = {r.pipeline for r in rows}
    if len(pipelines) > 1:
        raise DecisionError(
            f"model {name!r} version {version!r} exists in pipelines "
            f"{', '.join(sorted(pipelines))}; pass --pipeline"
        )
    return rows[0]


def _newer_live(conn: sa.Connection, row: DecisionRow) -> DecisionRow | None:
    """A newer version of the same model that is deployed or being deployed."""
    newer = conn.execute(
        sa.select(model_decisions)
        .where(
            model_decisions.c.pipeline == row.pipeline,
            model_decisions.c.name == row.name,
            model_decisions.c.stack == row.stack,
            model_decisions.c.artifact_id > row.artifact_id,
            model_decisions.c.state.in_(("deployed", "deploying")),
        )
        .order_by(model_decisions.c.artifact_id.desc())
        .limit(1)
    )
    found = newer.first()
    return DecisionRow.model_validate({**found._mapping, "metrics": found.metrics or {}}) if (
        found
    ) else None


def decide(
    conn: sa.Connection,
    *,
    action: Literal["deploy", "approve", "reject"],
    name: str,
    version: str,
    pipeline: str | None = None,
    by: str | None = None,
    comment: str | None = None,
    force: bool = False,
    endpoint_name: Callable[[str], str | None] = lambda _stack: None,
) -> DecisionRow:
    """Carry out `model deploy|approve|reject` inside one journal transaction."""
    row = _find(conn, name, version, pipeline)
    now = time.time()
    if action == "reject":
        if row.state != "pending_approval":
            raise DecisionError(
                f"{name} {version} is {row.state}, not pending approval; only a pending "
                "approval can be rejected"
            )
        _update(conn, row, state="rejected", decided_by=by, comment=comment, now=now)
        return _find(conn, name, version, row.pipeline)
    if action == "approve" and row.state != "pending_approval":
        raise DecisionError(
            f"{name} {version} is {row.state}, not pending approval"
            + ("; use `model deploy` for manual deploys" if row.condition != "on_approval" else "")
        )
    if action == "deploy" and row.state in ("pending_approval", "rejected") and not force:
        # `model deploy` must not bypass the approval on_approval asks for.
        raise DecisionError(
            f"{name} {version} is {row.state} (deploy_condition {row.condition}): "
            + (f"approve it with `artifact-router model approve {name} --version {version}`, "
               "or pass --force to deploy it without approval"
               if row.state == "pending_approval" else
               f"it was rejected by {row.decided_by or 'an approver'}; pass --force to deploy "
               "it anyway")
        )
    if row.state == "deploying":
        raise DecisionError(f"{name} {version} is already being deployed")
    if row.state == "deployed" and not force:
        raise DecisionError(f"{name} {version} is already deployed")
    newer = _newer_live(conn, row)
    if newer is not None and not force:
        raise DecisionError(
            f"version {newer.version} of {name} is {newer.state} and newer than {version}; "
            "deploying the older one would replace it: pass --force to roll back on purpose"
        )
    key = _enqueue_deploy(conn, row, endpoint_name(row.stack), force, now)
    _update(
        conn, row, state="deploying", decided_by=by, comment=comment, now=now,
        deploy_key=key, forced=force,
    )
    return _find(conn, name, version, row.pipeline)


def _enqueue_deploy(
    conn: sa.Connection, row: DecisionRow, endpoint: str | None, force: bool, now: float
) -> str:
    """A deploy delivery after the model's register (or store) delivery."""
    index: int = conn.execute(
        sa.select(artifacts.c.artifact_index).where(artifacts.c.id == row.artifact_id)
    ).scalar_one()
    siblings = conn.execute(
        sa.select(deliveries.c.key, deliveries.c.action, deliveries.c.state,
                  deliveries.c.last_error).where(
            deliveries.c.event_id == row.event_id, deliveries.c.artifact_index == index
        )
    ).all()
    prereq = next((s for s in siblings if s.action == "register"), None) or next(
        (s for s in siblings if s.action == "store"), None
    )
    if prereq is not None and prereq.state == "dead":
        # A deploy waits for its prerequisite to be done: behind a dead one it would
        # wait for ever.
        raise DecisionError(
            f"{row.name} {row.version} cannot be deployed: its {prereq.action} delivery "
            f"{prereq.key} is dead ({prereq.last_error}); fix the cause, run "
            f"`artifact-router retry {prereq.key}`, and deploy once it is done"
        )
    after = prereq.key if prereq is not None else None
    key = delivery_key(row.event_id, index, Action.DEPLOY, f"{row.stack}.model_deployer")
    params: dict[str, Any] = {"endpoint_name": endpoint, "forced": force}
    values = {
        "state": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now,
        "updated_at": now, "params": params, "last_error": None, "result": None,
        "owner": None, "lease_until": None,
    }
    if any(s.key == key for s in siblings):
        conn.execute(sa.update(deliveries).where(deliveries.c.key == key).values(**values))
    else:
        conn.execute(
            sa.insert(deliveries).values(
                key=key, event_id=row.event_id, artifact_index=index, action="deploy",
                stack=row.stack, component="model_deployer",
                sink_id=f"{row.stack}.model_deployer", target=None, after=after, **values,
            )
        )
    conn.execute(
        sa.update(events).where(events.c.id == row.event_id)
        .values(state="accepted", finished_at=None)
    )
    return key


def _update(conn: sa.Connection, row: DecisionRow, *, now: float, **values: Any) -> None:
    conn.execute(
        sa.update(model_decisions)
        .where(model_decisions.c.artifact_id == row.artifact_id)
        .values(updated_at=now, **values)
    )


def _newer_deployed(conn: sa.Connection, row: Any) -> str | None:
    """The version of a newer deployed row of the same model, unless `row` was forced."""
    if row.forced:
        return None
    version: str | None = conn.execute(
        sa.select(model_decisions.c.version).where(
            model_decisions.c.pipeline == row.pipeline,
            model_decisions.c.name == row.name,
            model_decisions.c.stack == row.stack,
            model_decisions.c.artifact_id > row.artifact_id,
            model_decisions.c.state == "deployed",
        ).order_by(model_decisions.c.artifact_id.desc()).limit(1)
    ).scalar()
    return version


def _superseded_reason(conn: sa.Connection, key: str) -> str | None:
    found = conn.execute(
        sa.select(model_decisions).where(model_decisions.c.deploy_key == key)
    ).first()
    version = _newer_deployed(conn, found) if found is not None else None
    if found is None or version is None:
        return None
    return (
        f"superseded: version {version} of {found.name} is deployed and newer than "
        f"{found.version}; `model deploy --force` rolls back on purpose"
    )


async def deploy_superseded(conn: AsyncConnection, key: str) -> str | None:
    """Why a deploy delivery must not run now (a newer version went live), or None."""
    return await conn.run_sync(_superseded_reason, key)


def deploy_may_start(conn: sa.Connection, key: str, starting: set[tuple[str, str, str]]) -> bool:
    """Whether the deploy delivery `key` may be claimed now; `starting` collects the models
    whose deploy this claim takes.

    Deploys of one model (pipeline, name, stack) run one at a time: two in flight land
    in any order, and whichever lands last is live. One at a time, the check before each
    deploy (`deploy_superseded`) skips an older version once a newer one is deployed.
    """
    found = conn.execute(
        sa.select(model_decisions.c.pipeline, model_decisions.c.name, model_decisions.c.stack)
        .where(model_decisions.c.deploy_key == key)
    ).first()
    if found is None:
        return True
    model = (found.pipeline, found.name, found.stack)
    if model in starting:
        return False
    if conn.dialect.name == "postgresql" and not conn.execute(sa.select(
        # Pools: daemons claiming at once cannot see each other's uncommitted claims;
        # this lock (held until commit, never waited for) lets one of them at a time look.
        sa.func.pg_try_advisory_xact_lock(sa.func.hashtext("/".join(("deploy", *model))))
    )).scalar():
        return False
    busy = conn.execute(
        sa.select(deliveries.c.key)
        .select_from(model_decisions.join(
            deliveries, deliveries.c.key == model_decisions.c.deploy_key))
        .where(
            model_decisions.c.pipeline == found.pipeline,
            model_decisions.c.name == found.name,
            model_decisions.c.stack == found.stack,
            deliveries.c.state == "in_flight",
        ).limit(1)
    ).first()
    if busy is not None:
        return False
    starting.add(model)
    return True


def record_deploy_outcome(
    conn: sa.Connection, key: str, ok: bool, error: str | None, now: float
) -> None:
    found = conn.execute(
        sa.select(model_decisions).where(model_decisions.c.deploy_key == key)
    ).first()
    if found is None:
        return
    newer = _newer_deployed(conn, found)
    if not ok:
        # Dead-lettered because a newer version is live (the dispatcher's check): that
        # is not a failure of this version.
        conn.execute(
            sa.update(model_decisions)
            .where(model_decisions.c.artifact_id == found.artifact_id)
            .values(state="superseded" if newer else "failed", reason=error, updated_at=now)
        )
        return
    if newer is not None:
        # An older deploy landed after a newer one went live (its lease expired while
        # the deployer was slow): the endpoint now serves the older model. The newest
        # wins: deploy it again, and this one is superseded.
        conn.execute(
            sa.update(model_decisions)
            .where(model_decisions.c.artifact_id == found.artifact_id)
            .values(state="superseded", updated_at=now,
                    reason=f"landed after version {newer}, which is deployed again")
        )
        _redeploy_newest(conn, found, now)
        return
    conn.execute(
        sa.update(model_decisions)
        .where(model_decisions.c.artifact_id == found.artifact_id)
        .values(state="deployed", updated_at=now)
    )
    # Whatever was live before is now superseded (including a newer one, if forced).
    conn.execute(
        sa.update(model_decisions)
        .where(
            model_decisions.c.pipeline == found.pipeline,
            model_decisions.c.name == found.name,
            model_decisions.c.stack == found.stack,
            model_decisions.c.artifact_id != found.artifact_id,
            model_decisions.c.state == "deployed",
        )
        .values(state="superseded", updated_at=now)
    )


def _redeploy_newest(conn: sa.Connection, older: Any, now: float) -> None:
    """Queue the deploy of the newest deployed version of `older`'s model again."""
    newest = conn.execute(
        sa.select(model_decisions).where(
            model_decisions.c.pipeline == older.pipeline,
            model_decisions.c.name == older.name,
            model_decisions.c.stack == older.stack,
            model_decisions.c.state == "deployed",
        ).order_by(model_decisions.c.artifact_id.desc()).limit(1)
    ).first()
    if newest is None or newest.deploy_key is None:
        return
    conn.execute(
        sa.update(deliveries).where(deliveries.c.key == newest.deploy_key).values(
            state="pending", attempts=0, next_attempt_at=now, updated_at=now,
            last_error=None, owner=None, lease_until=None,
        )
    )
    conn.execute(
        sa.update(events).where(events.c.id == newest.event_id)
        .values(state="accepted", finished_at=None)
    )
    conn.execute(
        sa.update(model_decisions)
        .where(model_decisions.c.artifact_id == newest.artifact_id)
        .values(state="deploying", updated_at=now)
    )
