from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.jobs import (
    REVISION_PATTERN,
    BitsList,
    BudgetIn,
    CalibrationIn,
    GroupSize,
    ModelRef,
    Strict,
    Token,
)
from mopeq_core.config import QUANTIZERS


class EstimateIn(Strict):
    model: ModelRef
    revision: str | None = Field(None, pattern=REVISION_PATTERN)
    bits: BitsList = Field(default_factory=lambda: [2, 3, 4])
    group_size: GroupSize = 128
    symmetric: bool = True
    budget: BudgetIn | None = Field(None, description="When given, the answer says whether it is feasible")
    trust_remote_code: bool = False
    quantizer: Literal[QUANTIZERS] = Field("gptq",  # type: ignore[valid-type]
                                           description="gptq adds its Hessians to the calibration memory")
    calibration: CalibrationIn = Field(default_factory=CalibrationIn,
                                       description="Sizes the calibration memory and checks the server's bounds")
    hf_token: Token | None = Field(None, json_schema_extra={"writeOnly": True})


class MoELayerOut(BaseModel):
    layer: int
    module: str
    experts: int
    params_per_expert: int


class EstimateOut(BaseModel):
    model: str
    source: str
    revision: str | None
    model_type: str | None
    architectures: list[str]
    moe_layers: int
    experts_per_layer: list[int]
    num_experts: int
    expert_params: int
    non_expert_params: int
    total_params: int
    stored_bytes: int
    non_expert_bytes: int
    bits: list[int]
    group_size: int
    symmetric: bool
    min_bytes: int
    max_bytes: int
    min_gb: float
    max_gb: float
    feasible: dict[str, Any] = Field(description="Feasible budget range in avg_bits, gb and bytes")
    layers: list[MoELayerOut]
    calibration: dict[str, Any] | None = Field(None, description="seq_len, tokens and estimated calibration memory "
                                                                 "(activation_bytes, hessian_bytes, memory_bytes)")
    engines: dict[str, Any] | None = Field(None, description="Per serving engine (format): the granularities it "
                                                              "runs and the widths it can store for this model")
    memory_bytes: int | None = Field(None, description="Device memory a job with these settings needs (the "
                                                       "queue routing figure, app.services.queues)")
    queue: str | None = Field(None, description="The queue such a job goes to (MOPEQ_QUEUES); null with "
                                                "queue_message when it fits none")
    queue_message: str | None = None
    budget_feasible: bool | None = None
    budget_message: str | None = None
