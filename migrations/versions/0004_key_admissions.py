"""per-key admission counter

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Issue 16: ``api_keys.admissions`` counts the jobs a key was admitted. Every admission bumps it with an UPDATE in
the transaction that inserts the job, which takes the key row's lock on PostgreSQL and the write lock on SQLite:
concurrent submits of one key queue behind each other, so the per-key limits counted in that transaction hold.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('admissions', sa.BigInteger(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('admissions')
