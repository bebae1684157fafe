"""Benchmark the bit allocators on synthetic MoE-sized instances (CPU only, no torch).

    .venv/bin/python bench/bench_allocate.py [--avg-bits 2.5] [--sizes 1000,5000,15000]

Two kinds of instance, both with widths {2,3,4}, group size 128, symmetric scales:
- ``uniform``: every expert the same shape (a DeepSeek-V3 expert: gate/up 2048x7168, down 7168x2048), as in a real
  model; cost increments are all equal, so the LP relaxation is integral and knapsack "auto" certifies it.
- ``mixed``: two expert shapes (alternating layers), whose cost increments have a small gcd: the reduced DP capacity
  is large (DP falls back to the Lagrangian above max_dp_cells) and the Lagrangian rounding is inexact.
Errors follow ‖W‖²·4^−b with log-normal noise, sensitivities are log-normal. Prints a markdown table of seconds
per allocator and the objective of the exact DP against the Lagrangian rounding (with its reported gap).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from mopeq_core.allocate import ExpertItem, allocate, budget_for_avg_bits
from mopeq_core.sizing import expert_bytes

WIDTHS = (2, 3, 4)


def make(n: int, kind: str, seed: int = 0) -> list[ExpertItem]:
    rng = np.random.default_rng(seed)
    experts_per_layer = 256
    shapes_a = [(2048, 7168), (2048, 7168), (7168, 2048)]
    shapes_b = [(1408, 2048), (1408, 2048), (2048, 1408)]
    cost_a = {b: expert_bytes(shapes_a, b, 128, True) for b in WIDTHS}
    cost_b = {b: expert_bytes(shapes_b, b, 128, True) for b in WIDTHS}
    items = []
    for e in range(n):
        layer, expert = divmod(e, experts_per_layer)
        use_b = kind == "mixed" and layer % 2 == 1
        shapes, cost = (shapes_b, cost_b) if use_b else (shapes_a, cost_a)
        params = sum(o * i for o, i in shapes)
        norm2 = params * rng.lognormal(-9.0, 0.3)
        err = {b: float(norm2 * 4.0 ** (-b) * rng.lognormal(0.0, 0.15)) for b in WIDTHS}
        items.append(ExpertItem(layer, expert, params, float(rng.lognormal(0.0, 1.0)), err, dict(cost)))
    return items


def timed(items, budget, **kw):
    t0 = time.perf_counter()
    a = allocate(items, budget, **kw)
    return time.perf_counter() - t0, a


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--sizes", default="1000,5000,15000")
    args = ap.parse_args()
    configs = [
        ("knapsack auto", {"allocator": "knapsack"}),
        ("knapsack dp", {"allocator": "knapsack", "method": "dp"}),
        ("knapsack lagrangian", {"allocator": "knapsack", "method": "lagrangian"}),
        ("knapsack scope=layer", {"allocator": "knapsack", "scope": "layer"}),
        ("knapsack gran=layer", {"allocator": "knapsack", "granularity": "layer"}),
        ("tiers", {"allocator": "tiers"}),
    ]
    print(f"mean bits {args.avg_bits}, widths {WIDTHS}\n")
    header = (
        "| instance | items | "
        + " | ".join(c[0] for c in configs)
        + " | DP objective | Lagrangian objective "
    )
    header += "| reported gap | tiers objective |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind in ("uniform", "mixed"):
        for n in [int(s) for s in args.sizes.split(",")]:
            items = make(n, kind)
            budget = budget_for_avg_bits(items, args.avg_bits)
            cells, res = [], {}
            for name, kw in configs:
                sec, a = timed(items, budget, **kw)
                assert a.total_bytes <= budget
                res[name] = a
                tag = a.details.get("solver", "")
                cells.append(f"{sec:.2f}s ({tag})")
            dp, lag = res["knapsack dp"], res["knapsack lagrangian"]
            dp_obj = (
                f"{dp.objective:.6g}" if dp.details.get("solver") == "dp" else f"n/a ({dp.details['solver']})"
            )
            print(
                f"| {kind} | {n:,} | " + " | ".join(cells) + f" | {dp_obj} | {lag.objective:.6g} | "
                f"{lag.details['gap']:.3g} | {res['tiers'].objective:.6g} |"
            )


if __name__ == "__main__":
    main()
