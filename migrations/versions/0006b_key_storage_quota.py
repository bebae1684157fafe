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
    op.add_column('api_keys', sa.Column('storage_quota_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite >= 3.35 has it): batch mode would rebuild api_keys, which the jobs of existing
    # keys reference, and SQLite's foreign keys refuse that.
    op.execute('ALTER TABLE api_keys DROP COLUMN storage_quota_bytes')
