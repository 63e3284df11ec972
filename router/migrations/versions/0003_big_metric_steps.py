"""big metric steps: artifacts.step holds a manifest's step up to 2**63 - 1

A step over 2**31 - 1 (a timestamp in milliseconds, a global sample count) did not fit
PostgreSQL's INTEGER, and the intake batch holding it failed again at every retry.
SQLite's INTEGER is already 64-bit: nothing to change there (and no table to rebuild).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("artifacts", "step", type_=sa.BigInteger(),
                        existing_type=sa.Integer(), existing_nullable=True)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column("artifacts", "step", type_=sa.Integer(),
                        existing_type=sa.BigInteger(), existing_nullable=True)
