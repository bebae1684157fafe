"""Memory and speed of a loaded packed artifact vs the full-precision model, measured side by side.

    .venv/bin/python bench/bench_loader.py [--avg-bits 2.5] [--threads 1]

Quantizes the shipped model (RTN, input-hessian: fast), loads the artifact with ``load_quantized`` and reports the
bytes held by expert weights in memory (packed buffers vs float32 parameters), each process-wide RSS increase of
loading, and forward latency of both models on the same batch (median of repeats, interleaved).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mopeq_core import engine  # noqa: E402
from mopeq_core.config import Budget, QuantizeConfig  # noqa: E402
from mopeq_core.loader import load_quantized  # noqa: E402
from mopeq_core.loading import load_model  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "mopeq-tiny-moe"


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = QuantizeConfig(model=str(MODEL), budget=Budget(avg_bits=args.avg_bits), quantizer="rtn",
                             sensitivity="input-hessian", group_size=64, calib_samples=8, seq_len=128)
        result = engine.run(cfg, Path(tmp) / "q")
        r0 = rss()
        q = load_quantized(Path(tmp) / "q")
        r1 = rss()
        fp = load_model(MODEL)
        r2 = rss()
        packed = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if ".mopeq_" in n or
                     n.split(".")[-1].startswith("mopeq_"))
        fp_experts = sum(p.numel() * p.element_size() for n, p in fp.named_parameters()
                         if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
        ids = torch.randint(0, fp.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
        times = {"fp": [], "packed": []}
        with torch.no_grad():
            for m in (fp, q):
                m(input_ids=ids)  # warm-up
            for _ in range(args.repeats):
                for name, m in (("fp", fp), ("packed", q)):
                    t0 = time.perf_counter()
                    m(input_ids=ids)
                    times[name].append(time.perf_counter() - t0)
        fp_t, q_t = statistics.median(times["fp"]), statistics.median(times["packed"])
        print(f"# {MODEL.name} at {result.bitmap['avg_bits']:.3f} mean bits; {args.threads} thread(s); batch 4x128")
        print("| quantity | full precision (fp32) | packed artifact | ratio |")
        print("|---|---|---|---|")
        print(f"| expert weights in memory (bytes) | {fp_experts:,} | {packed:,} | {packed / fp_experts:.3f} |")
        print(f"| bitmap expert_bytes | – | {result.bitmap['expert_bytes']:,} | – |")
        print(f"| RSS increase of loading (MB) | {(r2 - r1) / 2**20:.1f} | {(r1 - r0) / 2**20:.1f} | "
              f"{(r1 - r0) / max(r2 - r1, 1):.3f} |")
        print(f"| forward latency, median of {args.repeats} (ms) | {fp_t * 1e3:.1f} | {q_t * 1e3:.1f} | "
              f"{q_t / fp_t:.2f} |")


if __name__ == "__main__":
    main()
