"""The knobs of one quantization run (shared by the CLI, the worker and the SDK's job body)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

SENSITIVITY_METHODS = ("auto", "hutchinson", "fisher", "frequency", "input-hessian", "weight-norm", "layer-hessian")
COSTS = ("output", "weight")
ALLOCATORS = ("knapsack", "tiers")
QUANTIZERS = ("rtn", "gptq")
FORMATS = ("mopeq", "fake", "compressed-tensors", "gptq", "gguf", "gguf-overrides")
GRANULARITIES = ("expert", "layer", "layer-projection")
SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class Budget:
    """Exactly one of ``avg_bits`` (mean bits per expert weight) or ``gb`` (whole model, 1e9 bytes)."""

    avg_bits: float | None = None
    gb: float | None = None

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.gb is None):
            raise ValueError("give exactly one of avg_bits or gb")


@dataclass
class QuantizeConfig:
    model: str
    budget: Budget = field(default_factory=lambda: Budget(avg_bits=3.0))
    revision: str | None = None
    bits: tuple[int, ...] = (2, 3, 4)
    sensitivity: Literal["auto", "hutchinson", "fisher", "frequency", "input-hessian", "weight-norm",
                         "layer-hessian"] = "auto"
    allocator: Literal["knapsack", "tiers"] = "knapsack"
    scope: Literal["model", "layer"] = "model"
    granularity: Literal["expert", "layer", "layer-projection"] = "expert"
    quantizer: Literal["rtn", "gptq"] = "gptq"
    # The allocator's error per expert and width: "output" = in·tr(ΔW H ΔWᵀ)/tr(H) (what GPTQ minimises),
    # "weight" = ‖ΔW‖² (see engine.output_error).
    cost: Literal["output", "weight"] = "output"
    # GPTQ each layer from the inputs the already-quantized earlier layers produce (False: from the
    # full-precision calibration inputs, i.e. the allocator's candidates).
    sequential: bool = True
    group_size: int = 128
    symmetric: bool = True
    act_order: bool = False
    probes: int = 64
    probe_tol: float = 0.02
    calib_file: str | None = None
    calib_samples: int = 32
    seq_len: int = 256
    calib_all_experts: bool = False
    eval_file: str | None = None
    eval_samples: int = 64
    # Evaluation suites (optional): "lm-eval:TASK[,TASK]" / "lmms-eval:TASK[,TASK]", run on the full-precision and
    # the quantized model with the same settings (mopeq_core.eval_suites); custom task YAMLs from the include folder.
    eval_suites: tuple[str, ...] = ()
    eval_suite_include: str | None = None
    eval_suite_limit: int | None = None
    device: str = "cpu"
    low_memory: bool = False
    format: str = "mopeq"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    seed: int = 0
    token: str | None = field(default=None, repr=False)  # never printed, never written to disk

    def validate(self) -> None:
        from .errors import UserInputError

        def bad(msg: str) -> None:
            raise UserInputError(msg)

        if not self.bits or any(b not in SUPPORTED_BITS for b in self.bits):
            bad(f"--bits must be a subset of {list(SUPPORTED_BITS)}, got {list(self.bits)}")
        if len(set(self.bits)) != len(self.bits):
            bad("--bits lists a width twice")
        self.bits = tuple(sorted(self.bits))
        if self.sensitivity not in SENSITIVITY_METHODS:
            bad(f"--sensitivity must be one of {', '.join(SENSITIVITY_METHODS)}")
        if self.allocator not in ALLOCATORS:
            bad(f"--allocator must be one of {', '.join(ALLOCATORS)}")
        if self.cost not in COSTS:
            bad(f"--cost must be one of {', '.join(COSTS)}")
        if self.quantizer not in QUANTIZERS:
            bad(f"--quantizer must be one of {', '.join(QUANTIZERS)}")
        if self.scope not in ("model", "layer"):
            bad("--scope must be model or layer")
        if self.granularity not in GRANULARITIES:
            bad(f"--granularity must be one of {', '.join(GRANULARITIES)}")
        if self.format not in FORMATS:
            bad(f"--format must be one of {', '.join(FORMATS)}")
        if not (8 <= self.group_size <= 8192) or self.group_size % 8:
            bad("--group-size must be a multiple of 8 between 8 and 8192")
        if not (1 <= self.probes <= 4096):
            bad("--probes must be between 1 and 4096")
        if not (0.0 <= self.probe_tol <= 1.0):
            bad("--probe-tol must be between 0 (use every probe) and 1")
        if not (1 <= self.calib_samples <= 100_000) or not (8 <= self.seq_len <= 32_768):
            bad("--calib-samples must be 1..100000 and --seq-len 8..32768")
        if self.budget.avg_bits is not None and not (1.0 <= self.budget.avg_bits <= 16.0):
            bad("--avg-bits must be between 1 and 16")
        if self.budget.gb is not None and not (self.budget.gb > 0):
            bad("--budget-gb must be positive")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            bad("--device must be cpu or cuda")
        if self.eval_suites:
            from .eval_suites import EvalSuiteError, parse_suites

            try:
                self.eval_suites = tuple(s.spec for s in parse_suites(self.eval_suites))
            except EvalSuiteError as exc:
                bad(str(exc))
        if self.eval_suite_limit is not None and self.eval_suite_limit < 1:
            bad("--eval-suite-limit must be at least 1")

    def to_public_dict(self) -> dict[str, Any]:
        """Everything but secrets; what reports and model cards record."""
        d = dataclasses.asdict(self)
        d.pop("token", None)
        d["bits"] = list(self.bits)
        d["eval_suites"] = list(self.eval_suites)
        return d
