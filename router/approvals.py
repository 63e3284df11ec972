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


async def deploy_superseded(conn: AsyncConnection, key: str) -> str | None:
    """Why a deploy delivery must not run now (a newer version went live), or None."""
    found = (
        await conn.execute(sa.select(model_decisions).where(model_decisions.c.deploy_key == key))
    ).first()
    if found is None:
        return None
    row = DecisionRow.model_validate({**found._mapping, "metrics": found.metrics or {}})
    if row.forced:
        return None
    newer = await conn.execute(
        sa.select(model_decisions.c.version).where(
            model_decisions.c.pipeline == row.pipeline,
            model_decisions.c.name == row.name,
            model_decisions.c.stack == row.stack,
            model_decisions.c.artifact_id > row.artifact_id,
            model_decisions.c.state == "deployed",
        )
    )
    version = newer.scalar()
    if version is None:
        return None
    return (
        f"superseded: version {version} of {row.name} is deployed and newer than "
        f"{row.version}; `model deploy --force` rolls back on purpose"
    )


def record_deploy_outcome(
    conn: sa.Connection, key: str, ok: bool, error: str | None, now: float
) -> None:
    found = conn.execute(
        sa.select(model_decisions).where(model_decisions.c.deploy_key == key)
    ).first()
    if found is None:
        return
    if not ok:
        conn.execute(
            sa.update(model_decisions)
            .where(model_decisions.c.artifact_id == found.artifact_id)
            .values(state="failed", reason=error, updated_at=now)
        )
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
