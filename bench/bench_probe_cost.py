#!/usr/bin/env python
"""Cost of one Hutchinson probe as a multiple of one forward+backward on the same batch, measured side by side.

    .venv/bin/python bench/bench_probe_cost.py [--model models/mopeq-tiny-moe] [--batch 8] [--seq-len 128]
                                               [--repeats 7] [--threads 1] [--device cpu]

One probe is exactly what ``sensitivity.hutchinson`` runs per probe (``hutchinson_probe``: forward, gradient with
``create_graph=True`` w.r.t. every expert parameter, Rademacher v, a second backward for Hv, v.Hv summed per
expert). The baselines on the same batch and model state:

* ``fwd+bwd (experts)``: forward and one backward for the gradient w.r.t. the same expert parameters (the cost of a
  gradient the probe builds on; what one ``fisher`` sample costs),
* ``fwd+bwd (all)``: forward and backward w.r.t. every parameter (an ordinary training step without the optimizer),
* ``forward``: the forward alone.

Timings alternate (baseline, probe, baseline, probe, ...) after one warm-up each; medians are reported. Also
measured: the probe's two halves (forward + ``create_graph`` backward; the backward of the backward), a
forward-over-reverse HVP (``torch.func.jvp`` of ``torch.func.grad``) as the alternative exact method, and the
low-memory pipeline's layer-local trace (``sensitivity.layer_hessian_trace`` for every expert of every layer on the routed
tokens of the same batch).
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
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-alternative", action="store_true", help="do not time the forward-over-reverse HVP")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from mopeq_core.data import read_texts, token_samples
    from mopeq_core.loading import load_model, load_tokenizer
    from mopeq_core.sensitivity import layer_hessian_trace
    from mopeq_core.moe import find_expert_groups
    from mopeq_core.sensitivity import _ExpertParams, _RequiresGradOnly, hutchinson_probe, lm_loss

    model = load_model(Path(args.model), device=args.device)
    tok = load_tokenizer(Path(args.model))
    batch = token_samples(tok, read_texts(str(REPO / "data" / "calib.jsonl")), args.batch, args.seq_len)
    batch = batch.to(args.device)
    groups = find_expert_groups(model)
    ep = _ExpertParams(groups)
    gen = torch.Generator().manual_seed(0)
    all_params = [p for p in model.parameters()]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            lm_loss(model, batch)

    def fb_experts():
        with _RequiresGradOnly(model, ep.params):
            torch.autograd.grad(lm_loss(model, batch), ep.params)

    def fb_all():
        with _RequiresGradOnly(model, all_params):
            torch.autograd.grad(lm_loss(model, batch), all_params)

    def probe():
        with _RequiresGradOnly(model, ep.params):
            hutchinson_probe(model, ep, batch, gen)

    vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype) * 2 - 1 for p in ep.params]
    graph = {}

    def probe_part1():  # forward + the gradient with create_graph=True (what the second backward needs)
        with _RequiresGradOnly(model, ep.params):
            grads = torch.autograd.grad(lm_loss(model, batch), ep.params, create_graph=True)
            graph["gv"] = sum((g * v).sum() for g, v in zip(grads, vs))

    def probe_part2():  # the backward of the backward: Hv
        with _RequiresGradOnly(model, ep.params):
            torch.autograd.grad(graph.pop("gv"), ep.params)

    from torch.func import functional_call, grad, jvp

    names = [n for n, p in model.named_parameters() if any(p is q for q in ep.params)]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    ex = {n: fixed[n] for n in names}
    vd = dict(zip(names, vs))

    def func_loss(e):
        logits = functional_call(model, {**fixed, **e}, (), {"input_ids": batch}).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 batch[:, 1:].reshape(-1))

    def fwd_over_rev():
        jvp(grad(func_loss), (ex,), (vd,))

    routed = {}

    def capture_hook(g):
        def hook(module, a, kw):
            hidden = a[0] if a else kw["hidden_states"]
            idx = a[1] if len(a) > 1 else kw["top_k_index"]
            w = a[2] if len(a) > 2 else kw["top_k_weights"]
            routed[g.layer] = (hidden.detach().reshape(-1, hidden.shape[-1]), idx.detach(), w.detach())
        return hook

    handles = [g.module.register_forward_pre_hook(capture_hook(g), with_kwargs=True) for g in groups]
    forward()
    for h in handles:
        h.remove()

    def local_trace():
        for g in groups:
            hidden, idx, w = routed[g.layer]
            for e in range(g.num_experts):
                tok_i, pos = torch.where(idx == e)
                layer_hessian_trace(g, e, hidden[tok_i], w[tok_i, pos])

    fns = {"forward": forward, "fwd+bwd (experts)": fb_experts, "fwd+bwd (all)": fb_all,
           "Hutchinson probe": probe, "- probe part 1: forward + backward with create_graph": probe_part1,
           "- probe part 2: backward of the backward (Hv)": probe_part2,
           "alternative, not used: forward-over-reverse HVP (torch.func)": fwd_over_rev,
           "layer-local trace (all layers)": local_trace}
    if args.skip_alternative:
        fns.pop("alternative, not used: forward-over-reverse HVP (torch.func)")
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
        sync()
    for _ in range(args.repeats):
        for k, fn in fns.items():  # interleaved: every quantity sees the same machine state
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"command: `python bench/bench_probe_cost.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, device {args.device}, "
          f"{args.threads} thread(s), {args.repeats} interleaved repeats (median; min..max)\n")
    print("| quantity | median ms | min..max ms | x fwd+bwd (experts) | x fwd+bwd (all) | x forward |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in fns:
        print(f"| {k} | {1e3 * med[k]:.1f} | {1e3 * min(times[k]):.1f}..{1e3 * max(times[k]):.1f} | "
              f"{med[k] / med['fwd+bwd (experts)']:.2f} | {med[k] / med['fwd+bwd (all)']:.2f} | "
              f"{med[k] / med['forward']:.2f} |")
    ratio = med["Hutchinson probe"] / med["fwd+bwd (experts)"]
    print(f"\none Hutchinson probe = {ratio:.2f} x one forward+backward (same batch, gradients w.r.t. the same "
          f"expert parameters); target <= 2.5: {'met' if ratio <= 2.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
