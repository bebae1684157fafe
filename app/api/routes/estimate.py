"""POST /v1/estimate: a model's size, expert count and feasible budget range, from headers only."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentPrincipal, SettingsDep
from app.schemas.common import error_responses
from app.schemas.estimate import EstimateIn, EstimateOut
from app.services import jobs as job_svc
from app.services import models as model_svc
from app.services import queues
from app.services.errors import ServiceError
from mopeq_core.errors import UserInputError

router = APIRouter(tags=["estimate"])


@router.post("/estimate", response_model=EstimateOut, responses=error_responses(400, 401, 429, 413, 422, 503),
             summary="Size a MoE model and its feasible budget range without downloading weights")
def estimate(body: EstimateIn, who: CurrentPrincipal, settings: SettingsDep) -> EstimateOut:
    ref = model_svc.resolve_model(body.model, settings)
    token = body.hf_token.get_secret_value() if body.hf_token else None
    ck = model_svc.inspect(ref, settings, revision=body.revision, token=token,
                           trust_remote_code=body.trust_remote_code)
    est = model_svc.estimate(ck, bits=body.bits, group_size=body.group_size, symmetric=body.symmetric)
    plan = job_svc.calibration_plan(body, ck.config, est.layers, settings)
    out = EstimateOut.model_validate({**est.to_dict(), "calibration": plan.to_dict()})
    out.memory_bytes = queues.memory_needed(est, plan)
    try:
        out.queue = queues.pick(settings, out.memory_bytes)
    except ServiceError as exc:
        out.queue_message = exc.detail
    if body.budget is not None:
        try:
            est.check_budget(avg_bits=body.budget.avg_bits, gb=body.budget.gb)
            out.budget_feasible, out.budget_message = True, "the budget is feasible"
        except UserInputError as exc:
            out.budget_feasible, out.budget_message = False, str(exc)
    return out
