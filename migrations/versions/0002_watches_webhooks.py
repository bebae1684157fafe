"""watches and webhooks

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

Issue 5: watches of Hub repos (``watches``), one job per (watch, repo, commit) (``watch_triggers``, unique), the
outgoing webhook of a job (``job_webhooks``), its signed messages (``webhook_messages``) and every delivery attempt
(``webhook_deliveries``). Times are naive UTC (app.db.models.UTCDateTime).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('watches',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner_key_id', sa.String(length=32), nullable=False),
    sa.Column('repo', sa.String(length=200), nullable=False),
    sa.Column('template', sa.JSON(), nullable=False),
    sa.Column('target_repo', sa.String(length=300), nullable=True),
    sa.Column('push_private', sa.Boolean(), nullable=False),
    sa.Column('hf_token_enc', sa.Text(), nullable=True),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('webhook_secret_enc', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['owner_key_id'], ['api_keys.id'], name=op.f('fk_watches_owner_key_id_api_keys')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_watches'))
    )
    with op.batch_alter_table('watches', schema=None) as batch_op:
        batch_op.create_index('ix_watches_owner_created', ['owner_key_id', 'created_at'], unique=False)

    op.create_table('job_webhooks',
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('secret_enc', sa.Text(), nullable=False),
    sa.Column('watch_id', sa.String(length=32), nullable=True),
    sa.Column('announced', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_webhooks_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['watch_id'], ['watches.id'], name=op.f('fk_job_webhooks_watch_id_watches'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('job_id', name=op.f('pk_job_webhooks'))
    )
    with op.batch_alter_table('job_webhooks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_webhooks_announced'), ['announced'], unique=False)

    op.create_table('watch_triggers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('watch_id', sa.String(length=32), nullable=False),
    sa.Column('repo', sa.String(length=200), nullable=False),
    sa.Column('sha', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('hub_webhook_id', sa.String(length=100), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_watch_triggers_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['watch_id'], ['watches.id'], name=op.f('fk_watch_triggers_watch_id_watches'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_watch_triggers')),
    sa.UniqueConstraint('watch_id', 'repo', 'sha', name='uq_watch_triggers_watch_repo_sha')
    )
    with op.batch_alter_table('watch_triggers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_watch_triggers_job_id'), ['job_id'], unique=False)

    op.create_table('webhook_messages',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('event_type', sa.String(length=32), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('secret_enc', sa.Text(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(), nullable=False),
    sa.Column('lease_until', sa.DateTime(), nullable=True),
    sa.Column('enqueued_at', sa.DateTime(), nullable=True),
    sa.Column('last_status_code', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_webhook_messages_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_messages')),
    sa.UniqueConstraint('job_id', 'event_type', name='uq_webhook_messages_job_event')
    )
    with op.batch_alter_table('webhook_messages', schema=None) as batch_op:
        batch_op.create_index('ix_webhook_messages_status_next', ['status', 'next_attempt_at'], unique=False)

    op.create_table('webhook_deliveries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('message_id', sa.String(length=40), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('duration_ms', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['message_id'], ['webhook_messages.id'], name=op.f('fk_webhook_deliveries_message_id_webhook_messages'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries'))
    )
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_webhook_deliveries_message_id'), ['message_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_webhook_deliveries_message_id'))

    op.drop_table('webhook_deliveries')
    with op.batch_alter_table('webhook_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_messages_status_next')

    op.drop_table('webhook_messages')
    with op.batch_alter_table('watch_triggers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_watch_triggers_job_id'))

    op.drop_table('watch_triggers')
    with op.batch_alter_table('job_webhooks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_webhooks_announced'))

    op.drop_table('job_webhooks')
    with op.batch_alter_table('watches', schema=None) as batch_op:
        batch_op.drop_index('ix_watches_owner_created')

    op.drop_table('watches')
