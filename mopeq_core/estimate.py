"""Size a MoE checkpoint and its feasible budget range from ``config.json`` and safetensors headers only.

Torch-free (the web API imports it). Nothing here downloads weights: a local directory is read through the
8-byte length and the JSON header of each ``.safetensors`` file; a Hub repo through ``HfApi.model_info``, the
``config.json`` file and ranged reads of each safetensors header (``HfApi.parse_safetensors_file_metadata``).

Experts are recognised by tensor name, in both layouts a checkpoint can have:

- per expert (Hub layout): ``...experts.3.w1.weight``, ``...experts.3.gate_proj.weight`` (2-D ``[out, in]``);
- fused (transformers 5 layout): ``...experts.gate_up_proj`` ``[E, 2F, H]`` and ``...experts.down_proj``
  ``[E, H, F]`` (3-D, one slice per expert).

Everything else (attention, norms, embeddings, routers, shared experts, expert biases) is "non-expert" and kept
at its stored dtype. The feasible range puts every expert at the smallest, then the largest, allowed bit width.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import (
    InfeasibleBudgetError,
    ModelNotFoundError,
    MopeqError,
    NotMoEError,
    RemoteCodeRequiredError,
    UnsafeCheckpointError,
    UserInputError,
)
from .sizing import matrix_bytes

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_FILES = 5000
GB = 1e9

DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
}
# dtypes safetensors knows without a whole-byte width (sub-byte floats, complex); anything else is refused
OTHER_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "C64"}
# Upper bounds on the sizes a config.json may claim (far above any real model): a config that claims more would
# make the worker try to build an impossible model.
CONFIG_SIZE_LIMITS = {
    "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "moe_intermediate_size": 1 << 22,
    "shared_expert_intermediate_size": 1 << 22, "num_hidden_layers": 4096, "num_local_experts": 1 << 16,
    "num_experts": 1 << 16, "n_routed_experts": 1 << 16, "num_experts_per_tok": 1 << 16, "vocab_size": 1 << 24,
    "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "head_dim": 1 << 16,
    "max_position_embeddings": 1 << 28,
}
_PER_EXPERT = re.compile(r"^(?P<module>(?:.*\.)?experts)\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")
_FUSED = re.compile(r"^(?P<module>(?:.*\.)?experts)\.(?P<proj>gate_up_proj|down_proj|gate_proj|up_proj|w1|w2|w3)"
                    r"(?:\.weight)?$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class HubUnavailableError(MopeqError):
    """The Hub could not be reached (network, timeout, 5xx); not the caller's fault, try again later."""


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Checkpoint:
    """What the headers say: the config, the file names and every tensor's dtype and shape."""

    model: str
    source: str  # local | hub
    revision: str | None
    config: dict[str, Any]
    files: list[str]
    tensors: list[Tensor]


@dataclass
class MoELayer:
    layer: int
    module: str
    experts: int
    params_per_expert: int
    shapes: list[tuple[int, int]]  # one expert's projections, [out, in]


@dataclass
class ModelEstimate:
    model: str
    source: str
    revision: str | None
    model_type: str | None
    architectures: list[str]
    moe_layers: int
    experts_per_layer: list[int]
    num_experts: int
    expert_params: int
    non_expert_params: int
    total_params: int
    stored_bytes: int
    non_expert_bytes: int
    bits: list[int]
    group_size: int
    symmetric: bool
    min_bytes: int
    max_bytes: int
    layers: list[MoELayer] = field(default_factory=list, repr=False)

    @property
    def min_gb(self) -> float:
        return self.min_bytes / GB

    @property
    def max_gb(self) -> float:
        return self.max_bytes / GB

    @property
    def min_avg_bits(self) -> float:
        return float(min(self.bits))

    @property
    def max_avg_bits(self) -> float:
        return float(max(self.bits))

    def feasible(self) -> dict[str, Any]:
        return {
            "avg_bits": [self.min_avg_bits, self.max_avg_bits],
            "gb": [self.min_gb, self.max_gb],
            "bytes": [self.min_bytes, self.max_bytes],
        }

    def bytes_at(self, bits: int) -> int:
        return self.non_expert_bytes + sum(
            layer.experts * sum(matrix_bytes(o, i, bits, self.group_size, self.symmetric) for o, i in layer.shapes)
            for layer in self.layers)

    def check_budget(self, *, avg_bits: float | None = None, gb: float | None = None) -> None:
        """Raises InfeasibleBudgetError (with the feasible range in the message) when the budget cannot be met."""
        eps = 1e-9
        if avg_bits is not None and not (self.min_avg_bits - eps <= avg_bits <= self.max_avg_bits + eps):
            raise InfeasibleBudgetError(
                f"budget avg_bits={avg_bits:g} is outside the feasible range {self.min_avg_bits:g}..."
                f"{self.max_avg_bits:g} for bits {self.bits} (every expert at the smallest to the largest width); "
                f"in gb the same model takes {self.min_gb:.6g}..{self.max_gb:.6g}",
                feasible=(self.min_avg_bits, self.max_avg_bits), unit="avg_bits")
        if gb is not None and not (self.min_bytes - 0.5 <= gb * GB <= self.max_bytes + 0.5):
            raise InfeasibleBudgetError(
                f"budget gb={gb:g} is outside the feasible range {self.min_gb:.6g}..{self.max_gb:.6g} GB for bits "
                f"{self.bits} (non-expert weights at their stored dtype, {self.non_expert_bytes / GB:.6g} GB, plus "
                f"every expert at {min(self.bits)} to {max(self.bits)} bits); in avg_bits: "
                f"{self.min_avg_bits:g}..{self.max_avg_bits:g}",
                feasible=(self.min_gb, self.max_gb), unit="gb")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [
            {"layer": la.layer, "module": la.module, "experts": la.experts, "params_per_expert": la.params_per_expert}
            for la in self.layers]
        d.update(min_gb=self.min_gb, max_gb=self.max_gb, feasible=self.feasible(), engines=self.engines())
        return d

    def engines(self) -> dict[str, dict[str, Any]]:
        """Per serving target: the granularities it runs and which of ``bits`` it can store for this model."""
        from .allocate import ENGINE_GRANULARITIES
        from .gguf_export import gguf_widths

        shapes = [s for la in self.layers for s in la.shapes]
        widths = {"gguf": gguf_widths(shapes, self.bits), "compressed-tensors": [b for b in self.bits if b in (4, 8)],
                  "gptq": [b for b in self.bits if b in (2, 3, 4, 8)]}
        return {name: {"granularities": list(g),
                       "bits": widths.get(name[name.index("(") + 1:-1], list(self.bits))}
                for name, g in ENGINE_GRANULARITIES.items()}


# ---- reading headers ----------------------------------------------------------------------------------------------
def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape) if shape else 1


def _tensor(name: str, meta: Any, where: str) -> Tensor:
    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str) or not isinstance(meta.get("shape"),
                                                                                              list):
        raise UserInputError(f"{where}: malformed safetensors header entry for '{name}'")
    shape = meta["shape"]
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape) or len(shape) > 8:
        raise UserInputError(f"{where}: tensor '{name}' has an invalid shape {shape!r}")
    offsets = meta.get("data_offsets")
    numel = _numel(shape)
    width = DTYPE_BYTES.get(meta["dtype"])
    if width is None and meta["dtype"] not in OTHER_DTYPES:
        raise UserInputError(f"{where}: tensor '{name}' has an unknown dtype {meta['dtype'][:20]!r}")
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
        nbytes = offsets[1] - offsets[0]
        if offsets[0] < 0 or nbytes < 0 or (width is not None and nbytes != numel * width):
            raise UserInputError(f"{where}: tensor '{name}' claims {numel} x {meta['dtype']} but its data takes "
                                 f"{nbytes} bytes; the header is inconsistent")
    elif width is not None:
        nbytes = numel * width
    else:
        raise UserInputError(f"{where}: tensor '{name}' has unknown dtype {meta['dtype']!r} and no data_offsets")
    return Tensor(name, meta["dtype"], tuple(shape), nbytes)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one .safetensors file (8-byte little-endian length, then JSON), checked for sanity."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserInputError(f"{path.name}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise UserInputError(f"{path.name}: malformed safetensors header (claims {n} header bytes in a "
                                 f"{size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UserInputError(f"{path.name}: malformed safetensors header ({str(exc)[:200]})") from exc
    if not isinstance(header, dict):
        raise UserInputError(f"{path.name}: malformed safetensors header (not a JSON object)")
    end = max((m["data_offsets"][1] for k, m in header.items()
               if k != "__metadata__" and isinstance(m, dict) and isinstance(m.get("data_offsets"), list)
               and len(m["data_offsets"]) == 2 and isinstance(m["data_offsets"][1], int)), default=0)
    if 8 + n + end > size:
        raise UserInputError(f"{path.name}: the header claims {end} bytes of tensor data but the file holds only "
                             f"{size - 8 - n}; the file is truncated or the header lies")
    return header


def _check_config(config: Any, where: str, trust_remote_code: bool) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise UserInputError(f"{where}/config.json is not a JSON object")
    for sub in [config, *(v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict))]:
        for key, limit in CONFIG_SIZE_LIMITS.items():
            v = sub.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
                raise UserInputError(f"{where}/config.json claims {key}={str(v)[:40]}, which is not a size any "
                                     f"model has (at most {limit}); refusing to build it")
    from .models import is_native

    if "auto_map" in config and not trust_remote_code and not is_native(config):
        raise RemoteCodeRequiredError(
            f"{where} needs remote code (config.json has auto_map: {sorted(config['auto_map'])}); running it "
            "executes Python from the repo. The server runs it only for repos its operator allows "
            "(MOPEQ_ALLOW_REMOTE_CODE_REPOS) and only when the job sets trust_remote_code: true.")
    return config


def _check_weight_files(names: list[str], where: str, allow_pickle: bool) -> list[str]:
    st = sorted(n for n in names if n.endswith(".safetensors"))
    if not st:
        if any(n.endswith(PICKLE_SUFFIXES) for n in names):
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{where} has only pickle weights (.bin/.pt); loading pickle can run arbitrary code, so MoPEQ "
                    "reads safetensors only. Convert the checkpoint to safetensors or pick a revision that has them.")
            raise UnsafeCheckpointError(
                f"{where} has only pickle weights; its size cannot be read without loading them. Convert it to "
                "safetensors to get an estimate.")
        raise ModelNotFoundError(f"{where} has no weight files (*.safetensors)")
    if len(st) > MAX_FILES:
        raise UserInputError(f"{where} has {len(st)} safetensors files (limit {MAX_FILES})")
    return st


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def inspect_local(path: Path, *, roots: list[Path] | None = None, allow_pickle: bool = False,
                  trust_remote_code: bool = False, label: str | None = None) -> Checkpoint:
    """Headers of a local model directory. With ``roots``, every file read must resolve inside one of them."""
    where = label or str(path)
    real = path.resolve()
    if not real.is_dir():
        raise ModelNotFoundError(f"{where} is not a directory holding a model (config.json + *.safetensors)")
    resolved_roots = [r.resolve() for r in roots] if roots is not None else None

    def _open_ok(p: Path) -> Path:
        rp = p.resolve()
        if resolved_roots is not None and not _inside(rp, resolved_roots):
            raise UserInputError(f"{where}: {p.name} is a link that leads outside the allowed model roots")
        return rp

    config_path = real / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{where} has no config.json; point the model at a transformers model directory")
    try:
        config = json.loads(_open_ok(config_path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserInputError(f"{where}/config.json is not valid JSON ({str(exc)[:200]})") from exc
    config = _check_config(config, where, trust_remote_code)
    names = sorted(p.name for p in real.iterdir() if p.is_file())
    st = _check_weight_files(names, where, allow_pickle)
    tensors: list[Tensor] = []
    for name in st:
        header = read_safetensors_header(_open_ok(real / name))
        tensors.extend(_tensor(k, v, f"{where}/{name}") for k, v in header.items() if k != "__metadata__")
    return Checkpoint(label or str(path), "local", None, config, names, tensors)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def inspect_hub(repo_id: str, *, revision: str | None = None, token: str | None = None,
                allow_pickle: bool = False, trust_remote_code: bool = False, endpoint: str | None = None) -> Checkpoint:
    """Headers of a Hub model at ``revision`` (resolved to its commit sha), without downloading weights.

    With ``HF_HUB_OFFLINE=1`` the pre-filled HF cache is read instead."""
    if not REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise UserInputError(f"'{repo_id}' is not a valid Hub repo id (expected 'org/name')")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        if _hub_offline():
            path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                          allow_patterns=["*.json", "*.safetensors", *[f"*{s}" for s in
                                                                                       PICKLE_SUFFIXES]]))
            ck = inspect_local(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, label=repo_id)
            ck.source, ck.revision = "hub", path.name
            return ck
        api = HfApi(endpoint=endpoint, token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=False)
        sha = info.sha or revision
        names = sorted(s.rfilename for s in (info.siblings or []))
        if "config.json" not in names:
            raise ModelNotFoundError(f"Hub repo '{repo_id}' has no config.json at its top level")
        config_file = api.hf_hub_download(repo_id, "config.json", revision=sha)
        try:
            config = json.loads(Path(config_file).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UserInputError(f"{repo_id}/config.json is not valid JSON ({str(exc)[:200]})") from exc
        config = _check_config(config, repo_id, trust_remote_code)
        st = _check_weight_files([n for n in names if "/" not in n], repo_id, allow_pickle)
        tensors: list[Tensor] = []
        for name in st:
            meta = api.parse_safetensors_file_metadata(repo_id, name, revision=sha)
            for tname, t in meta.tensors.items():
                tensors.append(_tensor(tname, {"dtype": t.dtype, "shape": list(t.shape),
                                               "data_offsets": list(t.data_offsets)}, f"{repo_id}/{name}"))
        return Checkpoint(repo_id, "hub", sha, config, names, tensors)
    except GatedRepoError as exc:
        raise ModelNotFoundError(f"Hub repo '{repo_id}' is gated: accept its terms on the Hub and pass an hf_token "
                                 "that has access") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"model '{repo_id}' was not found on the Hub (check the id; a private repo needs an "
                                 "hf_token that can read it)") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"revision '{revision}' was not found in Hub repo '{repo_id}'") from exc
    except LocalEntryNotFoundError as exc:
        if _hub_offline():
            raise ModelNotFoundError(f"'{repo_id}' is not in the local HF cache and the Hub is offline "
                                     "(HF_HUB_OFFLINE=1)") from exc
        raise HubUnavailableError(f"the Hub could not be reached to read '{repo_id}': {exc}") from exc
    except EntryNotFoundError as exc:
        raise ModelNotFoundError(f"Hub repo '{repo_id}' lacks a file it lists: {exc}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise ModelNotFoundError(f"the Hub refused access to '{repo_id}' (HTTP {status}); pass an hf_token "
                                     "that can read it") from exc
        raise HubUnavailableError(f"the Hub answered HTTP {status} for '{repo_id}'; try again later") from exc
    except (*_http_errors(), ConnectionError, TimeoutError) as exc:
        raise HubUnavailableError(f"the Hub could not be reached to read '{repo_id}': {type(exc).__name__}") from exc


def _http_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client errors of whichever client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    out: list[type[BaseException]] = []
    for mod in ("httpx2", "httpx"):
        try:
            out.append(__import__(mod).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


# ---- sizing -------------------------------------------------------------------------------------------------------
def find_moe_layers(tensors: list[Tensor]) -> tuple[list[MoELayer], set[str]]:
    """MoE layers found by tensor name, and the names of the tensors that are expert weights."""
    per: dict[str, dict[int, dict[str, tuple[int, int]]]] = {}
    fused: dict[str, dict[str, tuple[int, int, int]]] = {}
    expert_names: set[str] = set()
    for t in tensors:
        m = _PER_EXPERT.match(t.name)
        if m and len(t.shape) == 2:
            per.setdefault(m["module"], {}).setdefault(int(m["expert"]), {})[m["proj"]] = (t.shape[0], t.shape[1])
            expert_names.add(t.name)
            continue
        m = _FUSED.match(t.name)
        if m and len(t.shape) == 3:
            fused.setdefault(m["module"], {})[m["proj"]] = (t.shape[0], t.shape[1], t.shape[2])
            expert_names.add(t.name)
    layers: list[MoELayer] = []
    for module, experts in per.items():
        first = experts[min(experts)]
        shapes = [first[k] for k in sorted(first)]
        layers.append(MoELayer(-1, module, len(experts), sum(o * i for o, i in shapes), shapes))
    for module, projs in fused.items():
        n = max(s[0] for s in projs.values())
        shapes = [(s[1], s[2]) for _, s in sorted(projs.items())]
        layers.append(MoELayer(-1, module, n, sum(o * i for o, i in shapes), shapes))

    def _key(la: MoELayer) -> tuple[int, str]:
        m = _LAYER.search(la.module + ".")
        return (int(m.group(1)) if m else 1 << 30, la.module)

    layers.sort(key=_key)
    for idx, la in enumerate(layers):
        m = _LAYER.search(la.module + ".")
        la.layer = int(m.group(1)) if m else idx
    return layers, expert_names


def estimate_checkpoint(ck: Checkpoint, *, bits: Iterable[int] = (2, 3, 4), group_size: int = 128,
                        symmetric: bool = True) -> ModelEstimate:
    bits = sorted({int(b) for b in bits})
    if not bits:
        raise UserInputError("bits must list at least one width")
    layers, expert_names = find_moe_layers(ck.tensors)
    if not layers:
        raise NotMoEError(
            f"{ck.model} is not a Mixture-of-Experts model: none of its {len(ck.tensors)} tensors is an expert "
            "weight ('...experts.N.<proj>.weight' or fused '...experts.gate_up_proj'). MoPEQ quantizes MoE models "
            "only.")
    expert_params = sum(la.experts * la.params_per_expert for la in layers)
    non_expert = [t for t in ck.tensors if t.name not in expert_names]
    non_expert_params = sum(_numel(t.shape) for t in non_expert)
    non_expert_bytes = sum(t.nbytes for t in non_expert)
    est = ModelEstimate(
        model=ck.model, source=ck.source, revision=ck.revision,
        model_type=ck.config.get("model_type"), architectures=list(ck.config.get("architectures") or []),
        moe_layers=len(layers), experts_per_layer=[la.experts for la in layers],
        num_experts=sum(la.experts for la in layers), expert_params=expert_params,
        non_expert_params=non_expert_params, total_params=expert_params + non_expert_params,
        stored_bytes=sum(t.nbytes for t in ck.tensors), non_expert_bytes=non_expert_bytes,
        bits=bits, group_size=group_size, symmetric=symmetric, min_bytes=0, max_bytes=0, layers=layers)
    est.min_bytes = est.bytes_at(bits[0])
    est.max_bytes = est.bytes_at(bits[-1])
    return est


def estimate_model(model: str | Path, *, revision: str | None = None, token: str | None = None,
                   bits: Iterable[int] = (2, 3, 4), group_size: int = 128, symmetric: bool = True,
                   allow_pickle: bool = False, trust_remote_code: bool = False,
                   roots: list[Path] | None = None) -> ModelEstimate:
    """Convenience: a local directory (when it exists) or a Hub repo id."""
    p = Path(model).expanduser()
    if isinstance(model, Path) or p.exists() or str(model).startswith((".", "/", "~")):
        ck = inspect_local(p, roots=roots, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                           label=str(model))
    else:
        ck = inspect_hub(str(model), revision=revision, token=token, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
    return estimate_checkpoint(ck, bits=bits, group_size=group_size, symmetric=symmetric)
