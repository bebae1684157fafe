"""Upload and presigned-download throughput of the S3 artifact store against a local S3-compatible server.

    .venv/bin/python bench/bench_store.py [--mib 256] [--endpoint http://127.0.0.1:PORT]

Without --endpoint it starts moto's server (``python -m moto.server``) on a free port for the run. Prints MiB/s of
``S3Store.publish`` (SHA-256 + multipart upload, the worker's path) and of a GET of the presigned URL (the client's
path after the API's redirect)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.services.storage import S3Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--endpoint")
    ap.add_argument("--chunk-mib", type=int, default=64)
    a = ap.parse_args()
    proc = None
    if not a.endpoint:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a.endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(a.endpoint, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": a.endpoint, "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "x"),
                       "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "x"),
                       "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            with open(out / "model.safetensors", "wb") as f:
                for _ in range(a.mib):
                    f.write(os.urandom(1 << 20))
            store = S3Store("s3://mopeq-bench/bench", Path(tmp) / "work", multipart_threshold=a.chunk_mib << 20,
                            multipart_chunk=a.chunk_mib << 20)
            try:
                store.client.create_bucket(Bucket="mopeq-bench")
            except Exception:  # noqa: BLE001 - exists
                pass
            t = time.perf_counter()
            files = store.publish("job", 1, out)
            up = time.perf_counter() - t
            t = time.perf_counter()
            n = 0
            with httpx.stream("GET", store.presigned_url(files[0].uri, "model.safetensors"), timeout=120) as r:
                for chunk in r.iter_bytes(1 << 20):
                    n += len(chunk)
            down = time.perf_counter() - t
            store.delete_job("job")
            print(f"{a.mib} MiB, parts of {a.chunk_mib} MiB: publish (sha256 + upload) {up:.2f} s = "
                  f"{a.mib / up:.0f} MiB/s; presigned GET {down:.2f} s = {n / 2**20 / down:.0f} MiB/s")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
