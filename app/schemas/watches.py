"""Watches: quantize every new commit on a Hub repo's main branch (or on the branch or tags a watch follows) with a
job template."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field, create_model

from app.schemas.common import TOKEN_PATTERN, HubToken
from app.schemas.jobs import JobCreate, Strict
from app.schemas.webhooks import WebhookIn, WebhookOut

# "org/name", or an owner's repos by a glob on the name ("org/*-MoE*"); the owner is always literal.
REPO_GLOB_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9._*?\[\]!-]{1,96}$"
# The refs a watch follows: a branch or tags, by a glob on the full ref name ("refs/tags/*", "refs/tags/v*").
REF_PATTERN = r"^refs/(heads|tags)/[A-Za-z0-9._/*?\[\]!-]{1,180}$"
MAIN_REF = "refs/heads/main"
TEMPLATE_EXCLUDED = ("model", "revision", "push", "hf_token", "webhook")

# The knobs of POST /v1/jobs, field for field (same types, defaults and limits), without what a watch sets itself.
JobTemplate = create_model(
    "JobTemplate", __base__=Strict, __doc__="The knobs of POST /v1/jobs without model, revision, push, hf_token "
                                            "and webhook (the watch sets those).",
    **{name: (f.annotation, f) for name, f in JobCreate.model_fields.items() if name not in TEMPLATE_EXCLUDED})


class WatchCreate(Strict):
    repo: str = Field(pattern=REPO_GLOB_PATTERN, max_length=200,
                      description="A Hub model repo 'org/name', or an owner's repos by a glob on the name, "
                                  "e.g. 'org/*-MoE*' (case-insensitive)")
    ref: str = Field(MAIN_REF, pattern=REF_PATTERN, max_length=200,
                     description="The refs whose updates make jobs: a branch ('refs/heads/main', the default) or tags "
                                 "and releases by a glob on the full ref name ('refs/tags/*', 'refs/tags/v*')")
    template: JobTemplate = Field(default_factory=JobTemplate,  # type: ignore[valid-type]
                                  description="The job each new commit gets (the knobs of POST /v1/jobs)")
    target_repo: str | None = Field(None, min_length=3, max_length=300,
                                    description="Push every result to this repo, a rule with {owner}, {name}, "
                                                "{bits}, {sha}, {short_sha}: e.g. '{owner}/{name}-MoPEQ-{bits}b'. "
                                                "Needs hf_token. Unset: no push")
    private: bool = Field(True, description="Create pushed repos as private")
    hf_token: HubToken | None = Field(None, max_length=1000,
                                      json_schema_extra={"writeOnly": True, "pattern": TOKEN_PATTERN},
                                       description="Write-only Hub token for the watch's jobs (gated/private source "
                                                   "repos, push); stored encrypted, never returned")
    webhook: WebhookIn | None = Field(None, description="Announce the end of each of the watch's jobs here")


class WatchOut(BaseModel):
    id: str
    owner_key_id: str
    repo: str
    ref: str
    template: dict[str, Any]
    target_repo: str | None
    private: bool
    has_hf_token: bool
    webhook: WebhookOut | None
    created_at: dt.datetime
    deleted_at: dt.datetime | None


class WatchCreated(WatchOut):
    webhook_secret: str | None = Field(None, description="The webhook's signing secret, shown once (here only)")
