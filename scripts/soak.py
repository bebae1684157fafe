"""Soak: many small jobs through two workers while faults are injected at random, then the audit.

    .venv/bin/python scripts/soak.py --jobs 40 --faults 12 --deadline 900 --seed 1

Everything runs on this machine, on loopback only, and stops by itself: a private PostgreSQL and Redis (started
here, never the machine's shared ones), the API (``python -m app.serve --no-worker``), two Celery workers forked from
a warm zygote, and the HTTP Hub mock. Faults, drawn at random until ``--faults`` were injected: ``kill -9`` of a
busy worker (a replacement is started), a Redis crash and restart (no persistence: every message is lost), a
PostgreSQL fast shutdown and restart, Hub errors on the next pushes, a user cancelling a running job.

Prints the counts: jobs lost, jobs stuck in ``running``, duplicate artifacts, final states and reasons. Exit status
0 when lost = stuck = duplicates = 0 and every job ended before the deadline."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))
sys.path.insert(0, str(REPO))

from rel_util import HF_TOKEN, TERMINAL, Cluster, PgServer, RedisServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--faults", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole soak")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--push-every", type=int, default=5, help="every n-th job also pushes to the Hub mock")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    deadline = t0 + args.deadline
    base = Path(tempfile.mkdtemp(prefix="mopeq-soak-"))
    print(f"soak: {args.jobs} jobs, {args.faults} faults, {args.workers} workers, deadline {args.deadline:.0f} s, "
          f"seed {args.seed}; logs in {base}", flush=True)

    sys.path.insert(0, str(REPO / "tests" / "service"))
    from hubmock import HubMock
    from svc_util import HF_TOKEN as TOKEN
    from svc_util import make_tiny_moe

    root = base / "models"
    root.mkdir()
    make_tiny_moe(root / "tiny-moe")
    pg, redis_srv = PgServer(), RedisServer()
    hub = HubMock(tokens={TOKEN: "tester"}).start()
    from app.db.migrate import upgrade

    upgrade(pg.url)
    cl = Cluster(base / "home", root, pg, redis_srv, hub)
    cl.home.mkdir()
    faults: list[dict] = []
    try:
        cl.start_api()
        cl.start_zygote()
        for i in range(args.workers):
            cl.worker(f"w{i}", MOPEQ_DEBUG_STAGE_DELAY="sensitivity:1")  # a wider window for faults mid-job
        print(f"soak: cluster up after {time.monotonic() - t0:.0f} s", flush=True)

        def status(job_id: str) -> dict:
            for _ in range(60):  # the database may be restarting
                try:
                    return cl.job(job_id)
                except AssertionError:
                    raise
                except Exception:  # noqa: BLE001
                    time.sleep(0.5)
            raise RuntimeError("the database stayed unreachable")

        def submit(i: int) -> None:
            body = {}
            if args.push_every and i % args.push_every == 0:
                body = {"hf_token": HF_TOKEN, "push": {"repo_id": f"tester/soak-{i}-{uuid.uuid4().hex[:6]}"}}
            for _attempt in range(30):  # the API answers 503 while PostgreSQL restarts: retry, as the SDK does
                try:
                    cl.submit(**body)
                    return
                except AssertionError as exc:
                    if "503" not in str(exc) and "database_unavailable" not in str(exc):
                        raise
                except Exception as exc:  # noqa: BLE001 - connection refused while something restarts
                    print(f"soak: submit {i}: {type(exc).__name__}; retrying", flush=True)
                time.sleep(1)
            raise RuntimeError(f"job {i} could not be submitted")

        # submit in waves while faults fire at random moments
        pending_submits = list(range(args.jobs))
        kinds = ["kill9", "kill9", "kill9", "redis", "postgres", "hub", "cancel"]
        next_fault = time.monotonic() + rng.uniform(3, 10)
        worker_seq = args.workers
        while time.monotonic() < deadline:
            for _ in range(min(len(pending_submits), rng.randint(1, 4))):
                submit(pending_submits.pop(0))
            if len(faults) < args.faults and time.monotonic() >= next_fault:
                kind = rng.choice(kinds)
                f = {"t": round(time.monotonic() - t0, 1), "kind": kind}
                running = [j for j in cl.submitted if status(j)["status"] == "running"] if kind in (
                    "kill9", "cancel") else []
                if kind == "kill9" and running:
                    victim_job = status(rng.choice(running))
                    pid = int(victim_job["worker_id"].split(":")[1])
                    victim = next((w for w in cl.workers if w.pid == pid), None)
                    if victim is not None:
                        f.update(job=victim_job["id"], stage=victim_job["stage"], pid=pid)
                        victim.kill9()
                        cl.workers.remove(victim)
                        cl.worker(f"w{worker_seq}", MOPEQ_DEBUG_STAGE_DELAY="sensitivity:1")
                        worker_seq += 1
                        faults.append(f)
                elif kind == "redis":
                    down = rng.uniform(0.5, 3)
                    cl.redis.restart(down_s=down)
                    f["down_s"] = round(down, 1)
                    faults.append(f)
                elif kind == "postgres":
                    down = rng.uniform(0.5, 3)
                    cl.pg.restart(down_s=down)
                    f["down_s"] = round(down, 1)
                    faults.append(f)
                elif kind == "hub":
                    codes = [rng.choice([500, 502, 503]) for _ in range(rng.randint(1, 2))]
                    hub.fail_next = [0] * rng.randint(0, 3) + codes
                    f["codes"] = codes
                    faults.append(f)
                elif kind == "cancel" and running:
                    job_id = rng.choice(running)
                    try:
                        r = cl.http.post(f"/v1/jobs/{job_id}/cancel")
                        f.update(job=job_id, status=r.status_code)
                        faults.append(f)
                    except Exception as exc:  # noqa: BLE001 - the API may be restarting its connections
                        print(f"soak: cancel {job_id}: {type(exc).__name__}", flush=True)
                if f in faults:
                    print(f"soak: fault {len(faults)}/{args.faults}: {json.dumps(f)}", flush=True)
                next_fault = time.monotonic() + rng.uniform(3, 12)
            states = Counter(status(j)["status"] for j in cl.submitted)
            if not pending_submits and len(faults) >= args.faults and all(s in TERMINAL for s in states.elements()):
                break
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        a = cl.audit()
        reasons = Counter()
        for j in cl.submitted:
            row = cl.job(j)
            if row["status"] != "succeeded":
                reasons[f"{row['status']}: {row['error_code']}"] += 1
        attempts = Counter(cl.job(j)["attempts"] for j in cl.submitted)
        fig = {"jobs_submitted": len(cl.submitted), "jobs_not_submitted": len(pending_submits),
               "faults": len(faults), "fault_kinds": dict(Counter(f["kind"] for f in faults)),
               "lost": a["lost"], "stuck_running": a["stuck_running"], "duplicate_artifacts": a["duplicate_artifacts"],
               "final": a["final"], "not_succeeded": dict(reasons), "attempts": dict(sorted(attempts.items())),
               "seconds": round(elapsed, 1), "deadline_hit": elapsed >= args.deadline, "problems": a["problems"],
               "fault_log": faults}
        print(json.dumps({k: v for k, v in fig.items() if k != "fault_log"}, indent=1))
        print(f"\njobs {fig['jobs_submitted']}  faults {fig['faults']}  lost {fig['lost']}  stuck running "
              f"{fig['stuck_running']}  duplicate artifacts {fig['duplicate_artifacts']}  final {fig['final']}  "
              f"in {elapsed:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(fig, indent=1, default=str))
        ok = (a["lost"], a["stuck_running"], a["duplicate_artifacts"]) == (0, 0, 0) and not pending_submits \
            and not fig["deadline_hit"]
        return 0 if ok else 1
    finally:
        cl.close()
        hub.stop()
        redis_srv.close()
        pg.close()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
