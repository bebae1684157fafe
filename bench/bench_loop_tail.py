#!/usr/bin/env python
"""Why a single API process has a long tail once a request costs a few tenths of a millisecond of CPU.

    .venv/bin/python bench/bench_loop_tail.py                 # burns 0, 0.05, 0.1, 0.2, 0.3 ms; 1 and 2 processes
    options: --burns 0,0.1,0.3 --processes 1,2 --clients 64 --duration 8

A FastAPI app with one async route that spins the CPU for ``burn`` ms and returns a small constant JSON runs under
the API's uvicorn settings (``app.serve.uvicorn_config``'s, through ``uvicorn.run`` with its ``workers``);
``wrk`` keeps ``--clients`` connections busy on it over loopback (bench_api.py's load generator and parser). The
table shows the rate and latency percentiles per (burn, processes): where the p99 leaves the p50 behind is where
one saturated event loop stops being fair to all connections.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_api import REPO, ensure_wrk, free_port, wait_ready, wrk_load  # noqa: E402


def make_app():  # uvicorn's factory (workers > 1 import it by name); burn from the environment
    from fastapi import FastAPI
    from fastapi.responses import Response

    from app.main import TELEMETRY_OFF

    burn_s = float(os.environ["MOPEQ_BENCH_BURN_MS"]) / 1e3
    app = FastAPI(telemetry=TELEMETRY_OFF)

    @app.get("/burn")
    async def burn() -> Response:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < burn_s:
            pass
        return Response(b'{"status":"succeeded"}', media_type="application/json")

    return app


def serve(port: int, processes: int) -> None:
    import uvicorn

    # app.serve.uvicorn_config's settings, with uvicorn's own process manager for more than one process
    uvicorn.run("bench_loop_tail:make_app", factory=True, workers=processes, host="127.0.0.1", port=port,
                log_config=None, access_log=False, timeout_graceful_shutdown=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--burns", default="0,0.05,0.1,0.2,0.3")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--serve", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return 0
    if not ensure_wrk():
        print("bench_loop_tail: needs wrk", file=sys.stderr)
        return 1
    print(f"command: `python bench/bench_loop_tail.py {' '.join(sys.argv[1:])}`; {args.clients} connections, "
          f"{args.duration:g} s per row, wrk\n")
    print("| CPU burn per request (ms) | API processes | rate (req/s) | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for processes in (int(p) for p in args.processes.split(",")):
        for burn in args.burns.split(","):
            port = free_port()
            env = dict(os.environ, MOPEQ_BENCH_BURN_MS=burn,
                       PYTHONPATH=os.pathsep.join([str(REPO / "bench"), str(REPO)]))
            proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(processes)], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                wait_ready(f"http://127.0.0.1:{port}", 60, proc, path="/burn")
                r = wrk_load(f"http://127.0.0.1:{port}", "-", "/burn", args.clients, args.duration)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            print(f"| {burn} | {processes} | {r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} | {r['max_ms'] or float('nan'):.1f} | {r['errors']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
