"""Finds the routed experts of a loaded transformers model and gives one interface over their layouts.

Two layouts exist:
- ``fused``: transformers 5 ``*Experts`` modules (decorated with ``use_experts_implementation``) holding 3-D
  parameters ``gate_up_proj`` [E, 2F, H] (or ``up_proj`` when ``has_gate`` is False) and ``down_proj`` [E, H, F];
  ``is_transposed`` modules (gpt-oss, Aria) store each expert as [in, out] and may carry biases.
- ``modulelist``: an ``nn.ModuleList`` of per-expert MLPs made of ``nn.Linear`` (the native DeepSeek-VL2 and
  MolmoE of ``mopeq_core.models``, and remote code).

Every projection is exposed in ``nn.Linear`` orientation [out, in] so quantizers see one shape convention.
Shared experts and dense MLPs are not routed experts and stay out of the bit map.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NotMoEError, UnsupportedArchitectureError

# Per-expert Linear names, in the order the expert applies them: "in" projections read the layer input.
_LINEAR_ROLES = {
    "gate_proj": "in", "up_proj": "in", "w1": "in", "w3": "in", "fc1": "in", "gate_up_proj": "in",
    "down_proj": "out", "w2": "out", "fc2": "out",
}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Projection:
    name: str  # attribute name on the experts module (fused) or on each expert (modulelist)
    role: str  # "in" reads the MoE input; "out" reads the intermediate activation
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


class ExpertGroup:
    """The routed experts of one MoE layer."""

    def __init__(self, layer: int, path: str, module: nn.Module, kind: str, projections: list[Projection],
                 num_experts: int):
        self.layer = layer
        self.path = path
        self.module = module
        self.kind = kind
        self.projections = projections
        self.num_experts = num_experts

    def __repr__(self) -> str:
        return f"ExpertGroup(layer={self.layer}, path={self.path!r}, kind={self.kind}, E={self.num_experts})"

    @property
    def expert_params(self) -> int:
        return sum(p.params for p in self.projections)

    @property
    def transposed(self) -> bool:
        return self.kind == "fused" and bool(getattr(self.module, "is_transposed", False))

    def projection(self, name: str) -> Projection:
        for p in self.projections:
            if p.name == name:
                return p
        raise KeyError(name)

    # -- weights in [out, in] orientation ---------------------------------------------------------------------
    def parameter(self, proj: str, expert: int | None = None) -> nn.Parameter:
        """The parameter holding ``proj`` (the fused 3-D one, or expert ``expert``'s Linear weight)."""
        if self.kind == "fused":
            return getattr(self.module, proj)
        return getattr(self.module[expert], proj).weight

    def weight(self, expert: int, proj: str) -> torch.Tensor:
        if self.kind == "fused":
            w = getattr(self.module, proj)[expert]
            return w.t() if self.transposed else w
        return getattr(self.module[expert], proj).weight

    def set_weight(self, expert: int, proj: str, value: torch.Tensor) -> None:
        with torch.no_grad():
            dst = self.weight(expert, proj)
            dst.copy_(value.to(dtype=dst.dtype, device=dst.device))

    def grad_slice(self, tensor: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s slice of a tensor shaped like a fused parameter (any orientation)."""
        return tensor[expert] if self.kind == "fused" else tensor

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter, int | None]]:
        """(projection, parameter, expert or None for fused) for every parameter holding expert weights."""
        for p in self.projections:
            if self.kind == "fused":
                yield p.name, getattr(self.module, p.name), None
            else:
                for e in range(self.num_experts):
                    yield p.name, getattr(self.module[e], p.name).weight, e

    # -- the expert function, for statistics and packed execution -------------------------------------------
    def intermediate(self, expert: int, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None
                     ) -> torch.Tensor:
        """The input of the "out" projection for tokens ``x`` routed to ``expert``."""
        w = weights or {p.name: self.weight(expert, p.name) for p in self.projections if p.role == "in"}
        m = self.module
        if self.kind == "fused":
            name = "gate_up_proj" if getattr(m, "has_gate", True) else "up_proj"
            h = torch.nn.functional.linear(x, w[name].to(x.dtype), _bias(m, name, expert))
            if getattr(m, "has_gate", True):
                return m._apply_gate(h)
            return m.act_fn(h)
        expert_mod = m[expert]
        act = _expert_act(expert_mod)
        names = [p.name for p in self.projections if p.role == "in"]
        if len(names) == 2:  # gate (w1/gate_proj) and up (w3/up_proj)
            gate_name = "gate_proj" if "gate_proj" in names else "w1"
            up_name = "up_proj" if "up_proj" in names else "w3"
            g = torch.nn.functional.linear(x, w[gate_name].to(x.dtype), getattr(expert_mod, gate_name).bias)
            u = torch.nn.functional.linear(x, w[up_name].to(x.dtype), getattr(expert_mod, up_name).bias)
            return act(g) * u
        name = names[0]
        h = torch.nn.functional.linear(x, w[name].to(x.dtype), getattr(expert_mod, name).bias)
        if name == "gate_up_proj":
            g, u = h.chunk(2, dim=-1)
            return act(g) * u
        return act(h)


def _bias(module: nn.Module, proj: str, expert: int) -> torch.Tensor | None:
    if getattr(module, "has_bias", False):
        b = getattr(module, f"{proj}_bias", None)
        return None if b is None else b[expert]
    return None


def _expert_act(expert: nn.Module):
    for attr in ("act_fn", "act", "activation_fn", "activation"):
        fn = getattr(expert, attr, None)
        if callable(fn):
            return fn
    return torch.nn.functional.silu


def _layer_index(path: str, fallback: int) -> int:
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else fallback


def _fused_group(path: str, module: nn.Module, order: int) -> ExpertGroup:
    has_gate = getattr(module, "has_gate", True)
    transposed = bool(getattr(module, "is_transposed", False))
    if getattr(module, "has_post_expert_norm", False):
        raise UnsupportedArchitectureError(
            f"{path}: experts with a post-expert norm are not supported yet; use a model without it")
    names = ["gate_up_proj" if has_gate else "up_proj", "down_proj"]
    projections = []
    for name in names:
        p = getattr(module, name, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3:
            raise UnsupportedArchitectureError(f"{path}.{name} is not a 3-D expert parameter")
        e, a, b = p.shape
        out_f, in_f = (b, a) if transposed else (a, b)
        projections.append(Projection(name, "in" if name != "down_proj" else "out", out_f, in_f))
    return ExpertGroup(_layer_index(path, order), path, module, "fused", projections, int(p.shape[0]))


def _modulelist_group(path: str, module: nn.ModuleList, order: int) -> ExpertGroup | None:
    first = module[0]
    linears = {n: c for n, c in first.named_children() if isinstance(c, nn.Linear) and n in _LINEAR_ROLES}
    if not linears or not any(_LINEAR_ROLES[n] == "out" for n in linears):
        return None
    projections = [Projection(n, _LINEAR_ROLES[n], c.out_features, c.in_features) for n, c in linears.items()]
    projections.sort(key=lambda p: (p.role != "in", p.name))
    for i, expert in enumerate(module):
        for p in projections:
            lin = getattr(expert, p.name, None)
            if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != (p.out_features, p.in_features):
                raise UnsupportedArchitectureError(f"{path}.{i}.{p.name}: experts of one layer differ in shape")
    return ExpertGroup(_layer_index(path, order), path, module, "modulelist", projections, len(module))


def find_expert_groups(model: nn.Module) -> list[ExpertGroup]:
    """Every layer's routed experts, in layer order. Raises NotMoEError when there are none."""
    groups: list[ExpertGroup] = []
    for path, module in model.named_modules():
        leaf = path.rsplit(".", 1)[-1]
        if isinstance(module, nn.ModuleList):
            if leaf == "experts" and len(module) > 1:
                g = _modulelist_group(path, module, len(groups))
                if g is not None:
                    groups.append(g)
            continue
        if hasattr(module, "down_proj") and isinstance(module.down_proj, nn.Parameter) \
                and module.down_proj.dim() == 3:
            groups.append(_fused_group(path, module, len(groups)))
    if not groups:
        raise NotMoEError(
            f"{type(model).__name__} has no Mixture-of-Experts layer (no fused *Experts module and no 'experts' "
            "ModuleList of Linear experts); MoPEQ quantizes MoE models only - use a dense quantizer for this model")
    groups.sort(key=lambda g: g.layer)
    return groups


def expert_param_names(model: nn.Module, groups: list[ExpertGroup]) -> set[str]:
    """Names in model.state_dict() that hold routed-expert weights (not biases)."""
    names = set()
    for g in groups:
        for p in g.projections:
            if g.kind == "fused":
                names.add(f"{g.path}.{p.name}")
            else:
                names.update(f"{g.path}.{e}.{p.name}.weight" for e in range(g.num_experts))
    return names
