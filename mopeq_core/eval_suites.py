"""Evaluation suites (an optional stage): lm-evaluation-harness for language models, lmms-eval for VLMs.

Both harnesses run on the in-memory model object (no reload, no export): once on the full-precision model before
quantization and once on the quantized model, with the same tasks, limit, few-shot count, batch size and seed. The
result is ``{"HARNESS/TASK": {"METRIC": {"fp": x, "quantized": y, "delta": y - x}}}``, stored in report.json and the
model card.

A suite is named ``HARNESS:TASK[,TASK...]`` with HARNESS ``lm-eval`` or ``lmms-eval``. Besides every task the
harness itself knows (whose data must then be reachable: Hub access or a filled HF datasets cache), three local
tasks are built from the job's own evaluation data, so nothing is downloaded:

- ``lm-eval:mopeq_next_line`` (multiple choice, acc / acc_norm): for windows of the evaluation text, pick the true
  next line among it and three lines drawn from elsewhere in the text;
- ``lm-eval:mopeq_text_ppl`` (rolling log-likelihood: word_perplexity, byte_perplexity, bits_per_byte) over chunks
  of the evaluation text;
- ``lmms-eval:mopeq_caption_match`` (multiple choice, acc): for each image of an image+text .jsonl, pick its caption
  among it and three captions of other images.

Custom task definitions (YAML, as each harness documents them) are read from ``include_path`` as well.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HARNESSES = ("lm-eval", "lmms-eval")
LOCAL_TASKS = {"lm-eval": ("mopeq_next_line", "mopeq_text_ppl"), "lmms-eval": ("mopeq_caption_match",)}
_SKIP_METRIC_KEYS = ("alias", "samples", "name", "sample_len", "sample_count")


class EvalSuiteError(ValueError):
    """A suite cannot run (unknown harness, harness not installed, no data for a local task)."""


@dataclass(frozen=True)
class Suite:
    harness: str
    tasks: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.harness}:{','.join(self.tasks)}"


def parse_suites(specs) -> list[Suite]:
    """``["lm-eval:mopeq_next_line,arc_easy", "lmms-eval:mopeq_caption_match"]`` -> Suites (same harness merged)."""
    if isinstance(specs, str):
        specs = [specs]
    merged: dict[str, list[str]] = {}
    for spec in specs or ():
        harness, sep, tasks = str(spec).partition(":")
        harness = harness.strip().lower().replace("_", "-")
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not sep or harness not in HARNESSES or not names:
            raise EvalSuiteError(f"eval suite {spec!r}: write HARNESS:TASK[,TASK...] with HARNESS one of "
                                 f"{', '.join(HARNESSES)}")
        merged.setdefault(harness, [])
        merged[harness] += [t for t in names if t not in merged[harness]]
    return [Suite(h, tuple(t)) for h, t in merged.items()]


# ---- local task definitions ------------------------------------------------------------------------------------
def _lines_of(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.splitlines() if len(ln.strip()) >= 8]


def next_line_docs(text: str, n: int = 64, context_lines: int = 6, seed: int = 0) -> list[dict]:
    """Multiple-choice docs: ``context`` (preceding lines), ``choices`` (true next line + 3 distractors), ``label``."""
    lines = _lines_of(text)
    if len(lines) < context_lines + 8:
        raise EvalSuiteError("the evaluation text is too short for mopeq_next_line (needs ~15 lines of 8+ chars)")
    rng = random.Random(seed)
    starts = list(range(len(lines) - context_lines - 1))
    rng.shuffle(starts)
    docs = []
    for s in sorted(starts[:n]):
        true = lines[s + context_lines]
        pool = [ln for ln in lines if ln.strip() != true.strip()]
        distract = rng.sample(pool, 3)
        choices = distract + [true]
        rng.shuffle(choices)
        docs.append({"context": "\n".join(lines[s: s + context_lines]) + "\n", "choices": choices,
                     "label": choices.index(true)})
    return docs


def text_ppl_docs(text: str, n: int = 16, chars: int = 600) -> list[dict]:
    body = "\n".join(_lines_of(text))
    step = max(chars, (len(body) - chars) // max(n, 1))
    docs = [{"text": body[i: i + chars]} for i in range(0, max(len(body) - chars, 1), step)][:n]
    if not docs or not docs[0]["text"].strip():
        raise EvalSuiteError("the evaluation text is empty")
    return docs


def caption_match_docs(records: list[dict], seed: int = 0) -> list[dict]:
    """Docs ``{"image": abs path, "choices": [4 captions], "label": i}`` from image+text records."""
    with_images = [r for r in records if r.get("image")]
    captions = sorted({r["text"] for r in with_images})
    if len(with_images) < 2 or len(captions) < 2:
        raise EvalSuiteError("mopeq_caption_match needs an image+text .jsonl with at least two images")
    rng = random.Random(seed)
    docs = []
    for r in with_images:
        others = [c for c in captions if c != r["text"]]
        choices = rng.sample(others, min(3, len(others))) + [r["text"]]
        rng.shuffle(choices)
        docs.append({"image": str(r["image"]), "choices": choices, "label": choices.index(r["text"])})
    return docs


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def _yaml(d: dict) -> str:
    """YAML for a task dict (json is valid YAML; ``!function`` tags are spliced in as plain scalars)."""
    lines = []
    for k, v in d.items():
        if isinstance(v, str) and v.startswith("!function "):
            lines.append(f"{k}: {v}")
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def write_lm_eval_tasks(folder: Path, text: str, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mc = _write_jsonl(folder / "mopeq_next_line.jsonl", next_line_docs(text, seed=seed))
    ppl = _write_jsonl(folder / "mopeq_text_ppl.jsonl", text_ppl_docs(text))
    common = {"dataset_path": "json", "test_split": "train"}
    (folder / "mopeq_next_line.yaml").write_text(_yaml({
        "task": "mopeq_next_line", **common, "dataset_kwargs": {"data_files": str(mc)},
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}))
    (folder / "mopeq_text_ppl.yaml").write_text(_yaml({
        "task": "mopeq_text_ppl", **common, "dataset_kwargs": {"data_files": str(ppl)},
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
        "metadata": {"version": 1.0}}))
    return folder


_LMMS_UTILS = '''"""Document functions of MoPEQ's local lmms-eval task (written by mopeq_core.eval_suites)."""
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "Which caption describes the image?"


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target(doc, model_specific_target_kwargs=None):
    return int(doc["label"])
'''


def write_lmms_eval_tasks(folder: Path, records: list[dict], seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = _write_jsonl(folder / "mopeq_caption_match.jsonl", caption_match_docs(records, seed=seed))
    (folder / "mopeq_caption_utils.py").write_text(_LMMS_UTILS)
    (folder / "mopeq_caption_match.yaml").write_text(_yaml({
        "task": "mopeq_caption_match", "dataset_path": "json", "dataset_kwargs": {"data_files": str(data)},
        "test_split": "train", "output_type": "multiple_choice",
        "doc_to_visual": "!function mopeq_caption_utils.doc_to_visual",
        "doc_to_text": "!function mopeq_caption_utils.doc_to_text",
        "doc_to_choice": "!function mopeq_caption_utils.doc_to_choice",
        "doc_to_target": "!function mopeq_caption_utils.doc_to_target",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": [{"version": 1.0}]}))
    return folder


# ---- running the harnesses -------------------------------------------------------------------------------------
def _metrics(task_result: dict) -> dict[str, float]:
    out = {}
    for key, value in task_result.items():
        if key in _SKIP_METRIC_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric = key.split(",")[0]
        if isinstance(value, float) and math.isnan(value):
            continue
        out[metric] = float(value)
    return out


def run_lm_eval(model, tokenizer, tasks, *, include_path=None, limit=None, num_fewshot=None, batch_size=8,
                seed=0, max_length=None) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness on an in-memory causal LM (``HFLM(pretrained=model)``)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvalSuiteError("lm-eval is not installed: pip install 'lm-eval==0.4.13'") from exc
    device = next(model.parameters()).device
    max_length = max_length or getattr(model.config.get_text_config(), "max_position_embeddings", None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(device))
    builtin = set(LOCAL_TASKS["lm-eval"])
    tm = TaskManager(include_path=[str(p) for p in include_path] if include_path else None,
                     include_defaults=any(t not in builtin for t in tasks))
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          batch_size=batch_size, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False)
    return {t: _metrics(v) for t, v in (res or {}).get("results", {}).items()}


def _ll_result(ll: float, greedy: bool):
    """A log-likelihood answer as lmms-eval's evaluator keeps it.

    lmms-eval 0.7.3 passes every response through ``unwrap_generation_output``, which turns a plain
    ``(logprob, is_greedy)`` tuple into its string (so ``multiple_choice`` tasks then fail in process_results with
    "too many values to unpack"); a ``GenerationResult`` is unwrapped to its ``text`` unchanged, so the tuple is
    carried in one. Older releases without GenerationResult take the tuple as is."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:
        return (ll, greedy)
    return GenerationResult(text=(ll, greedy))


def _lmms_class():
    import torch  # here, not at module level: the service validates suite specs without torch
    from lmms_eval.api.model import lmms

    from .multimodal import format_prompt

    class MopeqLmms(lmms):
        """lmms-eval model over an in-memory VLM and its processor (log-likelihood and greedy generation)."""

        is_simple = True

        def __init__(self, model, processor, max_new_tokens: int = 32):
            super().__init__()
            self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
            p = next(model.parameters())
            self.device, self.dtype = p.device, p.dtype

        def _doc(self, task, split, doc_id):
            return self.task_dict[task][split][doc_id]

        def _visuals(self, doc_to_visual, doc):
            if doc_to_visual is None:
                return []
            out = []
            for v in doc_to_visual(doc) or []:
                out += list(v) if isinstance(v, (list, tuple)) else [v]
            return out

        def _encode(self, context, visuals):
            text = format_prompt(self.processor, None, has_image=bool(visuals), prompt=context,
                                 add_generation_prompt=True)
            enc = self.processor(text=[text], images=visuals or None, return_tensors="pt")
            return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

        def _to_device(self, enc):
            return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                    for k, v in enc.items()}

        @torch.no_grad()
        def loglikelihood(self, requests):
            res = []
            for context, continuation, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
                doc = self._doc(task, split, doc_id)
                if callable(continuation):
                    continuation = continuation(doc)
                enc = self._encode(context, self._visuals(doc_to_visual, doc))
                n_ctx = enc["input_ids"].shape[-1]
                cont = torch.tensor([self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]],
                                    dtype=enc["input_ids"].dtype)
                # Continuation ids appended after the context ids (no re-tokenization across the boundary);
                # every per-token tensor of the processor is extended alongside.
                for k, v in list(enc.items()):
                    if v.dim() == 2 and v.shape[-1] == n_ctx and not v.is_floating_point():
                        fill = cont if k == "input_ids" else (torch.ones_like(cont) if k == "attention_mask"
                                                              else torch.zeros_like(cont))
                        enc[k] = torch.cat([v, fill], dim=-1)
                enc = self._to_device(enc)
                logits = self.model(**enc).logits[0, n_ctx - 1: -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                target = cont[0].to(logp.device)
                ll = float(logp.gather(1, target[:, None]).sum())
                res.append(_ll_result(ll, bool((logp.argmax(-1) == target).all())))
            return res

        @torch.no_grad()
        def generate_until(self, requests):
            out = []
            tok = self.processor.tokenizer
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
                doc = self._doc(task, split, doc_id)
                enc = self._to_device(self._encode(context, self._visuals(doc_to_visual, doc)))
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                new = int(gen_kwargs.get("max_new_tokens", self.max_new_tokens))
                ids = self.model.generate(**enc, max_new_tokens=new, do_sample=False,
                                          pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                          else tok.eos_token_id)
                text = tok.decode(ids[0, enc["input_ids"].shape[-1]:], skip_special_tokens=True)
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop)[0]
                out.append(text)
            return out

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("multi-round generation is not supported by MoPEQ's lmms-eval wrapper")

    return MopeqLmms


def _skip_lmms_filelock_patch() -> None:
    """lmms-eval 0.7.3 patches ``filelock._api`` (filelock 3.x) at every simple_evaluate, for multi-process
    runs; filelock 4 (which current huggingface_hub/datasets install) has no such module, so the patch raises
    ModuleNotFoundError. One process needs no cross-class lock cache: mark the patch as applied."""
    import importlib.util

    import lmms_eval.evaluator as ev

    fn = getattr(ev, "_enable_reentrant_filelocks", None)
    if fn is not None and importlib.util.find_spec("filelock._api") is None:
        fn._patched = True


def run_lmms_eval(model, processor, tasks, *, include_path=None, limit=None, num_fewshot=None, seed=0,
                  max_new_tokens: int = 32) -> dict[str, dict[str, float]]:
    """lmms-eval on an in-memory VLM (an ``lmms`` wrapper around the model and its processor)."""
    if processor is None:
        raise EvalSuiteError("lmms-eval needs the model's processor; this model has none (text-only?)")
    try:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.tasks import TaskManager
    except ImportError as exc:
        raise EvalSuiteError("lmms-eval is not installed: pip install 'lmms-eval==0.7.3'") from exc
    _skip_lmms_filelock_patch()
    builtin = set(LOCAL_TASKS["lmms-eval"])
    tm = TaskManager("WARNING", include_path=[str(p) for p in include_path] if include_path else None,
                     include_defaults=any(t not in builtin for t in tasks))
    lm = _lmms_class()(model, processor, max_new_tokens=max_new_tokens)
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          batch_size=1, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
    return {t: _metrics(v) for t, v in (res or {}).get("results", {}).items()}


def run_suites(model, tokenizer, processor, suites, *, eval_file=None, include_path=None, limit=None,
               num_fewshot=None, seed: int = 0, work_dir=None) -> dict[str, dict[str, float]]:
    """Run every suite on ``model`` as it is now; returns ``{"HARNESS/TASK": {METRIC: value}}``.

    The local tasks are built from ``eval_file`` (a .txt/.jsonl text file for lm-eval; an image+text .jsonl for
    lmms-eval; default: the built-in calibration text) in ``work_dir`` (default: a temporary folder), identically on
    every call, so the full-precision and quantized runs see the same documents."""
    from .data import read_records, read_texts

    suites = parse_suites(suites) if not all(isinstance(s, Suite) for s in suites or ()) else list(suites)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mopeq-suites-") as tmp:
        root = Path(work_dir) if work_dir else Path(tmp)
        for suite in suites:
            include = [Path(p) for p in (include_path if isinstance(include_path, (list, tuple))
                                         else [include_path] if include_path else [])]
            local = [t for t in suite.tasks if t in LOCAL_TASKS[suite.harness]]
            if suite.harness == "lm-eval":
                if local:
                    include.append(write_lm_eval_tasks(root / "lm_eval_tasks", "\n".join(read_texts(eval_file)),
                                                       seed=seed))
                got = run_lm_eval(model, tokenizer, suite.tasks, include_path=include, limit=limit,
                                  num_fewshot=num_fewshot, seed=seed)
            else:
                if local:
                    include.append(write_lmms_eval_tasks(root / "lmms_eval_tasks", read_records(eval_file),
                                                         seed=seed))
                got = run_lmms_eval(model, processor, suite.tasks, include_path=include, limit=limit,
                                    num_fewshot=num_fewshot, seed=seed)
            missing = [t for t in suite.tasks if t not in got]
            if missing:
                raise EvalSuiteError(f"{suite.harness} returned no result for {', '.join(missing)}")
            results.update({f"{suite.harness}/{t}": m for t, m in got.items()})
    return results


def compare(fp: dict[str, dict[str, float]], quantized: dict[str, dict[str, float]]) -> dict[str, Any]:
    """``{task: {metric: {"fp", "quantized", "delta"}}}`` over the metrics both runs have."""
    out: dict[str, Any] = {}
    for task, metrics in fp.items():
        q = quantized.get(task, {})
        out[task] = {m: {"fp": v, "quantized": q[m], "delta": q[m] - v} for m, v in metrics.items() if m in q}
    return out


def markdown_table(table: dict[str, Any] | None) -> list[str]:
    """Model-card lines for ``report["eval_suites"]`` (empty when no suite ran)."""
    if not table:
        return []
    lines = ["| harness/task | metric | full precision | quantized | Δ |", "| --- | --- | --- | --- | --- |"]
    for task, metrics in table.items():
        for metric, v in metrics.items():
            if "stderr" in metric:
                continue
            lines.append(f"| {task} | {metric} | {v['fp']:.4g} | {v['quantized']:.4g} | {v['delta']:+.4g} |")
    return lines
