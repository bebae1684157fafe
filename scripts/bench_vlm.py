#!/usr/bin/env python
"""VLM rows for docs/BENCHMARKS.md: the tiny random Qwen3-VL-MoE, the native DeepSeek-VL2 and the native MolmoE of the
tests, quantized end to end on the shipped image+text set (data/vlm), with image+text perplexity and the lmms-eval
caption-matching suite before and after quantization.

    .venv/bin/python scripts/bench_vlm.py [--avg-bits 3.0 2.5] [--probes 16] [--threads 1] [--only MolmoE]

The models are random (no VLM small enough to train here), so perplexities sit near the vocabulary size and the
caption accuracy near chance: the rows show what the pipeline measures and what it costs, not model quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--avg-bits", type=float, nargs="+", default=[3.0, 2.5])
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="run only the models whose label contains this text")
    args = ap.parse_args()

    import torch
    import vlm_models as vm

    from mopeq_core import engine
    from mopeq_core.config import Budget, QuantizeConfig

    torch.set_num_threads(args.threads)
    models = [("Qwen3-VL-MoE tiny (random)", vm.build_qwen3_vl_moe, False),
              ("DeepSeek-VL2 native (random)", vm.build_deepseek_vl2, False),
              ("MolmoE native (random)", vm.build_molmoe, False)]
    models = [m for m in models if args.only in m[0]]
    print("| model | avg bits | fp ppl (img+text) | quantized ppl | Δ ppl | caption-match acc fp → q "
          "| expert MB fp → q | total MB | vision MB | time s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for label, build, trust in models:
            src = build(Path(tmp) / "models")
            for bits in args.avg_bits:
                cfg = QuantizeConfig(
                    model=str(src), budget=Budget(avg_bits=bits), sensitivity="hutchinson", probes=args.probes,
                    quantizer="gptq", group_size=16, calib_file=str(vm.VLM_DATA / "calib.jsonl"), calib_samples=27,
                    seq_len=64, eval_file=str(vm.VLM_DATA / "eval.jsonl"), eval_samples=8, trust_remote_code=trust,
                    device=args.device, eval_suites=("lmms-eval:mopeq_caption_match",))
                t0 = time.perf_counter()
                r = engine.run(cfg, Path(tmp) / f"out-{src.name}-{bits}")
                secs = time.perf_counter() - t0
                ppl, sizes = r.report["perplexity"], r.report["sizes"]
                acc = r.report["eval_suites"]["lmms-eval/mopeq_caption_match"]["acc"]
                print(f"| {label} | {r.bitmap['avg_bits']:.2f} | {ppl['fp_perplexity']:.1f} | "
                      f"{ppl['quantized_perplexity']:.1f} | {ppl['increase_pct']:+.2f}% | "
                      f"{acc['fp']:.3f} → {acc['quantized']:.3f} | {sizes['fp_expert_bytes'] / 1e6:.3f} → "
                      f"{sizes['expert_bytes'] / 1e6:.3f} | {sizes['total_bytes'] / 1e6:.3f} | "
                      f"{sizes['non_expert_by_component']['vision'] / 1e6:.3f} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
