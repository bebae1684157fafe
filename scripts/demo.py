"""`make demo`: the main job end to end on embedded defaults, no network.

Starts the service (`python -m app.serve`: SQLite, filesystem broker, local artifact store, one embedded worker)
on a free loopback port, submits a job on the shipped trained model through the SDK, follows its progress over
SSE, prints the bit map as a table, the perplexities and where the artifact is, then stops the service.

    .venv/bin/python scripts/demo.py [--local] [--avg-bits 2.5] [--sensitivity hutchinson] [--keep-running]

``--local`` runs the same job in-process with `mopeq quantize` instead of through the service.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "mopeq-tiny-moe"  # under the model root models/
KNOBS = dict(group_size=64, calib_samples=16, seq_len=128, eval_samples=32, probes=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(args) -> int:
    cmd = [sys.executable, "-m", "app.cli", "quantize", str(REPO / "models" / MODEL),
           "--out", str(REPO / "out" / "demo-local"), "--avg-bits", str(args.avg_bits),
           "--sensitivity", args.sensitivity, "--group-size", str(KNOBS["group_size"]),
           "--calib-samples", str(KNOBS["calib_samples"]), "--seq-len", str(KNOBS["seq_len"]),
           "--probes", str(KNOBS["probes"]), "--eval-file", str(REPO / "data" / "eval.txt"),
           "--eval-samples", str(KNOBS["eval_samples"])]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=REPO)


def run_service(args) -> int:
    from rich.console import Console

    from mopeq_client import MopeqClient
    from mopeq_client.cli import bitmap_table

    console = Console()
    home = REPO / ".mopeq" / "demo"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    key = "mopeq_demo_" + secrets.token_hex(16)
    env = dict(os.environ, MOPEQ_HOME=str(home), MOPEQ_PORT=str(port), MOPEQ_BOOTSTRAP_API_KEY=key,
               MOPEQ_MODEL_ROOTS=f"{REPO / 'models'},{REPO / 'data'}", MOPEQ_LOG_LEVEL="WARNING",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore")
    env.pop("MOPEQ_DATABASE_URL", None)
    env.pop("MOPEQ_BROKER_URL", None)
    console.print(f"[bold]starting the service[/] on http://127.0.0.1:{port} (embedded: SQLite + filesystem broker "
                  f"under {home})")
    server = subprocess.Popen([sys.executable, "-m", "app.serve"], cwd=REPO, env=env, start_new_session=True)
    try:
        client = MopeqClient(f"http://127.0.0.1:{port}", key)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.ready()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    console.print("[red]the service did not start[/]")
                    return 1
                time.sleep(0.5)
        job = client.submit(MODEL, avg_bits=args.avg_bits, sensitivity=args.sensitivity,
                            calib_samples=KNOBS["calib_samples"], seq_len=KNOBS["seq_len"],
                            group_size=KNOBS["group_size"], probes=KNOBS["probes"],
                            eval_file=str(REPO / "data" / "eval.txt"), eval_samples=KNOBS["eval_samples"])
        console.print(f"submitted job [bold]{job.id}[/]: {MODEL} at {args.avg_bits} mean bits, "
                      f"sensitivity {args.sensitivity}, GPTQ")
        final = client.wait(job.id, progress=True)
        if final.status != "succeeded":
            console.print(f"[red]job {final.status}[/]: {final.error}")
            return 1
        bitmap = client.bitmap(job.id)
        console.print(bitmap_table(bitmap))
        ppl = (final.raw.get("result") or {}).get("perplexity") or {}
        if ppl.get("fp_perplexity"):
            console.print(f"perplexity on data/eval.txt: full precision {ppl['fp_perplexity']:.3f} → quantized "
                          f"{ppl['quantized_perplexity']:.3f} ({ppl['increase_pct']:+.2f} %)")
        console.print(f"size: {bitmap['total_bytes']:,} B (experts {bitmap['expert_bytes']:,} B, "
                      f"mean {bitmap['avg_bits']:.3f} bits)")
        arts = client.artifacts(job.id)
        where = {str(Path(a.uri.removeprefix("file://").removeprefix("file:")).parent) for a in arts
                 if getattr(a, "uri", None) and a.kind == "file"}
        console.print(f"artifact: {len(arts)} files in {', '.join(sorted(where)) or home / 'artifacts'}")
        console.print(f"download: mopeq download {job.id} DEST --url http://127.0.0.1:{port} --api-key …")
        if args.keep_running:
            console.print(f"service left running (pid {server.pid}); API key {key}")
            return 0
        return 0
    finally:
        if not args.keep_running and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            console.print("service stopped")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", action="store_true", help="run in-process instead of through the service")
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--sensitivity", default="hutchinson")
    ap.add_argument("--keep-running", action="store_true")
    args = ap.parse_args()
    return run_local(args) if args.local else run_service(args)


if __name__ == "__main__":
    sys.exit(main())
