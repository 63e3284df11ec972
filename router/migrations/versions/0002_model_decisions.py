"""model decisions: persisted deploy conditions and approvals

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_decisions",
        sa.Column("artifact_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(length=300), nullable=False),
        sa.Column("artifact_index", sa.Integer(), nullable=False),
        sa.Column("pipeline", sa.String(length=300), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("stack", sa.String(length=200), nullable=False),
        sa.Column("condition", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("deploy_key", sa.String(length=800), nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("forced", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("artifact_id"),
    )
    op.create_index("ix_model_decisions_state", "model_decisions", ["state"])
    op.create_index("ix_model_decisions_model", "model_decisions", ["pipeline", "name"])


def downgrade() -> None:
    op.drop_index("ix_model_decisions_model", table_name="model_decisions")
    op.drop_index("ix_model_decisions_state", table_name="model_decisions")
    op.drop_table("model_decisions")
