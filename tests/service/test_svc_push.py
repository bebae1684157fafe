"""The push stage (worker.push): in-process against respx routes, and over real HTTP against the Hub mock."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx
from huggingface_hub.errors import HfHubHTTPError
from svc_util import HF_TOKEN

from worker.push import default_repo_name, push_folder

ENDPOINT = "https://hub.test"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "artifact"
    d.mkdir()
    (d / "README.md").write_text("---\nlibrary_name: transformers\ntags: [mopeq]\n---\n# card\n")
    (d / "bitmap.json").write_text(json.dumps({"avg_bits": 2.53}))
    (d / "model.safetensors").write_bytes(b"\1" * 4096)
    return d


@pytest.fixture
def router() -> Iterator[respx.Router]:
    """respx routes serving huggingface_hub (which talks through httpx2: bridged here into respx's httpx router)."""
    import httpx2
    from huggingface_hub.utils import _http

    r = respx.Router(base_url=ENDPOINT, assert_all_mocked=True)

    def handler(req: httpx2.Request) -> httpx2.Response:
        resp = r.handler(httpx.Request(req.method, str(req.url), headers=list(req.headers.raw), content=req.read()))
        return httpx2.Response(resp.status_code, headers=list(resp.headers.raw), content=resp.read())

    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    yield r
    _http.set_client_factory(_http.default_client_factory)
    _http.close_session()


def test_default_repo_name() -> None:
    assert default_repo_name("mistralai/Mixtral-8x7B-v0.1", 2.53) == "Mixtral-8x7B-v0.1-MoPEQ-2.5b"
    assert default_repo_name("/srv/models/tiny moe/", 3.0) == "tiny-moe-MoPEQ-3b"


def test_push_with_respx(router: respx.Router, folder: Path) -> None:
    router.get("/api/whoami-v2").respond(200, json={"name": "alice", "type": "user"})
    create = router.post("/api/repos/create").respond(200, json={"url": f"{ENDPOINT}/alice/x"})
    router.post("/api/validate-yaml").respond(200, json={"errors": [], "warnings": []})
    pre = router.post(path__regex=r"/api/models/alice/.+/preupload/main").mock(side_effect=lambda req: httpx.Response(
        200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in json.loads(req.content)["files"]]}))
    commit = router.post(path__regex=r"/api/models/alice/.+/commit/main").respond(
        200, json={"commitUrl": f"{ENDPOINT}/alice/x/commit/abc", "commitOid": "a" * 40, "pullRequestUrl": None})

    res = push_folder(folder, model="org/Tiny-MoE", avg_bits=2.53, token=HF_TOKEN, private=True, endpoint=ENDPOINT)

    assert res.repo_id == "alice/Tiny-MoE-MoPEQ-2.5b" and res.commit == "a" * 40
    payload = json.loads(create.calls.last.request.content)
    assert payload["name"] == "Tiny-MoE-MoPEQ-2.5b" and payload["visibility"] == "private"
    assert pre.called and commit.called
    for call in router.calls:
        assert call.request.headers["authorization"] == f"Bearer {HF_TOKEN}"
    lines = [json.loads(x) for x in commit.calls.last.request.content.splitlines()]
    files = {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
    assert set(files) == {"README.md", "bitmap.json", "model.safetensors"}
    assert files["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_push_to_a_named_repo_refused(router: respx.Router, folder: Path) -> None:
    router.post("/api/repos/create").respond(403, json={"error": "You don't have the rights"})
    # with exist_ok, huggingface_hub checks whether the repo exists before giving up
    router.get("/api/models/someone-else/x").respond(404, headers={"X-Error-Code": "RepoNotFound"})
    with pytest.raises(HfHubHTTPError) as exc:
        push_folder(folder, model="m", avg_bits=3, token=HF_TOKEN, repo_id="someone-else/x", endpoint=ENDPOINT)
    assert exc.value.response.status_code == 403


def test_push_over_http_to_the_hub_mock(hub, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)  # the mock speaks LFS, not Xet
    res = push_folder(folder, model="org/tiny", avg_bits=3.0, token=HF_TOKEN, private=True, endpoint=hub.url)
    repo = hub.repos[res.repo_id]
    assert res.repo_id == "tester/tiny-MoPEQ-3b" and repo.private and res.commit == repo.sha
    assert repo.files == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert any(r["path"].startswith("/lfs-upload/") for r in hub.requests), "the weights went through LFS"
    again = push_folder(folder, model="org/tiny", avg_bits=3.0, token=HF_TOKEN, endpoint=hub.url)
    assert again.repo_id == res.repo_id  # an existing repo is reused (a resumed job pushes again safely)
    with pytest.raises(HfHubHTTPError):
        push_folder(folder, model="org/tiny", avg_bits=3.0, token="hf_wrongtoken000000000", endpoint=hub.url)
