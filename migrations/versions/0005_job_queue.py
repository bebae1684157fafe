"""job queue and memory estimate

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Issue 13: ``jobs.queue`` is the Celery queue a job was routed to at submit (by the device memory its estimate
needs, ``jobs.est_memory_bytes``, against MOPEQ_QUEUES); the recovery sweep republishes a job to that queue. NULL
(jobs from before): the deployment's default queue.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('est_memory_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('est_memory_bytes')
        batch_op.drop_column('queue')
