"""Runs the stages of one quantization job in order, checkpointing each finished stage so a retry resumes.

Public seam used by the CLI and the worker:

    run_quantization(cfg, out_dir, state_dir=None, on_event=None, should_cancel=None) -> RunResult

``on_event(ProgressEvent)`` is called at stage start/end and inside long loops; ``should_cancel()`` is polled at
the same points and, when true, the run raises ``mopeq_core.errors.CancelledError``. Each finished stage leaves a
file in ``state_dir`` (default: ``OUT/.mopeq-state``, removed on success) and a later call with the same
state_dir and the same configuration skips those stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export")
_STAGE_WEIGHT = {"fetch": 0.05, "calibrate": 0.15, "sensitivity": 0.35, "allocate": 0.2, "quantize": 0.1,
                 "evaluate": 0.1, "export": 0.05}
AUTO_CANDIDATES = ("hutchinson", "fisher", "frequency", "input-hessian")
log = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    stage: str
    progress: float  # 0..1 within the stage
    overall: float  # 0..1 over the whole run
    message: str | None = None


@dataclass
class RunResult:
    out_dir: Path
    bitmap: dict[str, Any]
    report: dict[str, Any]
    resolved_revision: str | None
    files: list[Path] = field(default_factory=list)


EventHook = Callable[[ProgressEvent], None]
CancelHook = Callable[[], bool]


class _StageState:
    """Per-stage checkpoint files under state_dir, invalidated when the configuration changes."""

    def __init__(self, state_dir: Path, fingerprint: str):
        self.dir = state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        marker = self.dir / "config.sha256"
        if marker.exists() and marker.read_text() != fingerprint:
            for p in self.dir.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        marker.write_text(fingerprint)

    def done(self, stage: str) -> bool:
        return (self.dir / f"{stage}.done").exists()

    def mark(self, stage: str) -> None:
        (self.dir / f"{stage}.done").write_text(str(time.time()))

    def write_json(self, stage: str, data: dict) -> None:
        tmp = self.dir / f"{stage}.json.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.dir / f"{stage}.json")

    def read_json(self, stage: str) -> dict:
        return json.loads((self.dir / f"{stage}.json").read_text())

    def path(self, name: str) -> Path:
        return self.dir / name


class _Progress:
    def __init__(self, on_event: EventHook | None, should_cancel: CancelHook | None):
        self.on_event, self.should_cancel = on_event, should_cancel
        self.stage = STAGES[0]
        self.done_weight = 0.0

    def check(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            from .errors import CancelledError

            raise CancelledError(f"cancelled during {self.stage}")

    def start(self, stage: str) -> None:
        self.stage = stage
        self.done_weight = sum(_STAGE_WEIGHT[s] for s in STAGES[: STAGES.index(stage)])
        self.emit(0.0, "started")

    def emit(self, fraction: float, message: str | None = None) -> None:
        self.check()
        if self.on_event is not None:
            overall = self.done_weight + _STAGE_WEIGHT[self.stage] * max(0.0, min(1.0, fraction))
            self.on_event(ProgressEvent(self.stage, float(fraction), float(overall), message))

    def fraction(self, fraction: float) -> None:
        self.emit(fraction)


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM where Linux has it: ru_maxrss of a forked child also counts
    the parent's peak from before the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _fingerprint(cfg) -> str:
    """What decides the stage results; the device does not (a job may resume on another worker's GPU)."""
    d = cfg.to_public_dict()
    d.pop("device", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def run_quantization(cfg, out_dir, *, state_dir=None, on_event: EventHook | None = None,
                     should_cancel: CancelHook | None = None) -> RunResult:
    import torch

    from . import __version__
    from .allocate import ExpertItem, allocate, budget_for_avg_bits
    from .apply import (
        QuantSettings,
        WeightSnapshot,
        apply_fake_quant,
        build_candidates,
        expert_cost,
        quantize_expert,
    )
    from .artifact import build_bitmap, checkpoint_dtype, matrices_for_layer, write_mopeq_artifact
    from .calibrate import CalibrationStats, calibrate
    from .data import SampleSet, load_samples, num_targets, num_tokens, split_holdout
    from .errors import InfeasibleBudgetError
    from .evaluate import mean_token_loss
    from .loading import load_model, load_tokenizer, resolve_model
    from .moe import find_expert_groups
    from .multimodal import component_bytes, load_processor
    from .sensitivity import SensitivityContext, SensitivityResult, compute_sensitivity

    cfg.validate()
    if cfg.format not in ("mopeq", "fake"):
        from .exporters import precheck

        precheck(cfg.format, cfg)  # refuse an impossible export before any compute
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    own_state = state_dir is None
    state = _StageState(Path(state_dir) if state_dir else out_dir / ".mopeq-state", _fingerprint(cfg))
    prog = _Progress(on_event, should_cancel)
    timings: dict[str, dict] = {}
    qs = QuantSettings(cfg.quantizer, cfg.group_size, cfg.symmetric, cfg.act_order)
    device = torch.device(cfg.device)

    def timed(stage: str):
        class _T:
            def __enter__(self):
                prog.start(stage)
                self.t0 = time.perf_counter()

            def __exit__(self, et, ev, tb):
                if et is None:
                    timings[stage] = {"seconds": round(time.perf_counter() - self.t0, 3),
                                      "peak_rss_mb": round(_peak_rss_mb(), 1)}
                    if device.type == "cuda":
                        timings[stage]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                    prog.emit(1.0, "finished")
        return _T()

    # ---- fetch --------------------------------------------------------------------------------------------------
    with timed("fetch"):
        if state.done("fetch"):
            f = state.read_json("fetch")
            model_path, revision = Path(f["path"]), f["revision"]
        else:
            resolved = resolve_model(cfg.model, revision=cfg.revision, token=cfg.token,
                                     allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
            model_path, revision = resolved.path, resolved.revision
            state.write_json("fetch", {"path": str(model_path), "revision": revision})
            state.mark("fetch")
        model = load_model(model_path, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                           allow_pickle=cfg.allow_pickle)
        tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
        # VLMs: the processor prepares image+text lines (None for text-only models); text-only data stays token
        # windows, image+text .jsonl data becomes a SampleSet (one model-input dict per example).
        processor = load_processor(model_path, trust_remote_code=cfg.trust_remote_code)
        groups = find_expert_groups(model)
        samples = load_samples(cfg.calib_file, tokenizer, cfg.calib_samples, cfg.seq_len, processor=processor)
        fit, holdout = split_holdout(samples) if cfg.sensitivity == "auto" else (samples, samples)
        eval_samples = None
        if cfg.eval_file:
            eval_samples = load_samples(cfg.eval_file, tokenizer, cfg.eval_samples, cfg.seq_len,
                                        processor=processor)

    def suites():
        from .eval_suites import run_suites

        return run_suites(model, tokenizer, processor, cfg.eval_suites, eval_file=cfg.eval_file,
                          include_path=cfg.eval_suite_include, limit=cfg.eval_suite_limit, seed=cfg.seed)

    # ---- calibrate ----------------------------------------------------------------------------------------------
    with timed("calibrate"):
        if state.done("calibrate"):
            stats = CalibrationStats.from_state(torch.load(state.path("calibrate.pt"), weights_only=True))
            fp = state.read_json("calibrate")
        else:
            stats = calibrate(model, groups, fit, collect_hessians=cfg.quantizer == "gptq",
                              all_experts=cfg.calib_all_experts, should_stop=prog.check, on_progress=prog.fraction)
            fp = {"fp_eval_loss": None, "fp_holdout_loss": None}
            if eval_samples is not None:
                fp["fp_eval_loss"] = mean_token_loss(model, eval_samples, should_stop=prog.check)
            if cfg.sensitivity == "auto":
                fp["fp_holdout_loss"] = mean_token_loss(model, holdout, should_stop=prog.check)
            if cfg.eval_suites:  # full-precision run of the evaluation suites, before any weight changes
                fp["fp_suites"] = suites()
            torch.save(stats.state(), state.path("calibrate.pt"))
            state.write_json("calibrate", fp)
            state.mark("calibrate")

    # ---- sensitivity --------------------------------------------------------------------------------------------
    methods = AUTO_CANDIDATES if cfg.sensitivity == "auto" else (cfg.sensitivity,)
    with timed("sensitivity"):
        if state.done("sensitivity"):
            sens = {m: SensitivityResult.from_json(d) for m, d in state.read_json("sensitivity").items()}
        else:
            sens = {}
            for i, m in enumerate(methods):
                def sub(f, i=i):
                    prog.fraction((i + f) / len(methods))
                ctx = SensitivityContext(model, groups, stats, fit, probes=cfg.probes, tol=cfg.probe_tol,
                                         seed=cfg.seed, should_stop=prog.check, on_progress=sub)
                t0 = time.perf_counter()
                sens[m] = compute_sensitivity(m, ctx)
                sens[m].details["seconds"] = round(time.perf_counter() - t0, 3)
            state.write_json("sensitivity", {m: r.to_json() for m, r in sens.items()})
            state.mark("sensitivity")

    # ---- allocate -----------------------------------------------------------------------------------------------
    costs = {(g.layer, e): {b: expert_cost(g, b, qs) for b in cfg.bits} for g in groups for e in range(g.num_experts)}
    elem = torch.finfo(checkpoint_dtype(model.config)).bits // 8
    non_expert_bytes = sum(t.numel() * (elem if t.is_floating_point() else t.element_size())
                           for t in non_expert_state_shapes(model, groups))
    candidates = None
    with timed("allocate"):
        if state.done("allocate"):
            alloc_state = state.read_json("allocate")
        else:
            candidates = build_candidates(groups, cfg.bits, stats, qs, should_stop=prog.check,
                                          on_progress=lambda f: prog.fraction(0.8 * f))

            def items_for(result: SensitivityResult) -> list:
                return [ExpertItem(layer=g.layer, expert=e, params=g.expert_params * 1,
                                   sensitivity=float(result.scores[g.layer][e]),
                                   error=candidates.errors[(g.layer, e)], cost=costs[(g.layer, e)])
                        for g in groups for e in range(g.num_experts)]

            any_items = items_for(sens[methods[0]])
            if cfg.budget.avg_bits is not None:
                budget_bytes = budget_for_avg_bits(any_items, cfg.budget.avg_bits)
                budget_desc = {"target_avg_bits": cfg.budget.avg_bits, "budget_bytes": None}
            else:
                budget_bytes = int(cfg.budget.gb * 1e9) - non_expert_bytes
                budget_desc = {"target_avg_bits": None, "budget_bytes": int(cfg.budget.gb * 1e9)}
            allocations, losses = {}, {}
            for m in methods:
                try:
                    allocations[m] = allocate(items_for(sens[m]), budget_bytes, allocator=cfg.allocator,
                                              scope=cfg.scope, granularity=cfg.granularity)
                except InfeasibleBudgetError as exc:
                    if cfg.budget.gb is None:
                        raise
                    lo, hi = exc.feasible or (0, 0)
                    raise InfeasibleBudgetError(
                        f"--budget-gb {cfg.budget.gb} is infeasible: with widths {list(cfg.bits)} this model needs "
                        f"between {(lo + non_expert_bytes) / 1e9:.6f} and {(hi + non_expert_bytes) / 1e9:.6f} GB "
                        f"({non_expert_bytes / 1e9:.6f} GB of it non-expert weights)",
                        feasible=((lo + non_expert_bytes) / 1e9, (hi + non_expert_bytes) / 1e9), unit="GB") from exc
            if len(methods) > 1:
                snapshot = WeightSnapshot(groups)
                for m in methods:
                    chosen = {k: candidates.matrices[(k[0], k[1], b)] for k, b in allocations[m].bits.items()}
                    apply_fake_quant(groups, chosen)
                    losses[m] = mean_token_loss(model, holdout, should_stop=prog.check)
                    snapshot.restore()
                del snapshot
                best = min(methods, key=lambda m: (losses[m], methods.index(m)))
            else:
                best = methods[0]
            a = allocations[best]
            alloc_state = {
                "method": best, "bits": [[k[0], k[1], b] for k, b in sorted(a.bits.items())],
                "errors": [[k[0], k[1], {str(b): v for b, v in errs.items()}]
                           for k, errs in sorted(candidates.errors.items())],
                "objective": a.objective, "exact": a.exact, "total_expert_bytes": a.total_bytes,
                "feasible_range": list(a.feasible_range), "budget_expert_bytes": budget_bytes,
                "budget": budget_desc, "candidate_losses": losses,
                "details": _jsonable(a.details),
            }
            state.write_json("allocate", alloc_state)
            state.mark("allocate")
    bits = {(l_, e): b for l_, e, b in alloc_state["bits"]}

    # ---- quantize -----------------------------------------------------------------------------------------------
    staging = state.path("artifact")
    with timed("quantize"):
        chosen = {}
        if state.done("quantize"):
            from .loader import load_packed_matrices

            chosen = load_packed_matrices(staging, groups)
        else:
            total = sum(g.num_experts for g in groups)
            for g in groups:
                for e in range(g.num_experts):
                    key = (g.layer, e)
                    if candidates is not None:
                        chosen[key] = candidates.matrices[(g.layer, e, bits[key])]
                    else:
                        chosen[key] = quantize_expert(g, e, bits[key], stats, qs)
                    prog.fraction(len(chosen) / total * 0.5)
            if staging.exists():
                shutil.rmtree(staging)
            write_mopeq_artifact(staging, model, groups, matrices_for_layer(chosen), bits,
                                 group_size=cfg.group_size, symmetric=cfg.symmetric, quantizer=cfg.quantizer)
            state.mark("quantize")
        candidates = None
        apply_fake_quant(groups, chosen)

    # ---- evaluate -----------------------------------------------------------------------------------------------
    with timed("evaluate"):
        if state.done("evaluate"):
            ev = state.read_json("evaluate")
        else:
            ev = {"fp_perplexity": None, "quantized_perplexity": None}
            if eval_samples is not None:
                q_loss = mean_token_loss(model, eval_samples, should_stop=prog.check)
                ev = {"fp_perplexity": math.exp(fp["fp_eval_loss"]), "quantized_perplexity": math.exp(q_loss),
                      "eval_tokens": num_targets(eval_samples), "eval_file": cfg.eval_file}
                ev["increase_pct"] = 100.0 * (ev["quantized_perplexity"] / ev["fp_perplexity"] - 1.0)
            if cfg.eval_suites:  # same suites, same settings, on the quantized model
                from .eval_suites import compare

                ev["suites"] = compare(fp["fp_suites"], suites())
            state.write_json("evaluate", ev)
            state.mark("evaluate")

    # ---- export -------------------------------------------------------------------------------------------------
    with timed("export"):
        chosen_result = sens[alloc_state["method"]]
        sensitivity_desc = {"method": alloc_state["method"], "probes": chosen_result.probes,
                            "calib_tokens": num_tokens(fit),
                            "rel_std_err_median": chosen_result.rel_std_err_median}
        if cfg.sensitivity == "auto":
            sensitivity_desc["selected_by"] = "auto"
            sensitivity_desc["candidate_holdout_loss"] = alloc_state["candidate_losses"]
        bitmap = build_bitmap(
            model_id=cfg.model, revision=revision, groups=groups, bits=bits, scores=chosen_result.scores,
            frequency={g.layer: stats.frequency(g.layer).tolist() for g in groups}, costs=costs,
            non_expert_bytes=non_expert_bytes, bits_choices=cfg.bits, group_size=cfg.group_size,
            symmetric=cfg.symmetric, quantizer=cfg.quantizer, sensitivity=sensitivity_desc,
            allocation={"allocator": cfg.allocator, "scope": cfg.scope, "granularity": cfg.granularity,
                        **alloc_state["budget"]})
        out_dir.mkdir(parents=True, exist_ok=True)
        files = _export(cfg, out_dir, staging, model, groups, chosen, bits, processor or tokenizer, bitmap)
        (out_dir / "bitmap.json").write_text(json.dumps(bitmap, indent=1))
        files.append(out_dir / "bitmap.json")
    # The report is written after the export stage closes so that its timing is included.
    report = {
        "mopeq_version": __version__, "model": cfg.model, "revision": revision,
        "config": cfg.to_public_dict(), "stages": timings,
        "perplexity": {k: v for k, v in ev.items() if k != "suites"}, "calibration": stats.coverage(),
        "modality": "image+text" if isinstance(samples, SampleSet) else "text",
        "eval_suites": ev.get("suites"),
        "sensitivity": {m: {"probes": r.probes, "rel_std_err_median": r.rel_std_err_median,
                            "seconds": r.details.get("seconds"), "converged": r.details.get("converged")}
                        for m, r in sens.items()},
        "selected_sensitivity": alloc_state["method"],
        "candidate_holdout_loss": alloc_state["candidate_losses"],
        "fp_holdout_loss": fp.get("fp_holdout_loss"),
        "allocation": {"objective": alloc_state["objective"], "exact": alloc_state["exact"],
                       "budget_expert_bytes": alloc_state["budget_expert_bytes"],
                       "feasible_expert_bytes": alloc_state["feasible_range"],
                       "details": alloc_state["details"]},
        "sizes": {"expert_bytes": bitmap["expert_bytes"], "non_expert_bytes": non_expert_bytes,
                  "total_bytes": bitmap["total_bytes"], "avg_bits": bitmap["avg_bits"],
                  "fp_expert_bytes": sum(g.expert_params * g.num_experts for g in groups) * elem,
                  "non_expert_by_component": component_bytes(model, groups, elem)},
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    from .card import write_model_card

    files.append(out_dir / "report.json")
    files += write_model_card(out_dir, bitmap, report)
    if own_state:
        shutil.rmtree(state.dir, ignore_errors=True)
    return RunResult(out_dir, bitmap, report, revision, files)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def non_expert_state_shapes(model, groups):
    """Non-expert tensors (tied duplicates once), without copying them."""
    from .artifact import iter_non_expert_tensors

    for _, t in iter_non_expert_tensors(model, groups):
        yield t


def _export(cfg, out_dir: Path, staging: Path, model, groups, chosen, bits, tokenizer, bitmap) -> list[Path]:
    files: list[Path] = []
    if cfg.format == "mopeq":
        for f in staging.iterdir():
            dst = out_dir / f.name
            shutil.copy2(f, dst)
            files.append(dst)
    elif cfg.format == "fake":
        model.save_pretrained(out_dir)
        files += list(out_dir.glob("*.safetensors")) + [out_dir / "config.json"]
    else:
        from .exporters import export as export_engine

        files += export_engine(cfg.format, out_dir, model, groups, chosen, bits, cfg)
    # A remote-code model's artifact needs the modeling files its config's auto_map names.
    model_src = Path(getattr(model.config, "_name_or_path", "") or "")
    if getattr(model.config, "auto_map", None) and model_src.is_dir():
        for py in model_src.glob("*.py"):
            shutil.copy2(py, out_dir / py.name)
            files.append(out_dir / py.name)
    tokenizer.save_pretrained(out_dir)
    files += [p for p in out_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template",
                                                                 "processor_config", "preprocessor_config",
                                                                 "video_preprocessor_config"))]
    return files
