"""Benchmark RTN vs GPTQ on one expert-sized matrix.

    .venv/bin/python bench/bench_quantize.py [--out 1024 --in 4096 --group-size 128 --threads 1 --device cpu]

W [out, in] is Gaussian (std 0.02); activations are synthetic but LLM-like: low-rank correlated structure, a
log-normal per-channel scale with a few outlier channels, plus noise. H = X^T X over ``--tokens`` calibration
tokens; the relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 is measured on held-out tokens of the same
distribution (and on the calibration tokens, which is what GPTQ minimises).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mopeq_core.quantize import QuantSpec, quantize_gptq, quantize_rtn


def make_activations(
    n: int, d: int, rank: int, g: torch.Generator, scale: torch.Tensor, basis: torch.Tensor
) -> torch.Tensor:
    z = torch.randn(n, rank, generator=g)
    return (z @ basis + 0.3 * torch.randn(n, d, generator=g)) * scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=int, default=1024)
    ap.add_argument("--in", dest="inp", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=512)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-act-order", action="store_true", help="skip the gptq act_order rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    d = args.inp
    W = torch.randn(args.out, d, generator=g) * 0.02
    scale = torch.exp(0.5 * torch.randn(d, generator=g))
    scale[torch.randperm(d, generator=g)[: max(1, d // 256)]] *= 10.0  # outlier channels
    rank = min(256, d)
    basis = torch.randn(rank, d, generator=g) / rank**0.5
    t0 = time.perf_counter()
    X = make_activations(args.tokens, d, rank, g, scale, basis)
    Xe = make_activations(args.eval_tokens, d, rank, g, scale, basis).to(dev)
    H = (X.T @ X).to(dev)
    Xc = X[: args.eval_tokens].to(dev)
    W = W.to(dev)
    t_setup = time.perf_counter() - t0
    ref_e = (Xe @ W.T).square().sum().item()
    ref_c = (Xc @ W.T).square().sum().item()

    def rel(qm) -> tuple[float, float, float]:
        D = qm.dequantize(torch.float32, device=dev) - W
        return (
            (Xe @ D.T).square().sum().item() / ref_e,
            (Xc @ D.T).square().sum().item() / ref_c,
            D.square().sum().item() / W.square().sum().item(),
        )

    methods = [("rtn", lambda s: quantize_rtn(W, s)), ("gptq", lambda s: quantize_gptq(W, H, s))]
    if not args.no_act_order:
        methods.append(("gptq+act_order", lambda s: quantize_gptq(W, H, s, act_order=True)))

    print(
        f"W {args.out}x{d}, group size {args.group_size}, symmetric, clip search on; H from {args.tokens} tokens; "
        f"device {dev}, {args.threads} thread(s); setup {t_setup:.1f}s"
    )
    header = f"{'method':<16}{'bits':>5}{'seconds':>10}{'rel out err (held-out)':>25}{'rel out err (calib)':>22}{'rel weight err':>17}"
    print(header)
    print("-" * len(header))
    for bits in [int(b) for b in args.bits.split(",")]:
        spec = QuantSpec(bits, args.group_size)
        for name, fn in methods:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            qm = fn(spec)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            secs = time.perf_counter() - t
            e_held, e_cal, e_w = rel(qm)
            print(f"{name:<16}{bits:>5}{secs:>10.2f}{e_held:>25.5f}{e_cal:>22.5f}{e_w:>17.5f}")


if __name__ == "__main__":
    main()
