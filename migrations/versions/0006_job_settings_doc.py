"""job settings as one versioned JSON document; jobs.retry_of

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Issue 12: the ~20 knob columns of ``jobs`` and its ``options`` bag become one ``settings`` document
``{"version": 1, ...}`` whose fields are the engine config's (``mopeq_core.config.QuantizeConfig``) minus the job's
identity (model, revision) and the worker's own choices. ``retry_of`` links a retried job to the one it retries.
Both directions convert the rows. The v1 document is spelled out here, not imported: a migration must keep
meaning what it meant when it was written.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# (column, type, nullable) as 0001 made them
COLUMNS = [
    ('budget_avg_bits', sa.Float(), True), ('budget_gb', sa.Float(), True), ('bits', sa.JSON(), False),
    ('sensitivity', sa.String(length=32), False), ('allocator', sa.String(length=32), False),
    ('scope', sa.String(length=16), False), ('granularity', sa.String(length=16), False),
    ('quantizer', sa.String(length=16), False), ('group_size', sa.Integer(), False),
    ('symmetric', sa.Boolean(), False), ('probes', sa.Integer(), False), ('calib_file', sa.Text(), True),
    ('calib_samples', sa.Integer(), False), ('seq_len', sa.Integer(), False), ('eval_file', sa.Text(), True),
    ('eval_samples', sa.Integer(), False), ('format', sa.String(length=32), False),
    ('trust_remote_code', sa.Boolean(), False), ('options', sa.JSON(), False),
]
# settings that lived in the options bag, with the engine's defaults of the time
OPTIONS = {'cost': 'output', 'sequential': True, 'act_order': False, 'probe_tol': 0.02, 'calib_all_experts': False,
           'eval_suites': [], 'eval_suite_limit': None, 'low_memory': False, 'seed': 0}
PLAIN = ['bits', 'sensitivity', 'allocator', 'scope', 'granularity', 'quantizer', 'group_size', 'symmetric', 'probes',
         'calib_file', 'calib_samples', 'seq_len', 'eval_file', 'eval_samples', 'format', 'trust_remote_code']


def _jobs(*names: str) -> sa.TableClause:
    types = {name: typ for name, typ, _ in COLUMNS}
    types.update(settings=sa.JSON(), id=sa.String(32))
    return sa.table('jobs', *(sa.column(n, types[n]) for n in names))


def to_document(row: Any) -> dict[str, Any]:
    opts = dict(row.options or {})
    doc: dict[str, Any] = {'version': 1, 'budget': {'avg_bits': row.budget_avg_bits, 'gb': row.budget_gb}}
    doc.update({k: getattr(row, k) for k in PLAIN})
    doc.update({k: opts.get(k, default) for k, default in OPTIONS.items()})
    doc['eval_suites'] = list(doc['eval_suites'] or [])
    return doc


def from_document(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get('version') != 1:
        raise RuntimeError(f"cannot downgrade a job settings document of version {doc.get('version')}")
    row = {k: doc[k] for k in PLAIN}
    row.update(budget_avg_bits=doc['budget']['avg_bits'], budget_gb=doc['budget']['gb'],
               options={k: doc.get(k, default) for k, default in OPTIONS.items()})
    return row


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('settings', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('retry_of', sa.String(length=32), nullable=True))
    conn = op.get_bind()
    old = _jobs('id', *(name for name, _, _ in COLUMNS))
    new = _jobs('id', 'settings')
    for row in conn.execute(sa.select(old)).fetchall():
        conn.execute(new.update().where(new.c.id == row.id).values(settings=to_document(row)))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('settings', existing_type=sa.JSON(), nullable=False)
        for name, _, _ in COLUMNS:
            batch_op.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        for name, typ, _ in COLUMNS:
            batch_op.add_column(sa.Column(name, typ, nullable=True))
    conn = op.get_bind()
    src = _jobs('id', 'settings')
    dst = _jobs('id', *(name for name, _, _ in COLUMNS))
    for row in conn.execute(sa.select(src)).fetchall():
        conn.execute(dst.update().where(dst.c.id == row.id).values(**from_document(row.settings)))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        for name, typ, nullable in COLUMNS:
            if not nullable:
                batch_op.alter_column(name, existing_type=typ, nullable=False)
        batch_op.drop_column('retry_of')
        batch_op.drop_column('settings')
