#!/usr/bin/env python
"""Cost of one Hutchinson probe in the layer-streaming engine, against a forward and a forward+backward.

    .venv/bin/python bench/bench_probe_cost.py [--model DIR] [--batch 8] [--seq-len 128] [--repeats 5]

One probe is what ``sensitivity.hutchinson`` runs per probe: a forward stream carrying the probe's tangent (each
layer: one forward, one backward with ``create_graph`` and one more backward) and a backward stream carrying the
gradient and its tangent (each layer recomputed: one forward, one backward with ``create_graph``, one more
backward). The baselines are the whole model's forward, and its forward+backward to the expert weights, on the same
batch. Times are medians over ``--repeats`` runs measured side by side in one process; the ratios are the figure
to compare across machines. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "mopeq-tiny-moe"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from mopeq_core.calibrate import CalibrationStats
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.loading import load_model, load_tokenizer
    from mopeq_core.moe import find_expert_groups
    from mopeq_core.sensitivity import SensitivityContext, _ExpertParams, lm_loss, streamed_hvp_products
    from mopeq_core.streaming import ModelStream, make_batches, record_inputs

    model = load_model(Path(args.model))
    for p in model.parameters():
        p.requires_grad_(False)
    ids = token_samples(load_tokenizer(Path(args.model)), read_texts(str(REPO / "data" / "calib.jsonl")),
                        args.batch, args.seq_len)
    groups = find_expert_groups(model)
    ep = _ExpertParams(groups)
    stream = ModelStream.from_model(model, groups)
    batches = make_batches(ids, "calib", args.batch, stream.device, stream.dtype)
    inputs = record_inputs(stream, batches)
    stats = CalibrationStats({}, {}, {}, int(ids.numel()), {})
    ctx = SensitivityContext(model, groups, stats, ids, batch_size=args.batch, stream=stream, batches=batches,
                             inputs=inputs)

    def forward():
        with torch.no_grad():
            lm_loss(model, ids)

    def forward_backward():
        for p in ep.params:
            p.requires_grad_(True)
        torch.autograd.grad(lm_loss(model, ids), ep.params)
        for p in ep.params:
            p.requires_grad_(False)

    probe_no = iter(range(10**6))

    def probe():
        streamed_hvp_products(ctx, [next(probe_no)])

    def eight_probes():  # one batch of probes shares the layer recomputations of the two streams
        start = next(probe_no) * 8 + 10**5
        streamed_hvp_products(ctx, list(range(start, start + 8)))

    def timed(fn) -> float:
        fn()  # warm-up
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    t = {"forward": timed(forward), "forward+backward (expert weights)": timed(forward_backward),
         "one streamed probe (forward and backward streams)": timed(probe),
         "per probe, in a batch of 8 probes": timed(eight_probes) / 8}
    print(f"command: `python bench/bench_probe_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, {args.threads} thread(s), median of "
          f"{args.repeats}\n")
    print("| what | seconds | x forward+backward |\n|---|---:|---:|")
    fb = t["forward+backward (expert weights)"]
    for k, v in t.items():
        print(f"| {k} | {v:.4f} | {v / fb:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
