"""watches follow a branch or tags

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Issue 15: a watch's ``ref_pattern`` names the refs whose updates make jobs: a branch (``refs/heads/main``, what
every existing watch followed, so their rows get it) or tags and releases by a glob (``refs/tags/*``).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('watches') as batch:
        batch.add_column(sa.Column('ref_pattern', sa.String(length=200), nullable=False,
                                   server_default='refs/heads/main'))


def downgrade() -> None:
    with op.batch_alter_table('watches') as batch:
        batch.drop_column('ref_pattern')
