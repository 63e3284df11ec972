"""run status: runs.status and runs.ended_at, from a manifest's run_status

A run's last step may say the run ended (finished, failed or killed); the catalog keeps
that status and the event's time, and the read API and client report them.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("ended_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("ended_at")
        batch.drop_column("status")
