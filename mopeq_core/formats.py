"""What each export format and a streamed run can take, decided from the configuration alone (torch-free).

One rule in one place: the engine calls :func:`precheck` and :func:`check_streamed` before any compute, and the web
API calls :func:`check_config` at submit, so a job that could only fail later is refused when it is sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, UserInputError

# Widths each format can express.
COMPRESSED_TENSORS_BITS = (4, 8)  # vLLM's compressed-tensors MoE kernels (WNA16) take 4 or 8 bits
GPTQ_BITS = (2, 3, 4, 8)
GGUF_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0"}  # ggml_type_name spellings (llama-quantize ignores case)
# Formats written from the packed layers as they stream by; every other one needs the whole model in memory.
STREAMABLE_FORMATS = ("mopeq",)
# --sensitivity auto cross-fits on FOLDS halves of the calibration batches (engine.BATCH samples each).
AUTO_FOLDS = 2
CALIB_BATCH = 8

CT_ASYM_MSG = ("--format compressed-tensors needs symmetric quantization: transformers' compressed-tensors loader "
               "(CompressedTensorsDequantize) rebuilds each fused expert from weight_packed, weight_scale and "
               "weight_shape only and fails on the zero points of an asymmetric expert scheme; drop --asymmetric")


@dataclass(frozen=True)
class FormatRule:
    """What an engine export format can express, from the configuration alone."""

    widths: tuple[int, ...]  # the --bits it can write
    widths_why: str
    # With more than one width offered: the granularities that give one width per tensor it writes (None: any).
    mixed_granularities: tuple[str, ...] | None = None
    mixed_why: str = ""
    symmetric_only: bool = False


FORMAT_RULES: dict[str, FormatRule] = {
    "compressed-tensors": FormatRule(COMPRESSED_TENSORS_BITS, "takes widths 4 and 8 only (vLLM's MoE kernels)",
                                     ("layer",), "needs one width per MoE layer (vLLM runs one scheme per fused MoE "
                                                 "layer)", symmetric_only=True),
    "gptq": FormatRule(GPTQ_BITS, f"takes widths {list(GPTQ_BITS)}"),
    "gguf": FormatRule(tuple(GGUF_TYPES), f"maps widths {sorted(GGUF_TYPES)} to llama.cpp types",
                       ("layer-projection", "layer"), "needs one width per MoE layer x projection (GGUF has one "
                                                      "type per tensor)"),
    "gguf-overrides": FormatRule(tuple(GGUF_TYPES), f"maps widths {sorted(GGUF_TYPES)} to llama.cpp types",
                                 ("layer", "layer-projection"), "needs one width per MoE layer (GGUF has one type "
                                                                "per layer x projection tensor)"),
}


def precheck(fmt: str, cfg: Any) -> None:
    """Refuse, before any work, a configuration whose allocation the export ``fmt`` could not (or would very likely
    not) express. Only what the configuration alone decides is checked (``--bits``, ``--granularity``,
    ``--asymmetric``); the exporters check the actual allocation again."""
    rule = FORMAT_RULES.get(fmt)
    if rule is None:
        return
    choices = sorted(set(getattr(cfg, "bits", ()) or ()))
    bad = [b for b in choices if b not in rule.widths]
    if bad:
        ok = [b for b in choices if b in rule.widths] or list(rule.widths)
        raise ExportError(f"--format {fmt} {rule.widths_why}; --bits offers {bad}: use --bits "
                          f"{','.join(map(str, ok))}")
    granularity = getattr(cfg, "granularity", "expert")
    if len(choices) > 1 and rule.mixed_granularities and granularity not in rule.mixed_granularities:
        grans = " or ".join(f"--granularity {g}" for g in rule.mixed_granularities)
        raise ExportError(f"--format {fmt} {rule.mixed_why}: add {grans}, or offer one width (e.g. --bits "
                          f"{choices[-1]})")
    if rule.symmetric_only and not getattr(cfg, "symmetric", True):
        raise ExportError(CT_ASYM_MSG)


def check_streamed(cfg: Any, why: str) -> None:
    """Refuse what a run that streams its layers (``why``: --low-memory, or the model is too large to hold) cannot
    do: engine export formats and evaluation suites need the whole model in memory."""
    if cfg.format not in STREAMABLE_FORMATS:
        raise UserInputError(f"--format {cfg.format} needs the whole model in memory, and this run streams its layers "
                             f"({why}); write the packed mopeq format, or drop --low-memory / raise the limit")
    if cfg.eval_suites:
        raise UserInputError("evaluation suites need the whole model in memory and this run streams its layers "
                             f"({why}); drop --eval-suite or --low-memory")


def auto_min_samples(rows_per_batch: int = CALIB_BATCH) -> int:
    """Fewest calibration samples that fill the AUTO_FOLDS batches --sensitivity auto cross-fits on (text: rows of
    CALIB_BATCH token windows; image+text: one example per batch)."""
    return rows_per_batch * (AUTO_FOLDS - 1) + 1


def auto_samples_error(rows_per_batch: int = CALIB_BATCH) -> UserInputError:
    return UserInputError(f"--sensitivity auto cross-fits on {AUTO_FOLDS} halves of the calibration data: give at "
                          f"least {auto_min_samples(rows_per_batch)} calibration samples (or pick a method)")


def has_image_lines(path: str | Path | None) -> bool:
    """A .jsonl calibration file with ``"image"`` lines: image+text data, batched one example at a time. Lines that
    do not parse are left to the data loader, which reports them with their line number."""
    if not path or Path(path).suffix != ".jsonl":
        return False
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("image") is not None:
            return True
    return False


def calib_rows_per_batch(calib_file: str | Path | None, image_processor: bool) -> int:
    """Rows of one calibration batch of the engine: one example for image+text data (a .jsonl with ``"image"``
    lines) on a model with an image processor, else CALIB_BATCH token windows."""
    return 1 if image_processor and has_image_lines(calib_file) else CALIB_BATCH


def check_config(cfg: Any, rows_per_batch: int = CALIB_BATCH) -> None:
    """Every refusal the configuration alone decides, beyond the ranges of ``QuantizeConfig.validate``: the export
    format against the widths and granularity, a --low-memory run against what streaming cannot do, and
    ``--sensitivity auto`` against fewer calibration samples than fill its folds at ``rows_per_batch`` rows a batch
    (``calib_rows_per_batch``: the engine's rule)."""
    if cfg.format not in ("mopeq", "fake"):
        precheck(cfg.format, cfg)
    if cfg.low_memory:
        check_streamed(cfg, "--low-memory")
    if cfg.sensitivity == "auto" and cfg.calib_samples < auto_min_samples(rows_per_batch):
        raise auto_samples_error(rows_per_batch)
