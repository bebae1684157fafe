#!/usr/bin/env python
"""Quality table on both shipped models at 2.5 mean bits with GPTQ, every row a full engine run.

    .venv/bin/python bench/bench_quality.py [--models mopeq-tiny-moe,mopeq-tiny-olmoe] [--probes 8]

Rows (same calibration and evaluation data, same seed, measured side by side in one process):

* ``hutchinson`` (the default: sequential GPTQ, output-error cost), then one change at a time:
  non-sequential GPTQ (each layer from full-precision inputs), and the weight-error cost;
* the other scores (``fisher``, ``input-hessian``, ``layer-hessian``, ``weight-norm``) and ``frequency`` (the
  allocation by routing frequency that MoPEQ argues against);
* ``auto`` (picks among its candidates by cross-fitted calibration loss);
* uniform GPTQ at 2 and 3 bits (every expert at one width; 3 bits is the reference a 2.5-bit allocation should
  approach or beat).

Perplexity is the engine's own (``report.json``) on ``--eval`` (held-out text). Prints a Markdown table per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = [
    ("hutchinson (sequential GPTQ, output cost)", {"sensitivity": "hutchinson"}),
    ("hutchinson, non-sequential GPTQ", {"sensitivity": "hutchinson", "sequential": False}),
    ("hutchinson, weight-error cost", {"sensitivity": "hutchinson", "cost": "weight"}),
    ("fisher", {"sensitivity": "fisher"}),
    ("input-hessian", {"sensitivity": "input-hessian"}),
    ("layer-hessian", {"sensitivity": "layer-hessian"}),
    ("weight-norm", {"sensitivity": "weight-norm"}),
    ("frequency", {"sensitivity": "frequency"}),
    ("auto", {"sensitivity": "auto"}),
    ("uniform 2-bit GPTQ", {"sensitivity": "frequency", "bits": (2,), "avg_bits": 2.0}),
    ("uniform 3-bit GPTQ", {"sensitivity": "frequency", "bits": (3,), "avg_bits": 3.0}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mopeq-tiny-moe,mopeq-tiny-olmoe")
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", default=str(REPO / "data" / "eval.txt"))
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated row labels (substring match)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from mopeq_core.config import Budget, QuantizeConfig
    from mopeq_core.engine import run

    print(f"command: `python bench/bench_quality.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    results = {}
    rows = [r for r in ROWS if not args.only or any(s in r[0] for s in args.only.split(","))]
    for name in args.models.split(","):
        model = REPO / "models" / name
        print(f"### {name} at {args.avg_bits} mean bits, GPTQ (group size {args.group_size}), {args.calib_samples} x "
              f"{args.seq_len} calibration tokens, {args.probes} Hutchinson probes at most\n")
        print("| allocation | mean bits | expert bytes | perplexity | vs full precision | chosen score | seconds |")
        print("|---|---:|---:|---:|---:|---|---:|")
        fp = None
        for label, over in rows:
            over = dict(over)
            avg = over.pop("avg_bits", args.avg_bits)
            cfg = QuantizeConfig(model=str(model), budget=Budget(avg_bits=avg), quantizer="gptq",
                                 group_size=args.group_size, probes=args.probes, probe_tol=0.0,
                                 calib_samples=args.calib_samples, seq_len=args.seq_len, eval_file=args.eval,
                                 eval_samples=args.eval_samples, **over)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                r = run(cfg, Path(tmp) / "out")
            sec = time.perf_counter() - t0
            p = r.report["perplexity"]
            fp = p["fp_perplexity"]
            results[(name, label)] = {"avg_bits": r.avg_bits, "expert_bytes": r.bitmap["expert_bytes"],
                                      "ppl": p["quantized_perplexity"], "fp_ppl": fp, "seconds": sec,
                                      "chosen": r.selected_sensitivity,
                                      "validation": r.report.get("candidate_validation")}
            print(f"| {label} | {r.avg_bits:.3f} | {r.bitmap['expert_bytes']:,} | {p['quantized_perplexity']:.3f} | "
                  f"{p['increase_pct']:+.2f} % | {r.selected_sensitivity} | {sec:.0f} |", flush=True)
        print(f"\nFull-precision perplexity: {fp:.3f}.")
        auto = results.get((name, "auto"), {}).get("validation")
        if auto:
            print("auto's cross-fitted calibration loss per candidate (paired difference vs the chosen, ± s.e.): "
                  + "; ".join(f"{m} {v:.5f} ({auto['paired_vs_best'][m]['mean_diff']:+.5f} ± "
                              f"{auto['paired_vs_best'][m]['std_err']:.5f})" for m, v in auto["loss"].items()))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}|{k[1]}": v for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
