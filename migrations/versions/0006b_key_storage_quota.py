"""per-key storage quota

Revision ID: 0006b
Revises: 0006
Create Date: 2026-12-02

Issue 12: ``api_keys.storage_quota_bytes`` is the most artifact bytes a key may hold (stored files plus the
estimated output of its unfinished jobs), set by an admin; NULL (every existing key) means no quota. Only this
column (self-contained; chained after 0006, the job settings document).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006b'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('storage_quota_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('storage_quota_bytes')
