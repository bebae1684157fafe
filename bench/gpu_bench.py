#!/usr/bin/env python
"""GPU benchmark: the whole MoPEQ pipeline on a Mixtral-8x7B-shaped MoE with random weights.

    python bench/gpu_bench.py                       # H200: the engine with streamed layers, 2 of 32 layers measured
    python bench/gpu_bench.py --pipeline both       # also with the layers resident
    python bench/gpu_bench.py --scale small --device cpu   # a scaled-down shape that runs anywhere

It writes a checkpoint with Mixtral-8x7B's shapes (hidden 4096, expert FFN 14336, 8 experts, top-2, 32 heads / 8 KV
heads, vocabulary 32000; random bfloat16 weights, Hub per-expert layout) holding ``--layers`` decoder layers (default
2, not 32: a 32-layer checkpoint is 93 GB), runs the pipeline on it and prints per-stage time and peak GPU memory as a
table. The 32-layer column is an EXTRAPOLATION, and the output says so: the stages that run once per decoder layer
(calibrate -- which includes reading the checkpoint --, sensitivity, quantize, evaluate, export) are scaled by
32 / layers, fetch and allocate are kept as measured; the low-memory pipeline holds one decoder layer at a time, so
its peak memory does not grow with the layer count. Exit status 0 only when every run finished and its checks
(bit map within budget, finite perplexities, bytes read <= 1.1 x checkpoint, the artifact loads and runs) passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from synthetic_moe import MIXTRAL_8X7B, checkpoint_params, write_synthetic_mixtral

TARGET_LAYERS = 32
TARGET_SECONDS = 15 * 60
SCALES = {
    "full": {k: v for k, v in MIXTRAL_8X7B.items() if k != "layers"},
    "small": dict(hidden=512, ffn=1792, experts=8, top_k=2, heads=8, kv_heads=2, vocab=4096),
}
STAGES = ("fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export")
PER_LAYER_STAGES = {  # stages whose work is proportional to the number of decoder layers
    "streamed": ("calibrate", "sensitivity", "quantize", "evaluate", "export"),
    "resident": STAGES,
}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible, " \
           f"{torch.get_num_threads()} torch threads)"


def _run(pipeline: str, model_dir: Path, out: Path, args) -> dict:
    import torch

    from mopeq_core.config import Budget, QuantizeConfig

    cfg = QuantizeConfig(model=str(model_dir), budget=Budget(avg_bits=args.avg_bits), bits=(2, 3, 4),
                         quantizer=args.quantizer, group_size=args.group_size, sensitivity="hutchinson",
                         probes=args.probes, calib_samples=args.calib_samples, seq_len=args.seq_len,
                         calib_file=str(REPO / "data" / "calib.jsonl"), eval_file=str(REPO / "data" / "eval.txt"),
                         eval_samples=args.eval_samples, device=args.device, low_memory=pipeline == "streamed")
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    from mopeq_core.engine import run

    result = run(cfg, out)
    wall = time.perf_counter() - t0
    rep = result.report
    checks = {}
    checks["bitmap within budget"] = result.bitmap["expert_bytes"] <= rep["allocation"]["budget_expert_bytes"]
    ppl = rep["perplexity"]
    checks["finite perplexities"] = all(math.isfinite(ppl[k]) for k in ("fp_perplexity", "quantized_perplexity"))
    eng = rep["engine"]
    if eng["checkpoint_bytes"]:  # calibrate, two sensitivity streams per probe batch, quantize
        passes = sum(eng["passes"].values())
        checks[f"bytes read <= {passes} passes x checkpoint"] = eng["bytes_read"] <= 1.05 * passes * eng[
            "checkpoint_bytes"]
    checks["artifact loads and runs"] = _load_check(out, args.device)
    return {"pipeline": pipeline, "wall_seconds": wall, "stages": rep["stages"], "perplexity": ppl,
            "avg_bits": result.bitmap["avg_bits"], "checks": checks,
            "bytes_read": eng["bytes_read"], "checkpoint_bytes": eng["checkpoint_bytes"], "engine": eng}


def _load_check(out: Path, device: str) -> bool:
    import torch

    from mopeq_core.loader import load_quantized

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_quantized(out, device=device, dtype=dtype)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 35, device=device).view(1, -1)).logits
    ok = bool(torch.isfinite(logits.float()).all())
    del model, logits
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return ok


def _passthrough(args) -> list[str]:
    out = ["--device", args.device, "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
           "--eval-samples", str(args.eval_samples), "--quantizer", args.quantizer, "--group-size",
           str(args.group_size), "--avg-bits", str(args.avg_bits), "--probes", str(args.probes)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def _fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _table(run: dict, layers: int) -> tuple[list[str], float]:
    scale = TARGET_LAYERS / layers
    low = run["pipeline"] == "streamed"
    lines = [(f"| stage | seconds ({layers} layers, measured) | seconds ({TARGET_LAYERS} layers, extrapolated) | "
              "peak GPU MiB | peak RSS MiB |"), "|---|---:|---:|---:|---:|"]
    tot_m = tot_x = 0.0
    peak_gpu = peak_rss = 0.0
    for s in STAGES:
        st = run["stages"].get(s, {})
        sec = st.get("seconds", 0.0)
        ext = sec * scale if s in PER_LAYER_STAGES[run["pipeline"]] else sec
        gpu = st.get("layer_pass_peak_gpu_mb") if s in ("sensitivity",) else st.get("peak_gpu_mb")
        if s == "quantize" and st.get("layer_pass_peak_gpu_mb") is not None:
            gpu = max(st.get("peak_gpu_mb", 0.0), st["layer_pass_peak_gpu_mb"])
        gpu_txt = _fmt(gpu, 0) + ("" if low or gpu is None else " (run max so far)")
        tot_m += sec
        tot_x += ext
        peak_gpu = max(peak_gpu, gpu or 0.0)
        peak_rss = max(peak_rss, st.get("peak_rss_mb", 0.0))
        lines.append(f"| {s} | {sec:,.1f} | {ext:,.1f} | {gpu_txt} | {_fmt(st.get('peak_rss_mb'), 0)} |")
    lines.append(f"| **total** | **{tot_m:,.1f}** | **{tot_x:,.1f}** | {_fmt(peak_gpu or None, 0)} | "
                 f"{_fmt(peak_rss, 0)} |")
    return lines, tot_x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers written and measured (of 32)")
    ap.add_argument("--pipeline", choices=("streamed", "resident", "both"), default="streamed")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson probes ")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and outputs go (default tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--run-one", choices=("streamed", "resident"), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run_one:  # child: one pipeline, result as JSON
        try:
            run = _run(args.run_one, args.model, args.out, args)
        except Exception as exc:  # noqa: BLE001 - reported to the parent as JSON
            traceback.print_exc()
            run = {"pipeline": args.run_one, "error": f"{type(exc).__name__}: {exc}"}
        args.result.write_text(json.dumps(run, default=str))
        return 0 if "error" not in run else 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    shape = SCALES[args.scale]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mopeq-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"ok": False, "device": _device_name(args.device), "scale": args.scale, "layers": args.layers,
               "shape": shape, "command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv), "runs": []}
    ok = True
    try:
        params = checkpoint_params(layers=args.layers, **shape)
        print(f"# MoPEQ GPU benchmark ({args.scale} scale) on {results['device']}, torch {torch.__version__}")
        print(f"model: Mixtral-8x7B-shaped MoE ({'' if args.scale == 'full' else 'SCALED DOWN: '}hidden "
              f"{shape['hidden']}, expert FFN {shape['ffn']}, {shape['experts']} experts, top-{shape['top_k']}, "
              f"{shape['heads']} heads / {shape['kv_heads']} KV heads, vocab {shape['vocab']}), random bfloat16 "
              f"weights, {args.layers} of {TARGET_LAYERS} decoder layers written "
              f"({params['total'] * 2 / 2**30:.2f} GiB; {TARGET_LAYERS} layers would be "
              f"{checkpoint_params(layers=TARGET_LAYERS, **shape)['total'] * 2 / 2**30:.1f} GiB)")
        t0 = time.perf_counter()
        gen_device = args.device if args.device.startswith("cuda") else "cpu"
        ck = write_synthetic_mixtral(work / "checkpoint", layers=args.layers, dtype=torch.bfloat16,
                                     layers_per_shard=1, device=gen_device, max_position=max(4096, args.seq_len),
                                     **shape)
        results["checkpoint_write_seconds"] = time.perf_counter() - t0
        print(f"checkpoint written in {results['checkpoint_write_seconds']:.1f} s (not part of the pipeline)")
        print(f"run: {args.calib_samples} x {args.seq_len} calibration tokens, {args.eval_samples} x {args.seq_len} "
              f"evaluation tokens, {args.quantizer}, group {args.group_size}, widths {{2,3,4}}, "
              f"{args.avg_bits} mean bits")
        print(f"NOTE: measured on {args.layers} of {TARGET_LAYERS} layers. The {TARGET_LAYERS}-layer column is "
              f"EXTRAPOLATED, not measured: per-layer stages x {TARGET_LAYERS / args.layers:g} (low-memory: "
              f"{', '.join(PER_LAYER_STAGES['low-memory'])}; fetch and allocate as measured; in-memory: every "
              "stage). Each pipeline runs in its own process.\n")
        pipelines = ["streamed", "resident"] if args.pipeline == "both" else [args.pipeline]
        for p in pipelines:
            # each pipeline in its own process: peak RSS and GPU memory are its own
            child_json = work / f"run-{p}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", p, "--model", str(ck),
                   "--out", str(work / f"out-{p}"), "--result", str(child_json)] + _passthrough(args)
            rc = subprocess.run(cmd, check=False).returncode
            run = json.loads(child_json.read_text()) if child_json.is_file() else {"error": f"exit status {rc}"}
            if rc != 0 or "error" in run:
                results["runs"].append({"pipeline": p, "error": run.get("error", f"exit status {rc}")})
                ok = False
                print(f"## {p} pipeline FAILED: {run.get('error')}\n")
                continue
            results["runs"].append(run)
            lines, extrapolated = _table(run, args.layers)
            run["extrapolated_total_seconds"] = extrapolated
            print(f"## {p} pipeline (wall {run['wall_seconds']:.1f} s for {args.layers} layers)")
            print("\n".join(lines))
            if p == "resident":
                fp32 = checkpoint_params(layers=TARGET_LAYERS, **shape)["total"] * 4 / 2**30
                print(f"(resident layers hold the whole model in float32: {fp32:.0f} GiB for "
                      f"{TARGET_LAYERS} layers, plus gradients for its Hessian-vector products)")
            if p == "streamed":
                eng = run["engine"]
                print(f"passes {eng['passes']}; layer loads {eng['layer_loads']}; bytes read {run['bytes_read']:,} "
                      f"of {run['checkpoint_bytes']:,}")
                if args.scale == "full":
                    verdict = "meets" if extrapolated <= TARGET_SECONDS else "MISSES"
                    print(f"extrapolated whole pipeline for {TARGET_LAYERS} layers: {extrapolated / 60:.1f} min "
                          f"({verdict} the 15 min target)")
            failed = [k for k, v in run["checks"].items() if not v]
            print(f"checks: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)} "
                  f"({', '.join(run['checks'])}); perplexity FP {run['perplexity']['fp_perplexity']:.4g} -> "
                  f"quantized {run['perplexity']['quantized_perplexity']:.4g} (random weights: only finiteness "
                  "matters)\n")
            ok = ok and not failed
    except Exception as exc:  # noqa: BLE001 - reported; exit status 1
        traceback.print_exc()
        results["error"] = f"{type(exc).__name__}: {exc}"
        ok = False
    finally:
        results["ok"] = ok
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
