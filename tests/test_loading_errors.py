"""Resolving and loading models: every refusal says why, the Hub path works offline from a pre-filled HF cache, and
online Hub calls (against an HTTP mock of the Hub's endpoints) refuse unsafe or missing repos before downloading.

huggingface_hub >= 1.0 talks HTTP through ``httpx2``, which respx does not patch; ``hub_mock`` routes its client
through a respx router instead (``huggingface_hub.set_client_factory`` + an httpx2 MockTransport bridge).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
respx = pytest.importorskip("respx")

import tiny_models as tm

from mopeq_core import engine
from mopeq_core.config import Budget, QuantizeConfig
from mopeq_core.errors import (
    ModelNotFoundError,
    NotMoEError,
    RemoteCodeRequiredError,
    UnsafeCheckpointError,
    UnsupportedArchitectureError,
    UserInputError,
)
from mopeq_core.loading import load_model, resolve_model

SHA = "4f1c0c4e2b8d9a7e6f5a4b3c2d1e0f9a8b7c6d5e"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return tm.build_model("mixtral", tmp_path_factory.mktemp("models"))


@pytest.fixture()
def copy_of(tiny_moe, tmp_path):
    def make(name: str = "m") -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_moe, dst)
        return dst
    return make


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _small_cfg(model: str, **kw) -> QuantizeConfig:
    return QuantizeConfig(model=model, budget=Budget(avg_bits=3.0), sensitivity="frequency", quantizer="rtn",
                          group_size=16, calib_samples=2, seq_len=16, **kw)


@pytest.fixture()
def no_hub(monkeypatch):
    """Any attempt to reach the Hub fails the test (local and malformed inputs must never touch it)."""
    import huggingface_hub

    def boom(*a, **k):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)


# ---- local directories -----------------------------------------------------------------------------------------
def test_pickle_only_checkpoint_is_refused(copy_of, tmp_path, no_hub):
    src = copy_of()
    from safetensors.torch import load_file

    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(str(f)))
        f.unlink()
    for f in src.glob("*.safetensors.index.json"):
        f.unlink()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"only pickle weights.*safetensors") as ei:
        resolve_model(str(src))
    assert "Convert the checkpoint to safetensors" in str(ei.value)
    with pytest.raises(UnsafeCheckpointError):  # the pipeline refuses it in its first stage
        engine.run(_small_cfg(str(src)), tmp_path / "out")
    assert not (tmp_path / "out" / "bitmap.json").exists()
    assert resolve_model(str(src), allow_pickle=True).path == src.resolve()  # only when explicitly allowed


def test_sharded_pickle_checkpoint_is_refused(copy_of, no_hub):
    src = copy_of()
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "pytorch_model-00001-of-00002.bin").write_bytes(b"not really")
    (src / "pytorch_model.bin.index.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError, match="pickle"):
        resolve_model(str(src))


def test_remote_code_needs_trust(copy_of, no_hub):
    src = copy_of()
    _edit_config(src, auto_map={"AutoConfig": "configuration_x.XConfig",
                                "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    with pytest.raises(RemoteCodeRequiredError, match=r"auto_map.*--trust-remote-code") as ei:
        resolve_model(str(src))
    assert "AutoModelForCausalLM" in str(ei.value)
    assert resolve_model(str(src), trust_remote_code=True).path == src.resolve()


def test_remote_code_with_unknown_model_type_needs_trust_first(copy_of, no_hub):
    src = copy_of()
    _edit_config(src, model_type="mopeq_unknown_remote", auto_map={"AutoModelForCausalLM": "m.X"})
    with pytest.raises(RemoteCodeRequiredError):
        resolve_model(str(src))


def test_native_model_type_ignores_auto_map(copy_of, no_hub):
    """DeepSeek-VL2 is implemented natively (mopeq_core.models): its auto_map never asks for remote code."""
    from mopeq_core.estimate import inspect_local
    from mopeq_core.models import trust_for

    src = copy_of()
    _edit_config(src, model_type="deepseek_vl_v2", auto_map={"AutoModelForCausalLM": "m.X"})
    assert resolve_model(str(src)).path == src.resolve()
    assert inspect_local(src).config["model_type"] == "deepseek_vl_v2"
    assert trust_for(src, True) is False


@pytest.fixture()
def remote_code_model(tmp_path, monkeypatch):
    """A DeepSeek-VL2-like remote-code checkpoint (ModuleList experts); dynamic modules go to a temporary dir."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    return tm.build_remote_code_standin(tmp_path)


def test_remote_code_model_runs_only_with_trust(remote_code_model, tmp_path, no_hub):
    with pytest.raises(RemoteCodeRequiredError):
        resolve_model(str(remote_code_model))
    with pytest.raises(RemoteCodeRequiredError):
        engine.run(_small_cfg(str(remote_code_model)), tmp_path / "refused")
    from mopeq_core.moe import find_expert_groups

    model = load_model(resolve_model(str(remote_code_model), trust_remote_code=True).path, trust_remote_code=True)
    groups = find_expert_groups(model)
    assert [(g.layer, g.kind, g.num_experts) for g in groups] == [(1, "modulelist", 4), (2, "modulelist", 4)]
    res = engine.run(_small_cfg(str(remote_code_model), trust_remote_code=True), tmp_path / "out")
    assert [entry["layer"] for entry in res.bitmap["layers"]] == [1, 2]
    assert res.report["config"]["trust_remote_code"] is True  # the job records that remote code ran


def test_remote_code_artifact_loads(remote_code_model, tmp_path):
    from mopeq_core.loader import load_quantized

    engine.run(_small_cfg(str(remote_code_model), trust_remote_code=True), tmp_path / "out")
    with pytest.raises(RemoteCodeRequiredError):
        load_quantized(tmp_path / "out")
    model = load_quantized(tmp_path / "out", trust_remote_code=True)
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == len(tm.tokenizer())


def test_unknown_model_type(copy_of, no_hub):
    src = copy_of()
    _edit_config(src, model_type="not_a_real_moe")
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 'not_a_real_moe'.*upgrade transformers"):
        resolve_model(str(src))


def test_config_that_disagrees_with_its_weights_is_refused(copy_of, no_hub):
    # transformers would initialise the missing experts at random and only warn; we refuse instead.
    src = copy_of()
    n = json.loads((src / "config.json").read_text())["num_local_experts"]
    _edit_config(src, num_local_experts=2 * n)
    with pytest.raises(ModelNotFoundError, match="does not match its config.json"):
        load_model(src)


def test_missing_model_type(copy_of, no_hub):
    src = copy_of()
    _edit_config(src, model_type=None)
    with pytest.raises(UnsupportedArchitectureError, match="no model_type"):
        resolve_model(str(src))


def test_dense_model_is_not_moe(tmp_path, no_hub):
    dense = tm.build_dense(tmp_path)
    assert resolve_model(str(dense)).path == dense.resolve()  # a valid model: refused for having no MoE layer
    with pytest.raises(NotMoEError, match="no Mixture-of-Experts layer") as ei:
        engine.run(_small_cfg(str(dense)), tmp_path / "out")
    assert "LlamaForCausalLM" in str(ei.value) and "dense quantizer" in str(ei.value)


@pytest.mark.parametrize("path", ["/nonexistent/mopeq/model", "./no-such-dir", "~/no-such-mopeq-model-dir"])
def test_nonexistent_path(path, no_hub):
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model(path)


def test_file_dir_without_config_or_weights(copy_of, tmp_path, no_hub):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model(str(f))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(empty))
    src = copy_of("noweights")
    for w in src.glob("*.safetensors"):
        w.unlink()
    with pytest.raises(ModelNotFoundError, match="no weight files"):
        resolve_model(str(src))
    bad = copy_of("badjson")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match="not valid JSON"):
        resolve_model(str(bad))


@pytest.mark.parametrize("repo_id", ["org//name", "a/b/c", "org/na..me", "org/na--me", "bad id", "-org/name",
                                     "org/name.git", "org/" + "x" * 120, ""])
def test_malformed_repo_id(repo_id, no_hub):
    with pytest.raises(ModelNotFoundError, match="neither an existing directory nor a Hub repo id"):
        resolve_model(repo_id)


def test_errors_are_user_errors():
    for cls in (ModelNotFoundError, UnsafeCheckpointError, RemoteCodeRequiredError, UnsupportedArchitectureError,
                NotMoEError):
        assert issubclass(cls, UserInputError)


def test_load_model_uses_eager_attention_and_experts(tiny_moe):
    model = load_model(tiny_moe)
    assert model.config._attn_implementation == "eager"
    assert model.config._experts_implementation == "eager"
    assert not model.training


# ---- the Hub, offline, from a pre-filled HF cache ----------------------------------------------------------------
@pytest.fixture()
def offline_cache(tmp_path, tiny_moe, monkeypatch):
    hf_home = tmp_path / "hf-home"
    snap = tm.write_hf_cache(hf_home, "tiny-org/tiny-moe", tiny_moe, sha=SHA)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snap


def test_offline_cache_resolves_snapshot_and_sha(offline_cache, hub_mock):
    r = resolve_model("tiny-org/tiny-moe")
    assert r.path == offline_cache
    assert r.revision == SHA and r.repo_id == "tiny-org/tiny-moe"
    assert resolve_model("tiny-org/tiny-moe", revision=SHA).path == offline_cache
    assert not hub_mock.calls  # offline means offline


def test_offline_cache_honours_hf_hub_cache(offline_cache, monkeypatch):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_cache.parents[2]))
    assert resolve_model("tiny-org/tiny-moe").path == offline_cache


def test_offline_cache_missing_repo(offline_cache):
    with pytest.raises(ModelNotFoundError, match="not in the local HF cache"):
        resolve_model("tiny-org/not-cached")
    with pytest.raises(ModelNotFoundError, match="not in the local HF cache"):
        resolve_model("tiny-org/tiny-moe", revision="b" * 40)


def test_offline_cache_pickle_only_snapshot_is_refused(offline_cache, tmp_path):
    hf_home = Path(str(offline_cache).split("/hub/")[0])
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(offline_cache / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    tm.write_hf_cache(hf_home, "tiny-org/pickled", src, sha="c" * 40)
    with pytest.raises(UnsafeCheckpointError):
        resolve_model("tiny-org/pickled")


def test_pipeline_runs_from_offline_cache(offline_cache, tmp_path):
    res = engine.run(_small_cfg("tiny-org/tiny-moe"), tmp_path / "out")
    assert res.resolved_revision == SHA
    bitmap = json.loads((tmp_path / "out" / "bitmap.json").read_text())
    assert bitmap["model"] == "tiny-org/tiny-moe" and bitmap["revision"] == SHA
    assert [entry["layer"] for entry in bitmap["layers"]] == [0, 1]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["revision"] == SHA


# ---- the Hub, online, against an HTTP mock -----------------------------------------------------------------------
@pytest.fixture()
def hub_mock(monkeypatch):
    """A respx router serving the Hub's endpoints to huggingface_hub's (httpx2) client."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    router = respx.Router(base_url=constants.ENDPOINT, assert_all_mocked=True, assert_all_called=False)

    def bridge(request: httpx2.Request) -> httpx2.Response:
        req = httpx.Request(request.method, str(request.url), headers=list(request.headers.multi_items()),
                            content=request.read())
        try:
            resp = router.handler(req)
        except httpx.ConnectError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        except respx.models.AllMockedAssertionError as exc:
            raise AssertionError(f"unexpected Hub request {request.method} {request.url}") from exc
        return httpx2.Response(resp.status_code, headers=list(resp.headers.multi_items()), content=resp.read(),
                               request=request)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(bridge)))
    try:
        yield router
    finally:
        _http.set_client_factory(_http.default_client_factory)


@pytest.fixture()
def online(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")


def _model_info(repo_id: str, files: list[str], config: dict | None = None) -> dict:
    return {"id": repo_id, "modelId": repo_id, "sha": SHA, "private": False,
            "siblings": [{"rfilename": f} for f in files], "config": config or {"model_type": "mixtral"}}


def _requests(router) -> list[str]:
    return [f"{c.request.method} {c.request.url.path}" for c in router.calls]


def test_online_pickle_only_repo_refused_before_download(online, hub_mock, monkeypatch):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("download attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    hub_mock.get("/api/models/org/pickled").respond(
        200, json=_model_info("org/pickled", [".gitattributes", "config.json", "pytorch_model.bin", "README.md"]))
    with pytest.raises(UnsafeCheckpointError, match="org/pickled has only pickle weights"):
        resolve_model("org/pickled")
    assert _requests(hub_mock) == ["GET /api/models/org/pickled"]


def test_online_remote_code_refused_before_download(online, hub_mock, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("download attempted")))
    hub_mock.get("/api/models/org/remote").respond(200, json=_model_info(
        "org/remote", ["config.json", "model.safetensors", "modeling_x.py"],
        config={"model_type": "mopeq_unknown_remote", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    with pytest.raises(RemoteCodeRequiredError, match="--trust-remote-code"):
        resolve_model("org/remote")
    assert _requests(hub_mock) == ["GET /api/models/org/remote"]


@pytest.mark.parametrize("headers", [{"X-Error-Code": "RepoNotFound"}, {}], ids=["hub-404", "bare-404"])
def test_online_missing_repo(online, hub_mock, headers):
    hub_mock.get("/api/models/org/missing").respond(404, headers=headers, json={"error": "Repository not found"})
    with pytest.raises(ModelNotFoundError, match="org/missing"):
        resolve_model("org/missing")
    assert _requests(hub_mock) == ["GET /api/models/org/missing"]


def test_online_missing_revision(online, hub_mock):
    hub_mock.get("/api/models/org/name/revision/nope").respond(
        404, headers={"X-Error-Code": "RevisionNotFound"}, json={"error": "Invalid rev id: nope"})
    with pytest.raises(ModelNotFoundError, match="revision 'nope' not found"):
        resolve_model("org/name", revision="nope")


def test_online_gated_repo(online, hub_mock):
    hub_mock.get("/api/models/org/gated").respond(403, headers={"X-Error-Code": "GatedRepo"}, json={})
    with pytest.raises(ModelNotFoundError, match="gated"):
        resolve_model("org/gated")


def test_unreachable_hub_falls_back_to_the_cache(offline_cache, hub_mock, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub_mock.get("/api/models/tiny-org/tiny-moe").mock(side_effect=httpx.ConnectError("no route to host"))
    r = resolve_model("tiny-org/tiny-moe")
    assert r.path == offline_cache and r.revision == SHA
    assert _requests(hub_mock) == ["GET /api/models/tiny-org/tiny-moe"]
    hub_mock.get("/api/models/tiny-org/elsewhere").mock(side_effect=httpx.ConnectError("no route to host"))
    with pytest.raises(ModelNotFoundError, match="not in the local HF cache"):
        resolve_model("tiny-org/elsewhere")


def _serve_repo(router, repo_id: str, files: dict[str, bytes], config: dict | None = None) -> None:
    """model_info, the tree listing and resolve (HEAD + GET) for every file of one commit, as the Hub serves them."""
    import hashlib

    router.get(f"/api/models/{repo_id}").respond(200, json=_model_info(repo_id, list(files), config))
    router.get(f"/api/models/{repo_id}/tree/{SHA}").respond(200, json=[
        {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for n, b in files.items()])
    for n, b in files.items():
        h = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(b).hexdigest()}"', "Content-Length": str(len(b))}
        router.head(f"/{repo_id}/resolve/{SHA}/{n}").respond(200, headers=h)
        router.get(f"/{repo_id}/resolve/{SHA}/{n}").respond(200, headers=h, content=b)


@pytest.mark.parametrize("trust", [False, True], ids=["plain", "trust-remote-code"])
def test_online_download_fetches_only_what_a_model_needs(online, hub_mock, tiny_moe, tmp_path, trust):
    files = {f.name: f.read_bytes() for f in tiny_moe.iterdir() if f.is_file()}
    files.update({"pytorch_model.bin": b"pickle bytes", "modeling_x.py": b"x = 1\n", "README.md": b"# card",
                  "original/consolidated.pth": b"pickle bytes"})
    _serve_repo(hub_mock, "org/tiny-moe", files)
    r = resolve_model("org/tiny-moe", trust_remote_code=trust)
    assert r.repo_id == "org/tiny-moe" and r.revision == SHA and r.path.name == SHA
    got = sorted(p.name for p in r.path.iterdir())
    assert "model.safetensors" in got and "config.json" in got and "tokenizer.json" in got
    assert not {"pytorch_model.bin", "README.md", "original"} & set(got)
    assert ("modeling_x.py" in got) == trust  # remote code is fetched only when it may run
    fetched = {c.request.url.path.rsplit("/", 1)[-1] for c in hub_mock.calls if c.request.method == "GET"}
    assert "pytorch_model.bin" not in fetched and "consolidated.pth" not in fetched

    if not trust:  # and the pipeline runs on it, recording the commit it used
        res = engine.run(_small_cfg("org/tiny-moe"), tmp_path / "out")
        assert res.resolved_revision == SHA
        assert json.loads((tmp_path / "out" / "bitmap.json").read_text())["revision"] == SHA
