"""Quality table on the shipped model: every sensitivity x allocator at 2.5 and 3.0 mean bits, RTN and GPTQ.

Calibration, every sensitivity score and every expert's candidate quantizations are computed once; each row then
allocates, fake-quantizes and measures perplexity on held-out text. Prints a Markdown table.

    .venv/bin/python bench/bench_methods.py [--model models/mopeq-tiny-moe] [--eval data/eval.txt]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mopeq_core.allocate import ExpertItem, allocate, budget_for_avg_bits  # noqa: E402
from mopeq_core.apply import QuantSettings, WeightSnapshot, apply_fake_quant, build_candidates, expert_cost  # noqa: E402
from mopeq_core.calibrate import calibrate  # noqa: E402
from mopeq_core.data import read_texts, split_holdout, token_samples  # noqa: E402
from mopeq_core.evaluate import mean_token_loss  # noqa: E402
from mopeq_core.loading import load_model, load_tokenizer  # noqa: E402
from mopeq_core.moe import find_expert_groups  # noqa: E402
from mopeq_core.sensitivity import SensitivityContext, compute_sensitivity  # noqa: E402

METHODS = ("hutchinson", "fisher", "frequency", "input-hessian", "weight-norm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/mopeq-tiny-moe")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--eval", default="data/eval.txt")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_model(Path(args.model))
    tok = load_tokenizer(Path(args.model))
    groups = find_expert_groups(model)
    samples = token_samples(tok, read_texts(args.calib), args.calib_samples, args.seq_len)
    fit, holdout = split_holdout(samples)
    ev = token_samples(tok, read_texts(args.eval), args.eval_samples, args.seq_len)
    fp_ppl = math.exp(mean_token_loss(model, ev))
    t0 = time.perf_counter()
    stats = calibrate(model, groups, fit, collect_hessians=True)
    t_cal = time.perf_counter() - t0
    scores, seconds = {}, {}
    for m in METHODS:
        t0 = time.perf_counter()
        scores[m] = compute_sensitivity(m, SensitivityContext(model, groups, stats, fit, probes=args.probes))
        seconds[m] = time.perf_counter() - t0
    snap = WeightSnapshot(groups)
    rows = [f"| full precision | – | – | – | {fp_ppl:.3f} | – |"]
    print(f"# shipped model {args.model}: fp ppl {fp_ppl:.3f}; calibration {t_cal:.1f}s; "
          + ", ".join(f"{m} {s:.1f}s" for m, s in seconds.items())
          + f"; hutchinson probes {scores['hutchinson'].probes}, median relative std error "
            f"{scores['hutchinson'].rel_std_err_median:.4f}", flush=True)
    for quantizer in ("rtn", "gptq"):
        qs = QuantSettings(quantizer=quantizer, group_size=args.group_size)
        t0 = time.perf_counter()
        cand = build_candidates(groups, (2, 3, 4), stats, qs)
        t_q = time.perf_counter() - t0
        costs = {(g.layer, e): {b: expert_cost(g, b, qs) for b in (2, 3, 4)} for g in groups
                 for e in range(g.num_experts)}

        def ppl_for(bits: dict) -> tuple[float, float]:
            apply_fake_quant(groups, {k: cand.matrices[(k[0], k[1], b)] for k, b in bits.items()})
            p = math.exp(mean_token_loss(model, ev))
            h = mean_token_loss(model, holdout)
            snap.restore()
            return p, h

        for b in (2, 3, 4):
            p, _ = ppl_for({k: b for k in costs})
            rows.append(f"| uniform {b}-bit | – | {quantizer} | {b:.1f} | {p:.3f} | {t_q:.1f} |")
        for avg in (2.5, 3.0):
            holdout_best = {}
            for allocator in ("knapsack", "tiers"):
                for m in METHODS:
                    items = [ExpertItem(g.layer, e, g.expert_params, float(scores[m].scores[g.layer][e]),
                                        cand.errors[(g.layer, e)], costs[(g.layer, e)])
                             for g in groups for e in range(g.num_experts)]
                    a = allocate(items, budget_for_avg_bits(items, avg), allocator=allocator)
                    p, h = ppl_for(a.bits)
                    if allocator == "knapsack" and m != "weight-norm":
                        holdout_best[m] = (h, p)
                    rows.append(f"| {m} | {allocator} | {quantizer} | {avg} | {p:.3f} | {seconds[m]:.1f} |")
            best = min(holdout_best, key=lambda k: holdout_best[k][0])
            rows.append(f"| auto (→ {best}) | knapsack | {quantizer} | {avg} | {holdout_best[best][1]:.3f} | "
                        f"{sum(seconds[m] for m in holdout_best):.1f} |")
        print(f"# {quantizer}: candidate quantization {t_q:.1f}s", flush=True)
    print("| sensitivity | allocator | quantizer | mean bits | eval ppl | method seconds |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
