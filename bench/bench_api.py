#!/usr/bin/env python
"""API benchmark: ``GET /v1/jobs/{id}`` under 64 concurrent clients beside a constant-JSON FastAPI app, and the
time from submit to a worker start.

    .venv/bin/python bench/bench_api.py                      # starts `python -m app.serve` itself (fresh state)
    .venv/bin/python bench/bench_api.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test
                                                             # the same on a fresh PostgreSQL database
    .venv/bin/python bench/bench_api.py --profile prof.txt   # also a py-spy profile of the API under load
    .venv/bin/python bench/bench_api.py --url http://127.0.0.1:8000 --api-key KEY   # a running service
    options: --clients 64 --duration 15 --tool auto|wrk|httpx --submits 3

1. **Submit to start**: 1 + ``--submits`` times, one after another on an idle worker, a small job (the shipped model,
   ``frequency`` + RTN, a few calibration tokens) is posted; the client polls ``GET /v1/jobs/{id}`` every 10 ms until
   it leaves ``queued``. Reported: the client-side time from the POST's response to seeing the job running, and the
   server-side ``started_at - created_at``. The job is then cancelled and awaited so the worker is idle again. The
   first job is reported on its own: it also waits for the worker process to start (``/readyz`` does not wait).
2. **Load, side by side**: a separate load-generator process (``wrk`` -- C, HdrHistogram latencies; the script
   installs the Debian package with apt-get when it is missing and it runs as root, otherwise this script's own
   ``--load-gen`` mode with httpx.AsyncClient) keeps ``--clients`` connections busy on ``GET /v1/jobs/{id}`` for
   ``--duration`` seconds over loopback after a 2 s warm-up; then the same on a constant-JSON FastAPI app (one async
   route) served by uvicorn with the API's own settings (``app.serve.uvicorn_config``). Reported for both: requests,
   rate, p50 / p90 / p99 / max latency, errors (non-2xx and socket errors), the server's CPU per request at one
   client, and the ratio of the two p99s.
3. ``--profile FILE``: py-spy (PyPI) samples the API process (every thread, idle ones left out) during a further
   load run; FILE gets the collapsed stacks, the output a table of the top costs.

When it starts the service itself it uses a fresh ``MOPEQ_HOME`` (SQLite + filesystem broker: ``make serve``'s
defaults, or ``--postgres``), a bootstrap API key, ``MOPEQ_MODEL_ROOTS`` = the repository's ``models`` and ``data``,
the CPU worker, and lifts the per-key rate limit (``MOPEQ_RATE_LIMIT_PER_MINUTE``) that would otherwise answer 429 to
a load test; a service given with ``--url`` must be configured so. Exit status 1 when the service cannot be reached
or a step fails; the targets (p99 <= 25 ms, 0 errors, >= 1,500 req/s, p99 within 2x of the constant app's) are
reported, not enforced.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
JOB = {"budget": {"avg_bits": 3.0}, "sensitivity": "frequency", "quantizer": "rtn", "group_size": 32,
       "calibration": {"samples": 2, "seq_len": 32}}
CONSTANT = {"id": "constant", "status": "succeeded", "stage": None, "progress": 1.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(home: Path, port: int, key: str, database_url: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, MOPEQ_HOME=str(home), MOPEQ_PORT=str(port), MOPEQ_BOOTSTRAP_API_KEY=key,
               MOPEQ_MODEL_ROOTS=f"{REPO / 'models'},{REPO / 'data'}", MOPEQ_RATE_LIMIT_PER_MINUTE="1000000000",
               MOPEQ_WORKER_DEVICE="cpu", MOPEQ_LOG_LEVEL=os.environ.get("MOPEQ_LOG_LEVEL", "WARNING"))
    for k in ("MOPEQ_DATABASE_URL", "MOPEQ_BROKER_URL", "MOPEQ_ARTIFACT_DIR", "MOPEQ_WORK_DIR", "MOPEQ_REDIS_URL"):
        env.pop(k, None)
    if database_url:
        env["MOPEQ_DATABASE_URL"] = database_url
    log = open(home / "serve.log", "w")
    return subprocess.Popen([sys.executable, "-m", "app.serve"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None, path: str = "/readyz") -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the service exited with status {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url}{path} did not answer 200 within {timeout:.0f} s")


def _ts(s: str | None) -> float | None:
    return None if s is None else datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def submit_to_start(client: httpx.Client, n: int, start_timeout: float) -> dict:
    client_s, server_s, post_s = [], [], []
    last = None
    for _ in range(n):
        body = dict(JOB, model=str(REPO / "models" / "mopeq-tiny-moe"))
        t0 = time.perf_counter()
        r = client.post("/v1/jobs", json=body)
        t_posted = time.perf_counter()
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/jobs answered {r.status_code}: {r.text[:300]}")
        job_id = r.json()["id"]
        post_s.append(t_posted - t0)
        last = job_id
        while True:
            j = client.get(f"/v1/jobs/{job_id}").json()
            if j["status"] != "queued":
                break
            if time.perf_counter() - t_posted > start_timeout:
                return {"post_ms": [1e3 * x for x in post_s], "client_submit_to_running_ms": [],
                        "server_created_to_started_ms": [], "job_id": job_id,
                        "error": f"job still queued {start_timeout:.0f} s after submit: no worker started it"}
            time.sleep(0.01)
        client_s.append(time.perf_counter() - t_posted)
        if j.get("started_at") and j.get("created_at"):
            server_s.append(_ts(j["started_at"]) - _ts(j["created_at"]))
        client.post(f"/v1/jobs/{job_id}/cancel")
        t1 = time.perf_counter()
        while j["status"] not in ("succeeded", "failed", "cancelled") and time.perf_counter() - t1 < 300:
            time.sleep(0.1)
            j = client.get(f"/v1/jobs/{job_id}").json()
    return {"post_ms": [1e3 * x for x in post_s], "client_submit_to_running_ms": [1e3 * x for x in client_s],
            "server_created_to_started_ms": [1e3 * x for x in server_s], "job_id": last}


# ---- load generators -------------------------------------------------------------------------------------------
async def _httpx_load(url: str, key: str, path: str, clients: int, duration: float, warmup: float) -> dict:
    lat: list[float] = []
    errors = {"non_2xx": 0, "exceptions": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                 timeout=10) as c:
        t_start = time.perf_counter()
        t_measure = t_start + warmup
        t_end = t_measure + duration

        async def worker():
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    r = await c.get(path)
                    ok = 200 <= r.status_code < 300
                except httpx.HTTPError:
                    ok = None
                t1 = time.perf_counter()
                if t0 >= t_measure:
                    lat.append(t1 - t0)
                    if ok is None:
                        errors["exceptions"] += 1
                    elif not ok:
                        errors["non_2xx"] += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    lat.sort()

    def pct(p):
        return 1e3 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")
    return {"tool": "httpx.AsyncClient (python, one process)", "requests": len(lat), "rate": len(lat) / duration,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": 1e3 * lat[-1] if lat else None,
            "errors": errors["non_2xx"] + errors["exceptions"], "error_detail": errors}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text.strip())
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk_load(url: str, key: str, path: str, clients: int, duration: float, warmup: bool = True) -> dict:
    threads = min(2, clients)
    # --timeout 10s: a slow answer is counted in the latencies, not dropped as a socket timeout (wrk's default: 2 s)
    base = ["wrk", f"-t{threads}", f"-c{clients}", "--latency", "--timeout", "10s", "-H",
            f"Authorization: Bearer {key}"]
    if warmup:
        subprocess.run(base + ["-d2s", url + path], capture_output=True, text=True, check=False)
    out = subprocess.run(base + [f"-d{int(duration)}s", url + path], capture_output=True, text=True,
                         check=True).stdout
    res = {"tool": f"wrk 4 ({threads} threads, {clients} connections, 10 s timeout)", "raw": out}
    dist = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.MULTILINE))
    res.update({"p50_ms": _ms(dist["50"]), "p90_ms": _ms(dist["90"]), "p99_ms": _ms(dist["99"])})
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    res["max_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    res["requests"] = int(m.group(1))
    res["rate"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = int((re.search(r"Non-2xx or 3xx responses: (\d+)", out) or [0, 0])[1])
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock_n = sum(int(x) for x in sock.groups()) if sock else 0
    res["errors"] = non2xx + sock_n
    res["error_detail"] = {"non_2xx": non2xx, "socket": sock.group(0) if sock else "none"}
    return res


def ensure_wrk() -> bool:
    """wrk is a Debian package: install it when missing (as root, with apt-get); False when it cannot be had."""
    if shutil.which("wrk"):
        return True
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("bench_api: installing wrk (apt-get install -y wrk)", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], capture_output=True, check=False)
    if not shutil.which("wrk"):
        print("bench_api: wrk not found; install it with `sudo apt-get install -y wrk` (falling back to httpx)",
              file=sys.stderr)
    return bool(shutil.which("wrk"))


def serve_constant(port: int) -> None:
    """Child process: FastAPI with one async route returning a constant JSON, under the API's uvicorn settings."""
    import uvicorn
    from fastapi import FastAPI

    from app.main import TELEMETRY_OFF
    from app.serve import uvicorn_config

    app = FastAPI(telemetry=TELEMETRY_OFF)

    @app.get("/constant")
    async def constant() -> dict:
        return CONSTANT

    uvicorn.Server(uvicorn_config(app, "127.0.0.1", port)).run()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, key: str, path: str, clients: int, duration: float, tool: str, pid: int | None) -> dict:
    if tool == "wrk":
        load = wrk_load(url, key, path, clients, duration)
    else:
        out = subprocess.run([sys.executable, __file__, "--load-gen", "--url", url, "--api-key", key, "--path", path,
                              "--clients", str(clients), "--duration", str(duration)],
                             capture_output=True, text=True, check=True).stdout
        load = json.loads(out.strip().splitlines()[-1])
    if pid is not None and tool == "wrk":  # CPU per request at one client: the server's cost, not queueing
        c0 = cpu_seconds(pid)
        one = wrk_load(url, key, path, 1, min(duration, 5.0), warmup=False)
        load["cpu_ms_per_request"] = 1e3 * (cpu_seconds(pid) - c0) / max(1, one["requests"])
    return load


# ---- profile -------------------------------------------------------------------------------------------------------
def _frame(f: str) -> tuple[str, str]:
    """py-spy's 'func (pkg/mod.py:12)' -> ('func (mod.py)', the package: 'fastapi', 'stdlib: asyncio', ...)."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", f)
    name, path = (m.group(1), m.group(2)) if m else (f, "")
    top = Path(path).parts[0].removesuffix(".py") if path else "native"
    if top in sys.stdlib_module_names or top.startswith("<frozen"):
        top = "stdlib: " + top.removeprefix("<frozen ").rstrip(">")
    return f"{name} ({Path(path).name})", top


def summarize_profile(raw: str, top: int = 15) -> str:
    """py-spy's collapsed stacks -> markdown: self time per package, and the functions with the most inclusive time."""
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_frame(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if frames:
            self_fn[frames[-1][0]] += count
            self_pkg[frames[-1][1]] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples of the thread holding the GIL.", "", "| self time by package | share |", "|---|---:|"]
    lines += [f"| {pkg} | {100 * c / total:.1f}% |" for pkg, c in self_pkg.most_common(12)]
    lines += ["", "| function (self time) | share |", "|---|---:|"]
    lines += [f"| `{f}` | {100 * c / total:.1f}% |" for f, c in self_fn.most_common(top)]
    return "\n".join(lines)


def profile(url: str, key: str, path: str, clients: int, duration: float, pid: int, out: Path) -> str:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    # --gil: only the thread holding the GIL is sampled, i.e. Python's CPU time, not threads waiting for work
    rec = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250", "--nonblocking",
                            "--gil",
                            "--duration", str(int(duration)), "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    wrk_load(url, key, path, clients, duration, warmup=False)
    _, err = rec.communicate(timeout=duration + 60)
    if rec.returncode != 0 or not out.is_file():
        return f"(py-spy failed: {err.strip()[-300:]})"
    return summarize_profile(out.read_text())


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.machine()}, {os.cpu_count()} cores visible (shared with other jobs), {mem:.0f} GiB RAM, " \
           f"Python {platform.python_version()}, load average {load} (1/5/15 min) at the end"


def _pg_database(admin_url: str, drop: str | None = None) -> str:
    """Creates (or drops) a private database next to ``admin_url``'s; returns its URL."""
    import psycopg

    conn = psycopg.connect(admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    with conn:
        if drop:
            conn.execute(f'DROP DATABASE IF EXISTS "{drop}" WITH (FORCE)')
            return ""
        name = "mopeq_bench_" + secrets.token_hex(6)
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def _row(name: str, r: dict) -> str:
    cpu = r.get("cpu_ms_per_request")
    return (f"| {name} | {r['requests']} | {r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['max_ms'] or float('nan'):.1f} | {r['errors']} | "
            f"{'-' if cpu is None else f'{cpu:.2f}'} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--url", default=None, help="a running service (default: start one)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--postgres", default=None, metavar="ADMIN_URL",
                    help="run the started service on a fresh database created next to this PostgreSQL URL")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--submits", type=int, default=5, help="jobs timed after the first (cold) one")
    ap.add_argument("--tool", choices=("auto", "wrk", "httpx"), default="auto")
    ap.add_argument("--profile", type=Path, default=None, help="write py-spy's collapsed stacks here and summarize")
    ap.add_argument("--start-timeout", type=float, default=120.0, help="seconds a job may stay queued")
    ap.add_argument("--load-gen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--constant-app", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.load_gen:  # child process: the httpx load generator
        print(json.dumps(asyncio.run(_httpx_load(args.url, args.api_key, args.path, args.clients, args.duration,
                                                 2.0))))
        return 0
    if args.constant_app is not None:  # child process: the constant-JSON app
        serve_constant(args.constant_app)
        return 0

    proc = home = const = db_name = None
    key = args.api_key or ("bench-" + secrets.token_hex(16))
    url = args.url
    prof_summary = None
    try:
        tool = args.tool
        if tool == "auto":
            tool = "wrk" if ensure_wrk() else "httpx"
        if url is None:
            home = Path(tempfile.mkdtemp(prefix="mopeq-bench-api-"))
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            db_url = _pg_database(args.postgres) if args.postgres else None
            db_name = db_url.rsplit("/", 1)[1] if db_url else None
            proc = start_service(home, port, key, db_url)
        cport = free_port()
        const = subprocess.Popen([sys.executable, __file__, "--constant-app", str(cport)], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_ready(url, 180, proc)
        const_url = f"http://127.0.0.1:{cport}"
        wait_ready(const_url, 60, const, path="/constant")
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        sub = submit_to_start(client, args.submits + 1, args.start_timeout)
        path = f"/v1/jobs/{sub['job_id']}"
        assert client.get(path).status_code == 200
        ours = measure(url, key, path, args.clients, args.duration, tool, proc.pid if proc else None)
        base = measure(const_url, key, "/constant", args.clients, args.duration, tool, const.pid)
        if args.profile is not None and proc is not None and tool == "wrk":
            prof_summary = profile(url, key, path, args.clients, args.duration, proc.pid, args.profile)
    except Exception as exc:  # noqa: BLE001 - reported; exit status 1
        print(f"bench_api: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        if home is not None and (home / "serve.log").is_file():
            print((home / "serve.log").read_text()[-3000:], file=sys.stderr)
        return 1
    finally:
        for p in (proc, const):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)
        if db_name:
            _pg_database(args.postgres, drop=db_name)

    cmd = "python bench/bench_api.py " + " ".join(sys.argv[1:] if argv is None else argv)
    db = "PostgreSQL" if args.postgres else "SQLite"
    print(f"command: `{cmd}`\nmachine: {machine()}; service: "
          f"{f'python -m app.serve (embedded: {db}, filesystem broker, 1 CPU worker)' if proc else url}\n")
    print(f"**GET {'/v1/jobs/{id}'}** beside a constant-JSON FastAPI app (async route, same uvicorn settings), "
          f"{args.clients} concurrent clients, {args.duration:g} s each after a 2 s warm-up, load generator: "
          f"{ours['tool']} in a separate process, loopback; CPU per request: server process CPU time over a 5 s "
          "run at 1 client\n")
    print("| app | requests | rate (req/s) | p50 ms | p90 ms | p99 ms | max ms | errors | CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(_row("`GET /v1/jobs/{id}`", ours))
    print(_row("constant JSON", base))
    ratio = ours["p99_ms"] / base["p99_ms"] if base["p99_ms"] else float("nan")
    met = ours["p99_ms"] <= 25 and ours["errors"] == 0 and ours["rate"] >= 1500
    print(f"\np99 ratio (ours / constant app): **{ratio:.2f}** (target <= 2: {'met' if ratio <= 2 else 'MISSED'}); "
          f"target p99 <= 25 ms, 0 errors, >= 1,500 req/s: {'met' if met else 'MISSED'} "
          f"(errors: {ours['error_detail']})\n")
    if prof_summary:
        print(f"**Profile** (py-spy, {args.duration:g} s at {args.clients} clients; stacks in {args.profile}):\n")
        print(prof_summary + "\n")
    cs, ss, ps = sub["client_submit_to_running_ms"], sub["server_created_to_started_ms"], sub["post_ms"]
    if not sub.get("error") and len(cs) > 1:  # the first job also waits for the worker process to come up
        cold = (cs[0], ss[0] if ss else float("nan"))
        cs, ss = cs[1:], ss[1:]
        print(f"**First job after the service started** (the worker was still starting: /readyz does not wait for "
              f"it): submit -> running {cold[0]:.0f} ms client-observed, {cold[1]:.0f} ms server-side\n")
    if sub.get("error"):
        print(f"**Submit to worker start**: NOT MEASURED - {sub['error']} (POST /v1/jobs itself: median "
              f"{statistics.median(ps):.0f} ms); the load test above ran against that queued job")
        return 1
    print(f"**Submit to worker start** ({len(cs)} further jobs, one at a time, idle worker): client-observed "
          f"POST response -> status running: median {statistics.median(cs):.0f} ms (max {max(cs):.0f}); server "
          f"started_at - created_at: median {statistics.median(ss) if ss else float('nan'):.0f} ms "
          f"(max {max(ss) if ss else float('nan'):.0f}); POST /v1/jobs itself: median {statistics.median(ps):.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
