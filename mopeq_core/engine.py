"""The engine: one layer-streaming run for every model size.

    run(cfg, out_dir, *, state_dir=None, on_event=None, should_cancel=None, hooks=None) -> RunSummary

Every stage goes through :class:`mopeq_core.streaming.ModelStream`, whose decoder layers are either resident or
read from the checkpoint one at a time (``cfg.low_memory``, or a model larger than ``MOPEQ_RESIDENT_MAX_BYTES``):
a cache policy, not a second code path. The streams over the layers:

1. **calibrate** (one forward stream): routed statistics per expert (counts, input norms, the input second
   moments GPTQ and the output-error cost need), the layer-local scores (``weight-norm``, ``layer-hessian``),
   every expert quantized at every width (the allocator's costs; packed candidates on disk), the inputs of every
   layer (kept when a whole-model loss score needs them), and the full-precision evaluation loss.
2. **sensitivity**: layer-local scores come from (1); ``fisher`` is one backward stream with exact per-sequence
   gradients; ``hutchinson`` is one forward (tangents) and one backward (gradients and their tangents) stream per
   batch of probes (``sensitivity.py``).
3. **allocate**: the knapsack over every expert of the model. ``auto`` picks among its candidate scores by the
   loss each allocation gives on calibration tokens it was not scored on (two-fold cross-fitting: scores from one
   half, loss on the other, every calibration token used once), in one forward stream for all candidates.
4. **quantize** (one forward stream): each layer at its allocated widths, with GPTQ Hessians from the inputs that
   the already-quantized earlier layers produce (``cfg.sequential``; otherwise the candidates of (1)); the packed
   artifact is written layer by layer and the evaluation stream goes through the quantized layers.
5. **evaluate**: perplexities from (1) and (4); evaluation suites on the resident model.
6. **export**: the packed artifact (any size) or an engine format (resident models), bit map, report, card.

Each stage leaves its result in ``state_dir`` so that a retried run resumes after the last finished stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

STAGES = ("fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export")
_STAGE_WEIGHT = {"fetch": 0.05, "calibrate": 0.2, "sensitivity": 0.35, "allocate": 0.15, "quantize": 0.15,
                 "evaluate": 0.05, "export": 0.05}
AUTO_CANDIDATES = ("hutchinson", "fisher", "frequency", "input-hessian")
LOSS_METHODS = ("hutchinson", "fisher")
FOLDS = 2
BATCH = 8
log = logging.getLogger(__name__)


# =====================================================================================================================
# the typed seam
# =====================================================================================================================
@dataclass
class ProgressEvent:
    stage: str
    progress: float  # 0..1 within the stage
    overall: float  # 0..1 over the whole run
    message: str | None = None


@dataclass
class RunSummary:
    """What a run returns to the CLI and the worker (the files hold the same, for people and other tools)."""

    out_dir: Path
    bitmap: dict[str, Any]
    report: dict[str, Any]
    resolved_revision: str | None
    files: list[Path] = field(default_factory=list)

    @property
    def selected_sensitivity(self) -> str:
        return self.report["selected_sensitivity"]

    @property
    def avg_bits(self) -> float:
        return float(self.bitmap["avg_bits"])

    @property
    def total_bytes(self) -> int:
        return int(self.bitmap["total_bytes"])

    @property
    def perplexity(self) -> dict[str, Any]:
        return self.report["perplexity"]

    @property
    def eval_suites(self) -> dict | None:
        return self.report.get("eval_suites")


@dataclass
class EngineHooks:
    """Optional observers (tests, diagnostics)."""

    gptq_inputs: Callable[[int, Any, torch.Tensor], None] | None = None  # (layer index, batch key, inputs)


EventHook = Callable[[ProgressEvent], None]
CancelHook = Callable[[], bool]


class StageState:
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

    def forget(self, stage: str) -> None:
        (self.dir / f"{stage}.done").unlink(missing_ok=True)

    def write_json(self, stage: str, data: dict) -> None:
        tmp = self.dir / f"{stage}.json.tmp"
        tmp.write_text(json.dumps(data, default=_json_default))
        tmp.replace(self.dir / f"{stage}.json")

    def read_json(self, stage: str) -> dict:
        return json.loads((self.dir / f"{stage}.json").read_text())

    def path(self, name: str) -> Path:
        return self.dir / name


class Progress:
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


def peak_rss_mb() -> float:
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


def fingerprint(cfg, model_identity: str | None = None) -> str:
    """What decides the stage results; neither the device nor the cache policy does. ``model_identity`` stands for
    ``cfg.model`` when that names a private copy whose path changes from run to run (the service's snapshots)."""
    d = cfg.to_public_dict()
    d.pop("device", None)
    d.pop("low_memory", None)
    if model_identity is not None:
        d["model"] = model_identity
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _json_default(o):
    return o.tolist() if hasattr(o, "tolist") else str(o)


def _jsonable(d: Any) -> Any:
    return json.loads(json.dumps(d, default=_json_default))


def resident_limit_bytes() -> int:
    """Models whose float32 weights exceed this are streamed: ``MOPEQ_RESIDENT_MAX_BYTES``, else 40 % of RAM."""
    env = os.environ.get("MOPEQ_RESIDENT_MAX_BYTES")
    if env:
        return int(float(env))
    try:
        return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 8 * 2**30


# =====================================================================================================================
# entry point
# =====================================================================================================================
def run(cfg, out_dir, *, state_dir=None, on_event: EventHook | None = None, should_cancel: CancelHook | None = None,
        hooks: EngineHooks | None = None, spill_bytes: int | None = None,
        model_identity: str | None = None) -> RunSummary:
    """Quantize ``cfg.model`` into ``out_dir`` (see the module docstring). Finished stages in ``state_dir`` whose
    fingerprint (the config, with ``model_identity`` for the model when given) matches are reused."""
    return _Run(cfg, Path(out_dir), state_dir, on_event, should_cancel, hooks or EngineHooks(), spill_bytes,
                model_identity).run()


class _Run:
    def __init__(self, cfg, out_dir: Path, state_dir, on_event, should_cancel, hooks: EngineHooks, spill_bytes,
                 model_identity: str | None = None):
        from .apply import QuantSettings
        from .streaming import DEFAULT_SPILL_BYTES

        cfg.validate()
        self.cfg, self.out_dir, self.hooks = cfg, out_dir, hooks
        self.own_state = state_dir is None
        self.state = StageState(Path(state_dir) if state_dir else out_dir / ".mopeq-state",
                                fingerprint(cfg, model_identity))
        if self.state.done("fetch") and self.state.read_json("fetch").get("model", cfg.model) != cfg.model:
            self.state.forget("fetch")  # it names another copy of the same model (a retried service job's)
        self.prog = Progress(on_event, should_cancel)
        self.qs = QuantSettings(cfg.quantizer, cfg.group_size, cfg.symmetric, cfg.act_order)
        self.device = torch.device(cfg.device)
        self.spill = DEFAULT_SPILL_BYTES if spill_bytes is None else int(spill_bytes)
        self.timings: dict[str, dict] = {}
        self.rss0 = peak_rss_mb()
        self.methods = AUTO_CANDIDATES if cfg.sensitivity == "auto" else (cfg.sensitivity,)
        self.inputs = None  # every layer's calibration inputs (whole-model loss scores)

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def stage(self, name: str):
        run = self

        class _T:
            def __enter__(self):
                self.resumed = run.state.done(name)
                run.prog.start(name)
                if run.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(run.device)
                self.t0 = time.perf_counter()
                self.reads0 = run.stream.bytes_read if hasattr(run, "stream") else 0

            def __exit__(self, et, ev, tb):
                if et is None:
                    peak = peak_rss_mb()
                    t = {"seconds": round(time.perf_counter() - self.t0, 3), "peak_rss_mb": round(peak, 1),
                         "peak_rss_increase_mb": round(peak - run.rss0, 1)}
                    if hasattr(run, "stream"):
                        t["bytes_read"] = run.stream.bytes_read - self.reads0
                    if run.device.type == "cuda":
                        t["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)
                    if self.resumed:
                        t["resumed"] = True
                    run.timings[name] = t
                    run.prog.emit(1.0, "reused from its stage files" if self.resumed else "finished")
        return _T()

    def run(self) -> RunSummary:
        with self.stage("fetch"):
            self.fetch()
        with self.stage("calibrate"):
            self.calibrate()
        with self.stage("sensitivity"):
            self.sensitivity()
        with self.stage("allocate"):
            self.allocate()
        with self.stage("quantize"):
            self.quantize()
        with self.stage("evaluate"):
            self.evaluate()
        return self.export()

    # -- fetch ----------------------------------------------------------------------------------------------------
    def fetch(self) -> None:
        from .artifact import checkpoint_dtype
        from .data import load_samples
        from .errors import UserInputError
        from .loading import load_tokenizer, resolve_model
        from .moe import expert_param_names
        from .multimodal import load_processor
        from .streaming import ModelStream, SafetensorsCheckpoint

        cfg, st = self.cfg, self.state
        if cfg.format not in ("mopeq", "fake"):
            from .exporters import precheck

            precheck(cfg.format, cfg)  # refuse an impossible export before any compute
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but torch sees no CUDA device")
        if st.done("fetch"):
            f = st.read_json("fetch")
            self.model_path, self.revision = Path(f["path"]), f["revision"]
        else:
            resolved = resolve_model(cfg.model, revision=cfg.revision, token=cfg.token,
                                     allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code)
            self.model_path, self.revision = resolved.path, resolved.revision
            st.write_json("fetch", {"path": str(self.model_path), "revision": self.revision, "model": cfg.model})
            st.mark("fetch")
        resident = not cfg.low_memory
        if resident and not cfg.allow_pickle:
            try:  # float32 weights past the limit are streamed
                ck = SafetensorsCheckpoint(self.model_path)
                elem = max(1, sum(ck.nbytes(k) for k in ck.keys()) // max(1, _numel(ck)))
                resident = ck.payload_bytes * 4 // elem <= resident_limit_bytes()
            except Exception:  # noqa: BLE001 - no safetensors index to size from: load it whole (pickle, remote)
                pass
        if not resident:
            if cfg.format not in ("mopeq",):
                raise UserInputError(
                    f"--format {cfg.format} needs the whole model in memory, and this run streams its layers "
                    f"({'--low-memory' if cfg.low_memory else 'the model is larger than MOPEQ_RESIDENT_MAX_BYTES'}); "
                    "write the packed mopeq format, or raise the limit")
            if cfg.eval_suites:
                raise UserInputError("evaluation suites need the whole model in memory and this run streams its "
                                     "layers; drop --eval-suite or --low-memory")
        self.stream = ModelStream.open(self.model_path, resident=resident, device=cfg.device,
                                       trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
        model = self.stream.model
        for p in model.parameters():  # scores set requires_grad on the expert weights they differentiate
            p.requires_grad_(False)
        self.groups = self.stream.groups
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=cfg.trust_remote_code)
        self.processor = load_processor(self.model_path, trust_remote_code=cfg.trust_remote_code)
        self.calib = load_samples(cfg.calib_file, self.tokenizer, cfg.calib_samples, cfg.seq_len,
                                  processor=self.processor)
        self.evalset = None
        if cfg.eval_file:
            self.evalset = load_samples(cfg.eval_file, self.tokenizer, cfg.eval_samples, cfg.seq_len,
                                        processor=self.processor)
        self.ck_dtype = checkpoint_dtype(model.config)
        self.elem = torch.finfo(self.ck_dtype).bits // 8
        self.skip_names = expert_param_names(model, self.groups)
        self.non_expert_bytes = _non_expert_bytes(model, self.skip_names, self.elem)
        self.proj_costs = {(g.layer, p.name): {b: self._projection_cost(p, b) for b in cfg.bits}
                           for g in self.groups for p in g.projections}
        self.costs = {(g.layer, e): {b: sum(self.proj_costs[(g.layer, p.name)][b] for p in g.projections)
                                     for b in cfg.bits}
                      for g in self.groups for e in range(g.num_experts)}
        self.budget_bytes, self.budget_desc = self._budget()  # an infeasible budget stops here, before compute
        from .streaming import make_batches

        dt = self.stream.dtype
        self.calib_batches = make_batches(self.calib, "calib", BATCH, self.device, dt)
        self.eval_batches = make_batches(self.evalset, "eval", BATCH, self.device, dt) if self.evalset is not None else []
        self.folds = [b % FOLDS for b in range(len(self.calib_batches))] if cfg.sensitivity == "auto" else None
        if self.folds is not None and len(self.calib_batches) < FOLDS:
            raise UserInputError(f"--sensitivity auto cross-fits on {FOLDS} halves of the calibration data: give at "
                                 f"least {FOLDS * BATCH} calibration samples (or pick a method)")

    def _projection_cost(self, p, bits: int) -> int:
        """Bytes of one expert projection at ``bits``: packed codes and scales, or (``--format gguf``) the real
        blocks of the llama.cpp type that stores that width, so the budget is the file's."""
        if self.cfg.format == "gguf":
            from .gguf_export import gguf_projection_cost

            return gguf_projection_cost(p.out_features, p.in_features, bits)
        from .allocate import projection_cost

        return projection_cost(p.out_features, p.in_features, bits, self.cfg.group_size, self.cfg.symmetric)

    def _budget(self) -> tuple[int, dict]:
        from .allocate import ExpertItem, budget_for_avg_bits, feasible_range
        from .errors import InfeasibleBudgetError

        cfg, ne = self.cfg, self.non_expert_bytes
        items = [ExpertItem(layer=g.layer, expert=e, params=g.expert_params, sensitivity=0.0,
                            error={b: 0.0 for b in cfg.bits}, cost=self.costs[(g.layer, e)])
                 for g in self.groups for e in range(g.num_experts)]
        lo, hi = feasible_range(items)
        if cfg.budget.avg_bits is not None:
            return budget_for_avg_bits(items, cfg.budget.avg_bits), {"target_avg_bits": cfg.budget.avg_bits,
                                                                     "budget_bytes": None}
        budget = int(cfg.budget.gb * 1e9) - ne
        if budget < lo:
            raise InfeasibleBudgetError(
                f"--budget-gb {cfg.budget.gb} is infeasible: with widths {list(cfg.bits)} this model needs between "
                f"{(lo + ne) / 1e9:.6f} and {(hi + ne) / 1e9:.6f} GB ({ne / 1e9:.6f} GB of it non-expert weights)",
                feasible=((lo + ne) / 1e9, (hi + ne) / 1e9), unit="GB")
        return budget, {"target_avg_bits": None, "budget_bytes": int(cfg.budget.gb * 1e9)}

    # -- calibrate: one forward stream ----------------------------------------------------------------------------
    def calibrate(self) -> None:
        from .calibrate import CalibrationStats

        st = self.state
        if st.done("calibrate"):
            self.stats = CalibrationStats.from_state(torch.load(st.path("calibrate.pt"), weights_only=True),
                                                     mode="all" if self.cfg.calib_all_experts else "routed")
            self.fold_stats = [CalibrationStats.from_state(torch.load(st.path(f"calibrate-fold{f}.pt"),
                                                                      weights_only=True))
                               for f in range(FOLDS)] if self.folds else None
            c = st.read_json("calibrate")
            self.fp, self.layer_local, self.errors = c["fp"], _int_keys(c["layer_local"]), c["errors"]
            return
        self._calibration_stream()
        torch.save(self.stats.state(), st.path("calibrate.pt"))
        for f, s in enumerate(self.fold_stats or []):
            torch.save(s.state(), st.path(f"calibrate-fold{f}.pt"))
        st.write_json("calibrate", {"fp": self.fp, "layer_local": self.layer_local, "errors": self.errors})
        st.mark("calibrate")

    def _calibration_stream(self) -> None:
        from .calibrate import CalibrationStats, _Accumulator, _install_hooks
        from .sensitivity import TraceHook, weight_norm_scores
        from .streaming import ActivationStore

        cfg, stream, prog = self.cfg, self.stream, self.prog
        keep_inputs = any(m in LOSS_METHODS for m in self.methods)
        if keep_inputs:
            self.inputs = ActivationStore(self.state.path("inputs"), self.spill)
        want_hessians = cfg.quantizer == "gptq" or cfg.cost == "output"
        counts, sq, top_k, fallback = {}, {}, {}, {}
        fold_acc = [{} for _ in range(FOLDS)] if self.folds else None
        self.layer_local = {"weight-norm": {}}
        if "layer-hessian" in self.methods:
            self.layer_local["layer-hessian"] = {}
        self.errors: dict[str, dict] = {}
        batches = self.calib_batches + self.eval_batches
        xs = {key: stream.embed(key, batch).h0 for key, batch in batches}
        n_tokens = int(self.calib.numel())
        stream.count_pass("calibrate")
        for i in range(stream.n_layers):
            prog.emit(i / stream.n_layers, f"layer {i + 1}/{stream.n_layers}")
            g = stream.group_of.get(i)
            with stream.layer(i) as layer:
                acc = trace = None
                handles: list = []
                tk: dict[int, int] = {}
                if g is not None:
                    acc = _Accumulator([g], collect_hessians=want_hessians)
                    handles = _install_hooks(stream.model, [g], acc, False, tk)
                    if "layer-hessian" in self.layer_local:
                        trace = TraceHook(g).install()
                new = {}
                try:
                    with torch.no_grad():
                        for bi, (key, batch) in enumerate(self.calib_batches):
                            prog.check()
                            if keep_inputs:
                                self.inputs.put((i, key), xs[key])
                            fold_handles = []
                            if g is not None and fold_acc is not None:
                                fa = fold_acc[self.folds[bi]].setdefault(i, _Accumulator([g], False))
                                fold_handles = _install_hooks(stream.model, [g], fa, False, {})
                            try:
                                new[key] = stream.run_layer(layer, i, xs[key], stream.embed(key, batch))
                            finally:
                                for h in fold_handles:
                                    h.remove()
                finally:
                    for h in handles:
                        h.remove()
                    if trace is not None:
                        trace.remove()
                with torch.no_grad():
                    for key, batch in self.eval_batches:
                        prog.check()
                        new[key] = stream.run_layer(layer, i, xs[key], stream.embed(key, batch))
                if g is not None:
                    layer_stats = self._finish_layer_stats(g, layer, i, acc, tk, xs, n_tokens)
                    counts[g.layer], top_k[g.layer] = layer_stats.counts[g.layer], layer_stats.top_k[g.layer]
                    sq.update(layer_stats.sq_norms)
                    if layer_stats.fallback:
                        fallback.update(layer_stats.fallback)
                    self.layer_local["weight-norm"][g.layer] = weight_norm_scores(g)
                    if trace is not None:
                        self.layer_local["layer-hessian"][g.layer] = (trace.sums / max(n_tokens, 1)).tolist()
                    self._candidates(g, i, layer_stats)
                    del layer_stats, acc
            xs = new
        self.stats = CalibrationStats(counts, sq, {}, n_tokens, top_k, fallback,
                                      "all" if cfg.calib_all_experts else "routed")
        self.fold_stats = None
        if fold_acc is not None:
            self.fold_stats = []
            for f in range(FOLDS):
                fc = {stream.group_of[i].layer: a.counts[stream.group_of[i].layer] for i, a in fold_acc[f].items()}
                fs = {k: v for a in fold_acc[f].values() for k, v in a.sq.items()}
                tokens = sum(int(b["input_ids"].numel()) for bi, (_, b) in enumerate(self.calib_batches)
                             if self.folds[bi] == f)
                self.fold_stats.append(CalibrationStats(fc, fs, {}, tokens, top_k, {}, "routed"))
        self.fp = {"eval_loss": None}
        if self.eval_batches:
            self.fp["eval_loss"] = self._head_loss(self.eval_batches, xs)

    def _finish_layer_stats(self, g, layer, i: int, acc, top_k: dict, xs: dict, n_tokens: int):
        """One layer's routed statistics; starved experts (or all, with ``calib_all_experts``) get all-token
        statistics from a second pass over the layer, rescaled to their routed count."""
        from .calibrate import CalibrationStats, _install_hooks, fill_starved

        cfg, stream = self.cfg, self.stream

        def all_token_pass(alltok) -> None:
            handles = _install_hooks(stream.model, [g], alltok, True, {})
            try:
                with torch.no_grad():
                    for key, batch in self.calib_batches:
                        self.prog.check()
                        stream.run_layer(layer, i, xs[key], stream.embed(key, batch))
            finally:
                for h in handles:
                    h.remove()

        starved = fill_starved(acc, [g], all_token_pass, all_experts=cfg.calib_all_experts).get(g.layer, set())
        if g.layer not in top_k and n_tokens:
            top_k[g.layer] = round(int(acc.counts[g.layer].sum()) / n_tokens)
        fallback = {} if cfg.calib_all_experts or not starved else {g.layer: sorted(starved)}
        return CalibrationStats(acc.counts, acc.sq, acc.hs, n_tokens, {g.layer: top_k.get(g.layer, 0)}, fallback,
                                "all" if cfg.calib_all_experts else "routed")

    def _candidates(self, g, i: int, stats) -> None:
        """Every expert of the layer at every width: weight and output errors per projection (the allocator's
        costs) and the packed matrices (to disk)."""
        from .artifact import packed_key
        from .gptq_batched import quantize_layer_candidates
        from .streaming import _save_tensors

        tensors: dict[str, torch.Tensor] = {}
        errs: dict = {"weight": {}, "output": {}}
        for e, b, proj, qm, werr in quantize_layer_candidates(g, stats, self.cfg.bits, self.qs, device=self.device,
                                                              should_stop=self.prog.check):
            H = stats.hessians.get((g.layer, proj)) if stats.hessians else None
            oerr = output_error(g.weight(e, proj), qm, None if H is None else H[e])
            for kind, v in (("weight", werr), ("output", oerr)):
                errs[kind].setdefault(str(e), {}).setdefault(proj, {})[str(b)] = v
            for part, t in qm.to_packed().items():
                tensors[f"{b}.{packed_key(g.path, proj, e, part)}"] = t.cpu()
        _save_tensors(self.state.path(f"cand-{i}.safetensors"), tensors)
        self.errors[str(g.layer)] = errs

    def _head_loss(self, batches, hs: dict, per_row: bool = False):
        total, count, rows = 0.0, 0, []
        with torch.no_grad():
            for key, batch in batches:
                loss, n = self.stream.loss(batch, hs[key])
                total += float(loss.double().sum())
                count += int(n.sum())
                rows += [(float(a), int(b)) for a, b in zip(loss.double(), n)]
        return rows if per_row else total / max(count, 1)

    # -- sensitivity ----------------------------------------------------------------------------------------------
    def sensitivity(self) -> None:
        from .sensitivity import SensitivityContext, SensitivityResult, compute_sensitivity
        from .streaming import record_inputs

        cfg, st = self.cfg, self.state
        if st.done("sensitivity"):
            self.sens = {m: SensitivityResult.from_json(d) for m, d in st.read_json("sensitivity").items()}
            return
        if any(m in LOSS_METHODS for m in self.methods) and self.inputs is None:  # resumed: record them again
            from .streaming import ActivationStore

            self.inputs = record_inputs(self.stream, self.calib_batches, should_stop=self.prog.check,
                                        store=ActivationStore(self.state.path("inputs"), self.spill))
        self.sens = {}
        for j, m in enumerate(self.methods):
            def sub(f, j=j):
                self.prog.fraction((j + f) / len(self.methods))
            ctx = SensitivityContext(self.stream.model, self.groups, self.stats, self.calib, probes=cfg.probes,
                                     tol=cfg.probe_tol, seed=cfg.seed, should_stop=self.prog.check,
                                     on_progress=sub, stream=self.stream, batches=self.calib_batches,
                                     folds=self.folds, inputs=self.inputs, precomputed=self.layer_local)
            t0 = time.perf_counter()
            r = compute_sensitivity(m, ctx)
            if self.folds and "fold_scores" not in r.details:
                r.details["fold_scores"] = self._fold_scores(m, ctx)
            r.details["seconds"] = round(time.perf_counter() - t0, 3)
            self.sens[m] = r
        if self.inputs is not None:
            self.inputs.clear()
        st.write_json("sensitivity", {m: r.to_json() for m, r in self.sens.items()})
        st.mark("sensitivity")

    def _fold_scores(self, method: str, ctx) -> list[dict]:
        """Scores of statistics-based methods from each fold's own statistics (data-free ones: the same)."""
        import dataclasses

        from .sensitivity import compute_sensitivity

        out = []
        for f in range(FOLDS):
            stats = self.fold_stats[f] if method in ("frequency", "input-hessian") else self.stats
            r = compute_sensitivity(method, dataclasses.replace(ctx, stats=stats))
            out.append({str(k): v for k, v in r.scores.items()})
        return out

    # -- allocate -------------------------------------------------------------------------------------------------
    def items(self, scores: dict[int, list[float]]) -> list:
        from .allocate import ExpertItem

        kind = self.cfg.cost
        out = []
        for g in self.groups:
            per = self.errors[str(g.layer)][kind]
            for e in range(g.num_experts):
                proj = {p: {int(b): v for b, v in d.items()} for p, d in per[str(e)].items()}
                err = {b: sum(proj[p.name][b] for p in g.projections) for b in self.cfg.bits}
                out.append(ExpertItem(layer=g.layer, expert=e, params=g.expert_params,
                                      sensitivity=float(scores[g.layer][e]), error=err,
                                      cost=self.costs[(g.layer, e)], proj_error=proj,
                                      proj_params={p.name: p.params for p in g.projections},
                                      proj_cost={p.name: self.proj_costs[(g.layer, p.name)] for p in g.projections}))
        return out

    def _allocate(self, scores: dict[int, list[float]]):
        from .allocate import allocate

        cfg = self.cfg
        return allocate(self.items(scores), self.budget_bytes, allocator=cfg.allocator, scope=cfg.scope,
                        granularity=cfg.granularity)

    def allocate(self) -> None:
        st = self.state
        if st.done("allocate"):
            self.alloc_state = st.read_json("allocate")
        else:
            self.prog.check()
            allocations = {m: self._allocate(self.sens[m].scores) for m in self.methods}
            validation = {}
            if len(self.methods) > 1:
                validation = self._validate()
                best = validation["best"]
            else:
                best = self.methods[0]
            a = allocations[best]
            self.alloc_state = {
                "method": best, "bits": [[k[0], k[1], b] for k, b in sorted(a.bits.items())],
                "proj_bits": [[k[0], k[1], b] for k, b in sorted((a.proj_bits or {}).items())],
                "objective": a.objective, "exact": a.exact, "total_expert_bytes": a.total_bytes,
                "feasible_range": list(a.feasible_range), "budget_expert_bytes": self.budget_bytes,
                "budget": self.budget_desc, "validation": validation, "details": _jsonable(a.details),
            }
            st.write_json("allocate", self.alloc_state)
            st.mark("allocate")
        self.bits = {(l_, e): b for l_, e, b in self.alloc_state["bits"]}
        self.proj_bits = {(l_, p): b for l_, p, b in self.alloc_state.get("proj_bits", [])}

    def widths(self, g, e: int) -> dict[str, int]:
        """Expert ``e``'s width per projection (one width for all, except with layer-projection granularity)."""
        return {p.name: self.proj_bits.get((g.layer, p.name), self.bits[(g.layer, e)]) for p in g.projections}

    def _validate(self) -> dict:
        """Two-fold cross-fitting of ``auto``'s candidates: the allocation from each method's scores on one half
        of the calibration batches is scored by the loss on the other half, every token once; all candidates go
        through one forward stream, each with its own carried hidden states."""
        stream = self.stream
        configs = []  # (method, fold evaluated, bits)
        for m in self.methods:
            fold_scores = self.sens[m].details["fold_scores"]
            for f in range(FOLDS):
                other = {int(k): v for k, v in fold_scores[(f + 1) % FOLDS].items()}
                a = self._allocate(other)
                configs.append((m, f, _widths_of(a)))
        runs = {}
        for c, (m, f, _) in enumerate(configs):
            for bi, (key, batch) in enumerate(self.calib_batches):
                if self.folds[bi] == f:
                    runs[(c, key)] = (key, batch)
        hs = {rk: stream.embed(key, batch).h0 for rk, (key, batch) in runs.items()}
        stream.count_pass("auto-validation")
        for i in range(stream.n_layers):
            self.prog.emit(0.2 + 0.8 * i / stream.n_layers, f"validating candidates, layer {i + 1}")
            g = stream.group_of.get(i)
            with stream.layer(i) as layer:
                cands = self._read_candidates(i) if g is not None else None
                saved = _expert_weights(g) if g is not None else None
                for c, (_, _, widths) in enumerate(configs):
                    if g is not None:
                        _apply_candidates(g, cands, widths, self.cfg)
                    with torch.no_grad():
                        for rk, (key, batch) in runs.items():
                            if rk[0] == c:
                                self.prog.check()
                                hs[rk] = stream.run_layer(layer, i, hs[rk], stream.embed(key, batch))
                if g is not None:
                    _restore_expert_weights(g, saved)
        per_method: dict[str, list[tuple[float, int]]] = {m: [] for m in self.methods}
        for c, (m, _, _) in enumerate(configs):
            keys = [rk for rk in runs if rk[0] == c]
            per_method[m] += self._head_loss([runs[rk] for rk in keys], {runs[rk][0]: hs[rk] for rk in keys},
                                             per_row=True)
        loss = {m: sum(s for s, _ in r) / max(sum(n for _, n in r), 1) for m, r in per_method.items()}
        best = min(self.methods, key=lambda m: (loss[m], self.methods.index(m)))
        paired = {}
        for m in self.methods:  # per-sequence mean-loss differences against the best, paired by sequence
            d = torch.tensor([a / max(n, 1) - b / max(n, 1) for (a, n), (b, _) in zip(per_method[m],
                                                                                     per_method[best])],
                             dtype=torch.float64)
            paired[m] = {"mean_diff": float(d.mean()), "std_err": float(d.std() / math.sqrt(len(d)))
                         if len(d) > 1 else None}
        return {"best": best, "loss": loss, "paired_vs_best": paired, "folds": FOLDS,
                "sequences": len(per_method[best]), "scheme": "two-fold cross-fitting"}

    def _read_candidates(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.state.path(f"cand-{i}.safetensors")))

    # -- quantize: one forward stream -----------------------------------------------------------------------------
    def quantize(self) -> None:
        st = self.state
        self.staging = st.path("artifact")
        if st.done("quantize"):
            self.q = st.read_json("quantize")
            if self.stream.resident:  # the resident model carries the quantized weights (engine exports)
                from .loader import load_packed_matrices

                chosen = load_packed_matrices(self.staging, self.groups)
                from .apply import apply_fake_quant

                apply_fake_quant(self.groups, chosen)
            return
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        self.q = self._quantization_stream()
        st.write_json("quantize", self.q)
        st.mark("quantize")

    def _quantization_stream(self) -> dict:
        from .artifact import FORMAT_VERSION, INDEX_NAME, quantization_config, shard_name, write_config
        from .calibrate import _Accumulator, _install_hooks
        from .streaming import _save_tensors

        cfg, stream, prog = self.cfg, self.stream, self.prog
        sequential = cfg.sequential and cfg.quantizer == "gptq"
        n = stream.n_layers
        weight_map: dict[str, str] = {}
        glob = _state_tensors(stream.model, None, self.skip_names, self.ck_dtype, exclude_prefix=stream.layers_path)
        name0 = shard_name(0, n + 1)
        _save_tensors(self.staging / name0, glob, {"format": "pt", "mopeq": "non-expert"})
        weight_map.update({k: name0 for k in glob})
        del glob
        run_batches = (self.calib_batches if sequential else []) + self.eval_batches
        xs = {key: stream.embed(key, batch).h0 for key, batch in run_batches}
        stream.count_pass("quantize")
        for i in range(n):
            prog.emit(i / n, f"layer {i + 1}/{n}")
            g = stream.group_of.get(i)
            with stream.layer(i) as layer:
                packed: dict[str, torch.Tensor] = {}
                if g is not None:
                    if sequential:
                        acc = _Accumulator([g], collect_hessians=True)
                        tk: dict[int, int] = {}
                        handles = _install_hooks(stream.model, [g], acc, False, tk)
                        try:
                            with torch.no_grad():
                                for key, batch in self.calib_batches:
                                    prog.check()
                                    if self.hooks.gptq_inputs is not None:
                                        self.hooks.gptq_inputs(i, key, xs[key])
                                    stream.run_layer(layer, i, xs[key], stream.embed(key, batch))
                        finally:
                            for h in handles:
                                h.remove()
                        stats = self._finish_layer_stats(g, layer, i, acc, tk, xs, int(self.calib.numel()))
                        chosen = self._gptq_at_allocated_widths(g, stats)
                        del stats, acc
                    else:
                        chosen = _candidates_at(g, self._read_candidates(i), self.widths, cfg)
                    from .artifact import packed_key

                    for e, per in chosen.items():
                        for proj, qm in per.items():
                            g.set_weight(e, proj, qm.dequantize(g.weight(e, proj).dtype,
                                                                device=g.weight(e, proj).device))
                            for part, t in qm.to_packed().items():
                                packed[packed_key(g.path, proj, e, part)] = t.cpu().contiguous()
                local = _state_tensors(layer, f"{stream.layers_path}.{i}.", self.skip_names, self.ck_dtype)
                local.update(packed)
                name = shard_name(i + 1, n + 1)
                _save_tensors(self.staging / name, local, {"format": "pt", "mopeq": f"layer {i}"})
                weight_map.update({k: name for k in local})
                del local, packed
                new = {}
                with torch.no_grad():
                    for key, batch in run_batches:
                        prog.check()
                        new[key] = stream.run_layer(layer, i, xs[key], stream.embed(key, batch))
                xs = new
        index = {"metadata": {"format": "mopeq", "format_version": FORMAT_VERSION}, "weight_map": weight_map}
        (self.staging / INDEX_NAME).write_text(json.dumps(index, indent=1))
        qc = quantization_config(self.groups, self.bits, cfg.group_size, cfg.symmetric, cfg.quantizer)
        if self.proj_bits:  # layer-projection: the loader reads a width per projection
            for g in self.groups:
                qc["modules"][g.path]["proj_bits"] = {p.name: [self.widths(g, e)[p.name] for e in range(g.num_experts)]
                                                      for p in g.projections}
        write_config(self.staging, stream.model, qc)
        out = {"sequential": sequential, "eval_loss": None}
        if self.eval_batches:
            out["eval_loss"] = self._head_loss(self.eval_batches, xs)
        return out

    def _gptq_at_allocated_widths(self, g, stats) -> dict[int, dict]:
        from .apply import quantize_expert

        return {e: quantize_expert(g, e, self.widths(g, e), stats, self.qs) for e in range(g.num_experts)}

    # -- evaluate -------------------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        cfg, st = self.cfg, self.state
        if st.done("evaluate"):
            self.ev = st.read_json("evaluate")
            return
        ev: dict[str, Any] = {"fp_perplexity": None, "quantized_perplexity": None}
        if self.eval_batches:
            from .data import num_targets

            ev = {"fp_perplexity": math.exp(self.fp["eval_loss"]), "quantized_perplexity": math.exp(self.q["eval_loss"]),
                  "eval_tokens": num_targets(self.evalset), "eval_file": cfg.eval_file}
            ev["increase_pct"] = 100.0 * (ev["quantized_perplexity"] / ev["fp_perplexity"] - 1.0)
        if cfg.eval_suites:  # full precision from the checkpoint, then the resident quantized model
            from .eval_suites import compare, run_suites
            from .loading import load_model

            kw = {"eval_file": cfg.eval_file, "include_path": cfg.eval_suite_include, "limit": cfg.eval_suite_limit,
                  "seed": cfg.seed}
            fp_model = load_model(self.model_path, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                                  allow_pickle=cfg.allow_pickle)
            fp_suites = run_suites(fp_model, self.tokenizer, self.processor, cfg.eval_suites, **kw)
            del fp_model
            ev["suites"] = compare(fp_suites, run_suites(self.stream.model, self.tokenizer, self.processor,
                                                         cfg.eval_suites, **kw))
        self.ev = ev
        st.write_json("evaluate", ev)
        st.mark("evaluate")

    # -- export ---------------------------------------------------------------------------------------------------
    def export(self) -> RunSummary:
        from . import __version__
        from .artifact import build_bitmap
        from .card import write_model_card
        from .data import SampleSet, num_tokens
        from .multimodal import component_bytes

        cfg, out_dir, a = self.cfg, self.out_dir, self.alloc_state
        with self.stage("export"):
            chosen = self.sens[a["method"]]
            sensitivity_desc = {"method": a["method"], "probes": chosen.probes, "calib_tokens": num_tokens(self.calib),
                                "rel_std_err_median": chosen.rel_std_err_median}
            if cfg.sensitivity == "auto":
                sensitivity_desc["selected_by"] = "auto"
                sensitivity_desc["candidate_holdout_loss"] = a["validation"]["loss"]
            # each expert's bytes at its widths (per projection with layer-projection granularity)
            costs = {(g.layer, e): {self.bits[(g.layer, e)]: sum(self.proj_costs[(g.layer, p)][b]
                                                                for p, b in self.widths(g, e).items())}
                     for g in self.groups for e in range(g.num_experts)}
            bitmap = build_bitmap(
                model_id=cfg.model, revision=self.revision, groups=self.groups, bits=self.bits, scores=chosen.scores,
                frequency={g.layer: self.stats.frequency(g.layer).tolist() for g in self.groups}, costs=costs,
                non_expert_bytes=self.non_expert_bytes, bits_choices=cfg.bits, group_size=cfg.group_size,
                symmetric=cfg.symmetric, quantizer=cfg.quantizer, sensitivity=sensitivity_desc,
                allocation={"allocator": cfg.allocator, "scope": cfg.scope, "granularity": cfg.granularity,
                            **a["budget"]})
            if self.proj_bits:
                params = sum(g.expert_params * g.num_experts for g in self.groups)
                bitmap["avg_bits"] = sum(p.params * w for g in self.groups for e in range(g.num_experts)
                                         for p in g.projections for w in [self.widths(g, e)[p.name]]) / params
                for layer, g in zip(bitmap["layers"], self.groups):
                    for ex in layer["experts"]:
                        ex["projections"] = self.widths(g, ex["expert"])
            out_dir.mkdir(parents=True, exist_ok=True)
            files = self._export_files(bitmap)
            if cfg.format == "gguf":  # the budget was counted in llama.cpp's blocks: the figures are the file's
                from .gguf_export import gguf_sizes

                sizes = gguf_sizes(next(out_dir.glob("*.gguf")))
                bitmap["expert_bytes"], bitmap["total_bytes"] = sizes["expert_bytes"], sizes["total_bytes"]
            (out_dir / "bitmap.json").write_text(json.dumps(bitmap, indent=1))
            files.append(out_dir / "bitmap.json")
        model, stream = self.stream.model, self.stream
        validation = a.get("validation") or {}
        report = {
            "mopeq_version": __version__, "model": cfg.model, "revision": self.revision,
            "config": cfg.to_public_dict(), "stages": self.timings,
            "perplexity": {k: v for k, v in self.ev.items() if k != "suites"}, "calibration": self.stats.coverage(),
            "modality": "image+text" if isinstance(self.calib, SampleSet) else "text",
            "eval_suites": self.ev.get("suites"),
            "sensitivity": {m: {"probes": r.probes, "rel_std_err_median": r.rel_std_err_median,
                                "seconds": r.details.get("seconds"), "converged": r.details.get("converged"),
                                "streams": r.details.get("streams")}
                            for m, r in self.sens.items()},
            "selected_sensitivity": a["method"],
            "candidate_holdout_loss": validation.get("loss", {}),
            "candidate_validation": validation,
            "allocation": {"objective": a["objective"], "exact": a["exact"], "cost": cfg.cost,
                           "budget_expert_bytes": a["budget_expert_bytes"],
                           "feasible_expert_bytes": a["feasible_range"], "details": a["details"]},
            "quantization": {"sequential": self.q["sequential"], "quantizer": cfg.quantizer},
            "sizes": {"expert_bytes": bitmap["expert_bytes"], "non_expert_bytes": self.non_expert_bytes,
                      "total_bytes": bitmap["total_bytes"], "avg_bits": bitmap["avg_bits"],
                      "fp_expert_bytes": sum(g.expert_params * g.num_experts for g in self.groups) * self.elem,
                      "non_expert_by_component": component_bytes(model, self.groups, self.elem)},
            "engine": {"layers": "resident" if stream.resident else "streamed", "decoder_layers": stream.n_layers,
                       "moe_layers": len(self.groups), "passes": dict(stream.passes),
                       "bytes_read": stream.bytes_read, "checkpoint_bytes": stream.checkpoint_bytes,
                       "layer_loads": stream.layer_loads, "activation_spill_bytes": self.spill,
                       "rss_at_start_mb": round(self.rss0, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                       "peak_rss_increase_mb": round(peak_rss_mb() - self.rss0, 1)},
        }
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        files.append(out_dir / "report.json")
        files += write_model_card(out_dir, bitmap, report)
        if self.own_state:
            shutil.rmtree(self.state.dir, ignore_errors=True)
        return RunSummary(out_dir, bitmap, report, self.revision, files)

    def _export_files(self, bitmap) -> list[Path]:
        cfg, out_dir, model = self.cfg, self.out_dir, self.stream.model
        files: list[Path] = []
        if cfg.format == "mopeq":
            for f in self.staging.iterdir():
                shutil.copy2(f, out_dir / f.name)
                files.append(out_dir / f.name)
        elif cfg.format == "fake":
            model.save_pretrained(out_dir)
            files += list(out_dir.glob("*.safetensors")) + [out_dir / "config.json"]
        else:
            from .exporters import export as export_engine
            from .loader import load_packed_matrices

            chosen = load_packed_matrices(self.staging, self.groups)
            files += export_engine(cfg.format, out_dir, model, self.groups, chosen, self.bits, cfg)
        # A remote-code model's artifact needs the modeling files its config's auto_map names.
        if getattr(model.config, "auto_map", None) and self.model_path.is_dir():
            for py in self.model_path.glob("*.py"):
                shutil.copy2(py, out_dir / py.name)
                files.append(out_dir / py.name)
        (self.processor or self.tokenizer).save_pretrained(out_dir)
        files += [p for p in out_dir.iterdir() if p.name.startswith((
            "tokenizer", "special_tokens", "chat_template", "processor_config", "preprocessor_config",
            "video_preprocessor_config"))]
        return files


# =====================================================================================================================
# pieces
# =====================================================================================================================
def output_error(W: torch.Tensor, qm, H: torch.Tensor | None) -> float:
    """``in · tr(ΔW H ΔWᵀ) / tr(H)`` with ``H = Σ x xᵀ`` of the projection's inputs: the output error GPTQ
    minimises, on the scale of the weight error ``‖ΔW‖²`` (the two agree when H is isotropic). With a K-FAC
    view of the loss Hessian (input covariance ⊗ output-gradient covariance, the latter isotropic), the loss
    increase of a perturbation is ∝ s · tr(ΔW H ΔWᵀ)/tr(H), s the expert's Hessian trace: so the knapsack weighs
    this error by the sensitivity exactly as it weighs the weight error. Falls back to ‖ΔW‖² without tokens."""
    dW = (qm.dequantize(torch.float64, device=W.device) - W.detach().double())
    if H is None:
        return float(dW.square().sum())
    H = H.to(W.device, torch.float64)
    tr = float(H.diagonal().sum())
    if tr <= 0:
        return float(dW.square().sum())
    return float(W.shape[-1] * ((dW @ H) * dW).sum() / tr)


def _numel(ck) -> int:
    return sum(math.prod(shape) for (_, _, shape, _, _) in ck.entries.values())


def _int_keys(d: dict) -> dict:
    return {m: {int(k): v for k, v in per.items()} for m, per in d.items()}


def _non_expert_bytes(model, skip_names: set[str], elem: int) -> int:
    """Bytes of the non-expert weights at the checkpoint dtype (from shapes; works on a meta skeleton)."""
    total = 0
    for name, p in model.named_parameters():  # tied parameters appear once
        if name not in skip_names:
            total += p.numel() * (elem if p.is_floating_point() else p.element_size())
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        if name in persistent and name not in skip_names:
            total += b.numel() * (elem if b.is_floating_point() else b.element_size())
    return total


def _state_tensors(module, prefix: str | None, skip_names, ck_dtype, exclude_prefix: str | None = None
                   ) -> dict[str, torch.Tensor]:
    """The module's non-expert state (tied duplicates once) in the checkpoint dtype, on the CPU, under full
    state-dict names (``prefix`` + local name)."""
    out, seen = {}, set()
    for name, t in module.state_dict(keep_vars=True).items():
        full = (prefix or "") + name
        if exclude_prefix and (full == exclude_prefix or full.startswith(exclude_prefix + ".")):
            continue
        if full in skip_names or t.device.type == "meta":
            continue
        key = (t.device, t.data_ptr(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        t = t.detach()
        out[full] = (t.to(ck_dtype) if t.is_floating_point() else t).to("cpu").contiguous()
    return out


def _widths_of(a) -> Callable:
    """``widths(group, expert) -> {projection: bits}`` of an Allocation."""
    def widths(g, e):
        return {p.name: (a.proj_bits or {}).get((g.layer, p.name), a.bits[(g.layer, e)]) for p in g.projections}
    return widths


def _candidates_at(g, tensors: dict[str, torch.Tensor], widths: Callable, cfg) -> dict[int, dict]:
    """The layer's packed candidates at ``widths(group, expert)`` per projection, as QuantizedMatrix objects."""
    from .artifact import packed_key
    from .quantize import QuantizedMatrix, QuantSpec

    out = {}
    for e in range(g.num_experts):
        ws = widths(g, e)
        per = {}
        for p in g.projections:
            b = ws[p.name]
            spec = QuantSpec(bits=b, group_size=cfg.group_size, symmetric=cfg.symmetric)
            t = {part: tensors[f"{b}.{packed_key(g.path, p.name, e, part)}"] for part in ("qweight", "scales", "qzeros")
                 if f"{b}.{packed_key(g.path, p.name, e, part)}" in tensors}
            per[p.name] = QuantizedMatrix.from_packed(t, spec, (p.out_features, p.in_features))
        out[e] = per
    return out


def _apply_candidates(g, tensors, widths, cfg) -> None:
    """Write the dequantized candidates at ``widths`` into the layer's expert weights."""
    for e, per in _candidates_at(g, tensors, widths, cfg).items():
        for proj, qm in per.items():
            dst = g.weight(e, proj)
            g.set_weight(e, proj, qm.dequantize(dst.dtype, device=dst.device))


def _expert_weights(g) -> dict:
    return {(e, p.name): g.weight(e, p.name).detach().clone() for e in range(g.num_experts) for p in g.projections}


def _restore_expert_weights(g, saved: dict) -> None:
    for (e, proj), w in saved.items():
        g.set_weight(e, proj, w)
