"""The per-expert packed artifact (``--format mopeq``): writing it layer by layer, and the bit map.

Layout of DIR:
- ``model-00000-of-0000N.safetensors``: non-expert weights at their checkpoint dtype (transformers-5 names);
- ``model-0000L-of-0000N.safetensors``: MoE layer L's experts, per expert and projection
  ``{module}.{proj}.{expert}.qweight`` (codes packed densely at the expert's width), ``.scales`` (float16) and, when
  asymmetric, ``.qzeros``;
- ``model.safetensors.index.json``; ``config.json`` with ``quantization_config`` (quant_method ``mopeq``);
- ``bitmap.json``, ``report.json``, tokenizer files, ``README.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .moe import ExpertGroup, expert_param_names
from .quantize import QuantizedMatrix

FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def packed_key(module: str, proj: str, expert: int, part: str) -> str:
    return f"{module}.{proj}.{expert}.{part}"


def checkpoint_dtype(config) -> torch.dtype:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def iter_non_expert_tensors(model, groups: list[ExpertGroup]):
    """(name, tensor) for every state-dict tensor that is not a routed expert weight, tied duplicates once
    (e.g. lm_head = embed_tokens; the loader re-ties them from the config). Nothing is copied."""
    skip = expert_param_names(model, groups)
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        key = (t.data_ptr(), tuple(t.shape)) if t.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        yield name, t


def non_expert_state(model, groups: list[ExpertGroup]) -> dict[str, torch.Tensor]:
    """The non-expert tensors as stored in the artifact: on CPU, floating ones at the checkpoint dtype."""
    dtype = checkpoint_dtype(model.config)
    out = {}
    for name, t in iter_non_expert_tensors(model, groups):
        t = t.detach().to("cpu")
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def write_config(out_dir: Path, model, quant_config: dict) -> list[Path]:
    """config.json with ``quantization_config``, and generation_config.json when the model has one."""
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quant_config
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    files = [out_dir / "config.json"]
    if getattr(model, "generation_config", None) is not None:
        try:
            model.generation_config.save_pretrained(out_dir)
            files.append(out_dir / "generation_config.json")
        except (ValueError, OSError):
            pass
    return files


def quantization_config(groups: list[ExpertGroup], bits: dict[tuple[int, int], int], group_size: int,
                        symmetric: bool, quantizer: str) -> dict:
    return {
        "quant_method": "mopeq", "format_version": FORMAT_VERSION, "group_size": group_size,
        "symmetric": symmetric, "quantizer": quantizer,
        "modules": {g.path: {"layer": g.layer, "kind": g.kind, "num_experts": g.num_experts,
                             "bits": [bits[(g.layer, e)] for e in range(g.num_experts)],
                             "projections": {p.name: [p.out_features, p.in_features] for p in g.projections}}
                    for g in groups},
    }


def write_mopeq_artifact(out_dir: Path, model, groups: list[ExpertGroup],
                         chosen_for_layer, bits: dict[tuple[int, int], int], *, group_size: int,
                         symmetric: bool, quantizer: str) -> list[Path]:
    """Write the packed checkpoint. ``chosen_for_layer(group)`` yields {expert: {proj: QuantizedMatrix}} for one
    layer at a time, so only one layer's packed experts are in memory while writing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(groups) + 1
    weight_map: dict[str, str] = {}
    files = []
    base = non_expert_state(model, groups)
    name = shard_name(0, n)
    save_file(base, str(out_dir / name), metadata={"format": "pt", "mopeq": "non-expert"})
    weight_map.update({k: name for k in base})
    files.append(out_dir / name)
    del base
    for i, g in enumerate(groups, start=1):
        tensors: dict[str, torch.Tensor] = {}
        for e, per_proj in chosen_for_layer(g).items():
            for proj, qm in per_proj.items():
                if qm.spec.bits != bits[(g.layer, e)]:
                    raise ValueError(f"{g.path} expert {e}: packed at {qm.spec.bits} bits, bit map says "
                                     f"{bits[(g.layer, e)]}")
                for part, t in qm.to_packed().items():
                    tensors[packed_key(g.path, proj, e, part)] = t.cpu().contiguous()
        name = shard_name(i, n)
        save_file(tensors, str(out_dir / name), metadata={"format": "pt", "mopeq": f"experts layer {g.layer}"})
        weight_map.update({k: name for k in tensors})
        files.append(out_dir / name)
    index = {"metadata": {"format": "mopeq", "format_version": FORMAT_VERSION}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1))
    files.append(out_dir / INDEX_NAME)
    files += write_config(out_dir, model, quantization_config(groups, bits, group_size, symmetric, quantizer))
    return files


def expert_tensor_bytes(out_dir: Path) -> int:
    """Bytes of the expert tensors on disk (sum of their safetensors sizes), for the size check."""
    from safetensors import safe_open

    index = json.loads((out_dir / INDEX_NAME).read_text())
    total = 0
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(out_dir / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __contains__/__iter__)
                if key.endswith((".qweight", ".scales", ".qzeros")):
                    sl = f.get_slice(key)
                    shape = sl.get_shape()
                    numel = 1
                    for s in shape:
                        numel *= s
                    total += numel * (2 if key.endswith(".scales") else 1)
    return total


def build_bitmap(*, model_id: str, revision: str | None, groups: list[ExpertGroup],
                 bits: dict[tuple[int, int], int], scores: dict[int, list[float]],
                 frequency: dict[int, list[float]], costs: dict[tuple[int, int], dict[int, int]],
                 non_expert_bytes: int, bits_choices: tuple[int, ...], group_size: int, symmetric: bool,
                 quantizer: str, sensitivity: dict, allocation: dict) -> dict:
    total_params = sum(g.expert_params * g.num_experts for g in groups)
    weighted = sum(g.expert_params * bits[(g.layer, e)] for g in groups for e in range(g.num_experts))
    ebytes = sum(costs[(g.layer, e)][bits[(g.layer, e)]] for g in groups for e in range(g.num_experts))
    return {
        "format_version": FORMAT_VERSION, "model": model_id, "revision": revision,
        "bits_choices": list(bits_choices), "group_size": group_size, "symmetric": symmetric,
        "quantizer": quantizer, "sensitivity": sensitivity, "allocation": allocation,
        "avg_bits": weighted / max(total_params, 1), "expert_bytes": ebytes,
        "total_bytes": ebytes + non_expert_bytes,
        "layers": [{"layer": g.layer, "module": g.path,
                    "experts": [{"expert": e, "bits": bits[(g.layer, e)], "sensitivity": float(scores[g.layer][e]),
                                 "frequency": float(frequency[g.layer][e]), "params": g.expert_params}
                                for e in range(g.num_experts)]}
                   for g in groups],
    }


def matrices_for_layer(chosen: dict[tuple[int, int], dict[str, QuantizedMatrix]]):
    def per_layer(g: ExpertGroup):
        return {e: chosen[(g.layer, e)] for e in range(g.num_experts)}
    return per_layer
