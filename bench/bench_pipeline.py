#!/usr/bin/env python
"""Per-stage time and peak memory of both pipelines, each run in its own process.

    .venv/bin/python bench/bench_pipeline.py                 # the shipped model and the 16-layer synthetic MoE
    .venv/bin/python bench/bench_pipeline.py --only shipped
    .venv/bin/python bench/bench_pipeline.py --only synthetic --allow-mb 256

* **shipped**: ``models/mopeq-tiny-moe`` with the in-memory pipeline (``hutchinson``) and ``--low-memory``
  (``layer-hessian``), same calibration, GPTQ, 2.5 mean bits.
* **synthetic**: a 16-layer Mixtral-architecture MoE with random float32 weights in the Hub per-expert layout
  (``bench/synthetic_moe.py``, ~770 MiB), larger than the memory the low-memory run is allowed: a watchdog in the
  child kills it if its RSS rises more than ``--allow-mb`` above its post-import baseline (default: a third of the
  model's size). The in-memory pipeline runs on the same checkpoint without a limit, for contrast.

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
SYNTH = dict(layers=16, hidden=1536, heads=12, kv_heads=12, ffn=64, experts=8, vocab=4096)


def spearman(a, b) -> float:
    import torch

    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


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
    import mopeq_core.lowmem
    import mopeq_core.pipeline  # noqa: F401
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
    if cfg.low_memory:
        from mopeq_core.lowmem import run_low_memory

        r = run_low_memory(cfg, args.out)
    else:
        from mopeq_core.pipeline import run_quantization

        r = run_quantization(cfg, args.out)
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
    ap.add_argument("--probes", type=int, default=32, help="Hutchinson probes of the in-memory run (shipped)")
    ap.add_argument("--allow-mb", type=float, default=None, help="memory allowed to the low-memory run (synthetic)")
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
                          sensitivity="hutchinson", probes=args.probes, quantizer="gptq", group_size=32, calib_samples=16,
                          seq_len=128, calib_file=calib, eval_file=ev, eval_samples=32)
            runs = {"in-memory": run_child("shipped-in-memory", dict(common), work, args.threads),
                    "low-memory": run_child("shipped-low-memory", dict(common, low_memory=True), work, args.threads)}
            print("### Shipped model (`models/mopeq-tiny-moe`, 13.5 MiB float32)\n")
            print(f"Settings: {json.dumps(common)}\n")
            print("\n".join(table(runs)))
            for k, r in runs.items():
                if "error" in r:
                    ok = False
                    continue
                p = r["report"]["perplexity"]
                lm = r["report"].get("low_memory", {})
                extra = (f"; bytes read {lm['bytes_read']:,} of {lm['checkpoint_bytes']:,}" if lm else "")
                print(f"\n- {k}: sensitivity `{r['bitmap']['method']}`, avg bits {r['bitmap']['avg_bits']:.3f}, "
                      f"perplexity FP {p['fp_perplexity']:.3f} -> quantized {p['quantized_perplexity']:.3f}{extra}; "
                      f"baseline (after imports) {r['baseline_mb']:.0f} MiB")
            if all("error" not in r for r in runs.values()):
                a, b = runs["low-memory"]["bitmap"]["sensitivity"], runs["in-memory"]["bitmap"]["sensitivity"]
                flat = spearman(sum(a, []), sum(b, []))
                per = [round(spearman(x, y), 3) for x, y in zip(a, b)]
                print(f"\n- expert ranking, low-memory `layer-hessian` vs in-memory `hutchinson` "
                      f"({runs['in-memory']['report']['sensitivity']['hutchinson']['probes']} probes, median relative "
                      f"standard error {runs['in-memory']['report']['sensitivity']['hutchinson']['rel_std_err_median']:.3f}"
                      f"): Spearman {flat:.3f} over all {len(sum(a, []))} experts; per layer {per}")
                same = sum(x == y for p, q in zip(runs["low-memory"]["bitmap"]["bits"], runs["in-memory"]["bitmap"]["bits"])
                           for x, y in zip(p, q))
                print(f"- same width chosen for {same} of {len(sum(a, []))} experts")
            print()
        if args.only in (None, "synthetic"):
            from synthetic_moe import checkpoint_params, write_synthetic_mixtral

            t0 = time.perf_counter()
            ck = write_synthetic_mixtral(work / "synthetic", dtype=torch.float32, **SYNTH)
            size = checkpoint_params(**SYNTH)["total"] * 4 / 2**20
            allow = args.allow_mb or round(size / 3)
            common = dict(model=str(ck), budget={"avg_bits": 3.0}, bits=[2, 4], sensitivity="hutchinson",
                          probes=4, quantizer="rtn", group_size=32, calib_samples=4, seq_len=64, calib_file=calib,
                          eval_file=ev, eval_samples=2)
            print(f"### Synthetic 16-layer MoE larger than the allowed memory\n\n{SYNTH}, random float32 weights "
                  f"in the Hub per-expert layout, {size:.0f} MiB (written in {time.perf_counter() - t0:.1f} s); "
                  f"the low-memory run is allowed {allow} MiB above its post-import baseline (a watchdog kills it "
                  "beyond that); the in-memory run has no limit.\n")
            print(f"Settings: {json.dumps({k: v for k, v in common.items() if k != 'model'})}\n")
            runs = {"low-memory": run_child("synthetic-low-memory", dict(common, low_memory=True), work,
                                            args.threads, allow_mb=allow),
                    "in-memory": run_child("synthetic-in-memory", dict(common), work, args.threads)}
            print("\n".join(table(runs)))
            for k, r in runs.items():
                if "error" in r:
                    ok = ok and k != "low-memory"
                    continue
                lm = r["report"].get("low_memory", {})
                print(f"\n- {k}: peak RSS {r['peak_mb']:.0f} MiB, {r['peak_mb'] - r['baseline_mb']:.0f} MiB above "
                      f"the {r['baseline_mb']:.0f} MiB baseline (model: {size:.0f} MiB)"
                      + (f"; bytes read / checkpoint {lm['bytes_read'] / lm['checkpoint_bytes']:.3f}" if lm else ""))
            print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
