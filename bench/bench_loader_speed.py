"""Time per generated token on CPU at batch 1: the packed model (``load_quantized``) vs the bf16 and fp32 models.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_loader_speed.py [--new-tokens 64] [--repeats 5] [--threads 1]

The shipped model's experts are RTN-quantized at a mix of 2/3/4 bits (expert e of layer l at ``(2, 3, 4)[(l + e) %
3]``, group size 128), written as a MoPEQ artifact and loaded packed. Each model greedily generates ``--new-tokens``
tokens after a 32-token prompt (KV cache on); time per token = (time for N new tokens - time for 1) / (N - 1), so the
prompt's prefill cancels. A second figure is one forward of a 4x128-token batch (prefill-like: every expert routed). Times are the process's CPU time (``time.process_time``; with one thread that is the
work done, little affected by other processes on a shared machine). Runs are interleaved and the median of ``--repeats`` is printed, with the bytes the expert
weights hold in memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mopeq_core.apply import apply_fake_quant  # noqa: E402
from mopeq_core.artifact import write_mopeq_artifact  # noqa: E402
from mopeq_core.loader import load_quantized  # noqa: E402
from mopeq_core.loading import load_model  # noqa: E402
from mopeq_core.moe import find_expert_groups  # noqa: E402
from mopeq_core.quantize import QuantSpec, quantize_rtn  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "mopeq-tiny-moe"
WIDTHS = (2, 3, 4)


def build_artifact(out: Path, group_size: int) -> None:
    model = load_model(MODEL)
    groups = find_expert_groups(model)
    chosen, bits = {}, {}
    for g in groups:
        for e in range(g.num_experts):
            b = WIDTHS[(g.layer + e) % len(WIDTHS)]
            bits[(g.layer, e)] = b
            chosen[(g.layer, e)] = {p.name: quantize_rtn(g.weight(e, p.name).detach().float(),
                                                         QuantSpec(b, group_size, True)) for p in g.projections}
    apply_fake_quant(groups, chosen)
    write_mopeq_artifact(out, model, groups, lambda g: {e: chosen[(g.layer, e)] for e in range(g.num_experts)},
                         bits, group_size=group_size, symmetric=True, quantizer="rtn")


def expert_bytes(model) -> int:
    n = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".experts." in name or name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            n += t.numel() * t.element_size()
    return n


def gen_seconds(model, ids, new: int) -> float:
    t0 = time.process_time()  # CPU time of this process: robust to other processes sharing the cores
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    dt = time.process_time() - t0
    assert out.shape[1] == ids.shape[1] + new
    return dt


def forward_seconds(model, ids) -> float:
    t0 = time.process_time()
    with torch.no_grad():
        model(ids)
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "q"
        build_artifact(art, args.group_size)
        models = {"fp32": load_model(MODEL).eval(), "bf16": load_model(MODEL).to(torch.bfloat16).eval(),
                  "packed (load_quantized, fp32 compute)": load_quantized(art)}
        ids = torch.randint(3, models["fp32"].config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        for m in models.values():  # warm-up
            gen_seconds(m, ids, 4)
        per_token: dict[str, list[float]] = {k: [] for k in models}
        prefill: dict[str, list[float]] = {k: [] for k in models}
        batch = torch.randint(3, models["fp32"].config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(1))
        for _ in range(args.repeats):
            for name, m in models.items():
                prefill[name].append(forward_seconds(m, batch))
                t_n = gen_seconds(m, ids, args.new_tokens)
                t_1 = gen_seconds(m, ids, 1)
                per_token[name].append((t_n - t_1) / (args.new_tokens - 1))
        fp32 = statistics.median(per_token["fp32"])
        print(f"torch {torch.__version__}, {args.threads} thread(s), batch 1, {args.new_tokens} new tokens, "
              f"median of {args.repeats}")
        fp32_pre = statistics.median(prefill["fp32"])
        print("| model | CPU ms / token | vs fp32 | forward of 4x128 tokens, CPU ms | vs fp32 | expert weights in memory "
              "(bytes) |")
        print("|---|---|---|---|---|---|")
        for name, m in models.items():
            t, p = statistics.median(per_token[name]), statistics.median(prefill[name])
            print(f"| {name} | {t * 1e3:.3f} | {t / fp32:.2f}x | {p * 1e3:.1f} | {p / fp32_pre:.2f}x | "
                  f"{expert_bytes(m):,} |")


if __name__ == "__main__":
    main()
