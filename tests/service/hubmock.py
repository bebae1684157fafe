"""A small, real HTTP server that speaks the few Hugging Face Hub endpoints huggingface_hub calls for reading a
model (model_info, resolve with HEAD/Range) and for pushing one (whoami, create_repo, validate-yaml, preupload,
LFS batch + basic transfer + verify, commit). Point ``HF_ENDPOINT`` at ``HubMock.url`` (and set
``HF_HUB_DISABLE_XET=1``: the mock has no Xet storage)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    commit_messages: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class HubMock:
    def __init__(self, tokens: dict[str, str] | None = None):
        # token -> user name; writes need one of these tokens
        self.tokens = tokens or {"hf_mocktokenvalid0123456789": "tester"}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []  # status codes to answer to the next write requests (fault injection)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- fixtures ------------------------------------------------------------------------------------------------
    def add_repo_from_dir(self, repo_id: str, folder: Path, private: bool = False) -> Repo:
        repo = Repo(repo_id, private=private)
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                repo.files[p.relative_to(folder).as_posix()] = p.read_bytes()
        self._commit(repo, "initial")
        self.repos[repo_id] = repo
        return repo

    def _commit(self, repo: Repo, message: str) -> str:
        h = hashlib.sha1()
        h.update(repo.sha.encode())
        for name in sorted(repo.files):
            h.update(name.encode())
            h.update(hashlib.sha256(repo.files[name]).digest())
        h.update(message.encode())
        sha = h.hexdigest()
        repo.commits.append(sha)
        repo.commit_messages.append(message)
        return sha

    # ---- server --------------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubMock:
        mock = self

        class Handler(_Handler):
            hub = mock

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="hubmock").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    hub: HubMock
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ---- plumbing ------------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | dict | list | None = None, headers: dict[str, str] | None = None,
              head: bool = False) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else (body or b"")
        self.send_response(status)
        ctype = "application/json" if isinstance(body, (dict, list)) else "application/octet-stream"
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        return self.hub.tokens.get(token or "")

    def _record(self, method: str, body: bytes = b"") -> None:
        with self.hub.lock:
            self.hub.requests.append({"method": method, "path": self.path,
                                      "authorization": self.headers.get("Authorization"), "body": body})

    def _readable(self, repo: Repo | None, head: bool = False) -> bool:
        if repo is None or (repo.private and self._user() is None):
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return False
        return True

    def _fault(self) -> bool:
        with self.hub.lock:
            status = self.hub.fail_next.pop(0) if self.hub.fail_next else None
        if status:
            self._error(status, None, f"injected failure {status}")
            return True
        return False

    # ---- GET / HEAD -------------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._record("HEAD")
        self._get(head=True)

    def do_GET(self) -> None:
        self._record("GET")
        self._get(head=False)

    def _get(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path == "/api/whoami-v2":
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header", head=head)
            return self._send(200, {"type": "user", "name": user, "auth": {"type": "access_token"}}, head=head)
        m = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+|[^/]+)(?:/revision/(?P<rev>.+))?", path)
        if m:
            repo = self.hub.repos.get(m["repo"])
            if not self._readable(repo, head):
                return None
            assert repo is not None
            rev = m["rev"]
            if rev and rev not in ("main", repo.sha) and rev not in repo.commits:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            sha = rev if rev and rev in repo.commits else repo.sha
            return self._send(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": repo.private,
                                    "siblings": [{"rfilename": n} for n in sorted(repo.files)], "tags": []},
                              head=head)
        m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+|[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if m:
            repo = self.hub.repos.get(m["repo"])
            if not self._readable(repo, head):
                return None
            assert repo is not None
            if m["rev"] not in ("main", *repo.commits):
                return self._error(404, "RevisionNotFound", "Invalid rev id", head=head)
            data = repo.files.get(m["file"])
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", head=head)
            etag = hashlib.sha256(data).hexdigest()
            headers = {"X-Repo-Commit": repo.sha if m["rev"] == "main" else m["rev"], "ETag": f'"{etag}"',
                       "Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            if rng and not head:
                r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if r:
                    start = int(r.group(1))
                    end = int(r.group(2)) if r.group(2) else len(data) - 1
                    part = data[start:end + 1]
                    headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
                    return self._send(206, part, headers)
            if head:
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                return None
            return self._send(200, data, headers)
        return self._error(404, None, f"mock hub: no route for GET {path}", head=head)

    # ---- POST / PUT ---------------------------------------------------------------------------------------------
    def do_PUT(self) -> None:
        body = self._body()
        self._record("PUT", body)
        path = urlsplit(self.path).path
        m = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", path)
        if not m:
            return self._error(404, None, "no route")
        if hashlib.sha256(body).hexdigest() != m["oid"]:
            return self._error(400, None, "sha256 mismatch")
        with self.hub.lock:
            self.hub.blobs[m["oid"]] = body
        return self._send(200, b"")

    def do_POST(self) -> None:
        body = self._body()
        self._record("POST", body)
        path = unquote(urlsplit(self.path).path)
        if path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if path == "/lfs-verify":
            oid = json.loads(body)["oid"]
            return self._send(200 if oid in self.hub.blobs else 404, {})
        user = self._user()
        if user is None:
            return self._error(401, None, "Invalid credentials in Authorization header")
        if self._fault():
            return None
        if path == "/api/repos/create":
            req = json.loads(body)
            org = req.get("organization") or user
            repo_id = f"{org}/{req['name']}"
            if org != user:
                return self._error(403, None, f"You don't have the rights to create a model under {org}")
            with self.hub.lock:
                if repo_id in self.hub.repos:  # the Hub's 409 carries the url too
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{self.hub.url}/{repo_id}"},
                                      {"X-Error-Message": "You already created this model repo"})
                self.hub.repos[repo_id] = Repo(repo_id, private=req.get("visibility") == "private"
                                               or bool(req.get("private")))
            return self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        m = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", path)
        if m:
            repo = self.hub.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            files = json.loads(body)["files"]
            out = []
            for f in files:
                lfs = f["size"] > 1024 or f["path"].endswith(".safetensors")
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": None})
            return self._send(200, {"files": out})
        m = re.fullmatch(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            req = json.loads(body)
            objs = []
            for o in req["objects"]:
                if o["oid"] in self.hub.blobs:
                    objs.append({"oid": o["oid"], "size": o["size"]})
                else:
                    objs.append({"oid": o["oid"], "size": o["size"], "actions": {
                        "upload": {"href": f"{self.hub.url}/lfs-upload/{o['oid']}"},
                        "verify": {"href": f"{self.hub.url}/lfs-verify"}}})
            return self._send(200, {"transfer": "basic", "objects": objs})
        m = re.fullmatch(r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", path)
        if m:
            repo = self.hub.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            message = "commit"
            with self.hub.lock:
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    v = item["value"]
                    if item["key"] == "header":
                        message = v["summary"]
                    elif item["key"] == "file":
                        repo.files[v["path"]] = base64.b64decode(v["content"])
                    elif item["key"] == "lfsFile":
                        blob = self.hub.blobs.get(v["oid"])
                        if blob is None:
                            return self._error(422, None, f"LFS object {v['oid']} was never uploaded")
                        repo.files[v["path"]] = blob
                    elif item["key"] == "deletedFile":
                        repo.files.pop(v["path"], None)
                sha = self.hub._commit(repo, message)
            return self._send(200, {"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha,
                                    "pullRequestUrl": None})
        return self._error(404, None, f"mock hub: no route for POST {path}")
