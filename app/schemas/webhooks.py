"""Outgoing webhooks (Standard Webhooks) and the Hub's incoming webhook payload."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class WebhookIn(BaseModel):
    """Where to announce a job's end (``job.succeeded``, ``job.failed``, ``job.cancelled``), signed as Standard
    Webhooks with ``secret``."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2000, description="http(s) URL; private, loopback, link-local and "
                                                                 "reserved addresses are refused unless the operator "
                                                                 "allows them (MOPEQ_WEBHOOK_ALLOW_PRIVATE)")
    secret: SecretStr | None = Field(None, max_length=200, json_schema_extra={"writeOnly": True},
                                     description="Signing secret, 'whsec_' + base64 of 24..64 random bytes. "
                                                 "Required for a job; a watch generates one when it is left out. "
                                                 "Write-only: never returned (a watch returns it once, at creation)")


class WebhookOut(BaseModel):
    url: str


class DeliveryOut(BaseModel):
    attempt: int
    url: str
    status_code: int | None
    error: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None
    duration_ms: int | None


class MessageOut(BaseModel):
    id: str = Field(description="The webhook-id header: the same on every attempt of this message")
    job_id: str
    event_type: str
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None
    deliveries: list[DeliveryOut]


# ---- the Hub's payload (huggingface_hub/_webhooks_payload.py, read leniently: unknown fields are ignored) ----------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class HubEvent(_Lenient):
    action: str
    scope: str


class HubRepo(_Lenient):
    type: str
    name: str
    id: str | None = None
    private: bool | None = None
    head_sha: str | None = Field(None, alias="headSha")


class HubUpdatedRef(_Lenient):
    ref: str
    oldSha: str | None = None
    newSha: str | None = None


class HubWebhookInfo(_Lenient):
    id: str | None = None
    version: int | None = None


class HubPayload(_Lenient):
    event: HubEvent
    repo: HubRepo
    updatedRefs: list[HubUpdatedRef] | None = None
    webhook: HubWebhookInfo | None = None


class HubTriggered(BaseModel):
    watch_id: str
    job_id: str
    created: bool = Field(description="false when this (watch, repo, commit) already had its job")


class HubError(BaseModel):
    watch_id: str
    code: str
    detail: str


class HubHookOut(BaseModel):
    status: Literal["queued", "duplicate", "ignored", "error"]
    reason: str | None = None
    repo: str | None = None
    sha: str | None = None
    jobs: list[HubTriggered] = Field(default_factory=list)
    errors: list[HubError] = Field(default_factory=list)
