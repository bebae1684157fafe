"""Bit allocation: choose one width per expert (or per layer) within a byte budget.

Pure Python + numpy (no torch), so that the API can estimate and tests stay cheap.

Problem
-------
Each :class:`ExpertItem` offers the same set of widths ``b`` with a byte cost ``cost[b]`` (packed codes + scales +
zeros, see :mod:`mopeq_core.sizing`) and a quantization error ``error[b]``. With the (cleaned) sensitivity ``s_e``
the value of a choice is ``s_e * error_e(b)``. Allocators pick widths so that ``Σ cost ≤ budget`` and, for
``knapsack``, ``Σ value`` is minimal (HAWQ-V2's Ω with the real quantizer's error).

Allocators (registry :data:`ALLOCATORS`, keyed by name)
-------------------------------------------------------
``knapsack``
    Multiple-choice knapsack solved exactly. ``method="auto"`` (default) first solves the LP relaxation exactly
    (the Lagrangian dual: per-item lower convex hulls, increments sorted by efficiency = the critical λ) and
    rounds greedily; when the rounded solution meets the LP bound it is provably optimal and returned (the usual
    case for experts of equal size, whose cost increments are all equal). Otherwise a dynamic program over the
    gcd-reduced capacity solves it exactly (int8 choice table, only the band of capacities that backtracking can
    reach). When that table would exceed ``max_dp_cells`` the Lagrangian solution is returned with its duality
    gap in ``details`` and ``exact=False`` unless the gap is zero. ``method="dp"`` / ``"lagrangian"`` force one.
``tiers``
    The MoPEQ paper's clustering: exact weighted 1-D k-means of the scores (k = number of widths, fewer when
    there are fewer distinct scores), the most sensitive tier gets the most bits, then the budget is met by
    demoting the least sensitive experts and filled by promoting the most sensitive ones; monotone in the score.

Scope and granularity (handled by :func:`allocate` for every allocator)
-----------------------------------------------------------------------
``scope="model"``: one budget over all experts. ``scope="layer"``: write the budget as ``B = min + t·(max − min)``
and give each layer ``min_ℓ + ⌊t·(max_ℓ − min_ℓ)⌋`` (the same mean bits per layer, since costs are affine in
bits), then solve each layer alone. ``granularity="layer"``: one width for all experts of a layer (what serving
engines run): a layer's experts are merged into one item (costs summed, value of width b = Σ_e s_e·error_e(b),
score = Σ_e s_e) and the choice is expanded back. ``granularity="layer-projection"``: one width per (layer,
projection as the model stores it, e.g. fused ``gate_up_proj`` and ``down_proj``), what GGUF's per-projection expert
tensors and fused MoE weights can express. Each item must then carry ``proj_error`` / ``proj_cost`` /
``proj_params`` (per projection; they sum to ``error`` / ``cost`` / ``params``); the unit (ℓ, p) has cost
Σ_e proj_cost_e[p](b), value Σ_e s_e·proj_error_e[p](b) and score Σ_e s_e. The chosen widths are in
:attr:`Allocation.proj_bits`; :attr:`Allocation.bits` then holds each expert's width of its largest projection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from mopeq_core.errors import InfeasibleBudgetError, UserInputError

__all__ = [
    "ALLOCATORS",
    "ENGINE_GRANULARITIES",
    "Allocation",
    "ExpertItem",
    "Pool",
    "PoolSolution",
    "allocate",
    "avg_bits_for_budget",
    "projection_cost",
    "budget_for_avg_bits",
    "feasible_range",
    "register_allocator",
]

DEFAULT_MAX_DP_CELLS = 300_000_000  # int8 cells of the DP choice table (≈ 300 MB) before falling back
SCOPES = ("model", "layer")
# Which granularities each serving target can run (docs/EXPORTS.md has the reasons): the widths one loader can express
# inside a MoE layer. Keys are "engine (--format)".
ENGINE_GRANULARITIES: dict[str, tuple[str, ...]] = {
    "mopeq loader (mopeq)": ("expert", "layer-projection", "layer"),
    "llama.cpp (gguf)": ("layer-projection", "layer"),
    "transformers (compressed-tensors)": ("layer",),
    "vLLM (compressed-tensors)": ("layer",),
    "SGLang (compressed-tensors)": ("layer",),
    "GPTQModel (gptq)": ("expert", "layer-projection", "layer"),
    "vLLM (gptq)": ("layer",),
}
GRANULARITIES = ("expert", "layer", "layer-projection")


# --------------------------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertItem:
    """One expert as the allocator sees it."""

    layer: int
    expert: int
    params: int  # weights in the expert (all projections)
    sensitivity: float  # score s_e; negative or NaN scores are treated as 0 (see _clean_score)
    error: dict[int, float]  # bits -> ‖Q_b(W_e) − W_e‖² with the real quantizer (sum over projections)
    cost: dict[int, int]  # bits -> bytes of the packed expert at that width (codes + scales + zeros)
    # Per projection (needed by granularity="layer-projection" only), each summing over projections to the field
    # above: projection name -> bits -> error; -> bits -> bytes (see projection_cost); -> weights.
    proj_error: dict[str, dict[int, float]] | None = None
    proj_params: dict[str, int] | None = None
    proj_cost: dict[str, dict[int, int]] | None = None


@dataclass
class Allocation:
    bits: dict[tuple[int, int], int]  # (layer, expert) -> width
    total_bytes: int
    objective: float  # Σ s_e · error_e(b_e)
    exact: bool  # True when provably optimal (for knapsack, under the scope's constraints)
    feasible_range: tuple[int, int]  # (all at min width, all at max width) in bytes
    details: dict = field(default_factory=dict)  # solver, DP size, duality gap, per-layer budgets, ...
    # granularity="layer-projection" only: (layer, projection) -> width; every expert of the layer uses it
    proj_bits: dict[tuple[int, str], int] | None = None


@dataclass
class Pool:
    """What a registered allocator solves: ``n`` units (experts or merged layers), ``k`` widths (ascending).

    ``cost[i, j]`` bytes and ``value[i, j]`` (= s·error) of unit ``i`` at ``widths[j]``; ``score[i]`` the cleaned
    sensitivity (used by score-based allocators); ``keys[i]`` the unit's (layer, expert) key (expert −1 for a
    merged layer). Units are in key order.
    """

    keys: list[tuple[int, int]]
    widths: tuple[int, ...]
    cost: np.ndarray  # (n, k) int64
    value: np.ndarray  # (n, k) float64
    score: np.ndarray  # (n,) float64


@dataclass
class PoolSolution:
    choice: np.ndarray  # (n,) index into Pool.widths
    exact: bool
    details: dict = field(default_factory=dict)


SolverFn = Callable[..., PoolSolution]  # (pool: Pool, budget: int, **options) -> PoolSolution
ALLOCATORS: dict[str, SolverFn] = {}


def register_allocator(name: str) -> Callable[[SolverFn], SolverFn]:
    """Register ``fn(pool, budget, **options) -> PoolSolution`` under ``name`` (usable by :func:`allocate`)."""

    def deco(fn: SolverFn) -> SolverFn:
        ALLOCATORS[name] = fn
        return fn

    return deco


# --------------------------------------------------------------------------------------------------------------
# Validation and helpers
# --------------------------------------------------------------------------------------------------------------
def _clean_score(s: float) -> float:
    """Sensitivity as used by the allocators.

    Negative and NaN scores (noise of a stochastic trace estimate, a dead expert) are treated as 0: the expert is
    insensitive. +inf (an overflowing estimate) is kept as the largest float, i.e. "most sensitive".
    """
    s = float(s)
    if math.isnan(s) or s < 0:
        return 0.0
    if math.isinf(s):
        return float(np.finfo(np.float64).max)
    return s


def _widths_of(items: list[ExpertItem]) -> tuple[int, ...]:
    if not items:
        raise ValueError("no expert items to allocate")
    widths = tuple(sorted(items[0].cost))
    if not widths:
        raise ValueError("expert items carry no bit widths")
    for it in items:
        if tuple(sorted(it.cost)) != widths or tuple(sorted(it.error)) != widths:
            raise ValueError(
                f"expert (layer {it.layer}, expert {it.expert}) has widths cost={sorted(it.cost)} "
                f"error={sorted(it.error)}; every item must carry the same widths {list(widths)}"
            )
    if len(widths) > 127:
        raise ValueError("at most 127 widths are supported")
    return widths


def _arrays(items: list[ExpertItem], widths: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cost = np.array([[it.cost[b] for b in widths] for it in items], dtype=np.int64).reshape(len(items), -1)
    err = np.array([[it.error[b] for b in widths] for it in items], dtype=np.float64).reshape(len(items), -1)
    if (cost < 0).any():
        raise ValueError("byte costs must be non-negative")
    bad = ~np.isfinite(err) | (err < 0)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        it = items[int(i)]
        raise ValueError(
            f"quantization error of (layer {it.layer}, expert {it.expert}) at {widths[int(j)]} bits is "
            f"{err[i, j]!r}; errors must be finite and non-negative"
        )
    score = np.array([_clean_score(it.sensitivity) for it in items], dtype=np.float64)
    return cost, err, score


def feasible_range(items: list[ExpertItem]) -> tuple[int, int]:
    """(bytes with every expert at its smallest option, bytes with every expert at its largest option)."""
    widths = _widths_of(items)
    cost = np.array([[it.cost[b] for b in widths] for it in items], dtype=np.int64)
    return int(cost.min(axis=1).sum()), int(cost.max(axis=1).sum())


def _width_totals(items: list[ExpertItem], widths: tuple[int, ...]) -> list[int]:
    return [int(sum(int(it.cost[b]) for it in items)) for b in widths]


def budget_for_avg_bits(items: list[ExpertItem], avg_bits: float) -> int:
    """Bytes when every expert sat at the (possibly fractional) mean width ``avg_bits``.

    Each item's cost is interpolated linearly in bits between the two neighbouring widths (extrapolated from the
    first/last pair outside the range), summed exactly and floored: at a listed width it is exactly the cost of all
    experts at that width. All items share the widths, so the sum of the interpolations is the interpolation of
    the per-width totals, computed here in exact rational arithmetic.
    """
    widths = _widths_of(items)
    totals = _width_totals(items, widths)
    a = Fraction(avg_bits)
    if len(widths) == 1:
        if a < widths[0]:
            raise InfeasibleBudgetError(
                f"{float(a):g} mean bits is below the only available width {widths[0]}",
                feasible=(totals[0], totals[0]),
                unit="bytes",
            )
        return totals[0]
    j = 0
    while j < len(widths) - 2 and a > widths[j + 1]:
        j += 1
    w0, w1, c0, c1 = widths[j], widths[j + 1], totals[j], totals[j + 1]
    return math.floor(c0 + (a - w0) * Fraction(c1 - c0, w1 - w0))


def avg_bits_for_budget(items: list[ExpertItem], budget_bytes: float) -> float:
    """Inverse of :func:`budget_for_avg_bits`: the mean width that a byte budget corresponds to."""
    widths = _widths_of(items)
    totals = _width_totals(items, widths)
    if len(widths) == 1:
        return float(widths[0])
    j = 0
    while j < len(widths) - 2 and budget_bytes > totals[j + 1]:
        j += 1
    w0, w1, c0, c1 = widths[j], widths[j + 1], totals[j], totals[j + 1]
    if c1 == c0:
        return float(w1 if budget_bytes >= c1 else w0)
    return float(w0 + (budget_bytes - c0) * (w1 - w0) / (c1 - c0))


def projection_cost(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Bytes of one expert projection ``[out, in]`` packed at ``bits`` (codes + float16 scales + zeros when
    asymmetric): the per-projection term of ``apply.expert_cost``, which is the sum of this over the projections."""
    from mopeq_core.sizing import matrix_bytes

    return matrix_bytes(out_features, in_features, bits, group_size, symmetric)


def _projection_units(items: list[ExpertItem], widths: tuple[int, ...], score: np.ndarray):
    """Per-projection arrays for granularity="layer-projection": (names per layer, cost (n, P, k), value (n, P, k))
    where P is the number of projections of the item's layer (padded with zero-cost, zero-value slots)."""
    names: dict[int, tuple[str, ...]] = {}
    for it in items:
        missing = [f for f in ("proj_error", "proj_cost", "proj_params") if getattr(it, f) is None]
        if missing:
            raise UserInputError(
                f"granularity 'layer-projection' needs per-projection errors, costs and sizes, but expert (layer "
                f"{it.layer}, expert {it.expert}) has no {', '.join(missing)}: the engine must fill "
                "ExpertItem.proj_error / proj_cost / proj_params")
        ps = tuple(sorted(it.proj_error))
        if tuple(sorted(it.proj_cost)) != ps or tuple(sorted(it.proj_params)) != ps or not ps:
            raise ValueError(f"expert (layer {it.layer}, expert {it.expert}): proj_error, proj_cost and proj_params "
                             "must name the same (non-empty) projections")
        if names.setdefault(it.layer, ps) != ps:
            raise ValueError(f"layer {it.layer}: experts name different projections ({list(names[it.layer])} vs "
                             f"{list(ps)})")
        for p in ps:
            if tuple(sorted(it.proj_error[p])) != widths or tuple(sorted(it.proj_cost[p])) != widths:
                raise ValueError(f"expert (layer {it.layer}, expert {it.expert}) projection {p!r} must carry the "
                                 f"widths {list(widths)}")
        if sum(it.proj_params.values()) != it.params:
            raise ValueError(f"expert (layer {it.layer}, expert {it.expert}): proj_params sum to "
                             f"{sum(it.proj_params.values())}, params is {it.params}")
        for b in widths:
            c = sum(int(it.proj_cost[p][b]) for p in ps)
            e = math.fsum(float(it.proj_error[p][b]) for p in ps)
            if c != int(it.cost[b]):
                raise ValueError(f"expert (layer {it.layer}, expert {it.expert}) at {b} bits: proj_cost sums to {c}, "
                                 f"cost is {it.cost[b]}")
            if not math.isclose(e, float(it.error[b]), rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(f"expert (layer {it.layer}, expert {it.expert}) at {b} bits: proj_error sums to "
                                 f"{e!r}, error is {it.error[b]!r}")
    P = max(len(v) for v in names.values())
    n, k = len(items), len(widths)
    pcost = np.zeros((n, P, k), dtype=np.int64)
    pvalue = np.zeros((n, P, k))
    for i, it in enumerate(items):
        for j, p in enumerate(names[it.layer]):
            pcost[i, j] = [int(it.proj_cost[p][b]) for b in widths]
            pvalue[i, j] = [score[i] * float(it.proj_error[p][b]) for b in widths]
    return names, pcost, pvalue


def _chosen_cost(cost: np.ndarray, choice: np.ndarray) -> int:
    return int(cost[np.arange(len(choice)), choice].sum())


# --------------------------------------------------------------------------------------------------------------
# knapsack: Lagrangian / LP relaxation with greedy rounding and repair
# --------------------------------------------------------------------------------------------------------------
def _lagrangian(cost: np.ndarray, value: np.ndarray, budget: int) -> tuple[np.ndarray, dict]:
    """Exact LP relaxation of the multiple-choice knapsack + greedy rounding + local repair.

    Returns (choice, info) with info["lower_bound"] (the LP = Lagrangian dual optimum), info["gap"] (primal −
    bound), info["lambda"] (the critical multiplier) and info["integral"] (LP optimum is integral, so the rounded
    solution is optimal).
    """
    n, k = cost.shape
    cost_l = cost.tolist()
    value_l = value.tolist()
    start = np.empty(n, dtype=np.int64)
    inc_item: list[int] = []
    inc_step: list[int] = []
    inc_dc: list[int] = []
    inc_dv: list[float] = []
    hull_pts: list[list[int]] = []
    order_desc = list(range(k - 1, -1, -1))
    for i in range(n):
        c, v = cost_l[i], value_l[i]
        # options by cost asc, then value asc, then wider first (deterministic ties)
        opts = sorted(order_desc, key=lambda j: (c[j], v[j], -j))
        hull = [opts[0]]
        for j in opts[1:]:
            if not v[j] < v[hull[-1]] or c[j] == c[hull[-1]]:
                continue  # not an improvement: never on the lower hull
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b lies strictly above segment a–j: drop it (collinear points are kept)
                if (v[b] - v[a]) * (c[j] - c[b]) > (v[j] - v[b]) * (c[b] - c[a]):
                    hull.pop()
                else:
                    break
            hull.append(j)
        start[i] = hull[0]
        hull_pts.append(hull)
        for s in range(1, len(hull)):
            inc_item.append(i)
            inc_step.append(s)
            inc_dc.append(c[hull[s]] - c[hull[s - 1]])
            inc_dv.append(v[hull[s]] - v[hull[s - 1]])

    choice = start.copy()
    slack = int(budget - _chosen_cost(cost, choice))
    v0 = float(value[np.arange(n), choice].sum())
    info: dict = {"lambda": 0.0, "integral": True}
    if not inc_item:
        info.update(lower_bound=v0, gap=0.0)
        return choice, info
    item_a = np.array(inc_item, dtype=np.int64)
    step_a = np.array(inc_step, dtype=np.int64)
    dc_a = np.array(inc_dc, dtype=np.int64)
    dv_a = np.array(inc_dv, dtype=np.float64)
    eff = -dv_a / dc_a
    order = np.lexsort((step_a, item_a, -eff))
    cum = np.cumsum(dc_a[order])
    crit = int(np.searchsorted(cum, slack, side="right"))  # first increment that does not fit
    taken = order[:crit]
    # the within-item order is respected: efficiencies decrease along a hull (ties ordered by step)
    next_step = np.ones(n, dtype=np.int64)
    for t in taken.tolist():
        i = inc_item[t]
        choice[i] = hull_pts[i][inc_step[t]]
        next_step[i] = inc_step[t] + 1
    used = int(cum[crit - 1]) if crit > 0 else 0
    rem = slack - used
    lp = v0 + float(dv_a[taken].sum())
    if crit < len(order):
        t = int(order[crit])
        info["lambda"] = float(eff[t])
        if rem > 0:
            info["integral"] = False
            lp += rem / int(dc_a[t]) * float(dv_a[t])
        # greedy fill: the remaining increments in efficiency order, each item's steps consecutive
        blocked = np.zeros(n, dtype=bool)
        for t in order[crit:].tolist():
            i = inc_item[t]
            if blocked[i] or inc_step[t] != next_step[i]:
                blocked[i] = True
                continue
            if inc_dc[t] <= rem:
                rem -= inc_dc[t]
                choice[i] = hull_pts[i][inc_step[t]]
                next_step[i] += 1
            else:
                blocked[i] = True
    # repair: best single-item move (any option, also off the hull) that lowers the value and fits the slack
    rows = np.arange(n)
    for _ in range(min(n * k, 2000)):  # each move strictly lowers the value; cap the rare long tail
        cur_c = cost[rows, choice]
        cur_v = value[rows, choice]
        dv = value - cur_v[:, None]
        ok = (cost - cur_c[:, None] <= rem) & (dv < 0)
        if not ok.any():
            break
        dv = np.where(ok, dv, np.inf)
        flat = int(np.argmin(dv))  # first minimum: lowest item, then lowest option index
        i, j = divmod(flat, k)
        rem -= int(cost[i, j] - cur_c[i])
        choice[i] = j
    # neutral fill: spend leftover bytes on wider options that do not raise the value (zero-sensitivity experts)
    for i in range(n):
        for j in range(k - 1, choice[i], -1):
            d = cost_l[i][j] - cost_l[i][choice[i]]
            if value_l[i][j] <= value_l[i][choice[i]] and 0 <= d <= rem:
                rem -= d
                choice[i] = j
                break
    primal = float(value[rows, choice].sum())
    scale = float(np.abs(value).max(axis=1).sum()) or 1.0
    gap = max(0.0, primal - lp)
    if gap <= 1e-12 * scale:  # floating-point noise of summing in different orders
        gap = 0.0
    info.update(lower_bound=lp, gap=gap)
    return choice, info


# --------------------------------------------------------------------------------------------------------------
# knapsack: exact DP over the gcd-reduced capacity
# --------------------------------------------------------------------------------------------------------------
def _dp_plan(cost: np.ndarray, budget: int) -> dict:
    base = cost.min(axis=1)
    inc = cost - base[:, None]
    pos = inc[inc > 0]
    g = int(np.gcd.reduce(pos)) if pos.size else 1
    red = inc // g
    maxinc = red.max(axis=1)
    total = int(maxinc.sum())
    cap = min(int((budget - int(base.sum())) // g), total)
    prefix = np.cumsum(maxinc)
    suffix = total - prefix  # Σ maxinc after item i
    lo = np.maximum(0, cap - suffix)  # capacities that backtracking from `cap` can reach after item i
    hi = np.minimum(cap, prefix)  # beyond Σ maxinc so far the table is flat
    width = hi - lo + 1
    return {
        "g": g,
        "red": red,
        "maxinc": maxinc,
        "cap": cap,
        "lo": lo,
        "hi": hi,
        "width": width,
        "cells": int(width.sum()),
    }


def _dp(cost: np.ndarray, value: np.ndarray, plan: dict) -> tuple[np.ndarray, float]:
    """Exact multiple-choice knapsack DP; dp_i[c] = min value of items 0..i with reduced cost ≤ c.

    Options are tried from the widest down and only a strictly smaller value replaces the incumbent, so ties go to
    the wider option. Only the band [lo_i, hi_i] of each row is computed and stored (int8 choices).
    """
    n, k = cost.shape
    red, maxinc, lo, hi, width = plan["red"], plan["maxinc"], plan["lo"], plan["hi"], plan["width"]
    offsets = np.concatenate([[0], np.cumsum(width)])
    table = np.empty(int(offsets[-1]), dtype=np.int8)
    opt_order = list(range(k - 1, -1, -1))
    red_l = red.tolist()
    val_l = value.tolist()
    lo_l, hi_l, m_l, off_l = lo.tolist(), hi.tolist(), maxinc.tolist(), offsets.tolist()
    old = np.zeros(1)
    old_lo, old_hi = 0, 0
    inf = np.inf
    for i in range(n):
        lo_i, hi_i, m = lo_l[i], hi_l[i], m_l[i]
        start = lo_i - m  # capacity coordinate of ext[0]
        ext = np.empty(hi_i - start + 1)
        neg = min(max(-start, 0), ext.size)
        ext[:neg] = inf  # negative capacity: infeasible
        a, b = max(start, old_lo), min(hi_i, old_hi)
        if a <= b:
            ext[a - start : b - start + 1] = old[a - old_lo : b - old_lo + 1]
        if hi_i > old_hi:
            ext[max(old_hi + 1, start) - start :] = old[-1]  # flat beyond Σ maxinc of previous items
        w = hi_i - lo_i + 1
        ch = table[off_l[i] : off_l[i + 1]]
        ch[:] = 0
        best = None
        r, vv = red_l[i], val_l[i]
        for t, j in enumerate(opt_order):
            d = r[j]
            cand = ext[m - d : m - d + w]
            cand = cand + vv[j]
            if best is None:
                best = cand
            else:
                better = cand < best
                ch[better] = t
                np.minimum(best, cand, out=best)
        old, old_lo, old_hi = best, lo_i, hi_i
    # backtrack from the full capacity
    choice = np.empty(n, dtype=np.int64)
    c = plan["cap"]
    for i in range(n - 1, -1, -1):
        ce = min(c, hi_l[i])
        j = opt_order[int(table[off_l[i] + ce - lo_l[i]])]
        choice[i] = j
        c = ce - red_l[i][j]
    return choice, float(old[-1])


@register_allocator("knapsack")
def _knapsack(
    pool: Pool, budget: int, *, method: str = "auto", max_dp_cells: int | None = None, **_: object
) -> PoolSolution:
    if method not in ("auto", "dp", "lagrangian"):
        raise UserInputError(f"unknown knapsack method {method!r}; use auto, dp or lagrangian")
    max_cells = DEFAULT_MAX_DP_CELLS if max_dp_cells is None else int(max_dp_cells)
    cost, value = pool.cost, pool.value
    n, k = cost.shape
    rows = np.arange(n)
    # unconstrained optimum (widest among ties); optimal whenever it fits
    free = (k - 1) - np.argmin(value[:, ::-1], axis=1)
    if _chosen_cost(cost, free) <= budget:
        return PoolSolution(free, True, {"solver": "unconstrained", "gap": 0.0})
    lag = None
    if method in ("auto", "lagrangian"):
        choice, info = _lagrangian(cost, value, budget)
        lag = (choice, info)
        d = {
            "solver": "lagrangian",
            "gap": info["gap"],
            "lower_bound": info["lower_bound"],
            "lambda": info["lambda"],
        }
        if method == "lagrangian" or info["gap"] == 0.0:
            if method == "auto":
                d["solver"] = "lagrangian-certified"
            return PoolSolution(choice, info["gap"] == 0.0, d)
    plan = _dp_plan(cost, budget)
    d = {
        "dp_cells": plan["cells"],
        "dp_capacity": plan["cap"],
        "cost_gcd": plan["g"],
        "max_dp_cells": max_cells,
    }
    if plan["cells"] > max_cells:
        if lag is None:
            lag = _lagrangian(cost, value, budget)
        choice, info = lag
        d.update(
            solver="lagrangian",
            gap=info["gap"],
            lower_bound=info["lower_bound"],
            **{"lambda": info["lambda"]},
            fallback=f"DP table of {plan['cells']:,} cells exceeds max_dp_cells={max_cells:,}",
        )
        return PoolSolution(choice, info["gap"] == 0.0, d)
    choice, opt = _dp(cost, value, plan)
    d.update(solver="dp", gap=0.0, optimum=opt)
    if lag is not None:
        d["lagrangian_gap"] = lag[1]["gap"]
    assert _chosen_cost(cost, choice) <= budget
    assert abs(float(value[rows, choice].sum()) - opt) <= 1e-9 * max(1.0, abs(opt))
    return PoolSolution(choice, True, d)


# --------------------------------------------------------------------------------------------------------------
# tiers: exact 1-D k-means of the scores, then budget repair
# --------------------------------------------------------------------------------------------------------------
def _kmeans1d(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Optimal weighted 1-D k-means of sorted distinct ``x`` (weights ``w``) into ``k`` contiguous clusters.

    DP over prefix sums, each layer computed by divide and conquer on the monotone argmin (vectorised level by
    level), O(k·u·log u). Ties go to the smaller split point. Returns the cluster index (0 = lowest) of each x.
    """
    u = len(x)
    k = max(1, min(k, u))
    if k == 1:
        return np.zeros(u, dtype=np.int64)
    sd = float(x.std())
    z = (x - float(np.average(x, weights=w))) / (sd if sd > 0 else 1.0)
    W = np.concatenate([[0.0], np.cumsum(w, dtype=np.float64)])
    S = np.concatenate([[0.0], np.cumsum(w * z)])
    Q = np.concatenate([[0.0], np.cumsum(w * z * z)])

    def seg_cost(i: np.ndarray, j: np.ndarray) -> np.ndarray:  # SSE of x[i:j]
        s = S[j] - S[i]
        return np.maximum(Q[j] - Q[i] - s * s / (W[j] - W[i]), 0.0)

    jj = np.arange(u + 1)
    D = np.full(u + 1, np.inf)
    D[1:] = seg_cost(np.zeros(u, dtype=np.int64), jj[1:])
    opts = []
    for m in range(2, k + 1):
        Dn = np.full(u + 1, np.inf)
        opt = np.zeros(u + 1, dtype=np.int64)
        jlo, jhi = np.array([m]), np.array([u])
        ilo, ihi = np.array([m - 1]), np.array([u - 1])
        while jlo.size:
            mid = (jlo + jhi) // 2
            a, b = ilo, np.minimum(ihi, mid - 1)
            lens = b - a + 1
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
            seg = np.repeat(np.arange(len(mid)), lens)
            i = a[seg] + (np.arange(int(lens.sum())) - starts[seg])
            val = D[i] + seg_cost(i, mid[seg])
            mins = np.minimum.reduceat(val, starts)
            hit = np.flatnonzero(val == mins[seg])
            _, first = np.unique(seg[hit], return_index=True)
            best = i[hit[first]]
            Dn[mid] = mins
            opt[mid] = best
            left = jlo <= mid - 1
            right = mid + 1 <= jhi
            jlo, jhi, ilo, ihi = (
                np.concatenate([jlo[left], (mid + 1)[right]]),
                np.concatenate([(mid - 1)[left], jhi[right]]),
                np.concatenate([ilo[left], best[right]]),
                np.concatenate([best[left], ihi[right]]),
            )
        D = Dn
        opts.append(opt)
    labels = np.empty(u, dtype=np.int64)
    j = u
    for m in range(k, 1, -1):
        i = int(opts[m - 2][j])
        labels[i:j] = m - 1
        j = i
    labels[:j] = 0
    return labels


@register_allocator("tiers")
def _tiers(pool: Pool, budget: int, **_: object) -> PoolSolution:
    cost, score = pool.cost, pool.score
    n, k = cost.shape
    if (np.diff(cost, axis=1) < 0).any():
        raise ValueError("tiers needs byte costs that do not decrease with the width")
    uniq, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    m = min(k, len(uniq))
    labels = _kmeans1d(uniq, counts.astype(np.float64), m)
    tier = labels[inverse]
    choice = (k - m + tier).astype(
        np.int64
    )  # most sensitive tier -> widest; fewer tiers sit at the top widths
    centers = [float(np.average(uniq[labels == t], weights=counts[labels == t])) for t in range(m)]
    tier_sizes = [int((tier == t).sum()) for t in range(m)]
    cost_l = cost.tolist()
    ch = choice.tolist()
    total = sum(cost_l[i][ch[i]] for i in range(n))
    asc = np.lexsort((np.arange(n), score)).tolist()  # least sensitive first, key order among ties
    demoted = promoted = 0
    # over budget: demote the least sensitive expert above the minimum width, one step at a time
    for i in asc:
        if total <= budget:
            break
        while total > budget and ch[i] > 0:
            total -= cost_l[i][ch[i]] - cost_l[i][ch[i] - 1]
            ch[i] -= 1
            demoted += 1
    # slack: promote the most sensitive expert below the maximum by one step while it fits. An expert is only
    # promoted up to the narrowest width held by a strictly more sensitive one, so bits stay monotone in the score
    # (a less sensitive expert may take a step the more sensitive one could not afford only up to that width).
    desc = asc[::-1]
    cap = k - 1
    p = 0
    while p < n:
        q = p
        while q < n and score[desc[q]] == score[desc[p]]:
            q += 1
        group = sorted(desc[p:q])
        for i in group:
            while ch[i] < cap and cost_l[i][ch[i] + 1] - cost_l[i][ch[i]] <= budget - total:
                total += cost_l[i][ch[i] + 1] - cost_l[i][ch[i]]
                ch[i] += 1
                promoted += 1
        cap = min(cap, min(ch[i] for i in group))
        p = q
    choice = np.array(ch, dtype=np.int64)
    return PoolSolution(
        choice,
        False,
        {
            "solver": "tiers",
            "tiers": m,
            "tier_centers": centers,
            "tier_sizes": tier_sizes,
            "demotions": demoted,
            "promotions": promoted,
        },
    )


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------
def _infeasible(items: list[ExpertItem], budget: float, lo: int, hi: int, widths: tuple[int, ...]) -> None:
    raise InfeasibleBudgetError(
        f"budget of {int(budget):,} bytes (~{avg_bits_for_budget(items, budget):.3f} mean bits) is below the "
        f"smallest possible size: the feasible range is {lo:,} to {hi:,} bytes "
        f"({avg_bits_for_budget(items, lo):.3f} to {avg_bits_for_budget(items, hi):.3f} mean bits, all experts "
        f"at {widths[0]} to all at {widths[-1]} bits). Raise the budget or offer a narrower bit width.",
        feasible=(lo, hi),
        unit="bytes",
    )


def allocate(
    items: list[ExpertItem],
    budget_bytes: int,
    *,
    allocator: str = "knapsack",
    scope: str = "model",
    granularity: str = "expert",
    **options: object,
) -> Allocation:
    """Choose a width per expert so that the packed experts take at most ``budget_bytes``.

    Extra keyword ``options`` go to the allocator (knapsack: ``method="auto"|"dp"|"lagrangian"``,
    ``max_dp_cells``). Raises :class:`InfeasibleBudgetError` when the budget is below the all-minimum size; a
    budget at or above the all-maximum size gives every expert the widest width.
    """
    t0 = time.perf_counter()
    if allocator not in ALLOCATORS:
        raise UserInputError(f"unknown allocator {allocator!r}; choose one of {sorted(ALLOCATORS)}")
    if scope not in SCOPES:
        raise UserInputError(f"unknown scope {scope!r}; choose one of {list(SCOPES)}")
    if granularity not in GRANULARITIES:
        raise UserInputError(f"unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}")
    if isinstance(budget_bytes, float) and not math.isfinite(budget_bytes):
        raise UserInputError(f"budget must be a finite number of bytes, got {budget_bytes!r}")
    budget = math.floor(budget_bytes)
    items = sorted(items, key=lambda it: (it.layer, it.expert))
    keys = [(it.layer, it.expert) for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate (layer, expert) items")
    base_details = {
        "allocator": allocator,
        "scope": scope,
        "granularity": granularity,
        "budget_bytes": budget,
    }
    if not items:
        if budget < 0:
            raise InfeasibleBudgetError("budget is negative", feasible=(0, 0), unit="bytes")
        return Allocation({}, 0, 0.0, True, (0, 0), base_details)
    widths = _widths_of(items)
    cost, err, score = _arrays(items, widths)
    value = score[:, None] * err
    n, k = cost.shape
    layers = np.array([it.layer for it in items])

    # units: experts, or one merged item per layer
    if granularity == "layer":
        ulayers, uidx = np.unique(layers, return_inverse=True)
        u_cost = np.zeros((len(ulayers), k), dtype=np.int64)
        u_value = np.zeros((len(ulayers), k))
        u_score = np.zeros(len(ulayers))
        np.add.at(u_cost, uidx, cost)
        np.add.at(u_value, uidx, value)
        np.add.at(u_score, uidx, score)
        u_keys = [(int(l), -1) for l in ulayers]
        u_layers = ulayers
    elif granularity == "layer-projection":
        names, pcost, pvalue = _projection_units(items, widths, score)
        unit_of: dict[tuple[int, int], int] = {}
        u_keys = []
        for layer in sorted(names):
            for j in range(len(names[layer])):
                unit_of[(layer, j)] = len(u_keys)
                u_keys.append((layer, j - len(names[layer])))  # negative "expert" index, ascending with j
        u_layers = np.array([k_[0] for k_ in u_keys])
        u_cost = np.zeros((len(u_keys), k), dtype=np.int64)
        u_value = np.zeros((len(u_keys), k))
        u_score = np.zeros(len(u_keys))
        for i, it in enumerate(items):
            for j in range(len(names[it.layer])):
                u = unit_of[(it.layer, j)]
                u_cost[u] += pcost[i, j]
                u_value[u] += pvalue[i, j]
                u_score[u] += score[i]
    else:
        uidx = np.arange(n)
        u_cost, u_value, u_score, u_keys, u_layers = cost, value, score, keys, layers

    # feasible range of the units (equal to the experts' unless a cost falls with the width)
    lo, hi = int(u_cost.min(axis=1).sum()), int(u_cost.max(axis=1).sum())
    if budget < lo:
        _infeasible(items, budget_bytes, lo, hi, widths)
    details = dict(base_details)
    details["widths"] = list(widths)
    exact = True
    u_choice = np.empty(len(u_keys), dtype=np.int64)
    fn = ALLOCATORS[allocator]
    if scope == "model":
        groups = [(None, np.arange(len(u_keys)), budget)]
    else:
        # B = min + t·(max − min); layer ℓ gets min_ℓ + ⌊t·(max_ℓ − min_ℓ)⌋ (exact integer arithmetic)
        groups = []
        for layer in np.unique(u_layers):
            idx = np.flatnonzero(u_layers == layer)
            lmin = int(u_cost[idx].min(axis=1).sum())
            lmax = int(u_cost[idx].max(axis=1).sum())
            lb = lmin + ((budget - lo) * (lmax - lmin)) // (hi - lo) if hi > lo else lmax
            groups.append((int(layer), idx, lb))
        details["layer_budgets"] = {g[0]: g[2] for g in groups}
    sub = []
    for layer, idx, b in groups:
        pool = Pool([u_keys[i] for i in idx], widths, u_cost[idx], u_value[idx], u_score[idx])
        sol = fn(pool, b, **options)
        choice = np.asarray(sol.choice, dtype=np.int64)
        if _chosen_cost(pool.cost, choice) > b:
            raise AssertionError(f"allocator {allocator!r} exceeded its budget")  # never by construction
        u_choice[idx] = choice
        exact = exact and bool(sol.exact)
        sub.append(sol.details if layer is None else {"layer": layer, **sol.details})
    if scope == "model":
        details.update(sub[0])
    else:
        details["per_layer"] = sub
        gaps = [s.get("gap") for s in sub if s.get("gap") is not None]
        details["solver"] = ",".join(sorted({str(s.get("solver")) for s in sub}))
        if gaps:
            details["gap"] = float(sum(gaps))

    proj_bits = None
    if granularity == "layer-projection":
        proj_bits = {(layer, p): widths[int(u_choice[unit_of[(layer, j)]])]
                     for layer, ps in names.items() for j, p in enumerate(ps)}
        total, terms, bits = 0, [], {}
        for i, it in enumerate(items):
            ps = names[it.layer]
            js = [int(u_choice[unit_of[(it.layer, j)]]) for j in range(len(ps))]
            total += sum(int(pcost[i, j, c]) for j, c in enumerate(js))
            terms += [float(pvalue[i, j, c]) for j, c in enumerate(js)]
            # representative width: that of the expert's largest projection (ties -> the wider)
            bits[keys[i]] = max((it.proj_params[p], widths[c]) for p, c in zip(ps, js))[1]
        objective = math.fsum(terms)
    else:
        choice = u_choice[uidx]
        rows = np.arange(n)
        total = int(cost[rows, choice].sum())
        objective = math.fsum(value[rows, choice].tolist())
        bits = {keys[i]: widths[int(choice[i])] for i in range(n)}
    if total > budget:
        raise AssertionError("allocation exceeds the budget")  # never by construction
    details["seconds"] = time.perf_counter() - t0
    details["units"] = len(u_keys)
    if not exact and allocator == "knapsack":
        details.setdefault("note", "not proven optimal; see gap")
    return Allocation(bits, total, objective, exact, (lo, hi), details, proj_bits)
