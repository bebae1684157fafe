"""Tables of the service (SQLAlchemy 2.0 typed models). The schema is created only by Alembic migrations."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator):
    """Stores naive UTC (same bytes on SQLite and PostgreSQL), returns aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the public key id (part of the key)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64))  # HMAC-SHA256(server secret, key), hex
    scope: Mapped[str] = mapped_column(String(16), default="user")  # admin | user
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Jobs admitted so far; bumped under the row's lock by every admission (app.services.limits.admit).
    admissions: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_created", "owner_key_id", "created_at"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)

    # what to quantize
    model: Mapped[str] = mapped_column(String(500))  # as the user gave it
    model_source: Mapped[str] = mapped_column(String(8), default="hub")  # hub | local
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)  # resolved local directory
    revision: Mapped[str | None] = mapped_column(String(200), nullable=True)  # as requested
    resolved_revision: Mapped[str | None] = mapped_column(String(64), nullable=True)  # commit sha

    # the settings: one versioned JSON document, the engine config's public form (app.services.job_settings)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    # the failed or cancelled job this one retries (POST /v1/jobs/{id}/retry); its finished stages are reused
    retry_of: Mapped[str | None] = mapped_column(String(32), nullable=True)
    push_repo_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    push_private: Mapped[bool] = mapped_column(Boolean, default=False)
    push_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    hf_token_enc: Mapped[str | None] = mapped_column(Text, nullable=True)  # Fernet; deleted when the job ends

    # sizing known at submit (from the estimate)
    est_download_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    est_output_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    est_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # device memory (queues)
    queue: Mapped[str | None] = mapped_column(String(64), nullable=True)  # Celery queue; NULL = MOPEQ_QUEUE

    # execution
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker started it
    recoveries: Mapped[int] = mapped_column(Integer, default=0)  # times it was re-queued after its worker died
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # stage -> seconds
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # summary of report.json
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)

    events: Mapped[list[JobEvent]] = relationship(back_populates="job", cascade="all, delete-orphan",
                                                  passive_deletes=True)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # status | stage | progress | log
    status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)

    job: Mapped[Job] = relationship(back_populates="events")


class ExpertAllocation(Base):
    __tablename__ = "expert_allocations"
    __table_args__ = (UniqueConstraint("job_id", "layer", "expert", name="uq_expert_allocations_job_layer_expert"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    module: Mapped[str | None] = mapped_column(String(300), nullable=True)
    expert: Mapped[int] = mapped_column(Integer)
    bits: Mapped[int] = mapped_column(Integer)
    sensitivity: Mapped[float | None] = mapped_column(Float, nullable=True)
    frequency: Mapped[float | None] = mapped_column(Float, nullable=True)
    params: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind", "name", name="uq_artifacts_job_kind_name"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # file | hub
    name: Mapped[str] = mapped_column(String(500))  # path relative to the job's artifact dir, or the hub repo
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    hub_repo: Mapped[str | None] = mapped_column(String(200), nullable=True)
    hub_commit: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    response_status: Mapped[int] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    current_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


# ---- watches (quantize new Hub commits) and outgoing webhooks (migration 0002) ------------------------------------
class Watch(Base):
    """A Hub repo (or an owner's repos by glob) whose new commits on main (or on the refs ``ref_pattern`` names: a
    branch, or tags by glob) each get a job from ``template``."""

    __tablename__ = "watches"
    __table_args__ = (Index("ix_watches_owner_created", "owner_key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    repo: Mapped[str] = mapped_column(String(200))  # "org/name", or "org/<glob>" such as "org/*-MoE*"
    # the refs that make jobs: "refs/heads/main", another branch, or tags by glob ("refs/tags/*")
    ref_pattern: Mapped[str] = mapped_column(String(200), default="refs/heads/main",
                                             server_default="refs/heads/main")
    template: Mapped[dict[str, Any]] = mapped_column(JSON)  # the job knobs (POST /v1/jobs without model/revision)
    target_repo: Mapped[str | None] = mapped_column(String(300), nullable=True)  # push naming rule
    push_private: Mapped[bool] = mapped_column(Boolean, default=True)
    hf_token_enc: Mapped[str | None] = mapped_column(Text, nullable=True)  # Fernet
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_secret_enc: Mapped[str | None] = mapped_column(Text, nullable=True)  # Fernet
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WatchTrigger(Base):
    """One job per (watch, repo, commit): the unique constraint makes a retried or concurrent Hub delivery find the
    first job instead of making a second."""

    __tablename__ = "watch_triggers"
    __table_args__ = (UniqueConstraint("watch_id", "repo", "sha", name="uq_watch_triggers_watch_repo_sha"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    watch_id: Mapped[str] = mapped_column(ForeignKey("watches.id", ondelete="CASCADE"))
    repo: Mapped[str] = mapped_column(String(200))
    sha: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    hub_webhook_id: Mapped[str | None] = mapped_column(String(100), nullable=True)  # the Hub's webhook.id
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobWebhook(Base):
    """Where a job's final status is announced (the job body's ``webhook``, or its watch's)."""

    __tablename__ = "job_webhooks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    secret_enc: Mapped[str] = mapped_column(Text)  # Fernet of the whsec_ secret
    watch_id: Mapped[str | None] = mapped_column(ForeignKey("watches.id", ondelete="SET NULL"), nullable=True)
    announced: Mapped[bool] = mapped_column(Boolean, default=False, index=True)  # its message exists
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookMessage(Base):
    """One event to one URL (Standard Webhooks: ``webhook-id`` is this id, the same on every attempt)."""

    __tablename__ = "webhook_messages"
    __table_args__ = (UniqueConstraint("job_id", "event_type", name="uq_webhook_messages_job_event"),
                      Index("ix_webhook_messages_status_next", "status", "next_attempt_at"))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # msg_<32 hex>
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(String(32))  # job.succeeded | job.failed | job.cancelled
    url: Mapped[str] = mapped_column(Text)
    secret_enc: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the exact body that is signed and sent
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WebhookDelivery(Base):
    """One HTTP attempt of a message."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("webhook_messages.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
