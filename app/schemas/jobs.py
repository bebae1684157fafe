from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.common import TOKEN_PATTERN, HubToken, PathText
from app.schemas.webhooks import WebhookIn
from mopeq_core.config import ALLOCATORS, FORMATS, QUANTIZERS, SENSITIVITY_METHODS

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"


class Strict(BaseModel):
    """Request bodies: unknown fields are refused, and so are JSON booleans where a number is expected
    (pydantic would read ``true`` as 1)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(field.alias or name, data.get(name))
                values = value if isinstance(value, list) else [value]
                if any(isinstance(v, bool) for v in values) and "bool" not in repr(field.annotation):
                    raise ValueError(f"{field.alias or name}: expected a number, got a boolean")
        return data


class BudgetIn(Strict):
    """Exactly one of ``avg_bits`` (mean bits per expert weight) or ``gb`` (whole model, 1e9 bytes)."""

    avg_bits: float | None = Field(None, ge=1.0, le=16.0)
    gb: float | None = Field(None, gt=0, le=1e6)

    @model_validator(mode="after")
    def _one(self) -> BudgetIn:
        if (self.avg_bits is None) == (self.gb is None):
            raise ValueError("budget takes exactly one of avg_bits or gb, e.g. {\"avg_bits\": 2.5}")
        return self


class CalibrationIn(Strict):
    file: PathText | None = Field(None, max_length=1000,
                                  description="A .txt or .jsonl file under the server's model roots (default: built-in text)")
    samples: int = Field(32, ge=1, le=100_000)
    seq_len: int = Field(256, ge=8, le=32_768)


class EvaluationIn(Strict):
    file: PathText | None = Field(None, max_length=1000)
    samples: int = Field(64, ge=1, le=100_000)
    suites: list[str] = Field(default_factory=list, max_length=8,
                              description='Evaluation suites run before and after, e.g. "lm-eval:TASK[,TASK]" or '
                                          '"lmms-eval:TASK"; the built-in local tasks need `file`')
    suite_limit: int | None = Field(None, ge=1, le=100_000, description="Examples per suite task")


class PushIn(Strict):
    repo_id: str | None = Field(None, pattern=REPO_PATTERN,
                                description="Target Hub repo; default {owner}/{model}-MoPEQ-{bits}b")
    private: bool = False


class JobCreate(Strict):
    model: PathText = Field(min_length=1, max_length=500, description="Hub repo id (org/name) or a local directory "
                                                                 "under the server's MOPEQ_MODEL_ROOTS")
    revision: str | None = Field(None, pattern=REVISION_PATTERN, description="Branch, tag or commit (Hub models)")
    budget: BudgetIn = Field(default_factory=lambda: BudgetIn(avg_bits=3.0))
    bits: list[int] = Field(default_factory=lambda: [2, 3, 4], min_length=1, max_length=4)
    sensitivity: Literal[SENSITIVITY_METHODS] = "auto"  # type: ignore[valid-type]
    allocator: Literal[ALLOCATORS] = "knapsack"  # type: ignore[valid-type]
    scope: Literal["model", "layer"] = "model"
    granularity: Literal["expert", "layer", "layer-projection"] = "expert"
    quantizer: Literal[QUANTIZERS] = "gptq"  # type: ignore[valid-type]
    cost: Literal["output", "weight"] = Field("output", description="The allocator's error: output (what GPTQ "
                                                                    "minimises) or weight")
    sequential: bool = Field(True, description="GPTQ each layer from the outputs of the quantized layers before it")
    group_size: int = Field(128, ge=8, le=8192)
    symmetric: bool = True
    act_order: bool = False
    probes: int = Field(64, ge=1, le=4096)
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    evaluation: EvaluationIn | None = None
    format: Literal[FORMATS] = "mopeq"  # type: ignore[valid-type]
    low_memory: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    trust_remote_code: bool = Field(False, description="Run the repo's own code; only for repos the operator allows")
    push: PushIn | None = None
    hf_token: HubToken | None = Field(None, max_length=1000,
                                      json_schema_extra={"writeOnly": True, "pattern": TOKEN_PATTERN},
                                       description="Write-only Hub token for this job (download and push); "
                                                   "never returned, logged or stored in plain text")
    webhook: WebhookIn | None = Field(None, description="Announce the job's end to this URL (Standard Webhooks "
                                                        "signature with the secret, retried with backoff)")


class JobRetry(Strict):
    hf_token: HubToken | None = Field(None, max_length=1000,
                                      json_schema_extra={"writeOnly": True, "pattern": TOKEN_PATTERN},
                                      description="A Hub token for the new job (the old job's was deleted when it "
                                                  "ended); needed when the job pushes or reads a gated model")


class BudgetOut(BaseModel):
    avg_bits: float | None
    gb: float | None


class PushOut(BaseModel):
    repo_id: str | None
    private: bool


class JobOut(BaseModel):
    id: str
    status: JobStatus
    stage: str | None
    progress: float
    model: str
    revision: str | None
    resolved_revision: str | None
    retry_of: str | None = Field(None, description="The failed or cancelled job this one retries")
    settings: dict[str, Any] = Field(default_factory=dict,
                                     description='The job\'s settings document ({"version": 1, ...}: the engine '
                                                 "config's field names); the fields below are views of it")
    budget: BudgetOut
    bits: list[int]
    sensitivity: str
    allocator: str
    scope: str
    granularity: str
    quantizer: str
    group_size: int
    symmetric: bool
    probes: int
    calibration: CalibrationIn
    evaluation: EvaluationIn | None
    format: str
    trust_remote_code: bool
    push: PushOut | None
    cancel_requested: bool
    attempts: int
    queue: str | None = Field(None, description="The worker queue the job was routed to by the device memory it "
                                                "needs (MOPEQ_QUEUES); null: the deployment's one queue")
    est_memory_bytes: int | None = Field(None, description="Device memory the submit-time estimate says it needs")
    error: str | None
    error_code: str | None
    timings: dict[str, float]
    result: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class JobEventOut(BaseModel):
    id: int
    job_id: str
    ts: dt.datetime
    kind: str
    status: str | None
    stage: str | None
    progress: float | None
    message: str | None


class AllocationOut(BaseModel):
    layer: int
    module: str | None
    expert: int
    bits: int
    sensitivity: float | None
    frequency: float | None
    params: int | None


class ArtifactOut(BaseModel):
    kind: str
    name: str
    uri: str = Field(description="Where to get it: the download URL of a file, the Hub URL of a push")
    sha256: str | None
    bytes: int | None
    hub_repo: str | None
    hub_commit: str | None
    download_url: str | None
