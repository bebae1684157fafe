#!/usr/bin/env python
"""Per-stage time, peak memory, passes and bytes read of the engine, resident and streamed, each run in its own
process.

    .venv/bin/python bench/bench_pipeline.py                 # the shipped model and the 24-layer synthetic MoE
    .venv/bin/python bench/bench_pipeline.py --only shipped
    .venv/bin/python bench/bench_pipeline.py --only synthetic

* **shipped**: ``models/mopeq-tiny-moe`` with the same configuration (``hutchinson``, GPTQ, 2.5 mean bits) with
  its layers resident and streamed: the bit maps must be the same.
* **synthetic**: the 24-layer Mixtral-shaped MoE of issue 11 (hidden 1024, ffn 2048, 8 experts, random bfloat16
  weights in the Hub per-expert layout, ``bench/synthetic_moe.py``, ~2.5 GB), streamed. A watchdog in the child
  kills it if its RSS rises more than ``--allow-mb`` above its post-import baseline (default: 8x the largest
  decoder layer's checkpoint bytes, the issue's bound).

Memory is each child's own: VmHWM (the peak RSS of the process, which a fresh exec starts from zero) after
importing torch/transformers/mopeq (the baseline) and after the run; per-stage peaks are the pipelines' own
``report.json`` numbers (peak so far) minus the baseline. Prints Markdown tables (for docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STAGES = ("fetch", "calibrate", "sensitivity", "allocate", "quantize", "evaluate", "export")
SYNTH = dict(layers=24, hidden=1024, heads=8, kv_heads=8, ffn=2048, experts=8, vocab=4096)


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def machine() -> str:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.machine()}, {os.cpu_count()} cores visible (shared with other jobs), {mem:.0f} GiB RAM, "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s), Python {platform.python_version()}")


# ---- child -----------------------------------------------------------------------------------------------------
def child(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    import transformers.conversion_mapping
    import transformers.core_model_loading
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    import mopeq_core.allocate
    import mopeq_core.card
    import mopeq_core.engine
    import mopeq_core.sensitivity
    import mopeq_core.streaming  # noqa: F401
    from mopeq_core.config import Budget, QuantizeConfig

    spec = json.loads(args.spec)
    base = vm_hwm_mb()
    if args.allow_mb:
        def watchdog():
            while True:
                if vm_rss_mb() - base > args.allow_mb:
                    print(f"RSS rose {vm_rss_mb() - base:.0f} MiB above the baseline, over the "
                          f"{args.allow_mb} MiB allowed", file=sys.stderr, flush=True)
                    os._exit(3)
                time.sleep(0.005)
        threading.Thread(target=watchdog, daemon=True).start()
    cfg = QuantizeConfig(**{**spec["cfg"], "budget": Budget(**spec["cfg"]["budget"]),
                            "bits": tuple(spec["cfg"].get("bits", (2, 3, 4)))})
    t0 = time.perf_counter()
    r = mopeq_core.engine.run(cfg, args.out)
    res = {"wall": time.perf_counter() - t0, "baseline_mb": base, "peak_mb": vm_hwm_mb(), "report": r.report,
           "bitmap": {"avg_bits": r.bitmap["avg_bits"], "method": r.bitmap["sensitivity"]["method"],
                      "sensitivity": [[e["sensitivity"] for e in L["experts"]] for L in r.bitmap["layers"]],
                      "bits": [[e["bits"] for e in L["experts"]] for L in r.bitmap["layers"]]}}
    Path(args.result).write_text(json.dumps(res, default=str))
    return 0


# ---- parent ----------------------------------------------------------------------------------------------------
def run_child(label: str, cfg: dict, work: Path, threads: int, allow_mb: float | None = None) -> dict:
    result = work / f"{label}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--spec", json.dumps({"cfg": cfg}),
           "--out", str(work / f"out-{label}"), "--result", str(result), "--threads", str(threads)]
    if allow_mb:
        cmd += ["--allow-mb", str(allow_mb)]
    rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
    if rc != 0 or not result.is_file():
        return {"error": f"exit status {rc}" + (" (killed by the memory watchdog)" if rc == 3 else "")}
    return json.loads(result.read_text())


def table(runs: dict[str, dict]) -> list[str]:
    labels = list(runs)
    head = "| stage | " + " | ".join(f"{k}: s | {k}: peak RSS +MiB" for k in labels) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(labels)]
    for s in STAGES:
        cells = []
        for k in labels:
            r = runs[k]
            if "error" in r:
                cells += ["failed", "-"]
                continue
            st = r["report"]["stages"].get(s, {})
            cells += [f"{st.get('seconds', 0):.2f}", f"{st.get('peak_rss_mb', r['baseline_mb']) - r['baseline_mb']:.0f}"]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    cells = []
    for k in labels:
        r = runs[k]
        if "error" in r:
            cells += [r["error"], "-"]
        else:
            cells += [f"**{r['wall']:.1f}** (wall)", f"**{r['peak_mb'] - r['baseline_mb']:.0f}**"]
    lines.append("| total | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("shipped", "synthetic"), default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson probes (shipped)")
    ap.add_argument("--allow-mb", type=float, default=None, help="memory allowed to the streamed run (synthetic)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    torch.set_num_threads(args.threads)
    cmd = "python bench/bench_pipeline.py " + " ".join(sys.argv[1:])
    print(f"command: `{cmd}`\nmachine: {machine()}\n")
    work = Path(tempfile.mkdtemp(prefix="mopeq-bench-pipeline-"))
    ok = True
    try:
        calib, ev = str(REPO / "data" / "calib.jsonl"), str(REPO / "data" / "eval.txt")
        if args.only in (None, "shipped"):
            common = dict(model=str(REPO / "models" / "mopeq-tiny-moe"), budget={"avg_bits": 2.5},
                          sensitivity="hutchinson", probes=args.probes, quantizer="gptq", group_size=32,
                          calib_samples=16, seq_len=128, calib_file=calib, eval_file=ev, eval_samples=32)
            runs = {"resident": run_child("shipped-resident", dict(common), work, args.threads),
                    "streamed": run_child("shipped-streamed", dict(common, low_memory=True), work, args.threads)}
            print("### Shipped model (`models/mopeq-tiny-moe`, 13.5 MiB float32)\n")
            print(f"Settings: {json.dumps(common)}\n")
            print("\n".join(table(runs)))
            for k, r in runs.items():
                if "error" in r:
                    ok = False
                    continue
                p, eng = r["report"]["perplexity"], r["report"]["engine"]
                print(f"\n- {k}: sensitivity `{r['bitmap']['method']}`, avg bits {r['bitmap']['avg_bits']:.3f}, "
                      f"perplexity FP {p['fp_perplexity']:.3f} -> quantized {p['quantized_perplexity']:.3f}; passes "
                      f"{eng['passes']}; bytes read {eng['bytes_read']:,} (checkpoint {eng['checkpoint_bytes']}); "
                      f"baseline (after imports) {r['baseline_mb']:.0f} MiB")
            if all("error" not in r for r in runs.values()):
                same = runs["resident"]["bitmap"]["bits"] == runs["streamed"]["bitmap"]["bits"]
                print(f"- same bit map resident and streamed: {same}")
                ok = ok and same
            print()
        if args.only in (None, "synthetic"):
            from synthetic_moe import checkpoint_params, write_synthetic_mixtral

            t0 = time.perf_counter()
            ck = write_synthetic_mixtral(work / "synthetic", dtype=torch.bfloat16, **SYNTH)
            size = sum(f.stat().st_size for f in ck.glob("*.safetensors")) / 2**20
            params = checkpoint_params(**SYNTH)
            layer_mb = params["per_layer"] * 2 / 2**20
            allow = args.allow_mb or round(8 * layer_mb)
            common = dict(model=str(ck), budget={"avg_bits": 3.0}, bits=[2, 3, 4], sensitivity="hutchinson",
                          probes=2, quantizer="rtn", group_size=128, calib_samples=4, seq_len=64,
                          calib_file=calib, eval_file=ev, eval_samples=2, low_memory=True)
            print(f"### Synthetic 24-layer Mixtral-shaped MoE, streamed\n\n{SYNTH}, random bfloat16 weights in the "
                  f"Hub per-expert layout, checkpoint {size:.0f} MiB (written in {time.perf_counter() - t0:.1f} s), "
                  f"largest decoder layer about {layer_mb:.0f} MiB; the run is allowed {allow} MiB above its "
                  "post-import baseline (a watchdog kills it beyond that).\n")
            print(f"Settings: {json.dumps({k: v for k, v in common.items() if k != 'model'})}\n")
            runs = {"streamed": run_child("synthetic-streamed", common, work, args.threads, allow_mb=allow)}
            print("\n".join(table(runs)))
            r = runs["streamed"]
            if "error" in r:
                ok = False
            else:
                eng = r["report"]["engine"]
                print(f"\n- peak RSS {r['peak_mb']:.0f} MiB = {r['peak_mb'] / size:.2f}x the checkpoint; "
                      f"{r['peak_mb'] - r['baseline_mb']:.0f} MiB above the {r['baseline_mb']:.0f} MiB baseline = "
                      f"{(r['peak_mb'] - r['baseline_mb']) / layer_mb:.1f}x the largest layer; passes {eng['passes']}; "
                      f"bytes read / checkpoint {eng['bytes_read'] / eng['checkpoint_bytes']:.3f}")
            print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
