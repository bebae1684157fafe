"""Refuse at submit what the engine would refuse only once the job runs: the export format against the widths,
granularity and symmetry, a low-memory (streamed) run against engine formats and evaluation suites, and
``sensitivity: auto`` against too few calibration samples. The rules are the engine's own (mopeq_core.formats,
torch-free); this module only maps them to a 422 that names what to change."""

from __future__ import annotations

from typing import Any

from app.services.errors import from_user_error
from mopeq_core.config import QuantizeConfig
from mopeq_core.errors import UserInputError
from mopeq_core.formats import CALIB_BATCH, check_config


def is_multimodal(model_config: dict[str, Any]) -> bool:
    """A vision-language checkpoint (its config.json has a vision tower): its calibration batches hold one
    image+text example each instead of CALIB_BATCH token windows."""
    return isinstance(model_config.get("vision_config"), dict)


def check_job(cfg: QuantizeConfig, model_config: dict[str, Any]) -> None:
    try:
        check_config(cfg, rows_per_batch=1 if is_multimodal(model_config) else CALIB_BATCH)
    except UserInputError as exc:
        raise from_user_error(exc) from exc
