"""Bit allocation: every allocator, scope and granularity against an independent brute-force reference."""

from __future__ import annotations

import itertools
import math
import time
from fractions import Fraction

import numpy as np
import pytest

from mopeq_core.allocate import (
    ALLOCATORS,
    ExpertItem,
    _kmeans1d,
    allocate,
    avg_bits_for_budget,
    budget_for_avg_bits,
    feasible_range,
    projection_cost,
)
from mopeq_core.errors import InfeasibleBudgetError, UserInputError
from mopeq_core.sizing import expert_bytes

W3 = (2, 3, 4)


# ---------------------------------------------------------------------------------------------------------------
# instance generators
# ---------------------------------------------------------------------------------------------------------------
def make_items(rng, n, widths=W3, layers=1, kind="sizing", monotone=True, scores="mixed"):
    """Random experts. kind="sizing": costs from the real byte accounting of random shapes; "random": arbitrary
    increasing integer costs (awkward gcds); "uniform": identical experts (the real-model case)."""
    items = []
    for e in range(n):
        if kind == "uniform":
            shapes = [(64, 32), (32, 64)]
        else:
            shapes = [(int(rng.integers(1, 5)) * 16, int(rng.integers(1, 5)) * 16) for _ in range(2)]
        params = sum(o * i for o, i in shapes)
        if kind == "random":
            c0 = int(rng.integers(5, 40))
            cost, c = {}, c0
            for b in widths:
                cost[b] = c
                c += int(rng.integers(1, 25))
        else:
            cost = {
                b: expert_bytes(shapes, b, 32, bool(rng.integers(0, 2)) if kind == "sizing" else True)
                for b in widths
            }
        if monotone:
            base = params * rng.uniform(0.2, 5.0)
            err = {b: float(base * 4.0 ** (-b) * rng.uniform(0.7, 1.3)) for b in widths}
        else:
            err = {b: float(rng.uniform(0, 10)) for b in widths}
        if scores == "mixed":
            s = float(
                rng.choice(
                    [rng.uniform(0, 3), rng.uniform(0, 3), -rng.uniform(0, 1), np.nan, 0.0],
                    p=[0.4, 0.4, 0.08, 0.06, 0.06],
                )
            )
        else:
            s = float(rng.uniform(0.01, 3))
        items.append(
            ExpertItem(
                layer=e % layers, expert=e // layers, params=params, sensitivity=s, error=err, cost=cost
            )
        )
    return items


def clean(s):
    return 0.0 if (math.isnan(s) or s < 0) else s


def brute_force(items, feasible):
    """Optimal objective over all assignments (itertools.product) that `feasible(assignment dict)` accepts."""
    widths = sorted(items[0].cost)
    best = math.inf
    for combo in itertools.product(widths, repeat=len(items)):
        a = {(it.layer, it.expert): b for it, b in zip(items, combo)}
        if not feasible(a):
            continue
        v = sum(clean(it.sensitivity) * it.error[b] for it, b in zip(items, combo))
        best = min(best, v)
    return best


def total_cost(items, bits):
    return sum(it.cost[bits[(it.layer, it.expert)]] for it in items)


def under(items, budget):
    return lambda bits: total_cost(items, bits) <= budget


def budgets_for(items, rng):
    lo, hi = feasible_range(items)
    pts = {lo, lo + 1, hi - 1, hi, hi + 7}
    pts.update(int(x) for x in rng.integers(lo, hi + 1, size=3))
    return sorted(b for b in pts if b >= lo)


def close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


# ---------------------------------------------------------------------------------------------------------------
# knapsack vs brute force
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "dp"])
def test_knapsack_matches_brute_force(method):
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(70):
        n = int(rng.integers(1, 8))
        kind = ["sizing", "random", "uniform"][trial % 3]
        items = make_items(rng, n, kind=kind, monotone=trial % 4 != 0, layers=int(rng.integers(1, 3)))
        for budget in budgets_for(items, rng):
            a = allocate(items, budget, method=method)
            ref = brute_force(items, under(items, budget))
            assert a.total_bytes <= budget
            assert a.total_bytes == total_cost(items, a.bits)
            assert a.exact is True
            assert close(a.objective, ref), (trial, budget, a.objective, ref, a.details)
            checked += 1
    assert checked > 300


def test_knapsack_eight_items_tight_budgets():
    rng = np.random.default_rng(7)
    for _ in range(4):
        items = make_items(rng, 8, kind="random", monotone=True)
        lo, hi = feasible_range(items)
        for budget in (lo, lo + 3, (lo + hi) // 2, hi - 2):
            a = allocate(items, budget)
            ref = brute_force(items, under(items, budget))
            assert a.total_bytes <= budget and a.exact and close(a.objective, ref)


def test_lagrangian_bound_brackets_the_optimum():
    rng = np.random.default_rng(2)
    for trial in range(60):
        items = make_items(rng, int(rng.integers(2, 7)), kind="random", monotone=trial % 2 == 0)
        for budget in budgets_for(items, rng):
            a = allocate(items, budget, method="lagrangian")
            ref = brute_force(items, under(items, budget))
            gap = a.details["gap"]
            assert a.total_bytes <= budget
            assert a.objective >= ref - 1e-9 * max(1, ref)
            assert a.objective - ref <= gap + 1e-9 * max(1, ref)
            if a.exact:
                assert close(a.objective, ref)


# ---------------------------------------------------------------------------------------------------------------
# granularity=layer and scope=layer vs brute force
# ---------------------------------------------------------------------------------------------------------------
def layer_budgets(items, budget):
    """Reference split: B = min + t(max - min); layer gets floor(min_l + t(max_l - min_l))."""
    lo, hi = feasible_range(items)
    t = Fraction(budget - lo, hi - lo) if hi > lo else Fraction(1)
    out = {}
    for layer in {it.layer for it in items}:
        li = [it for it in items if it.layer == layer]
        lmin, lmax = feasible_range(li)
        out[layer] = math.floor(lmin + t * (lmax - lmin))
    return out


def uniform_per_layer(bits):
    per = {}
    for (layer, _), b in bits.items():
        per.setdefault(layer, set()).add(b)
    return all(len(v) == 1 for v in per.values())


@pytest.mark.parametrize("scope,granularity", [("model", "layer"), ("layer", "expert"), ("layer", "layer")])
def test_constrained_knapsack_matches_brute_force(scope, granularity):
    rng = np.random.default_rng(3)
    for trial in range(25):
        layers = int(rng.integers(1, 4))
        n = int(rng.integers(layers, 8))
        items = make_items(rng, n, layers=layers, kind=["sizing", "random"][trial % 2])
        for budget in budgets_for(items, rng):
            lb = layer_budgets(items, budget)

            def feasible(bits, items=items, budget=budget, lb=lb):
                if granularity == "layer" and not uniform_per_layer(bits):
                    return False
                if scope == "layer":
                    return all(
                        sum(it.cost[bits[(it.layer, it.expert)]] for it in items if it.layer == layer) <= b
                        for layer, b in lb.items()
                    )
                return total_cost(items, bits) <= budget

            ref = brute_force(items, feasible)
            a = allocate(items, budget, scope=scope, granularity=granularity)
            assert a.total_bytes <= budget
            assert feasible(a.bits), (trial, budget, a.bits)
            assert a.exact
            assert close(a.objective, ref), (trial, budget, a.objective, ref)
            if scope == "layer":
                assert a.details["layer_budgets"] == lb


@pytest.mark.parametrize("allocator", ["knapsack", "tiers"])
@pytest.mark.parametrize("scope", ["model", "layer"])
@pytest.mark.parametrize("granularity", ["expert", "layer"])
def test_all_combinations_respect_budget(allocator, scope, granularity):
    rng = np.random.default_rng(4)
    for trial in range(6):
        items = make_items(rng, 40, layers=4, kind=["sizing", "uniform"][trial % 2])
        lo, hi = feasible_range(items)
        for budget in [lo, *rng.integers(lo, hi, size=4).tolist(), hi, hi * 2]:
            a = allocate(items, budget, allocator=allocator, scope=scope, granularity=granularity)
            assert set(a.bits) == {(it.layer, it.expert) for it in items}
            assert set(a.bits.values()) <= set(W3)
            assert a.total_bytes == total_cost(items, a.bits) <= budget
            assert a.feasible_range == (lo, hi)
            if granularity == "layer":
                assert uniform_per_layer(a.bits)
            if scope == "layer":
                for layer, b in layer_budgets(items, budget).items():
                    assert (
                        sum(it.cost[a.bits[(it.layer, it.expert)]] for it in items if it.layer == layer) <= b
                    )
            if budget >= hi:
                assert set(a.bits.values()) == {4}


# ---------------------------------------------------------------------------------------------------------------
# tiers
# ---------------------------------------------------------------------------------------------------------------
def sse(x, w, lab):
    total = 0.0
    for c in np.unique(lab):
        xs, ws = x[lab == c], w[lab == c]
        total += float(np.sum(ws * (xs - np.average(xs, weights=ws)) ** 2))
    return total


def test_kmeans1d_is_optimal():
    rng = np.random.default_rng(5)
    for _ in range(60):
        u = int(rng.integers(1, 10))
        x = np.sort(rng.choice(rng.normal(size=40) * 5, size=u, replace=False))
        w = rng.integers(1, 4, size=u).astype(float)
        k = int(rng.integers(1, 5))
        labels = _kmeans1d(x, w, k)
        assert np.all(np.diff(labels) >= 0) and labels[0] == 0

        kk = min(k, u)
        best = math.inf
        for cuts in itertools.combinations(range(1, u), kk - 1):
            lab = np.zeros(u, dtype=int)
            for c in cuts:
                lab[c:] += 1
            best = min(best, sse(x, w, lab))
        assert len(np.unique(labels)) == kk
        assert sse(x, w, labels) <= best + 1e-9 * max(1, best)


def monotone_in_score(items, bits, scope):
    for a in items:
        for b in items:
            if scope == "layer" and a.layer != b.layer:
                continue
            more = clean(a.sensitivity) > clean(b.sensitivity)
            if more and bits[(a.layer, a.expert)] < bits[(b.layer, b.expert)]:
                return False
    return True


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_tiers_budget_and_monotone(scope):
    rng = np.random.default_rng(6)
    for trial in range(30):
        widths = [W3, (2, 3, 4, 8), (4, 8)][trial % 3]
        items = make_items(
            rng,
            int(rng.integers(2, 30)),
            widths=widths,
            layers=3,
            kind=["sizing", "random", "uniform"][trial % 3],
        )
        lo, hi = feasible_range(items)
        for budget in [lo, *rng.integers(lo, hi + 1, size=6).tolist(), hi]:
            a = allocate(items, budget, allocator="tiers", scope=scope)
            assert a.total_bytes == total_cost(items, a.bits) <= budget
            assert monotone_in_score(items, a.bits, scope), (trial, budget)
            assert a.exact is False
        a = allocate(items, hi, allocator="tiers", scope=scope)
        assert set(a.bits.values()) == {max(widths)}


def test_tiers_follow_clusters_when_budget_allows():
    # three well separated score groups, widths {2,3,4}, budget exactly the tiered cost: no repair needed
    items = []
    for e, s in enumerate([0.1, 0.11, 0.12, 5.0, 5.1, 50.0]):
        items.append(ExpertItem(0, e, 64, s, {2: 3.0, 3: 2.0, 4: 1.0}, {2: 20, 3: 30, 4: 40}))
    a = allocate(items, 3 * 20 + 2 * 30 + 40, allocator="tiers")
    assert [a.bits[(0, e)] for e in range(6)] == [2, 2, 2, 3, 3, 4]
    assert a.details["tier_sizes"] == [3, 2, 1]


# ---------------------------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------------------------
def test_infeasible_budget_states_the_range():
    rng = np.random.default_rng(8)
    items = make_items(rng, 12, kind="sizing")
    lo, hi = feasible_range(items)
    for allocator in ALLOCATORS:
        with pytest.raises(InfeasibleBudgetError) as exc:
            allocate(items, lo - 1, allocator=allocator)
        msg = str(exc.value)
        assert f"{lo:,}" in msg and f"{hi:,}" in msg
        assert "2.000 to 4.000 mean bits" in msg
        assert exc.value.feasible == (lo, hi) and exc.value.unit == "bytes"
    a = allocate(items, lo)  # the minimum itself is feasible
    assert a.total_bytes == lo and set(a.bits.values()) == {2}


def test_budget_for_avg_bits():
    rng = np.random.default_rng(9)
    items = make_items(rng, 20, kind="sizing")
    all_at = {b: sum(it.cost[b] for it in items) for b in W3}
    assert budget_for_avg_bits(items, 2.0) == all_at[2]
    assert budget_for_avg_bits(items, 3.0) == all_at[3]
    assert budget_for_avg_bits(items, 4) == all_at[4]
    assert budget_for_avg_bits(items, 2.5) == (all_at[2] + all_at[3]) // 2
    assert budget_for_avg_bits(items, 3.25) == math.floor(
        all_at[3] + Fraction(1, 4) * (all_at[4] - all_at[3])
    )
    assert budget_for_avg_bits(items, 5.0) == all_at[4] + (all_at[4] - all_at[3])  # extrapolated
    assert avg_bits_for_budget(items, all_at[3]) == pytest.approx(3.0)
    assert avg_bits_for_budget(items, budget_for_avg_bits(items, 2.5)) == pytest.approx(2.5, abs=1e-3)
    a = allocate(items, budget_for_avg_bits(items, 4.0))
    assert set(a.bits.values()) == {4}


def test_budget_above_max_gives_all_max_and_bad_names_raise():
    rng = np.random.default_rng(10)
    items = make_items(rng, 10, kind="random")
    _, hi = feasible_range(items)
    for allocator in ("knapsack", "tiers"):
        assert set(allocate(items, hi * 3, allocator=allocator).bits.values()) == {4}
    assert {"knapsack", "tiers"} <= set(ALLOCATORS)
    for kw in ({"allocator": "nope"}, {"scope": "expert"}, {"granularity": "model"}):
        with pytest.raises(UserInputError):
            allocate(items, hi, **kw)


def test_bad_scores_are_zero_and_result_is_deterministic():
    rng = np.random.default_rng(11)
    items = make_items(rng, 30, layers=3, kind="sizing")
    items = [
        ExpertItem(it.layer, it.expert, it.params, s, it.error, it.cost)
        for it, s in zip(items, [np.nan, -1.0, float("-inf")] * 10)
    ]
    lo, hi = feasible_range(items)
    a = allocate(items, (lo + hi) // 2)
    assert a.objective == 0.0 and a.exact
    items = make_items(rng, 30, layers=3, kind="sizing")
    budget = (lo + hi) // 2
    b1 = allocate(items, budget).bits
    shuffled = [items[i] for i in rng.permutation(len(items))]
    assert allocate(shuffled, budget).bits == b1
    assert (
        allocate(items, budget, allocator="tiers").bits == allocate(shuffled, budget, allocator="tiers").bits
    )


# ---------------------------------------------------------------------------------------------------------------
# scale
# ---------------------------------------------------------------------------------------------------------------
def test_large_instance_is_fast_and_exact():
    rng = np.random.default_rng(12)
    items = make_items(rng, 15_000, layers=58, kind="uniform", scores="positive")
    budget = budget_for_avg_bits(items, 2.5)
    t0 = time.perf_counter()
    a = allocate(items, budget)
    assert time.perf_counter() - t0 < 5.0
    assert a.total_bytes <= budget and a.exact
    t0 = time.perf_counter()
    d = allocate(items, budget, method="dp")  # the band DP on ~84 M int8 cells
    assert time.perf_counter() - t0 < 8.0
    assert d.details["solver"] == "dp" and d.total_bytes <= budget
    assert close(a.objective, d.objective)
    t = allocate(items, budget, allocator="tiers")
    assert t.total_bytes <= budget and t.objective >= a.objective


def test_lagrangian_fallback_within_gap_of_dp():
    rng = np.random.default_rng(13)
    items = make_items(rng, 300, layers=6, kind="random", scores="positive")
    lo, hi = feasible_range(items)
    for budget in (lo + (hi - lo) // 3, (lo + hi) // 2 + 11):
        dp = allocate(items, budget, method="dp")
        lag = allocate(items, budget, max_dp_cells=10)  # auto: certificate fails, DP too big -> Lagrangian
        assert dp.exact and dp.details["solver"] == "dp"
        assert lag.details["solver"] == "lagrangian" and "fallback" in lag.details
        assert lag.total_bytes <= budget
        gap = lag.details["gap"]
        assert gap >= 0
        assert dp.objective - 1e-9 * dp.objective <= lag.objective <= dp.objective + gap + 1e-9 * dp.objective
        assert lag.exact == (gap == 0.0)


# ---------------------------------------------------------------------------------------------------------------
# granularity=layer-projection vs brute force over one width per (layer, projection)
# ---------------------------------------------------------------------------------------------------------------
PROJS = ("down_proj", "gate_up_proj")


def make_proj_items(rng, n, layers, widths=W3, kind="sizing"):
    """Experts with two projections of random shapes; per-projection errors/costs summing to the expert's."""
    items = []
    for e in range(n):
        shapes = {p: (int(rng.integers(1, 5)) * 16, int(rng.integers(1, 5)) * 16) for p in PROJS}
        sym = bool(rng.integers(0, 2))
        if kind == "random":
            pcost = {}
            for p in PROJS:
                c = int(rng.integers(5, 40))
                pcost[p] = {}
                for b in widths:
                    pcost[p][b] = c
                    c += int(rng.integers(1, 25))
        else:
            pcost = {p: {b: projection_cost(*shapes[p], b, 32, sym) for b in widths} for p in PROJS}
        perr = {p: {b: float(shapes[p][0] * shapes[p][1] * rng.uniform(0.2, 5.0) * 4.0 ** (-b)) for b in widths}
                for p in PROJS}
        pparams = {p: shapes[p][0] * shapes[p][1] for p in PROJS}
        s = float(rng.choice([rng.uniform(0, 3), -rng.uniform(0, 1), 0.0], p=[0.8, 0.1, 0.1]))
        items.append(ExpertItem(
            layer=e % layers, expert=e // layers, params=sum(pparams.values()), sensitivity=s,
            error={b: math.fsum(perr[p][b] for p in PROJS) for b in widths},
            cost={b: sum(pcost[p][b] for p in PROJS) for b in widths},
            proj_error=perr, proj_params=pparams, proj_cost=pcost))
    return items


def brute_force_proj(items, budget, scope):
    """Optimal (objective, assignment) over every width per (layer, projection), independent of allocate()."""
    widths = sorted(items[0].cost)
    units = sorted({(it.layer, p) for it in items for p in PROJS})
    lb = layer_budgets(items, budget) if scope == "layer" else None
    best = (math.inf, None)
    for combo in itertools.product(widths, repeat=len(units)):
        a = dict(zip(units, combo))
        cost_l: dict[int, int] = {}
        for it in items:
            cost_l[it.layer] = cost_l.get(it.layer, 0) + sum(it.proj_cost[p][a[(it.layer, p)]] for p in PROJS)
        if scope == "layer":
            if any(cost_l[layer] > lb[layer] for layer in cost_l):
                continue
        elif sum(cost_l.values()) > budget:
            continue
        v = sum(clean(it.sensitivity) * it.proj_error[p][a[(it.layer, p)]] for it in items for p in PROJS)
        if v < best[0]:
            best = (v, a)
    return best


@pytest.mark.parametrize("scope", ["model", "layer"])
def test_layer_projection_knapsack_matches_brute_force(scope):
    rng = np.random.default_rng(14)
    for trial in range(20):
        layers = int(rng.integers(1, 3))
        items = make_proj_items(rng, int(rng.integers(layers, 6)), layers, kind=["sizing", "random"][trial % 2])
        for budget in budgets_for(items, rng):
            ref, _ = brute_force_proj(items, budget, scope)
            a = allocate(items, budget, scope=scope, granularity="layer-projection")
            assert set(a.proj_bits) == {(it.layer, p) for it in items for p in PROJS}
            # recompute bytes and objective from proj_bits alone
            spent = sum(it.proj_cost[p][a.proj_bits[(it.layer, p)]] for it in items for p in PROJS)
            obj = sum(clean(it.sensitivity) * it.proj_error[p][a.proj_bits[(it.layer, p)]]
                      for it in items for p in PROJS)
            assert a.total_bytes == spent <= budget
            assert close(a.objective, obj)
            assert a.exact
            assert close(a.objective, ref), (trial, budget, a.objective, ref)
            for it in items:  # representative width = the larger projection's
                big = max(PROJS, key=lambda p, it=it: (it.proj_params[p], a.proj_bits[(it.layer, p)]))
                assert a.bits[(it.layer, it.expert)] == a.proj_bits[(it.layer, big)]


def test_layer_projection_is_between_layer_and_expert():
    """Finer granularity can only help: objective(expert) <= objective(layer-projection) <= objective(layer)."""
    rng = np.random.default_rng(15)
    for _ in range(10):
        items = make_proj_items(rng, 12, 3)
        lo, hi = feasible_range(items)
        for budget in rng.integers(lo, hi + 1, size=4).tolist():
            by = {g: allocate(items, budget, granularity=g, method="dp").objective
                  for g in ("expert", "layer-projection", "layer")}
            assert by["expert"] <= by["layer-projection"] * (1 + 1e-9) + 1e-12
            assert by["layer-projection"] <= by["layer"] * (1 + 1e-9) + 1e-12


def test_layer_projection_tiers_respects_budget():
    rng = np.random.default_rng(16)
    items = make_proj_items(rng, 24, 3)
    lo, hi = feasible_range(items)
    for budget in [lo, (lo + hi) // 2, hi]:
        a = allocate(items, budget, allocator="tiers", granularity="layer-projection")
        assert a.total_bytes == sum(it.proj_cost[p][a.proj_bits[(it.layer, p)]] for it in items for p in PROJS)
        assert a.total_bytes <= budget


def test_layer_projection_needs_per_projection_fields():
    rng = np.random.default_rng(17)
    items = make_items(rng, 4, layers=2)
    with pytest.raises(UserInputError, match="has no proj_error, proj_cost, proj_params"):
        allocate(items, feasible_range(items)[1], granularity="layer-projection")
    good = make_proj_items(rng, 4, 2)
    it = good[0]
    bad_cost = {p: dict(c) for p, c in it.proj_cost.items()}
    bad_cost["down_proj"][3] += 1
    broken = [ExpertItem(it.layer, it.expert, it.params, it.sensitivity, it.error, it.cost, it.proj_error,
                         it.proj_params, bad_cost), *good[1:]]
    with pytest.raises(ValueError, match="proj_cost sums to"):
        allocate(broken, feasible_range(good)[1], granularity="layer-projection")


def test_projection_cost_sums_to_expert_cost_of_a_real_model(tmp_path):
    """projection_cost over a real ExpertGroup's projections equals apply.expert_cost (the engine's byte cost)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    from mopeq_core.apply import QuantSettings, expert_cost
    from mopeq_core.loading import load_model
    from mopeq_core.moe import find_expert_groups

    groups = find_expert_groups(load_model(tiny_models.build_model("mixtral", tmp_path)))
    for sym in (True, False):
        qs = QuantSettings(quantizer="rtn", group_size=16, symmetric=sym)
        for g in groups:
            for b in W3:
                assert expert_cost(g, b, qs) == sum(
                    projection_cost(p.out_features, p.in_features, b, 16, sym) for p in g.projections)
