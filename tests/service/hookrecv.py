"""A real HTTP server on 127.0.0.1 that receives outgoing webhooks: it records every request (path, headers, the
raw body) and answers 200, or the status codes queued for a path (``fail(path, 500)``: the next request there gets
a 500, the ones after it 200). Also: the Hub's webhook payload, built exactly as the Hub sends it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plan: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with rec.lock:
                    rec.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body,
                                                 time.time()))
                    queued = rec.plan.get(self.path)
                    status = queued.pop(0) if queued else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="hook-receiver").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def fail(self, path: str, *statuses: int) -> None:
        with self.lock:
            self.plan[path] = list(statuses)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait(self, path: str, n: int = 1, timeout: float = 60) -> list[Received]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.at(path)
            if len(got) >= n:
                return got
            time.sleep(0.1)
        raise AssertionError(f"the receiver got {len(self.at(path))} request(s) at {path}, wanted {n}")


def hub_push_payload(repo: str, new_sha: str, old_sha: str | None = "0" * 40, *, repo_type: str = "model",
                     ref: str = "refs/heads/main", scope: str = "repo.content", action: str = "update",
                     extra_refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the Hugging Face Hub POSTs on a push (https://huggingface.co/docs/hub/webhooks, webhook version 3)."""
    kind = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    api = {"model": "models", "dataset": "datasets", "space": "spaces"}[repo_type]
    return {
        "event": {"action": action, "scope": scope},
        "repo": {"type": repo_type, "name": repo, "id": "6366c000a2abcdf2fd69a080", "private": False,
                 "url": {"web": f"https://huggingface.co/{kind}{repo}", "api": f"https://huggingface.co/api/{api}/{repo}"},
                 "headSha": new_sha, "tags": ["license:apache-2.0", "moe"], "owner": {"id": "61d2000c3c2083e1c08af22d"}},
        "updatedRefs": [{"ref": ref, "oldSha": old_sha, "newSha": new_sha}, *(extra_refs or [])],
        "webhook": {"id": "6390e855e30d9209411de93b", "version": 3},
    }
