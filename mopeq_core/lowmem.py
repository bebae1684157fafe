"""``--low-memory``: the quantization pipeline for checkpoints larger than memory, one decoder layer at a time.

    run_low_memory(cfg, out_dir, *, state_dir=None, on_event=None, should_cancel=None) -> RunResult

Same outputs as :func:`mopeq_core.pipeline.run_quantization` (``bitmap.json``, ``report.json``, the packed artifact
that :func:`mopeq_core.loader.load_quantized` reads, tokenizer files, the model card), computed without ever holding
more than one decoder layer's weights:

1. **fetch** -- resolve the model, build its skeleton with every parameter on the meta device, plan which checkpoint
   tensors feed which decoder layer, read the non-layer tensors (embeddings, final norm, head), run the embedding
   once to capture each layer's call arguments (mask, rotary tables) and the calibration / evaluation inputs of
   layer 0, spill the non-layer tensors to ``state_dir`` and free them.
2. **the layer pass** (reported as the ``calibrate`` / ``sensitivity`` / ``quantize`` stages it interleaves): for
   each decoder layer, read its tensors from the safetensors shards (transformers' own checkpoint conversion
   mapping turns the Hub per-expert layout, ``experts.3.w1.weight``, into the fused ``gate_up_proj``), run the
   layer on the carried calibration hidden states with hooks that record routed statistics (counts, input second
   moments, GPTQ Hessians) and the layer-local sensitivity, quantize every expert at every candidate width (errors
   for the allocator; packed candidates go to disk), write the layer's non-expert tensors to disk, carry the
   full-precision outputs on to the next layer, and free the layer.
3. **allocate** globally over all layers (the same knapsack / tiers code and budget rules as the in-memory pipeline).
4. **quantize** -- write the artifact layer by layer from the on-disk candidates and non-expert spills (the
   non-expert shard is streamed, never held whole).
5. **evaluate** -- full-precision perplexity comes from the layer pass (the evaluation stream is carried with the
   calibration stream); the quantized model's is a second layer-by-layer pass over the *spilled* state, so the
   checkpoint is still read once.
6. **export** -- copy the artifact, tokenizer, bitmap, report and model card into ``out_dir``.

Choices (and why)
-----------------
* **Layer-local sensitivity** (method name ``layer-hessian``). The objective is the MoE block's routed output
  reconstruction error ``L(W) = sum_t ||F(x_t; W) - F(x_t; W0)||^2`` over calibration tokens, where ``F`` is the
  routed-experts module (its output is added to the residual stream as is for Mixtral, Qwen-MoE, OLMoE, DeepSeek;
  for post-norm blocks it is the pre-norm error). At ``W = W0`` the residual is zero, so the Hessian equals the
  Gauss-Newton matrix ``2 J^T J`` exactly, and its trace over expert ``e``'s weights is ``2 ||J_e||_F^2``. Because
  each projection is linear, ``||dF/dW_proj||_F^2 = ||proj input||^2 * ||dF/d(proj output)||_F^2`` per token, and for
  the elementwise-gated expert MLPs (every projection output feeds exactly one intermediate unit) that is, per
  token with routing weight ``w``:
      down:     w^2 * out_features * ||h||^2
      gate/up:  w^2 * ||x||^2 * sum_m c_{j(m)} (dh_{j(m)}/dy_m)^2,   c_j = ||W_down[:, j]||^2,
  computed in closed form from one elementwise backward -- the exact trace, not a Hutchinson estimate (a
  Hutchinson estimator converges to this number; tests check it against a dense Jacobian). The **Fisher** of this
  objective would be useless: its gradient is zero at ``W0``, so the Fisher is zero. Frequency, input-Hessian and
  weight-norm scores are layer-local anyway and are offered as is; ``hutchinson``, ``fisher`` and ``auto`` need
  backpropagation through the whole model and use ``layer-hessian`` here (the bit map records what ran).
* **Full-precision activations are carried** to the next layer. The widths are only known after the global
  allocation, which needs every layer's candidates first, so a quantized stream would have to guess a width per
  expert; the full-precision stream is the same statistics the in-memory pipeline calibrates on.
* **Checkpoint reads** go through a small safetensors reader (plain ``readinto``, no mmap, so RSS shows what is
  really held) that counts every byte; each tensor that feeds the model is read exactly once.
* **Devices**: on CUDA the layer runs in bfloat16 (forward passes only: routing, attention, the carried stream)
  with the grouped-GEMM experts implementation when transformers offers it; statistics, Hessians, sensitivities and
  GPTQ are float32 (GPTQ's Cholesky float64), and GPTQ runs batched across the experts of a layer and all widths.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .pipeline import (
    STAGES,
    ProgressEvent,
    RunResult,
    _fingerprint,
    _jsonable,
    _peak_rss_mb,
    _Progress,
    _StageState,
)

__all__ = [
    "STAGES",
    "ActivationStore",
    "ProgressEvent",
    "RunResult",
    "SafetensorsCheckpoint",
    "layer_hessian_trace",
    "run_low_memory",
]

log = logging.getLogger(__name__)

LOCAL_METHOD = "layer-hessian"
LAYER_LOCAL = {"frequency", "input-hessian", "weight-norm"}
DEFAULT_SPILL_BYTES = int(os.environ.get("MOPEQ_SPILL_BYTES") or 256 * 2**20)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_LAYERS_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block))\.(\d+)(?:\.|$)")


# =====================================================================================================================
# checkpoint reading
# =====================================================================================================================
class SafetensorsCheckpoint:
    """The safetensors shards of a model directory, read tensor by tensor with exact byte accounting.

    Reads use ``readinto`` on a fresh tensor (no mmap): what a layer holds is what RSS shows, and ``bytes_read``
    counts header bytes plus every tensor payload read.
    """

    def __init__(self, path: Path):
        from .errors import ModelNotFoundError, UnsupportedArchitectureError

        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{path} has no *.safetensors weights; --low-memory reads safetensors only")
        self.path = path
        self.files = files
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.reads = 0
        self.checkpoint_bytes = sum(f.stat().st_size for f in files)
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            self.bytes_read += 8 + n
            base = 8 + n
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _ST_DTYPES:
                    raise UnsupportedArchitectureError(
                        f"{f.name}: tensor {key} has dtype {meta['dtype']}; --low-memory reads float/int "
                        "checkpoints only (not pre-quantized FP8 ones) - dequantize the checkpoint first")
                s, e = meta["data_offsets"]
                self.entries[key] = (f, meta["dtype"], list(meta["shape"]), base + s, base + e)
        self.payload_bytes = sum(e - s for (_, _, _, s, e) in self.entries.values())

    def keys(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, key: str) -> int:
        _, _, _, s, e = self.entries[key]
        return e - s

    def read(self, key: str) -> torch.Tensor:
        f, dt, shape, s, e = self.entries[key]
        buf = torch.empty(e - s, dtype=torch.uint8)
        if e > s:
            with open(f, "rb", buffering=0) as fh:
                fh.seek(s)
                view = memoryview(buf.numpy())
                got = 0
                while got < e - s:
                    n = fh.readinto(view[got:])
                    if not n:
                        raise OSError(f"{f}: truncated while reading {key}")
                    got += n
        with self._lock:
            self.bytes_read += e - s
            self.reads += 1
        return buf.view(_ST_DTYPES[dt]).reshape(shape)

    def lazy(self, key: str) -> _LazyTensor:
        return _LazyTensor(self, key)


class _LazyTensor:
    """What transformers' loader calls ``tensor[...]`` on to materialise a checkpoint tensor."""

    def __init__(self, ckpt: SafetensorsCheckpoint, key: str):
        self.ckpt, self.key = ckpt, key
        _, dt, shape, _, _ = ckpt.entries[key]
        self.shape, self.dtype = torch.Size(shape), _ST_DTYPES[dt]

    def __getitem__(self, idx):
        t = self.ckpt.read(self.key)
        return t if idx is Ellipsis else t[idx]

    def get_shape(self):
        return list(self.shape)


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


class LayerLoader:
    """Maps checkpoint keys to decoder layers with transformers' conversion mapping and loads one group at a time."""

    def __init__(self, model, ckpt: SafetensorsCheckpoint, layers_prefix: str, n_layers: int):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model, self.ckpt = model, ckpt
        self.mapping = get_model_conversion_mapping(model)
        renamings = [t for t in self.mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self.mapping if isinstance(t, WeightConverter)]
        meta_sd = model.state_dict()
        prefix = model.base_model_prefix
        self.by_layer: dict[int, list[str]] = {i: [] for i in range(n_layers)}
        self.global_keys: list[str] = []
        self.skipped: list[str] = []
        self.targets: dict[str, str] = {}
        layer_re = re.compile(rf"^{re.escape(layers_prefix)}\.(\d+)\.")
        for key in ckpt.entries:
            renamed, _ = rename_source_key(key, renamings, converters, prefix, meta_sd)
            if renamed not in meta_sd and key in meta_sd:
                renamed = key
            if renamed not in meta_sd:
                self.skipped.append(key)  # e.g. multi-token-prediction layers the model does not build
                continue
            self.targets[key] = renamed
            m = layer_re.match(renamed)
            if m and int(m.group(1)) in self.by_layer:
                self.by_layer[int(m.group(1))].append(key)
            else:
                self.global_keys.append(key)

    def load(self, keys: list[str], dtype: torch.dtype, device: torch.device) -> set[str]:
        """Materialise ``keys`` into the model (converted to its parameter layout); returns the targets set."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from .errors import UnsupportedArchitectureError

        if not keys:
            return set()
        sd = {k: self.ckpt.lazy(k) for k in keys}
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(
                self.model, sd, LoadStateDictConfig(dtype=dtype, weight_mapping=self.mapping))
        if info.mismatched_keys or info.conversion_errors:
            errs = [f"{k}: {str(v).strip().splitlines()[-1][:200] if str(v).strip() else v}"
                    for k, v in list(info.conversion_errors.items())[:2]]
            stray = [k for k in self.skipped if k.split(".")[:4] == keys[0].split(".")[:4]][:3]
            raise UnsupportedArchitectureError(
                f"{self.ckpt.path}: cannot convert checkpoint tensors to {type(self.model).__name__}'s layout "
                f"(shape mismatches: {sorted(info.mismatched_keys)[:3]}; conversion errors: {errs}"
                + (f"; checkpoint keys that map to no parameter: {stray}" if stray else "")
                + "). --low-memory reads the layouts transformers' conversion mapping knows; load this checkpoint "
                "without --low-memory")
        targets = {self.targets[k] for k in keys}
        for name in targets:
            mod_path, _, pname = name.rpartition(".")
            mod = self.model.get_submodule(mod_path) if mod_path else self.model
            p = mod._parameters.get(pname)
            if p is not None and p.device != device:
                mod._parameters[pname] = nn.Parameter(p.detach().to(device), requires_grad=False)
            elif p is not None:
                p.requires_grad_(False)
            elif pname in mod._buffers and mod._buffers[pname] is not None:
                mod._buffers[pname] = mod._buffers[pname].to(device)
        return targets


def _to_meta(module: nn.Module) -> None:
    """Drop every parameter of ``module`` back to the meta device (frees the layer)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _missing_params(module: nn.Module) -> list[str]:
    """Names of parameters still on meta after a load (the checkpoint lacked them)."""
    return [n for n, p in module.named_parameters() if p.device.type == "meta"]


# =====================================================================================================================
# activations
# =====================================================================================================================
class ActivationStore:
    """Batches of hidden states, held on the compute device or (``spilled``) in files under ``directory/name``.

    ``reopen=True`` attaches to the files a previous (interrupted) run left, for resuming.
    """

    def __init__(self, directory: Path, name: str, spilled: bool, reopen: bool = False):
        self.dir = Path(directory) / name
        self.spilled = spilled or reopen
        self.mem: dict[int, torch.Tensor] = {}
        if self.spilled and not reopen:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)

    @staticmethod
    def should_spill(n_tokens: int, hidden: int, dtype: torch.dtype, threshold: int) -> bool:
        return n_tokens * hidden * (torch.finfo(dtype).bits // 8) > threshold

    def put(self, i: int, t: torch.Tensor) -> None:
        if self.spilled:
            _save_tensors(self.dir / f"{i:06d}.safetensors", {"h": t})
        else:
            self.mem[i] = t.detach()

    def get(self, i: int, device) -> torch.Tensor:
        if self.spilled:
            from safetensors.torch import load_file

            return load_file(str(self.dir / f"{i:06d}.safetensors"))["h"].to(device)
        return self.mem[i]

    def clear(self) -> None:
        self.mem.clear()
        if self.spilled:
            shutil.rmtree(self.dir, ignore_errors=True)


# =====================================================================================================================
# layer-local sensitivity: exact trace of the Gauss-Newton (= Hessian at W0) of the routed-output error
# =====================================================================================================================
def _in_projection_forward(group, e: int, x: torch.Tensor) -> tuple[list[torch.Tensor], Callable]:
    """The "in" projection outputs of expert ``e`` on ``x`` (leaf tensors requiring grad) and ``f`` with
    ``h = f(*outputs)`` the expert's intermediate activation (elementwise in the outputs)."""
    import torch.nn.functional as F

    m = group.module
    if group.kind == "fused":
        name = "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj"
        w = group.weight(e, name).float()
        bias = None
        if getattr(m, "has_bias", False) and getattr(m, f"{name}_bias", None) is not None:
            bias = getattr(m, f"{name}_bias")[e].float()
        y = F.linear(x, w, bias).detach().requires_grad_(True)
        if getattr(m, "has_gate", True):
            return [y], lambda y_: m._apply_gate(y_)
        return [y], lambda y_: m.act_fn(y_)
    from .moe import _expert_act

    expert = m[e]
    act = _expert_act(expert)
    names = [p.name for p in group.projections if p.role == "in"]

    def lin(n):
        mod = getattr(expert, n)
        b = None if mod.bias is None else mod.bias.float()
        return F.linear(x, mod.weight.float(), b).detach().requires_grad_(True)

    if len(names) == 2:
        gate_name = "gate_proj" if "gate_proj" in names else "w1"
        up_name = "up_proj" if "up_proj" in names else "w3"
        return [lin(gate_name), lin(up_name)], lambda g, u: act(g) * u
    y = lin(names[0])
    if names[0] == "gate_up_proj":
        return [y], lambda y_: act(y_.chunk(2, dim=-1)[0]) * y_.chunk(2, dim=-1)[1]
    return [y], lambda y_: act(y_)


def layer_hessian_trace(group, e: int, x: torch.Tensor, w: torch.Tensor | None = None) -> float:
    """``tr(d^2 L / dW_e^2)`` at ``W0`` for ``L = sum_t ||F(x_t; W) - F(x_t; W0)||^2`` over the tokens ``x`` [n, H]
    routed to expert ``e`` with routing weights ``w`` [n] (None: 1). Exact; see the module docstring."""
    x = x.detach().float()
    if x.shape[0] == 0:
        return 0.0
    w2 = torch.ones(x.shape[0], device=x.device) if w is None else w.detach().float() ** 2
    out_proj = next(p for p in group.projections if p.role == "out")
    Wd = group.weight(e, out_proj.name).detach().float()  # [H_out, F]
    sqrt_c = Wd.square().sum(0).sqrt()  # ||W_down[:, j]||
    with torch.enable_grad():
        ys, f = _in_projection_forward(group, e, x)
        h = f(*ys)
        grads = torch.autograd.grad((h * sqrt_c).sum(), ys)
    x_sq = x.square().sum(-1)
    trace_in = sum((w2 * x_sq * g.square().sum(-1)).sum() for g in grads)
    trace_out = out_proj.out_features * (w2 * h.detach().square().sum(-1)).sum()
    return float(2.0 * (trace_in + trace_out))


class _TraceHook:
    """Accumulates every expert's layer-Hessian trace from the experts module's (or each expert's) inputs."""

    def __init__(self, group):
        self.group = group
        self.sums = torch.zeros(group.num_experts, dtype=torch.float64)
        self.seconds = 0.0
        self.handles = []
        if group.kind == "fused":
            self.handles.append(group.module.register_forward_pre_hook(self._fused, with_kwargs=True))
        else:
            for e in range(group.num_experts):
                self.handles.append(group.module[e].register_forward_pre_hook(
                    lambda mod, args, kwargs, e=e: self._expert(e, args, kwargs), with_kwargs=True))

    def _fused(self, module, args, kwargs):
        t0 = time.perf_counter()
        hidden = args[0] if args else kwargs.get("hidden_states")
        index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
        weights = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        if weights is not None and weights.dim() >= 2 and weights.shape[-1] != index.shape[-1]:
            weights = weights.gather(-1, index)  # dense [n, E] routing weights (some models pass those)
        for e in range(self.group.num_experts):
            tok, pos = torch.where(index == e)
            if tok.numel():
                w = None if weights is None else weights.reshape(hidden.shape[0], -1)[tok, pos]
                self.sums[e] += layer_hessian_trace(self.group, e, hidden[tok], w)
        self.seconds += time.perf_counter() - t0

    def _expert(self, e, args, kwargs):
        t0 = time.perf_counter()
        x = args[0] if args else next(iter(kwargs.values()))
        # ModuleList experts (remote code) are called without their routing weight: it is taken as 1.
        self.sums[e] += layer_hessian_trace(self.group, e, x.reshape(-1, x.shape[-1]), None)
        self.seconds += time.perf_counter() - t0

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# =====================================================================================================================
# helpers
# =====================================================================================================================
def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS creeps up layer after layer)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


_rss_mb = _peak_rss_mb  # one definition of peak RSS (pipeline.py)


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class _StopForward(Exception):
    pass


def _decoder_layers(model, groups) -> tuple[str, nn.ModuleList]:
    from .errors import UnsupportedArchitectureError

    m = _LAYERS_RE.match(groups[0].path)
    if not m:
        raise UnsupportedArchitectureError(f"cannot find the decoder layer list above {groups[0].path}")
    path = m.group(1)
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{path} is not a ModuleList of decoder layers")
    return path, layers


def _final_head(model):
    """(final norm or None, output embedding) applied after the last decoder layer."""
    from .errors import UnsupportedArchitectureError

    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = None
    for name in ("norm", "norm_f", "final_layernorm", "final_norm", "ln_f"):
        if base is not None and isinstance(getattr(base, name, None), nn.Module):
            norm = getattr(base, name)
            break
    if norm is None and base is not None:  # a direct child that is a norm layer (any other name)
        found = [m for _, m in base.named_children() if "norm" in type(m).__name__.lower()]
        if len(found) > 1:
            raise UnsupportedArchitectureError(f"{type(base).__name__}: cannot tell its final norm among "
                                               f"{[type(m).__name__ for m in found]}")
        norm = found[0] if found else None
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no output embedding; --low-memory needs "
                                           "a causal LM head")
    return norm, head


def _logits(model, norm, head, h: torch.Tensor) -> torch.Tensor:
    if norm is not None:
        h = norm(h)
    logits = head(h).float()
    cfg = model.config
    scale = getattr(cfg, "logits_scaling", None)
    if scale:
        logits = logits / scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _batch_loss(model, norm, head, h, ids) -> tuple[float, int]:
    logits = _logits(model, norm, head, h)[:, :-1]
    target = ids[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             reduction="sum")
    return float(loss.double()), int(target.numel())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """safetensors file written tensor by tensor (``save_file`` would first copy every tensor to bytes)."""
    items = [(k, v.dtype, list(v.shape), (lambda v=v: v)) for k, v in tensors.items()]
    _StreamWriter.write(path, items, meta)


class _StreamWriter:
    """Writes one safetensors file from tensors read one at a time (the header is computed from shapes first)."""

    @staticmethod
    def write(path: Path, items: list[tuple[str, torch.dtype, list[int], Callable[[], torch.Tensor]]],
              metadata: dict | None = None) -> None:
        header: dict[str, Any] = {}
        off = 0
        for name, dtype, shape, _ in items:
            n = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, dtype, shape, produce in items:
                t = produce().detach().to("cpu").contiguous()
                if t.dtype != dtype or list(t.shape) != list(shape):
                    raise ValueError(f"{name}: produced {t.dtype} {list(t.shape)}, announced {dtype} {shape}")
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        tmp.replace(path)


# =====================================================================================================================
# the run
# =====================================================================================================================
def run_low_memory(cfg, out_dir, *, state_dir=None, on_event: Callable[[ProgressEvent], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None, spill_bytes: int | None = None) -> RunResult:
    """The layer-by-layer pipeline (see the module docstring). ``spill_bytes``: carried activations larger than
    this (per stream) go to files under the state directory (default ``MOPEQ_SPILL_BYTES`` or 256 MiB)."""
    return _LowMemRun(cfg, out_dir, state_dir, on_event, should_cancel,
                      DEFAULT_SPILL_BYTES if spill_bytes is None else int(spill_bytes)).run()


class _LowMemRun:
    BATCH = 8

    def __init__(self, cfg, out_dir, state_dir, on_event, should_cancel, spill_bytes: int):
        from .apply import QuantSettings
        from .errors import UserInputError

        cfg.validate()
        if cfg.format != "mopeq":
            raise UserInputError(f"--low-memory writes the packed mopeq format only (got --format {cfg.format}); "
                                 "engine formats need the whole model in memory - drop --low-memory for them")
        if getattr(cfg, "eval_suites", ()):
            raise UserInputError("--low-memory cannot run evaluation suites (they need the whole model in memory); "
                                 "drop --eval-suite, or run the suites on the artifact afterwards")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.own_state = state_dir is None
        self.state = _StageState(Path(state_dir) if state_dir else self.out_dir / ".mopeq-state",
                                 _fingerprint(cfg) + ":low-memory")
        self.prog = _Progress(on_event, should_cancel)
        self.qs = QuantSettings(cfg.quantizer, cfg.group_size, cfg.symmetric, cfg.act_order)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but torch sees no CUDA device")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # bfloat16 for the forward passes on a GPU (statistics, traces and GPTQ are float32 regardless).
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.spill_bytes = spill_bytes
        self.method = cfg.sensitivity if cfg.sensitivity in LAYER_LOCAL else LOCAL_METHOD
        self.rss0 = _rss_mb()
        self.seconds = {s: 0.0 for s in STAGES}
        self.timings: dict[str, dict] = {}
        self.layer_kwargs: dict[tuple[int, int], dict] = {}
        self._impl_checked = False
        self.pass_stats = {"read_seconds": 0.0, "forward_seconds": 0.0, "trace_seconds": 0.0,
                           "candidate_seconds": 0.0, "fp_eval_seconds": 0.0, "spill_seconds": 0.0,
                           "rss_mb_after_layer": [], "activations_spilled": None}

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    @contextmanager
    def clock(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0

    def close(self, stage: str, **extra) -> None:
        peak = _rss_mb()
        t = {"seconds": round(self.seconds[stage], 3), "peak_rss_mb": round(peak, 1),
             "peak_rss_increase_mb": round(peak - self.rss0, 1)}
        if self.device.type == "cuda":
            t["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        t.update(extra)
        self.timings[stage] = t
        self.prog.emit(1.0, "finished")

    def _start(self, stage: str) -> None:
        if self.device.type == "cuda":  # peak GPU memory per stage (the layer pass counts as calibrate)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.prog.start(stage)

    def batches(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids[i: i + self.BATCH] for i in range(0, ids.shape[0], self.BATCH)]

    def _free_cuda(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the stages -----------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._start("fetch")
        with self.clock("fetch"):
            self.fetch()
        self.close("fetch", checkpoint_bytes=self.ckpt.checkpoint_bytes, layers=self.n_layers,
                   experts_implementation=self.experts_impl)

        self._start("calibrate")
        if self.state.done("layers"):
            saved = self.state.read_json("layers")
            self.fp_loss, self.pass_stats, self.bytes_read = saved["fp_loss"], saved["pass"], saved["bytes_read"]
            for k, v in saved["seconds"].items():
                self.seconds[k] += v
        else:
            self.layer_pass()
        self.results = {i: self.state.read_json(f"layer-{i}") for i in self.group_of}
        self.close("calibrate", includes="checkpoint reads, layer forwards with routed statistics, the "
                                         "full-precision evaluation stream and spills")
        gpu = {}
        if self.device.type == "cuda":  # the layer pass holds the calibrate, sensitivity and candidate peaks
            gpu = {"layer_pass_peak_gpu_mb": self.timings["calibrate"]["peak_gpu_mb"]}
        self._start("sensitivity")
        self.close("sensitivity", method=self.method, computed="inside the layer pass", **gpu)

        self._start("allocate")
        with self.clock("allocate"):
            self.allocate()
        self.close("allocate")

        self._start("quantize")
        with self.clock("quantize"):
            staging = self.state.path("artifact")
            if not self.state.done("quantize"):
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
                self.write_artifact(staging)
                self.state.mark("quantize")
        self.close("quantize", includes="candidate quantization (in the layer pass) and the artifact write",
                   candidate_seconds=round(self.pass_stats["candidate_seconds"], 3), **gpu)

        self._start("evaluate")
        with self.clock("evaluate"):
            if self.state.done("evaluate"):
                self.ev = self.state.read_json("evaluate")
            else:
                self.ev = {"fp_perplexity": None, "quantized_perplexity": None}
                if self.eval_ids is not None:
                    q = self.quantized_eval()
                    fp = self.fp_loss["sum"] / max(self.fp_loss["count"], 1)
                    self.ev = {"fp_perplexity": math.exp(fp), "quantized_perplexity": math.exp(q),
                               "eval_tokens": int(self.eval_ids[:, 1:].numel()), "eval_file": self.cfg.eval_file}
                    self.ev["increase_pct"] = 100.0 * (self.ev["quantized_perplexity"] / self.ev["fp_perplexity"]
                                                       - 1.0)
                self.state.write_json("evaluate", self.ev)
                self.state.mark("evaluate")
        self.close("evaluate")

        self._start("export")
        return self.export(staging, time.perf_counter())

    # -- fetch ----------------------------------------------------------------------------------------------------
    def fetch(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from .artifact import checkpoint_dtype
        from .data import read_texts, token_samples
        from .errors import UnsupportedArchitectureError
        from .loader import _parameters_on_meta
        from .loading import load_tokenizer, resolve_model
        from .moe import expert_param_names, find_expert_groups

        cfg = self.cfg
        resolved = resolve_model(cfg.model, revision=cfg.revision, token=cfg.token, allow_pickle=False,
                                 trust_remote_code=cfg.trust_remote_code)
        self.model_path, self.revision = resolved.path, resolved.revision
        self.ckpt = SafetensorsCheckpoint(self.model_path)
        hf_cfg = AutoConfig.from_pretrained(self.model_path, trust_remote_code=cfg.trust_remote_code)
        if getattr(hf_cfg, "vision_config", None) is not None:
            raise UnsupportedArchitectureError(
                f"{cfg.model} is a vision-language model; --low-memory calibrates text-only causal LMs - run it "
                "without --low-memory")
        # Grouped GEMM over the experts of a layer on a GPU (forward passes only: this pipeline takes no
        # second derivatives through the model); eager elsewhere.
        impl = os.environ.get("MOPEQ_EXPERTS_IMPL") or ("grouped_mm" if self.device.type == "cuda" else "eager")
        self.model = None
        for attempt in dict.fromkeys((impl, "eager")):
            try:
                with _parameters_on_meta():
                    self.model = AutoModelForCausalLM.from_config(
                        hf_cfg, dtype=self.dtype, attn_implementation="eager", experts_implementation=attempt,
                        trust_remote_code=cfg.trust_remote_code)
                self.experts_impl = attempt
                break
            except (ValueError, KeyError) as exc:
                if attempt == "eager":
                    raise UnsupportedArchitectureError(
                        f"transformers cannot build a causal LM from {self.model_path}: {exc}") from exc
        model = self.model
        model.eval()
        for mod in model.modules():  # buffers (rotary tables) are real: move them; parameters stay on meta
            for name, b in list(mod._buffers.items()):
                if b is not None and b.device != self.device:
                    mod._buffers[name] = b.to(self.device)
        self.groups = find_expert_groups(model)
        self.layers_path, self.layers = _decoder_layers(model, self.groups)
        self.n_layers = len(self.layers)
        self.group_of = {}
        for g in self.groups:
            m = re.match(rf"^{re.escape(self.layers_path)}\.(\d+)\.", g.path)
            if not m:
                raise UnsupportedArchitectureError(f"{g.path} is not inside {self.layers_path}")
            self.group_of[int(m.group(1))] = g
        self.loader = LayerLoader(model, self.ckpt, self.layers_path, self.n_layers)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=cfg.trust_remote_code)
        self.calib = token_samples(self.tokenizer, read_texts(cfg.calib_file), cfg.calib_samples, cfg.seq_len)
        self.eval_ids = None
        if cfg.eval_file:
            self.eval_ids = token_samples(self.tokenizer, read_texts(cfg.eval_file), cfg.eval_samples, cfg.seq_len)
        self.streams = {"calib": self.calib}
        if self.eval_ids is not None:
            self.streams["eval"] = self.eval_ids
        self.ck_dtype = checkpoint_dtype(model.config)
        self.elem = torch.finfo(self.ck_dtype).bits // 8
        self.skip_names = expert_param_names(model, self.groups)
        self.non_expert_bytes = _non_expert_bytes(model, self.skip_names, self.elem)
        self.tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        self.hidden = int(model.config.get_text_config().hidden_size)

    # -- the layer pass -------------------------------------------------------------------------------------------
    def layer_pass(self) -> None:
        from .errors import UnsupportedArchitectureError

        st, prog = self.state, self.prog
        with self.clock("calibrate"):
            t0 = time.perf_counter()
            self.loader.load(self.loader.global_keys, self.dtype, self.device)
            if self.tied:
                self.model.tie_weights()
            missing = [n for n, p in self.model.named_parameters()
                       if p.device.type == "meta" and not n.startswith(self.layers_path + ".")]
            if missing:
                raise UnsupportedArchitectureError(f"{self.model_path}: the checkpoint lacks {missing[:4]}")
            self.pass_stats["read_seconds"] += time.perf_counter() - t0
            gfile = st.path("nonexpert-global.safetensors")
            if not gfile.exists():
                _save_tensors(gfile, _spill_dict(self.model, set(_global_state_names(self.model, self.layers_path)),
                                                 self.skip_names, self.ck_dtype))
            start = _resume_point(st, self.n_layers, self.streams)
            stores = {}
            for sname, ids in self.streams.items():
                spilled = ActivationStore.should_spill(ids.numel(), self.hidden, self.dtype, self.spill_bytes)
                store = ActivationStore(st.dir, f"act-{sname}-{start}", spilled, reopen=start > 0)
                for bi, b in enumerate(self.batches(ids)):
                    prog.check()
                    h0 = _capture(self.model, self.layers, b.to(self.device), self.layer_kwargs)
                    if start == 0:
                        store.put(bi, h0.to(self.dtype))
                stores[sname] = store
            self.pass_stats["activations_spilled"] = {s: v.spilled for s, v in stores.items()}
            _to_meta_except_buffers(self.model, self.layers_path)
            self._free_cuda()
            _release_freed_memory()
        if start:
            log.info("resuming the layer pass at layer %d", start)
        for i in range(start, self.n_layers):
            prog.emit(i / self.n_layers, f"layer {i + 1}/{self.n_layers}")
            stores = self.process_layer(i, stores)
            self.pass_stats["rss_mb_after_layer"].append(round(_current_rss_mb(), 1))
        self.fp_loss = {"sum": 0.0, "count": 0}
        with self.clock("calibrate"):
            if "eval" in self.streams:
                t0 = time.perf_counter()
                norm, head = self.load_head()
                for bi, b in enumerate(self.batches(self.eval_ids)):
                    s, c = _batch_loss(self.model, norm, head, stores["eval"].get(bi, self.device), b)
                    self.fp_loss["sum"] += s
                    self.fp_loss["count"] += c
                _to_meta_except_buffers(self.model, self.layers_path)
                self.pass_stats["fp_eval_seconds"] += time.perf_counter() - t0
            for s in stores.values():
                s.clear()
        self.bytes_read = self.ckpt.bytes_read
        st.write_json("layers", {"fp_loss": self.fp_loss, "pass": _jsonable(self.pass_stats),
                                 "seconds": {k: self.seconds[k] for k in ("calibrate", "sensitivity", "quantize")},
                                 "bytes_read": self.bytes_read})
        st.mark("layers")

    def process_layer(self, i: int, stores: dict[str, ActivationStore]) -> dict[str, ActivationStore]:
        from .calibrate import _Accumulator, _install_hooks
        from .errors import UnsupportedArchitectureError

        st, prog, dev = self.state, self.prog, self.device
        layer, g = self.layers[i], self.group_of.get(i)
        with self.clock("calibrate"):
            t0 = time.perf_counter()
            self.loader.load(self.loader.by_layer[i], self.dtype, dev)
            missing = _missing_params(layer)
            if missing:
                hint = (f"; checkpoint keys that map to no parameter, e.g. {self.loader.skipped[:3]}"
                        if self.loader.skipped else "")
                raise UnsupportedArchitectureError(
                    f"{self.model_path}: the checkpoint has no tensors for {self.layers_path}.{i}: {missing[:4]}"
                    f"{hint}. --low-memory reads the layouts transformers' conversion mapping knows (and the "
                    "model's own parameter names); load this checkpoint without --low-memory")
            _release_freed_memory()  # the per-expert tensors the conversion stacked
            self.pass_stats["read_seconds"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            if g is not None and self.experts_impl != "eager" and not self._impl_checked:
                self._check_experts_impl(layer, i, stores["calib"])
            acc = trace = None
            handles: list = []
            top_k: dict[int, int] = {}
            if g is not None:
                acc = _Accumulator([g], collect_hessians=self.cfg.quantizer == "gptq")
                if dev.type == "cuda":  # accumulate Hessians where they are computed
                    acc.hs = {k: v.to(dev) for k, v in acc.hs.items()}
                handles = _install_hooks(self.model, [g], acc, False, top_k)
                if self.method == LOCAL_METHOD:
                    trace = _TraceHook(g)
            new: dict[str, ActivationStore] = {}
            try:
                for sname, ids in self.streams.items():
                    if sname != "calib":
                        for h in handles:
                            h.remove()
                        handles = []
                        if trace is not None:
                            trace.remove()
                    t_s = time.perf_counter()
                    out = ActivationStore(st.dir, f"act-{sname}-{i + 1}", stores[sname].spilled)
                    for bi, b in enumerate(self.batches(ids)):
                        prog.check()
                        out.put(bi, _run_layer(layer, stores[sname].get(bi, dev), self.layer_kwargs[(i, b.shape[0])]))
                    new[sname] = out
                    if sname == "eval":
                        self.pass_stats["fp_eval_seconds"] += time.perf_counter() - t_s
            finally:
                for h in handles:
                    h.remove()
                if trace is not None:
                    trace.remove()
            self.pass_stats["forward_seconds"] += time.perf_counter() - t0
        if trace is not None:  # the trace hook ran inside the forwards: book its time to sensitivity
            self.seconds["calibrate"] -= trace.seconds
            self.seconds["sensitivity"] += trace.seconds
            self.pass_stats["trace_seconds"] += trace.seconds
        if g is not None:
            with self.clock("calibrate"):
                stats = _finish_stats(self, g, acc, top_k, stores["calib"], layer, i)
                _release_freed_memory()
            with self.clock("sensitivity"):
                scores = _layer_scores(self.method, g, stats, trace)
            with self.clock("quantize"):
                t0 = time.perf_counter()
                errors = _layer_candidates(g, stats, self.cfg.bits, self.qs, st.path(f"cand-{i}.safetensors"),
                                           dev, prog)
                self.pass_stats["candidate_seconds"] += time.perf_counter() - t0
            st.write_json(f"layer-{i}", {
                "layer": g.layer, "path": g.path, "scores": scores,
                "counts": stats.counts[g.layer].tolist(), "top_k": stats.top_k.get(g.layer, 0),
                "fallback": stats.fallback.get(g.layer, []),
                "errors": {str(e): {str(b): v for b, v in errs.items()} for e, errs in errors.items()}})
            del stats, acc
        with self.clock("calibrate"):
            t0 = time.perf_counter()
            _save_tensors(st.path(f"nonexpert-{i}.safetensors"),
                          _spill_dict(layer, None, self.skip_names, self.ck_dtype, prefix=f"{self.layers_path}.{i}."))
            for s in stores.values():
                s.clear()
            if all(s.spilled for s in new.values()):
                st.mark(f"layer-{i}")  # this layer's outputs are on disk: a retry resumes after it
            _to_meta(layer)
            self._free_cuda()
            _release_freed_memory()
            self.pass_stats["spill_seconds"] += time.perf_counter() - t0
        return new

    def _check_experts_impl(self, layer, i: int, store: ActivationStore) -> None:
        """One forward with the grouped experts kernel; on failure fall back to eager experts for the run."""
        self._impl_checked = True
        b = self.calib[: self.BATCH]
        try:
            _run_layer(layer, store.get(0, self.device), self.layer_kwargs[(i, b.shape[0])])
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            log.warning("experts implementation %r failed (%s); using eager experts", self.experts_impl, exc)
            self.model.config._experts_implementation = "eager"
            for mod in self.model.modules():
                c = getattr(mod, "config", None)
                if c is not None and getattr(c, "_experts_implementation", "eager") != "eager":
                    c._experts_implementation = "eager"
            self.experts_impl = "eager"

    def load_head(self):
        """Final norm and output embedding from the spilled non-layer tensors."""
        from safetensors import safe_open

        norm, head = _final_head(self.model)
        wanted = {}
        for name, mod in self.model.named_modules():
            if mod is head or (norm is not None and mod is norm):
                wanted[name] = mod
        path = self.state.path("nonexpert-global.safetensors")
        state = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if any(k.startswith(p + ".") for p in wanted):
                    v = f.get_tensor(k)
                    state[k] = (v.to(self.dtype) if v.is_floating_point() else v).to(self.device)
            if self.tied and not any(k.startswith(p + ".") for k in state for p in wanted if wanted[p] is head):
                emb = self.model.get_input_embeddings()
                ename = next(n for n, m in self.model.named_modules() if m is emb)
                v = f.get_tensor(f"{ename}.weight")
                state[f"{ename}.weight"] = v.to(self.dtype).to(self.device)
        self.model.load_state_dict(state, strict=False, assign=True)
        if self.tied:
            self.model.tie_weights()
        return norm, head

    # -- allocate -------------------------------------------------------------------------------------------------
    def allocate(self) -> None:
        from .allocate import ExpertItem, allocate, budget_for_avg_bits
        from .apply import expert_cost
        from .errors import InfeasibleBudgetError

        cfg = self.cfg
        self.costs = {(g.layer, e): {b: expert_cost(g, b, self.qs) for b in cfg.bits} for g in self.groups
                      for e in range(g.num_experts)}
        self.by_layer = {r["layer"]: r for r in self.results.values()}
        items = [ExpertItem(layer=g.layer, expert=e, params=g.expert_params,
                            sensitivity=float(self.by_layer[g.layer]["scores"][e]),
                            error={int(b): v for b, v in self.by_layer[g.layer]["errors"][str(e)].items()},
                            cost=self.costs[(g.layer, e)])
                 for g in self.groups for e in range(g.num_experts)]
        if cfg.budget.avg_bits is not None:
            self.budget_bytes = budget_for_avg_bits(items, cfg.budget.avg_bits)
            self.budget_desc = {"target_avg_bits": cfg.budget.avg_bits, "budget_bytes": None}
        else:
            self.budget_bytes = int(cfg.budget.gb * 1e9) - self.non_expert_bytes
            self.budget_desc = {"target_avg_bits": None, "budget_bytes": int(cfg.budget.gb * 1e9)}
        try:
            self.alloc = allocate(items, self.budget_bytes, allocator=cfg.allocator, scope=cfg.scope,
                                  granularity=cfg.granularity)
        except InfeasibleBudgetError as exc:
            if cfg.budget.gb is None:
                raise
            lo, hi = exc.feasible or (0, 0)
            ne = self.non_expert_bytes
            raise InfeasibleBudgetError(
                f"--budget-gb {cfg.budget.gb} is infeasible: with widths {list(cfg.bits)} this model needs between "
                f"{(lo + ne) / 1e9:.6f} and {(hi + ne) / 1e9:.6f} GB ({ne / 1e9:.6f} GB of it non-expert weights)",
                feasible=((lo + ne) / 1e9, (hi + ne) / 1e9), unit="GB") from exc
        self.bits = dict(self.alloc.bits)

    # -- the artifact ---------------------------------------------------------------------------------------------
    def write_artifact(self, staging: Path) -> None:
        """The packed checkpoint in the layout of ``artifact.write_mopeq_artifact``, streamed from state files."""
        from safetensors import safe_open

        from .artifact import FORMAT_VERSION, INDEX_NAME, packed_key, quantization_config, shard_name

        groups, n = self.groups, len(self.groups) + 1
        weight_map: dict[str, str] = {}
        spills = [self.state.path("nonexpert-global.safetensors")] + [
            self.state.path(f"nonexpert-{i}.safetensors") for i in range(self.n_layers)]
        items = []
        for f in spills:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = h.get_slice(k)
                    items.append((k, _ST_DTYPES[sl.get_dtype()], list(sl.get_shape()), _reader(f, k)))
        name0 = shard_name(0, n)
        _StreamWriter.write(staging / name0, items, {"format": "pt", "mopeq": "non-expert"})
        weight_map.update({k: name0 for k, *_ in items})
        layer_index = {id(g): i for i, g in self.group_of.items()}
        for idx, g in enumerate(groups, start=1):
            self.prog.emit(idx / n, f"writing the experts of layer {g.layer}")
            tensors = {}
            with safe_open(str(self.state.path(f"cand-{layer_index[id(g)]}.safetensors")), framework="pt") as f:
                keys = set(f.keys())
                for e in range(g.num_experts):
                    b = self.bits[(g.layer, e)]
                    for p in g.projections:
                        for part in ("qweight", "scales", "qzeros"):
                            k = packed_key(g.path, p.name, e, part)
                            if f"{b}.{k}" in keys:
                                tensors[k] = f.get_tensor(f"{b}.{k}")
            name = shard_name(idx, n)
            _save_tensors(staging / name, tensors, {"format": "pt", "mopeq": f"experts layer {g.layer}"})
            weight_map.update({k: name for k in tensors})
            del tensors
            _release_freed_memory()
        index = {"metadata": {"format": "mopeq", "format_version": FORMAT_VERSION}, "weight_map": weight_map}
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=1))
        config = self.model.config.to_dict()
        config["quantization_config"] = quantization_config(groups, self.bits, self.cfg.group_size,
                                                            self.cfg.symmetric, self.cfg.quantizer)
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if getattr(self.model, "generation_config", None) is not None:
            try:
                self.model.generation_config.save_pretrained(staging)
            except (ValueError, OSError):
                pass

    # -- evaluate -------------------------------------------------------------------------------------------------
    def quantized_eval(self) -> float:
        """Mean token loss of the quantized model: a layer pass over the spilled non-expert weights and the
        chosen candidates (the checkpoint is not read again)."""
        from safetensors.torch import load_file

        st, dev, dt = self.state, self.device, self.dtype
        gstate = load_file(str(st.path("nonexpert-global.safetensors")))
        self.model.load_state_dict({k: (v.to(dt) if v.is_floating_point() else v).to(dev)
                                    for k, v in gstate.items()}, strict=False, assign=True)
        del gstate
        if self.tied:
            self.model.tie_weights()
        spilled = ActivationStore.should_spill(self.eval_ids.numel(), self.hidden, dt, self.spill_bytes)
        store = ActivationStore(st.dir, "qact-0", spilled)
        for bi, b in enumerate(self.batches(self.eval_ids)):
            store.put(bi, _capture(self.model, self.layers, b.to(dev), self.layer_kwargs).to(dt))
        _to_meta_except_buffers(self.model, self.layers_path)  # the head is loaded again at the end
        _release_freed_memory()
        for i, layer in enumerate(self.layers):
            self.prog.emit(i / self.n_layers, f"layer {i + 1}/{self.n_layers}")
            self._load_quantized_layer(i)
            out = ActivationStore(st.dir, f"qact-{i + 1}", spilled)
            for bi, b in enumerate(self.batches(self.eval_ids)):
                self.prog.check()
                out.put(bi, _run_layer(layer, store.get(bi, dev), self.layer_kwargs[(i, b.shape[0])]))
            store.clear()
            store = out
            _to_meta(layer)
            self._free_cuda()
            _release_freed_memory()
        norm, head = self.load_head()
        total, count = 0.0, 0
        for bi, b in enumerate(self.batches(self.eval_ids)):
            s, c = _batch_loss(self.model, norm, head, store.get(bi, dev), b)
            total += s
            count += c
        store.clear()
        _to_meta_except_buffers(self.model, self.layers_path)
        self._free_cuda()
        return total / max(count, 1)

    def _load_quantized_layer(self, i: int) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from .artifact import packed_key
        from .quantize import QuantizedMatrix, QuantSpec

        layer, g, dt, dev = self.layers[i], self.group_of.get(i), self.dtype, self.device
        prefix = f"{self.layers_path}.{i}."
        spill = load_file(str(self.state.path(f"nonexpert-{i}.safetensors")))
        local = {k[len(prefix):]: (v.to(dt) if v.is_floating_point() else v).to(dev) for k, v in spill.items()}
        del spill
        for mod_name, mod in layer.named_modules():  # the expert weights: real tensors, filled below
            for pname, p in list(mod._parameters.items()):
                full = f"{mod_name}.{pname}" if mod_name else pname
                if p is not None and p.device.type == "meta" and full not in local:
                    mod._parameters[pname] = nn.Parameter(torch.zeros(p.shape, dtype=dt, device=dev),
                                                          requires_grad=False)
        layer.load_state_dict(local, strict=False, assign=True)
        for p in layer.parameters():
            p.requires_grad_(False)
        if g is None:
            return
        with safe_open(str(self.state.path(f"cand-{i}.safetensors")), framework="pt") as f:
            keys = set(f.keys())
            for e in range(g.num_experts):
                b = self.bits[(g.layer, e)]
                spec = QuantSpec(bits=b, group_size=self.cfg.group_size, symmetric=self.cfg.symmetric)
                for p in g.projections:
                    t = {part: f.get_tensor(f"{b}.{packed_key(g.path, p.name, e, part)}")
                         for part in ("qweight", "scales", "qzeros")
                         if f"{b}.{packed_key(g.path, p.name, e, part)}" in keys}
                    qm = QuantizedMatrix.from_packed(t, spec, (p.out_features, p.in_features))
                    g.set_weight(e, p.name, qm.dequantize(dt, device=dev))

    # -- export ---------------------------------------------------------------------------------------------------
    def export(self, staging: Path, t_start: float) -> RunResult:
        from . import __version__
        from .artifact import build_bitmap
        from .card import write_model_card

        cfg, out_dir = self.cfg, self.out_dir
        counts = {layer: torch.tensor(r["counts"]) for layer, r in self.by_layer.items()}
        frequency = {layer: (c.double() / c.sum().clamp(min=1)).tolist() for layer, c in counts.items()}
        scores = {layer: r["scores"] for layer, r in self.by_layer.items()}
        exact = self.method == LOCAL_METHOD
        sens = {"method": self.method, "probes": None, "calib_tokens": int(self.calib.numel()),
                "rel_std_err_median": 0.0 if exact else None}
        if self.method != cfg.sensitivity:
            sens["requested"] = cfg.sensitivity
        if exact:
            sens["objective"] = ("exact trace of the Hessian of the MoE block's routed-output reconstruction "
                                 "error (layer-local, --low-memory)")
        bitmap = build_bitmap(
            model_id=cfg.model, revision=self.revision, groups=self.groups, bits=self.bits, scores=scores,
            frequency=frequency, costs=self.costs, non_expert_bytes=self.non_expert_bytes, bits_choices=cfg.bits,
            group_size=cfg.group_size, symmetric=cfg.symmetric, quantizer=cfg.quantizer, sensitivity=sens,
            allocation={"allocator": cfg.allocator, "scope": cfg.scope, "granularity": cfg.granularity,
                        **self.budget_desc})
        out_dir.mkdir(parents=True, exist_ok=True)
        files = []
        for f in staging.iterdir():
            dst = out_dir / f.name
            shutil.copy2(f, dst)
            files.append(dst)
        self.tokenizer.save_pretrained(out_dir)
        files += [p for p in out_dir.iterdir()
                  if p.name.startswith(("tokenizer", "special_tokens", "chat_template"))]
        (out_dir / "bitmap.json").write_text(json.dumps(bitmap, indent=1))
        files.append(out_dir / "bitmap.json")
        self.seconds["export"] += time.perf_counter() - t_start
        self.close("export")
        cnt = list(counts.values())
        covered = sum(int((c > 0).sum()) for c in cnt)
        total = sum(c.numel() for c in cnt)
        a = self.alloc
        peak = _rss_mb()
        report = {
            "mopeq_version": __version__, "model": cfg.model, "revision": self.revision,
            "config": cfg.to_public_dict(), "stages": self.timings, "perplexity": self.ev,
            "calibration": {"experts": total, "experts_with_tokens": covered, "share": covered / max(total, 1),
                            "min_tokens": min(int(c.min()) for c in cnt),
                            "fallback_experts": sum(len(r["fallback"]) for r in self.by_layer.values()),
                            "mode": "all" if cfg.calib_all_experts else "routed"},
            "sensitivity": {self.method: {"probes": None, "rel_std_err_median": sens["rel_std_err_median"],
                                          "seconds": round(self.seconds["sensitivity"], 3), "converged": True}},
            "selected_sensitivity": self.method, "candidate_holdout_loss": {}, "fp_holdout_loss": None,
            "allocation": {"objective": a.objective, "exact": a.exact, "budget_expert_bytes": self.budget_bytes,
                           "feasible_expert_bytes": list(a.feasible_range), "details": _jsonable(a.details)},
            "sizes": {"expert_bytes": bitmap["expert_bytes"], "non_expert_bytes": self.non_expert_bytes,
                      "total_bytes": bitmap["total_bytes"], "avg_bits": bitmap["avg_bits"],
                      "fp_expert_bytes": sum(g.expert_params * g.num_experts for g in self.groups) * self.elem},
            "bytes_read": self.bytes_read, "checkpoint_bytes": self.ckpt.checkpoint_bytes,
            "low_memory": {
                "bytes_read": self.bytes_read, "checkpoint_bytes": self.ckpt.checkpoint_bytes,
                "read_ratio": round(self.bytes_read / max(self.ckpt.checkpoint_bytes, 1), 4),
                "checkpoint_tensors_not_in_model": self.loader.skipped[:20],
                "layers": self.n_layers, "moe_layers": len(self.groups),
                "compute_dtype": str(self.dtype).replace("torch.", ""), "experts_implementation": self.experts_impl,
                "activation_spill_threshold_bytes": self.spill_bytes, "carried_activations": "full precision",
                "rss_at_start_mb": round(self.rss0, 1), "peak_rss_mb": round(peak, 1),
                "peak_rss_increase_mb": round(peak - self.rss0, 1),
                "layer_pass": _jsonable({k: (round(v, 3) if isinstance(v, float) else v)
                                         for k, v in self.pass_stats.items()})},
        }
        if exact:
            report["low_memory"]["sensitivity_objective"] = sens["objective"]
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        files.append(out_dir / "report.json")
        files += write_model_card(out_dir, bitmap, report)
        if self.own_state:
            shutil.rmtree(self.state.dir, ignore_errors=True)
        return RunResult(out_dir, bitmap, report, self.revision, files)


# =====================================================================================================================
# pieces of the run
# =====================================================================================================================
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


def _global_state_names(model, layers_path: str) -> list[str]:
    return [k for k in model.state_dict(keep_vars=True) if not k.startswith(layers_path + ".")]


def _spill_dict(module, names: set[str] | None, skip_names, ck_dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    """The module's non-expert state (real tensors, tied duplicates once) in the checkpoint dtype, on the CPU."""
    out, seen = {}, set()
    for name, t in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if names is not None and name not in names:
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


def _to_meta_except_buffers(model, layers_path: str) -> None:
    """Free the non-layer parameters (embeddings, norm, head)."""
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _resume_point(state, n_layers: int, streams) -> int:
    """The first layer to run: the one after the last layer whose outputs are all on disk."""
    for i in range(n_layers - 1, -1, -1):
        if state.done(f"layer-{i}") and all((state.dir / f"act-{s}-{i + 1}").is_dir() for s in streams):
            return i + 1
    return 0


def _capture(model, layers: nn.ModuleList, ids: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """Run the model with every decoder layer replaced by a recorder: returns layer 0's input hidden states and
    records each layer's call arguments (attention mask, position embeddings, ...) for this batch size."""
    rows = ids.shape[0]
    first: dict[str, torch.Tensor] = {}
    saved = {}

    def recorder(j):
        def fwd(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            if len(args) > 1:
                rest["__args__"] = args[1:]
            for k in ("past_key_values", "past_key_value", "cache_params", "use_cache"):
                rest.pop(k, None)
            layer_kwargs.setdefault((j, rows), rest)
            if j == 0:
                first["h"] = h
            if j == len(layers) - 1:
                raise _StopForward
            return h
        return fwd

    for j, layer in enumerate(layers):
        saved[j] = layer.__dict__.get("forward")
        layer.forward = recorder(j)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for j, layer in enumerate(layers):
            if saved[j] is None:
                del layer.forward
            else:
                layer.forward = saved[j]
    return first["h"].detach()


def _run_layer(layer, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    kw = dict(kwargs)
    args = kw.pop("__args__", ())
    with torch.no_grad():
        out = layer(x, *args, **kw)
    return out[0] if isinstance(out, tuple) else out


def _finish_stats(run: _LowMemRun, g, acc, top_k, store: ActivationStore, layer, i: int):
    """One layer's routed statistics; starved experts get all-token statistics from a second pass over the
    layer, rescaled as ``calibrate.calibrate`` does."""
    from .calibrate import CalibrationStats, _Accumulator, _install_hooks

    cfg, calib, min_tokens = run.cfg, run.calib, 8
    if cfg.calib_all_experts:
        starved = set(range(g.num_experts))
    else:
        starved = {e for e in range(g.num_experts) if int(acc.counts[g.layer][e]) < min_tokens}
    if starved:
        alltok = _Accumulator([g], bool(acc.hs), only={g.layer: starved})
        if acc.hs:
            alltok.hs = {k: v.to(next(iter(acc.hs.values())).device) for k, v in alltok.hs.items()}
        handles = _install_hooks(run.model, [g], alltok, True, {})
        try:
            for bi, b in enumerate(run.batches(calib)):
                run.prog.check()
                _run_layer(layer, store.get(bi, run.device), run.layer_kwargs[(i, b.shape[0])])
        finally:
            for h in handles:
                h.remove()
        for e in starved:
            n_all = max(int(alltok.counts[g.layer][e]), 1)
            scale = 1.0 if cfg.calib_all_experts else max(int(acc.counts[g.layer][e]), 1) / n_all
            for key in acc.sq:
                acc.sq[key][e] = alltok.sq[key][e] * scale
                if acc.hs:
                    acc.hs[key][e] = alltok.hs[key][e] * scale
        del alltok
    if g.layer not in top_k and calib.numel():
        top_k[g.layer] = round(int(acc.counts[g.layer].sum()) / calib.numel())
    fallback = {} if cfg.calib_all_experts else ({g.layer: sorted(starved)} if starved else {})
    return CalibrationStats(acc.counts, acc.sq, acc.hs, int(calib.numel()), {g.layer: top_k.get(g.layer, 0)},
                            fallback, "all" if cfg.calib_all_experts else "routed")


def _layer_scores(method: str, g, stats, trace: _TraceHook | None) -> list[float]:
    tokens = max(stats.tokens, 1)
    if method == LOCAL_METHOD:
        return (trace.sums / tokens).tolist()
    if method == "frequency":
        return stats.frequency(g.layer).tolist()
    if method == "input-hessian":  # as sensitivity.input_hessian
        s = torch.zeros(g.num_experts, dtype=torch.float64)
        for p in g.projections:
            s += 2.0 * p.out_features * stats.sq_norms[(g.layer, p.name)] / tokens
        return s.tolist()
    if method == "weight-norm":  # as sensitivity.weight_norm
        return [sum((p.params - 1) / max(float(g.weight(e, p.name).detach().double().norm()), 1e-12)
                    for p in g.projections) for e in range(g.num_experts)]
    raise KeyError(method)


def _layer_candidates(g, stats, bits_choices, qs, path: Path, device, prog) -> dict[int, dict[int, float]]:
    """Every expert of the layer at every width: errors (for the allocator) and packed matrices (to ``path``)."""
    from .artifact import packed_key
    from .gptq_batched import quantize_layer_candidates

    tensors: dict[str, torch.Tensor] = {}
    errors: dict[int, dict[int, float]] = {e: {b: 0.0 for b in bits_choices} for e in range(g.num_experts)}
    for e, b, proj, qm, err in quantize_layer_candidates(g, stats, bits_choices, qs, device=device,
                                                         should_stop=prog.check):
        errors[e][b] += err
        for part, t in qm.to_packed().items():
            tensors[f"{b}.{packed_key(g.path, proj, e, part)}"] = t.cpu()
    _save_tensors(path, tensors)
    return errors


def _reader(path: Path, key: str):
    def read():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as h:
            return h.get_tensor(key)
    return read
