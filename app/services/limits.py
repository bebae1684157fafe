"""Per-key limits and the bounds on every size a tenant's job controls. This module owns both rules.

**Admission** (``admit``): a job is admitted in the transaction that inserts it. Its first statement bumps the key's
``admissions`` counter; that UPDATE takes the key row's lock on PostgreSQL and the database's write lock on SQLite,
so concurrent submits of one key run their count-then-insert one after another and a per-key limit cannot be
overshot (the transaction of a refused job rolls the bump back). Every per-key limit is checked under that lock.

**Sizes** (``plan_calibration``): calibration and evaluation tokens (``MOPEQ_MAX_CALIB_TOKENS``), samples
(``MOPEQ_MAX_SAMPLES``), probes (``MOPEQ_MAX_PROBES``), ``seq_len`` against the model's context, and the estimated
calibration memory (``MOPEQ_MAX_CALIB_MEMORY_GB``). Each refusal is a 422 that names the bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import ApiKey, Job
from app.services.errors import ServiceError

ACTIVE = ("queued", "running")
DEFAULT_SEQ_LEN = 256  # CalibrationIn's default; shortened to the model's context when the job leaves it unset


# ---- admission -----------------------------------------------------------------------------------------------------
def check_active_jobs(db: Session, key_id: str, limit: int) -> None:
    """429 when the key already has ``limit`` queued or running jobs."""
    active = db.scalar(select(func.count()).select_from(Job).where(Job.owner_key_id == key_id,
                                                                  Job.status.in_(ACTIVE))) or 0
    if active >= limit:
        raise ServiceError(429, "too_many_jobs",
                           f"this key already has {active} queued or running jobs (limit {limit}); wait for one to "
                           "finish or cancel one", headers={"Retry-After": "30"})


def admit(db: Session, key_id: str, max_concurrent_jobs: int) -> None:
    """Call first in the transaction that inserts the job: locks the key (see the module doc), then checks every
    per-key limit under the lock."""
    res = db.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                     .values(admissions=ApiKey.admissions + 1))
    if res.rowcount != 1:
        raise ServiceError(401, "unauthorized", "this API key was revoked; ask the operator for a new one",
                           headers={"WWW-Authenticate": "Bearer"})
    check_active_jobs(db, key_id, max_concurrent_jobs)


# ---- sizes ---------------------------------------------------------------------------------------------------------
def check_output_size(settings: Settings, est_output_bytes: int) -> None:
    """A job whose estimated output alone exceeds the artifact store's quota can never finish: refuse it now (the
    worker still checks the store's real use before the job starts and after its export)."""
    quota = settings.ARTIFACT_MAX_BYTES
    if quota > 0 and est_output_bytes > quota:
        raise _too_big("the estimated output (bytes)", est_output_bytes, quota, "MOPEQ_ARTIFACT_MAX_BYTES",
                       "use a smaller model or ask the operator for a larger store")


def _sub_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    subs = [config.get(k) for k in ("text_config", "language_config", "llm_config")]
    return [config, *(s for s in subs if isinstance(s, dict))]


def _first_int(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for c in _sub_configs(config):
        for k in keys:
            v = c.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def model_context(config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes (config.json's max_position_embeddings or its aliases), if it says."""
    return _first_int(config, ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"))


@dataclass
class CalibrationPlan:
    """What a job's calibration costs, as estimated at submit (also part of POST /v1/estimate's answer)."""

    seq_len: int
    max_seq_len: int | None  # the model's context
    calib_tokens: int
    eval_tokens: int
    activation_bytes: int  # hidden states of every calibration token, fp32, a layer's input and output
    hessian_bytes: int  # GPTQ: Σ x xᵀ of every expert projection's input, fp32
    memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _too_big(what: str, value: int | float, bound: int | float, setting: str, hint: str) -> ServiceError:
    return ServiceError(422, "limit_exceeded", f"{what} is {value:,}, above this server's bound of {bound:,} "
                                               f"({setting}); {hint}")


def plan_calibration(settings: Settings, config: dict[str, Any], layers: list[Any], *, samples: int,
                     seq_len: int | None, eval_samples: int | None, probes: int, quantizer: str) -> CalibrationPlan:
    """Check every tenant-controlled size of a job against the model and the server's bounds; ``seq_len`` None
    means the default (256, or the model's context when shorter). ``layers`` are the estimate's MoE layers."""
    ctx = model_context(config)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, ctx) if ctx else DEFAULT_SEQ_LEN
    elif ctx is not None and seq_len > ctx:
        raise ServiceError(422, "limit_exceeded", f"calibration.seq_len {seq_len} is longer than the model's context "
                                                  f"(max_position_embeddings {ctx} in its config.json); use at most "
                                                  f"{ctx}")
    for what, n in (("calibration.samples", samples), ("evaluation.samples", eval_samples or 0)):
        if n > settings.MAX_SAMPLES:
            raise _too_big(what, n, settings.MAX_SAMPLES, "MOPEQ_MAX_SAMPLES", "use fewer samples")
    if probes > settings.MAX_PROBES:
        raise _too_big("probes", probes, settings.MAX_PROBES, "MOPEQ_MAX_PROBES", "use fewer probes")
    calib_tokens, eval_tokens = samples * seq_len, (eval_samples or 0) * seq_len
    for what, n in (("calibration tokens (samples x seq_len)", calib_tokens),
                    ("evaluation tokens (samples x seq_len)", eval_tokens)):
        if n > settings.MAX_CALIB_TOKENS:
            raise _too_big(what, n, settings.MAX_CALIB_TOKENS, "MOPEQ_MAX_CALIB_TOKENS",
                           "lower samples or seq_len")
    shapes = [s for layer in layers for s in layer.shapes]
    hidden = _first_int(config, ("hidden_size", "d_model", "n_embd")) or max((s[1] for s in shapes), default=0)
    activations = 2 * 4 * hidden * max(calib_tokens, eval_tokens)
    hessians = (sum(layer.experts * sum(s[1] * s[1] for s in layer.shapes) for layer in layers) * 4
                if quantizer == "gptq" else 0)
    bound = int(settings.MAX_CALIB_MEMORY_GB * 1e9)
    if activations > bound:
        raise _too_big("the estimated calibration memory (bytes)", activations, bound, "MOPEQ_MAX_CALIB_MEMORY_GB "
                       "x 1e9", f"hidden size {hidden} x {max(calib_tokens, eval_tokens):,} tokens x 8 bytes; "
                       "lower samples or seq_len")
    return CalibrationPlan(seq_len, ctx, calib_tokens, eval_tokens, activations, hessians, activations + hessians)
