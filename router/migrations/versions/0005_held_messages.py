"""held messages: MQTT messages acknowledged while a file:// checkpoint is hashed

A message whose local files are large is held in the journal, acknowledged, and
journaled as an event once hashed, so the messages behind it need not wait.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "held_messages",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("holder", sa.String(length=300), nullable=False),
        sa.Column("held_at", sa.Float(), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_held_messages_holder", "held_messages", ["holder"])


def downgrade() -> None:
    op.drop_index("ix_held_messages_holder", table_name="held_messages")
    op.drop_table("held_messages")
