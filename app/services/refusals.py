"""Refuse at submit what the engine would refuse only once the job runs: the export format against the widths,
granularity and symmetry, a low-memory (streamed) run against engine formats and evaluation suites, and
``sensitivity: auto`` against too few calibration samples. The rules are the engine's own (mopeq_core.formats,
torch-free); this module only maps them to a 422 that names what to change."""

from __future__ import annotations

from app.services.errors import from_user_error
from mopeq_core.config import QuantizeConfig
from mopeq_core.errors import UserInputError
from mopeq_core.formats import CALIB_BATCH, check_config


def check_job(cfg: QuantizeConfig, rows_per_batch: int = CALIB_BATCH) -> None:
    """The engine's rules for this job; ``sensitivity: auto`` needs the calibration samples that fill its folds at
    ``rows_per_batch`` rows a batch (``mopeq_core.formats.calib_rows_per_batch``)."""
    try:
        check_config(cfg, rows_per_batch)
    except UserInputError as exc:
        raise from_user_error(exc) from exc
