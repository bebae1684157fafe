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

DEFAULT_AVG_BITS = 3.0
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

    avg_bits: float = Field(ge=min(SUPPORTED_BITS), le=max(SUPPORTED_BITS),
                            description="Mean bits per expert weight, e.g. 2.5: between the smallest and the largest "
                                        "of the job's bits (the feasible range, whatever the model)")

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
                                                           "MOPEQ_MAX_SAMPLES; sensitivity auto needs at least 9, two "
                                                           "batches to cross-fit); samples x seq_len at most "
                                                           "MOPEQ_MAX_CALIB_TOKENS")
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


def job_rules_schema() -> dict[str, Any]:
    """The cross-field rules of a job body as JSON Schema, built from the tables the engine checks
    (mopeq_core.formats): which export formats the widths, granularity and symmetry allow, and that a low_memory
    (streamed) run writes the mopeq format without evaluation suites; plus, for a body without ``bits`` (so
    [2, 3, 4]), an ``avg_bits`` within 2..4. Each rule is one flat ``anyOf`` of the ways to satisfy it: schema-driven
    generators (schemathesis) give up on more combinations than this. Also checked at submit but only described:
    ``avg_bits`` within the smallest..largest width of ``bits`` when given, and ``sensitivity: auto`` with at least
    9 calibration samples."""
    default_bits = sorted(JobCreate.model_fields["bits"].get_default(call_default_factory=True))
    streamed_ok = {"evaluation": {"anyOf": [{"type": "null"}, {"properties": {"suites": {"maxItems": 0}}}]}}
    free = [f for f in FORMATS if f not in FORMAT_RULES or (FORMAT_RULES[f].widths == SUPPORTED_BITS
            and not FORMAT_RULES[f].mixed_granularities and not FORMAT_RULES[f].symmetric_only)]
    in_memory = [f for f in free if f in STREAMABLE_FORMATS]
    formats: list[dict[str, Any]] = [
        {"properties": {"format": {"enum": in_memory}, "low_memory": {"const": False}}},
        {"properties": {"format": {"enum": in_memory}, "low_memory": {"const": True}, **streamed_ok},
         "required": ["low_memory"]},
        {"properties": {"format": {"enum": [f for f in free if f not in STREAMABLE_FORMATS]},
                        "low_memory": {"const": False}}, "required": ["format"]}]
    for fmt, rule in FORMAT_RULES.items():
        if fmt in free:
            continue
        props: dict[str, Any] = {"format": {"const": fmt}, "low_memory": {"const": False}}
        if rule.symmetric_only:
            props["symmetric"] = {"const": True}
        widths = {"items": {"enum": list(rule.widths)}}
        formats.append({"properties": {**props, "bits": {**widths, "maxItems": 1}}, "required": ["format", "bits"]})
        if rule.mixed_granularities:
            mixed = {"properties": {**props, "granularity": {"enum": list(rule.mixed_granularities)}},
                     "required": ["format", "granularity"]}
            if not set(default_bits) <= set(rule.widths):
                mixed["properties"]["bits"] = widths
                mixed["required"].append("bits")
            formats.append(mixed)
    budgets = [{"properties": {"budget": {"required": ["gb"]}}}, {"required": ["bits"]},
               {"properties": {"budget": {"properties": {"avg_bits": {"minimum": default_bits[0],
                                                                     "maximum": default_bits[-1]}}}}}]
    return {"allOf": [{"anyOf": formats}, {"anyOf": budgets}], "dependentRequired": {"push": ["hf_token"]}}


class JobCreate(Strict):
    """A quantization job. Beyond the per-field constraints, the schema's ``allOf`` states which export formats
    the widths, granularity and ``low_memory`` allow; what depends on the model (budget feasibility, its context for
    ``seq_len``, sizes against the server's MOPEQ_MAX_* bounds, the key's storage quota) is checked at submit and
    refused with a 422 that says what to change."""

    model_config = ConfigDict(json_schema_extra=lambda s: s.update(job_rules_schema()))

    model: ModelRef
    revision: str | None = Field(None, pattern=REVISION_PATTERN, description="Branch, tag or commit (Hub models)")
    budget: BudgetIn = Field(default_factory=lambda: BudgetAvgBits(avg_bits=DEFAULT_AVG_BITS),
                             description='Default {"avg_bits": 3}, or the nearest width the bits offer')
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

    @model_validator(mode="after")
    def _default_budget(self) -> JobCreate:
        # Left out, the budget is 3 bits on average, or the nearest width the bits offer (bits [4]: 4).
        if "budget" not in self.model_fields_set:
            self.budget = BudgetAvgBits(avg_bits=min(max(DEFAULT_AVG_BITS, min(self.bits)), max(self.bits)))
        return self


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


# The server's bounds (MOPEQ_MAX_*) that a submit checks, stated in /openapi.json with this deployment's values.
def _server_bounds(settings: Any) -> dict[tuple[str, str], int]:
    return {("JobCreate", "probes"): settings.MAX_PROBES, ("CalibrationIn", "samples"): settings.MAX_SAMPLES,
            ("EvaluationIn", "samples"): settings.MAX_SAMPLES}


def state_server_bounds(app: Any, settings: Any) -> None:
    """Make the app's OpenAPI document carry the configured MOPEQ_MAX_PROBES / MOPEQ_MAX_SAMPLES as the fields'
    ``maximum``, and ``trust_remote_code: false`` only where MOPEQ_ALLOW_REMOTE_CODE_REPOS is empty (the schema is
    built once per app, so each deployment states its own bounds)."""
    build = app.openapi
    done: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema = build()
        if not done:
            comps = schema.get("components", {}).get("schemas", {})
            for (model, field), bound in _server_bounds(settings).items():
                prop = comps.get(model, {}).get("properties", {}).get(field)
                if prop is not None:
                    prop["maximum"] = min(prop.get("maximum", bound), bound)
            if not settings.ALLOW_REMOTE_CODE_REPOS:  # refused for every repo on this server
                for model in ("JobCreate", "EstimateIn", "JobTemplate"):
                    prop = comps.get(model, {}).get("properties", {}).get("trust_remote_code")
                    if prop is not None:
                        prop["enum"] = [False]
            done.append(True)
        return schema

    app.openapi = openapi
