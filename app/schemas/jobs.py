from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from app.schemas.common import PATH_TEXT_PATTERN, TOKEN_PATTERN, HubToken, PathText
from app.schemas.webhooks import WebhookIn
from mopeq_core.config import (
    ALLOCATORS,
    COSTS,
    FORMATS,
    GRANULARITIES,
    QUANTIZERS,
    SENSITIVITY_METHODS,
    SUPPORTED_BITS,
)
from mopeq_core.eval_suites import HARNESSES
from mopeq_core.formats import FORMAT_RULES, STREAMABLE_FORMATS

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$"
REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
# An evaluation suite: HARNESS:TASK[,TASK...] (mopeq_core.eval_suites.parse_suites)
SUITE_PATTERN = (r"^(?:" + "|".join(h.replace("-", "[-_]") for h in HARNESSES)
                 + r"):[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*$")


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


class BudgetAvgBits(Strict):
    """Mean bits per expert weight (scales included)."""

    avg_bits: float = Field(ge=1.0, le=16.0, description="Mean bits per expert weight, e.g. 2.5")

    @property
    def gb(self) -> None:
        return None


class BudgetGB(Strict):
    """The whole model's size in GB (1e9 bytes)."""

    gb: float = Field(gt=0, le=1e6, description="Whole-model size in GB (1e9 bytes)")

    @property
    def avg_bits(self) -> None:
        return None


def _budget_form(v: Any) -> str | None:
    if isinstance(v, dict):
        if ("avg_bits" in v) == ("gb" in v):
            return None  # Discriminator's custom error below
        return "avg_bits" if "avg_bits" in v else "gb"
    return "avg_bits" if isinstance(v, BudgetAvgBits) else "gb" if isinstance(v, BudgetGB) else None


# Exactly one of ``{"avg_bits": F}`` or ``{"gb": F}`` (oneOf in the schema); both forms have ``.avg_bits`` and
# ``.gb`` (the other is None).
BudgetIn = Annotated[Annotated[BudgetAvgBits, Tag("avg_bits")] | Annotated[BudgetGB, Tag("gb")],
                     Discriminator(_budget_form, custom_error_type="budget_form",
                                   custom_error_message='budget takes exactly one of avg_bits or gb, e.g. '
                                                        '{"avg_bits": 2.5}'), Field(
    description='Exactly one of {"avg_bits": F} (mean bits per expert weight) or {"gb": F} (whole model, 1e9 B); '
                "the feasible range depends on the model and --bits (POST /v1/estimate tells it)")]
def _unique(v: list[int]) -> list[int]:
    if len(set(v)) != len(v):
        raise ValueError("lists a width twice; give each width once, e.g. [2, 3, 4]")
    return v


# Field types shared by the job and the estimate bodies.
BitsList = Annotated[list[Literal[SUPPORTED_BITS]], AfterValidator(_unique),  # type: ignore[valid-type]
                     Field(min_length=1, max_length=len(SUPPORTED_BITS), json_schema_extra={"uniqueItems": True},
                           description="The widths the allocator chooses from, each once")]
GroupSize = Annotated[int, Field(ge=8, le=8192, multiple_of=8, description="Weights per quantization scale")]
ModelRef = Annotated[PathText, Field(min_length=1, max_length=500, json_schema_extra={"pattern": PATH_TEXT_PATTERN},
                                     description="Hub repo id (org/name) or a local directory under the server's "
                                                 "MOPEQ_MODEL_ROOTS")]
Token = Annotated[HubToken, Field(min_length=1, max_length=1000,
                                  json_schema_extra={"writeOnly": True, "pattern": TOKEN_PATTERN})]


class CalibrationIn(Strict):
    file: PathText | None = Field(None, min_length=1, max_length=1000, json_schema_extra={"pattern": PATH_TEXT_PATTERN},
                                  description="A .txt or .jsonl file under the server's model roots (default: built-in text)")
    samples: int = Field(32, ge=1, le=100_000, description="Calibration samples (at most the server's "
                                                           "MOPEQ_MAX_SAMPLES; sensitivity auto needs at least 9 for a "
                                                           "text model); samples x seq_len at most MOPEQ_MAX_CALIB_TOKENS")
    seq_len: int = Field(256, ge=8, le=32_768, description="Tokens per sample; at most the model's context "
                                                           "(max_position_embeddings). Default: 256, or the context "
                                                           "when shorter")
    all_experts: bool = Field(False, description="Send every calibration token through every expert for its "
                                                 "statistics (not only the routed ones); the CLI's --calib-all-experts")


class EvaluationIn(Strict):
    file: PathText | None = Field(None, min_length=1, max_length=1000, json_schema_extra={"pattern": PATH_TEXT_PATTERN},
                                  description="Held-out .txt or .jsonl under the server's model roots (perplexity)")
    samples: int = Field(64, ge=1, le=100_000, description="At most the server's MOPEQ_MAX_SAMPLES")
    suites: list[str] = Field(default_factory=list, max_length=8,
                              json_schema_extra={"items": {"type": "string", "pattern": SUITE_PATTERN,
                                                           "maxLength": 500}},
                              description='Evaluation suites run before and after, e.g. "lm-eval:TASK[,TASK]" or '
                                          '"lmms-eval:TASK"; the built-in local tasks need `file`; they need the whole '
                                          "model in memory (not with low_memory)")
    suite_limit: int | None = Field(None, ge=1, le=100_000, description="Examples per suite task")

    @field_validator("suites")
    @classmethod
    def _suites(cls, v: list[str]) -> list[str]:
        for spec in v:
            if not re.fullmatch(SUITE_PATTERN, spec) or len(spec) > 500:
                raise ValueError(f"suite {spec!r}: write HARNESS:TASK[,TASK...] with HARNESS one of "
                                 f"{', '.join(HARNESSES)}")
        return v


class PushIn(Strict):
    repo_id: str | None = Field(None, pattern=REPO_PATTERN,
                                description="Target Hub repo; default {owner}/{model}-MoPEQ-{bits}b")
    private: bool = False


def _when(field: str, value: Any, then: dict[str, Any]) -> dict[str, Any]:
    return {"if": {"properties": {field: {"const": value}}, "required": [field]}, "then": then}


def job_rules_schema() -> dict[str, Any]:
    """The cross-field rules of a job body as JSON Schema, built from the tables the engine checks
    (mopeq_core.formats): export formats against bits, granularity and symmetric; low_memory against engine formats
    and evaluation suites; push needs hf_token. The defaults count: ``bits`` left out is [2, 3, 4]."""
    default_bits = JobCreate.model_fields["bits"].get_default(call_default_factory=True)
    rules = []
    for fmt, rule in FORMAT_RULES.items():
        then: dict[str, Any] = {"properties": {"bits": {"items": {"enum": list(rule.widths)}}}}
        required = [] if set(default_bits) <= set(rule.widths) else ["bits"]
        if rule.mixed_granularities:
            then["anyOf"] = [{"properties": {"bits": {"maxItems": 1}}, "required": ["bits"]},
                             {"properties": {"granularity": {"enum": list(rule.mixed_granularities)}},
                              "required": ["granularity"]}]
        if rule.symmetric_only:
            then["properties"]["symmetric"] = {"const": True}
        if required:
            then["required"] = required
        rules.append(_when("format", fmt, then))
    rules.append(_when("low_memory", True, {"properties": {
        "format": {"enum": list(STREAMABLE_FORMATS)},
        "evaluation": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"suites": {"maxItems": 0}}}]}}}))
    return {"allOf": rules, "dependentRequired": {"push": ["hf_token"]}}


class JobCreate(Strict):
    """A quantization job. Beyond the per-field constraints, the schema's ``allOf`` states which export formats
    the widths, granularity and ``low_memory`` allow; what depends on the model (budget feasibility, its context for
    ``seq_len``, sizes against the server's MOPEQ_MAX_* bounds, the key's storage quota) is checked at submit and
    refused with a 422 that says what to change."""

    model_config = ConfigDict(json_schema_extra=lambda s: s.update(job_rules_schema()))

    model: ModelRef
    revision: str | None = Field(None, pattern=REVISION_PATTERN, description="Branch, tag or commit (Hub models)")
    budget: BudgetIn = Field(default_factory=lambda: BudgetAvgBits(avg_bits=3.0))
    bits: BitsList = Field(default_factory=lambda: [2, 3, 4])
    sensitivity: Literal[SENSITIVITY_METHODS] = "auto"  # type: ignore[valid-type]
    allocator: Literal[ALLOCATORS] = "knapsack"  # type: ignore[valid-type]
    scope: Literal["model", "layer"] = "model"
    granularity: Literal[GRANULARITIES] = "expert"  # type: ignore[valid-type]
    quantizer: Literal[QUANTIZERS] = "gptq"  # type: ignore[valid-type]
    cost: Literal[COSTS] = Field("output", description="The allocator's error: output (what GPTQ "  # type: ignore[valid-type]
                                                       "minimises) or weight")
    sequential: bool = Field(True, description="GPTQ each layer from the outputs of the quantized layers before it")
    group_size: GroupSize = 128
    symmetric: bool = True
    act_order: bool = False
    probes: int = Field(64, ge=1, le=4096, description="Most Hutchinson probes (at most the server's "
                                                       "MOPEQ_MAX_PROBES)")
    probe_tol: float = Field(0.02, ge=0.0, le=1.0, description="Stop probing once the median relative standard "
                                                               "error of the experts' traces is under this (0: use "
                                                               "every probe)")
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    evaluation: EvaluationIn | None = None
    format: Literal[FORMATS] = "mopeq"  # type: ignore[valid-type]
    low_memory: bool = Field(False, description="Stream the layers from the checkpoint (safetensors only); only the "
                                                "mopeq format, and no evaluation suites")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    trust_remote_code: bool = Field(False, description="Run the repo's own code; only for repos the operator allows")
    push: PushIn | None = Field(None, description="Push the result to the Hub; needs hf_token")
    hf_token: Token | None = Field(None, json_schema_extra={"writeOnly": True},
                                   description="Write-only Hub token for this job (download and push); "
                                                   "never returned, logged or stored in plain text")
    webhook: WebhookIn | None = Field(None, description="Announce the job's end to this URL (Standard Webhooks "
                                                        "signature with the secret, retried with backoff)")


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
    probe_tol: float | None = Field(None, description="null: a job submitted before the field existed")
    cost: str | None = None
    sequential: bool | None = None
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
