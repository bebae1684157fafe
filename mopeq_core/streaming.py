"""Layer streaming: a model as a list of decoder layers that are materialised one at a time.

:class:`ModelStream` is the only way the engine touches a model. Its layers are either **resident** (the whole
model was loaded once; ``layer(i)`` hands the module out as is) or **streamed** (the model is a skeleton on the
meta device; ``layer(i)`` reads that layer's tensors from the safetensors shards, converted to the fused
transformers-5 layout by transformers' own conversion mapping, and drops them again afterwards). Which one is a
cache policy: every stage runs the same per-layer code either way, so the same configuration gives the same
results.

What runs outside the decoder layers (embeddings, vision tower, rotary tables, masks, final norm, head, logit
scaling) is always the model's own forward:

* :meth:`ModelStream.embed` runs the model with every decoder layer replaced by a recorder: it returns layer 0's
  input, the keyword arguments each layer is called with (mask, position embeddings, ...) and, for models that add
  something to the residual stream between layers (Qwen3-VL's deepstack visual features), that addition;
* :meth:`ModelStream.logits` runs the model with the last layer replaced by one that returns the given final
  hidden states, so the final norm, head and logit processing are exactly the model's.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_SPILL_BYTES = int(os.environ.get("MOPEQ_SPILL_BYTES") or 256 * 2**20)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_LAYERS_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block))\.(\d+)(?:\.|$)")


# =====================================================================================================================
# the stream
# =====================================================================================================================
@dataclass
class Embedded:
    """What the model computes before its decoder layers for one batch."""

    h0: torch.Tensor  # layer 0's input [B, L, H]
    kwargs: list[dict[str, Any]]  # per layer: the call's keyword arguments ("__args__": extra positionals)
    deltas: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> added to its output (between layers)


class _StopForward(Exception):
    pass


def decoder_layers(model, groups) -> tuple[str, nn.ModuleList]:
    from .errors import UnsupportedArchitectureError

    m = _LAYERS_RE.match(groups[0].path)
    if not m:
        raise UnsupportedArchitectureError(f"cannot find the decoder layer list above {groups[0].path}")
    path = m.group(1)
    layers = model.get_submodule(path)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{path} is not a ModuleList of decoder layers")
    return path, layers


class ModelStream:
    """A model's decoder layers, resident or streamed from the checkpoint (see the module docstring)."""

    def __init__(self, model, groups, *, device, ckpt: SafetensorsCheckpoint | None = None,
                 loader: LayerLoader | None = None):
        from .errors import UnsupportedArchitectureError

        self.model, self.groups = model, groups
        self.device = torch.device(device)
        self.ckpt, self.loader = ckpt, loader
        self.resident = loader is None
        self.layers_path, self.layers = decoder_layers(model, groups)
        self.n_layers = len(self.layers)
        self.group_of: dict[int, Any] = {}
        for g in groups:
            m = re.match(rf"^{re.escape(self.layers_path)}\.(\d+)\.", g.path)
            if not m:
                raise UnsupportedArchitectureError(f"{g.path} is not inside {self.layers_path}")
            self.group_of[int(m.group(1))] = g
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._embedded: dict[Any, Embedded] = {}
        self.layer_loads = 0
        self.passes: dict[str, int] = {}

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model, groups=None) -> ModelStream:
        """A resident stream over a model already in memory."""
        from .moe import find_expert_groups

        return cls(model, groups if groups is not None else find_expert_groups(model),
                   device=next(model.parameters()).device)

    @classmethod
    def open(cls, path: Path, *, resident: bool, device: str = "cpu", trust_remote_code: bool = False,
             allow_pickle: bool = False) -> ModelStream:
        """The model at ``path``: loaded whole (``resident``) or as a meta skeleton whose layers are read from its
        safetensors shards on demand (the non-layer weights are read at once and stay)."""
        from .loading import load_model

        if resident:
            return cls.from_model(load_model(path, device=device, trust_remote_code=trust_remote_code,
                                             allow_pickle=allow_pickle))
        from transformers import AutoConfig

        from .errors import UnsupportedArchitectureError

        _fixed_mmap_threshold()
        from .loader import _parameters_on_meta
        from .models import trust_for
        from .moe import find_expert_groups
        from .multimodal import auto_model_class

        ckpt = SafetensorsCheckpoint(path)
        trust_remote_code = trust_for(path, trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        try:
            with _parameters_on_meta():
                model = auto_model_class(config).from_config(
                    config, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
                    trust_remote_code=trust_remote_code)
        except (ValueError, KeyError) as exc:
            raise UnsupportedArchitectureError(f"transformers cannot build a causal LM from {path}: {exc}") from exc
        model.eval()
        dev = torch.device(device)
        for mod in model.modules():  # buffers (rotary tables) are real: move them; parameters stay on meta
            for name, b in list(mod._buffers.items()):
                if b is not None and b.device != dev:
                    mod._buffers[name] = b.to(dev)
        groups = find_expert_groups(model)
        layers_path, layers = decoder_layers(model, groups)
        loader = LayerLoader(model, ckpt, layers_path, len(layers))
        loader.load(loader.global_keys, torch.float32, dev)
        if bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False)):
            model.tie_weights()
        missing = [n for n, p in model.named_parameters()
                   if p.device.type == "meta" and not n.startswith(layers_path + ".")]
        if missing:
            raise UnsupportedArchitectureError(f"{path}: the checkpoint lacks {missing[:4]}")
        return cls(model, groups, device=dev, ckpt=ckpt, loader=loader)

    # -- layers ---------------------------------------------------------------------------------------------------
    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Layer ``i`` with real weights for the duration of the block."""
        from .errors import UnsupportedArchitectureError

        layer = self.layers[i]
        if self.resident:
            yield layer
            return
        self.loader.load(self.loader.by_layer[i], torch.float32, self.device)
        self.layer_loads += 1
        missing = _missing_params(layer)
        if missing:
            raise UnsupportedArchitectureError(
                f"{self.ckpt.path}: the checkpoint has no tensors for {self.layers_path}.{i}: {missing[:4]}"
                + (f"; checkpoint keys that map to no parameter, e.g. {self.loader.skipped[:3]}"
                   if self.loader.skipped else ""))
        _release_freed_memory()  # the per-expert tensors the conversion stacked
        try:
            yield layer
        finally:
            _to_meta(layer)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            _release_freed_memory()

    def count_pass(self, name: str) -> None:
        self.passes[name] = self.passes.get(name, 0) + 1

    @property
    def bytes_read(self) -> int:
        return self.ckpt.bytes_read if self.ckpt is not None else 0

    @property
    def checkpoint_bytes(self) -> int | None:
        return self.ckpt.checkpoint_bytes if self.ckpt is not None else None

    # -- before and after the layers ------------------------------------------------------------------------------
    def embed(self, key, batch: dict[str, torch.Tensor]) -> Embedded:
        """Layer 0's input and every layer's call arguments for ``batch`` (cached under ``key``)."""
        if key in self._embedded:
            return self._embedded[key]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        n = self.n_layers
        seen: dict[str, Any] = {"kwargs": [None] * n, "prev": None, "deltas": {}}

        def recorder(j):
            def fwd(*args, **kwargs):
                h = args[0] if args else kwargs.pop("hidden_states")
                rest = {k: v for k, v in kwargs.items()
                        if k not in ("hidden_states", "past_key_values", "past_key_value", "cache_params",
                                     "use_cache")}
                if len(args) > 1:
                    rest["__args__"] = args[1:]
                seen["kwargs"][j] = rest
                if j == 0:
                    seen["h0"] = h.detach()
                else:  # identity layers: whatever changed the stream since the last layer was added between them
                    d = (h - seen["prev"]).detach()
                    if bool(d.abs().max() > 0):
                        seen["deltas"][j - 1] = d
                seen["prev"] = h
                if j == n - 1:
                    raise _StopForward
                return (h,) if _returns_tuple(self.layers[j]) else h
            return fwd

        with _replaced_forwards(self.layers, {j: recorder(j) for j in range(n)}), torch.no_grad():
            try:
                self.model(**inputs, use_cache=False)
            except _StopForward:
                pass
        emb = Embedded(seen["h0"], seen["kwargs"], seen["deltas"])
        self._embedded[key] = emb
        return emb

    def run_layer(self, layer: nn.Module, i: int, x: torch.Tensor, emb: Embedded) -> torch.Tensor:
        """Layer ``i`` on ``x`` (autograd as the caller set it), plus what the model adds after it."""
        kw = dict(emb.kwargs[i])
        args = kw.pop("__args__", ())
        out = layer(x, *args, **kw)
        out = out[0] if isinstance(out, tuple) else out
        d = emb.deltas.get(i)
        return out if d is None else out + d

    def logits(self, batch: dict[str, torch.Tensor], h_last: torch.Tensor) -> torch.Tensor:
        """The model's logits when its last decoder layer outputs ``h_last`` (differentiable in ``h_last``)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        n = self.n_layers

        def passthrough(j):
            def fwd(*args, **kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                if j == n - 1:
                    h = h_last
                return (h,) if _returns_tuple(self.layers[j]) else h
            return fwd

        with _replaced_forwards(self.layers, {j: passthrough(j) for j in range(n)}):
            return self.model(**inputs, use_cache=False).logits

    def loss(self, batch: dict[str, torch.Tensor], h_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-row summed next-token cross-entropy [B] (float32, differentiable), per-row target counts [B])."""
        from .data import IGNORE_INDEX

        logits = self.logits(batch, h_last)[:, :-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32, float64 stays
        labels = batch.get("labels", batch["input_ids"])[:, 1:].to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction="none")
        return ce.reshape(labels.shape).sum(-1), (labels != IGNORE_INDEX).sum(-1)


def _returns_tuple(layer: nn.Module) -> bool:
    """transformers 5 decoder layers return a tensor; older remote code returns (hidden_states, ...)."""
    cached = getattr(layer, "_mopeq_returns_tuple", None)
    if cached is not None:
        return cached
    import inspect

    try:
        src = inspect.getsource(type(layer).forward)
    except (OSError, TypeError):
        src = ""
    ret = bool(re.search(r"return\s*\(?\s*hidden_states\s*,|outputs\s*=\s*\(\s*hidden_states\s*,", src))
    layer._mopeq_returns_tuple = ret
    return ret


@contextmanager
def _replaced_forwards(layers: nn.ModuleList, forwards: dict[int, Callable]):
    saved = {j: layers[j].__dict__.get("forward") for j in forwards}
    for j, f in forwards.items():
        layers[j].forward = f
    try:
        yield
    finally:
        for j, f in saved.items():
            if f is None:
                del layers[j].forward
            else:
                layers[j].forward = f


# =====================================================================================================================
# checkpoint reading, activations, files
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




class ActivationStore:
    """Tensors keyed by batch (hidden states, tangents, gradients), held on the compute device or, when their total
    would pass ``spill_bytes``, in files under ``directory`` (one safetensors file per key)."""

    def __init__(self, directory: Path, spill_bytes: int = DEFAULT_SPILL_BYTES):
        self.dir = Path(directory)
        self.spill_bytes = spill_bytes
        self.mem: dict[Any, torch.Tensor] = {}
        self.on_disk: set = set()
        self.held = 0

    def _file(self, key) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", repr(key)) + ".safetensors")

    def put(self, key, t: torch.Tensor) -> None:
        t = t.detach()
        n = t.numel() * t.element_size()
        if key not in self.mem and self.held + n > self.spill_bytes:
            self.dir.mkdir(parents=True, exist_ok=True)
            _save_tensors(self._file(key), {"t": t})
            self.on_disk.add(key)
            return
        if key in self.mem:
            self.held -= self.mem[key].numel() * self.mem[key].element_size()
        self.mem[key] = t
        self.held += n

    def get(self, key, device) -> torch.Tensor:
        if key in self.mem:
            return self.mem[key]
        from safetensors.torch import load_file

        return load_file(str(self._file(key)))["t"].to(device)

    def __contains__(self, key) -> bool:
        return key in self.mem or key in self.on_disk

    def maybe(self, key, device) -> torch.Tensor | None:
        return self.get(key, device) if key in self else None

    def pop(self, key) -> None:
        t = self.mem.pop(key, None)
        if t is not None:
            self.held -= t.numel() * t.element_size()
        elif key in self.on_disk:
            self.on_disk.discard(key)
            self._file(key).unlink(missing_ok=True)

    @property
    def spilled(self) -> bool:
        return bool(self.on_disk)

    def clear(self) -> None:
        self.mem.clear()
        self.held = 0
        for key in self.on_disk:
            self._file(key).unlink(missing_ok=True)
        self.on_disk.clear()


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



def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Tensors of ``nbytes`` and more are mmapped and go back to the OS when freed. glibc's default threshold
    grows with every large block freed, after which layer-sized tensors come from the heap and its fragmentation
    keeps the pages of released layers resident (measured: calibration peak +422 MiB vs +191 MiB on the 12-layer
    test checkpoint)."""
    _release_freed_memory()  # loads libc
    if _LIBC:
        try:
            _LIBC.mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
        except AttributeError:
            pass


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")



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
# batches and the plain forward stream
# =====================================================================================================================
def make_batches(samples, name: str, batch_size: int, device, dtype) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    """(key, model inputs with ``labels``) for token windows (rows of ``batch_size``) or an image+text SampleSet
    (one example per batch). Keys are ``(name, index)``."""
    from .data import iter_batches

    out = []
    for b, batch in enumerate(iter_batches(samples, batch_size, device, dtype=dtype)):
        batch.setdefault("labels", batch["input_ids"])
        out.append(((name, b), batch))
    return out


def record_inputs(stream: ModelStream, batches, *, keep: bool = True, layer_hooks: dict | None = None,
                  store: ActivationStore | None = None, should_stop=None) -> ActivationStore | None:
    """One forward stream over ``batches``: every layer's input per batch into ``store`` (keys ``(layer, key)``;
    a fresh in-memory store when none is given). ``layer_hooks`` (group layer -> object with install/remove) are
    active while their layer runs."""
    import tempfile

    if keep and store is None:
        store = ActivationStore(Path(tempfile.mkdtemp(prefix="mopeq-inputs-")))
    xs = {key: stream.embed(key, batch).h0 for key, batch in batches}
    stream.count_pass("record-inputs")
    for i in range(stream.n_layers):
        g = stream.group_of.get(i)
        hook = (layer_hooks or {}).get(g.layer) if g is not None else None
        with stream.layer(i) as layer:
            if hook is not None:
                hook.install()
            try:
                with torch.no_grad():
                    for key, batch in batches:
                        if should_stop is not None:
                            should_stop()
                        if keep:
                            store.put((i, key), xs[key])
                        xs[key] = stream.run_layer(layer, i, xs[key], stream.embed(key, batch))
            finally:
                if hook is not None:
                    hook.remove()
    return store
