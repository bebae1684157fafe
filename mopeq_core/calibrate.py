"""Calibration: run tokens through the model and record, per layer and expert, what later stages need.

Recorded per expert: routed token count (frequency), the sum of squared input norms of each projection
(input-Hessian trace), and optionally the input second-moment matrix Σ x xᵀ of each projection (GPTQ).

Modes: ``routed`` statistics come from the tokens the router sent to each expert. With ``all_experts`` every token
also goes through every expert (the model's output still uses the routed result) so no expert is quantized blind;
in routed mode, experts that saw fewer than ``min_tokens`` tokens fall back to all-token statistics and are listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .moe import ExpertGroup


@dataclass
class CalibrationStats:
    counts: dict[int, torch.Tensor]  # layer -> int64 [E] routed tokens
    sq_norms: dict[tuple[int, str], torch.Tensor]  # (layer, proj) -> float64 [E] Σ‖x‖² of the projection input
    hessians: dict[tuple[int, str], torch.Tensor]  # (layer, proj) -> float32 [E, in, in] Σ x xᵀ (may be empty)
    tokens: int
    top_k: dict[int, int]
    fallback: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts using all-token statistics
    mode: str = "routed"

    def frequency(self, layer: int) -> torch.Tensor:
        c = self.counts[layer].double()
        return c / c.sum().clamp(min=1)

    def coverage(self) -> dict:
        covered = sum(int((c > 0).sum()) for c in self.counts.values())
        total = sum(c.numel() for c in self.counts.values())
        return {"experts": total, "experts_with_tokens": covered, "share": covered / max(total, 1),
                "min_tokens": min(int(c.min()) for c in self.counts.values()),
                "fallback_experts": sum(len(v) for v in self.fallback.values()), "mode": self.mode}

    def state(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict for safetensors / torch.save(weights_only) checkpoints."""
        out = {f"counts.{k}": v for k, v in self.counts.items()}
        out.update({f"sq.{k[0]}.{k[1]}": v for k, v in self.sq_norms.items()})
        out.update({f"h.{k[0]}.{k[1]}": v for k, v in self.hessians.items()})
        out.update({f"topk.{k}": torch.tensor(v) for k, v in self.top_k.items()})
        out.update({f"fallback.{k}": torch.tensor(v, dtype=torch.long) for k, v in self.fallback.items()})
        out["tokens"] = torch.tensor(self.tokens)
        return out

    @classmethod
    def from_state(cls, st: dict[str, torch.Tensor], mode: str = "routed") -> CalibrationStats:
        counts, sq, hs, topk, fb = {}, {}, {}, {}, {}
        for k, v in st.items():
            parts = k.split(".")
            if parts[0] == "counts":
                counts[int(parts[1])] = v
            elif parts[0] == "sq":
                sq[(int(parts[1]), parts[2])] = v
            elif parts[0] == "h":
                hs[(int(parts[1]), parts[2])] = v
            elif parts[0] == "topk":
                topk[int(parts[1])] = int(v)
            elif parts[0] == "fallback":
                fb[int(parts[1])] = v.tolist()
        return cls(counts, sq, hs, int(st["tokens"]), topk, fb, mode)


def _hook_args(args, kwargs):
    hidden = args[0] if args else kwargs.get("hidden_states")
    index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
    return hidden, index


class _Accumulator:
    """Per-expert sums for one pass. ``only`` limits which experts of each layer are recorded."""

    def __init__(self, groups: list[ExpertGroup], collect_hessians: bool, only: dict[int, set[int]] | None = None):
        self.only = only
        self.counts = {g.layer: torch.zeros(g.num_experts, dtype=torch.long) for g in groups}
        self.sq, self.hs = {}, {}
        for g in groups:
            for p in g.projections:
                self.sq[(g.layer, p.name)] = torch.zeros(g.num_experts, dtype=torch.float64)
                if collect_hessians and only is not None:  # only the listed experts' (all-token passes)
                    self.hs[(g.layer, p.name)] = {e: torch.zeros(p.in_features, p.in_features)
                                                  for e in only.get(g.layer, ())}
                elif collect_hessians:
                    self.hs[(g.layer, p.name)] = torch.zeros(g.num_experts, p.in_features, p.in_features)

    def wants(self, layer: int, e: int) -> bool:
        return self.only is None or e in self.only.get(layer, ())

    def _add(self, g: ExpertGroup, e: int, proj: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.sq[(g.layer, proj)][e] += float((x.double() ** 2).sum())
        if self.hs:
            h = self.hs[(g.layer, proj)]
            h[e] += (x.t() @ x).to(h[e].device, h[e].dtype)

    def add_expert_input(self, g: ExpertGroup, e: int, x: torch.Tensor) -> None:
        """Record tokens ``x`` [n, hidden] entering expert ``e``: its "in" projections and its intermediate."""
        self.counts[g.layer][e] += x.shape[0]
        for p in g.projections:
            if p.role == "in":
                self._add(g, e, p.name, x)
        inter = g.intermediate(e, x)
        for p in g.projections:
            if p.role == "out":
                self._add(g, e, p.name, inter)


def _install_hooks(model, groups: list[ExpertGroup], acc: _Accumulator, all_tokens: bool, top_k: dict[int, int]):
    """Forward pre-hooks that feed ``acc``: routed tokens, or (``all_tokens``) every token to every expert."""
    handles = []
    for g in groups:
        if g.kind == "fused":
            def fused_hook(module, args, kwargs, g=g):
                hidden, index = _hook_args(args, kwargs)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                top_k[g.layer] = int(index.shape[-1])
                for e in range(g.num_experts):
                    if not acc.wants(g.layer, e):
                        continue
                    x = hidden if all_tokens else hidden[(index == e).any(dim=-1)]
                    if x.shape[0]:
                        acc.add_expert_input(g, e, x)
            handles.append(g.module.register_forward_pre_hook(fused_hook, with_kwargs=True))
        elif all_tokens:
            # Per-expert Linear hooks only see routed tokens: take every token at the MoE block's input.
            block = model.get_submodule(g.path.rsplit(".", 1)[0])

            def block_hook(module, args, kwargs, g=g):
                hidden = args[0] if args else kwargs.get("hidden_states")
                hidden = hidden.reshape(-1, hidden.shape[-1])
                for e in range(g.num_experts):
                    if acc.wants(g.layer, e):
                        acc.add_expert_input(g, e, hidden)
            handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        else:
            for e in range(g.num_experts):
                def expert_hook(module, args, kwargs, g=g, e=e):
                    x = args[0] if args else next(iter(kwargs.values()))
                    if acc.wants(g.layer, e):
                        acc.add_expert_input(g, e, x.reshape(-1, x.shape[-1]))
                handles.append(g.module[e].register_forward_pre_hook(expert_hook, with_kwargs=True))
    return handles


def fill_starved(routed: _Accumulator, groups: list[ExpertGroup], all_token_pass, *, all_experts: bool,
                 min_tokens: int = 8) -> dict[int, set[int]]:
    """Experts that saw fewer than ``min_tokens`` routed tokens (every expert with ``all_experts``) get the
    statistics of every calibration token, from ``all_token_pass(accumulator)`` (hooks that send every token
    through them; the model's output still uses the routed result). Their sums are rescaled to the routed count
    (at least one) so scores stay comparable; in all-experts mode they are the plain all-token sums. Returns the
    starved experts per layer."""
    if all_experts:
        starved = {g.layer: set(range(g.num_experts)) for g in groups}
    else:
        starved = {g.layer: {e for e in range(g.num_experts) if int(routed.counts[g.layer][e]) < min_tokens}
                   for g in groups}
        starved = {k: v for k, v in starved.items() if v}
    if not starved:
        return starved
    alltok = _Accumulator(groups, bool(routed.hs), only=starved)
    all_token_pass(alltok)
    for layer, experts in starved.items():
        for e in experts:
            n_all = max(int(alltok.counts[layer][e]), 1)
            scale = 1.0 if all_experts else max(int(routed.counts[layer][e]), 1) / n_all
            for key in routed.sq:
                if key[0] == layer:
                    routed.sq[key][e] = alltok.sq[key][e] * scale
                    if routed.hs:
                        routed.hs[key][e] = alltok.hs[key][e] * scale
    return starved


def _run(model, samples, batch_size, should_stop, on_progress, hooks):
    # samples: token windows or an image+text SampleSet (data.iter_batches gives model-input dicts for both).
    from .data import iter_batches

    param = next(model.parameters())
    try:
        n = len(samples)
        done = 0
        for batch in iter_batches(samples, batch_size, param.device, dtype=param.dtype):
            if should_stop is not None:
                should_stop()
            batch.pop("labels", None)
            model(**batch)
            done += batch["input_ids"].shape[0]
            if on_progress is not None:
                on_progress(min(1.0, done / n))
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def calibrate(model, groups: list[ExpertGroup], samples, *, collect_hessians: bool = True,
              all_experts: bool = False, min_tokens: int = 8, batch_size: int = 8, should_stop=None,
              on_progress=None) -> CalibrationStats:
    top_k: dict[int, int] = {}
    routed = _Accumulator(groups, collect_hessians)
    progress = (lambda f: on_progress(0.5 * f)) if on_progress else None
    _run(model, samples, batch_size, should_stop, progress, _install_hooks(model, groups, routed, False, top_k))
    def all_token_pass(alltok: _Accumulator) -> None:  # every token through the starved experts
        progress = (lambda f: on_progress(0.5 + 0.5 * f)) if on_progress else None
        _run(model, samples, batch_size, should_stop, progress, _install_hooks(model, groups, alltok, True, {}))

    starved = fill_starved(routed, groups, all_token_pass, all_experts=all_experts, min_tokens=min_tokens)
    if not starved and on_progress:
        on_progress(1.0)
    fallback = {} if all_experts else {k: sorted(v) for k, v in starved.items()}
    n_tokens = int(samples.numel())  # positions through the MoE layers (image tokens too, for a SampleSet)
    for g in groups:
        # ModuleList experts are hooked one by one and never see the routing indices (their top-k stayed
        # unknown and was reported as 0): every routed token calls each of its experts once, so top-k is the
        # routed count per calibration token.
        if g.layer not in top_k and n_tokens:
            top_k[g.layer] = round(int(routed.counts[g.layer].sum()) / n_tokens)
    return CalibrationStats(routed.counts, routed.sq, routed.hs, n_tokens,
                            {g.layer: top_k.get(g.layer, 0) for g in groups}, fallback,
                            "all" if all_experts else "routed")
