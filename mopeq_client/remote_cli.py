"""Remote commands of ``mopeq`` (the service over HTTP): submit, status, wait, cancel, retry, bitmap, estimate,
jobs, download. ``mopeq_client/cli.py`` is the light distribution's ``mopeq`` (these commands alone); the full
distribution's ``mopeq`` (``app/cli.py``) adds ``quantize`` and ``admin``.

Every command takes ``--url`` / ``--api-key`` (else ``MOPEQ_URL`` / ``MOPEQ_API_KEY``) and ``--json`` for
machine-readable output on stdout (messages and progress go to stderr). Exit codes (for CI):

    0 ok / job succeeded          1 job failed                 2 invalid input (400/404/409/413/422, bad flags)
    3 job cancelled               4 bad credentials (401/403)  5 service unreachable / unavailable (after retries)
    6 perplexity regression (--max-ppl-increase)  7 download checksum mismatch  8 --timeout reached while waiting

Never imports torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mopeq_client.errors import (
    AuthenticationError,
    ChecksumError,
    MopeqAPIError,
    MopeqError,
    RateLimitError,
    ServerError,
    ServiceUnreachableError,
    WaitTimeoutError,
)
from mopeq_client.sdk import Estimate, Job, MopeqClient, bitmap_rows

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MoPEQ service commands (remote).")
err = Console(stderr=True, highlight=False)

# Exit codes of every `mopeq` command (documented in the README and docs/SDK.md); mopeq_client.cli re-exports them.
EXIT_OK, EXIT_JOB_FAILED, EXIT_CANCELLED, EXIT_INVALID, EXIT_AUTH, EXIT_UNREACHABLE = 0, 1, 3, 2, 4, 5
EXIT_PPL_REGRESSION = 6
EXIT_CHECKSUM = 7
EXIT_TIMEOUT = 8


def bitmap_table(bitmap: dict, title: str | None = None) -> Table:
    """Layers × experts: bits (sensitivity rank in brackets)."""
    width = max(len(layer["experts"]) for layer in bitmap["layers"])
    t = Table(title=title or f"bit map — mean {bitmap['avg_bits']:.3f} bits, experts {bitmap['expert_bytes']:,} B")
    t.add_column("layer", justify="right")
    for e in range(width):
        t.add_column(f"e{e}", justify="center")
    t.add_column("mean", justify="right")
    colors = {2: "red", 3: "yellow", 4: "green", 8: "cyan"}
    for layer in bitmap["layers"]:
        cells = [f"[{colors.get(x['bits'], 'white')}]{x['bits']}[/]" for x in layer["experts"]]
        mean = sum(x["bits"] * x["params"] for x in layer["experts"]) / sum(x["params"] for x in layer["experts"])
        t.add_row(str(layer["layer"]), *cells, *[""] * (width - len(cells)), f"{mean:.2f}")
    return t


# ---- shared options ---------------------------------------------------------------------------------------------------
Url = Annotated[str | None, typer.Option("--url", envvar="MOPEQ_URL", show_envvar=True,
                                            help="Service URL (default http://127.0.0.1:8000)")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="MOPEQ_API_KEY", show_envvar=True,
                                               show_default=False, help="API key")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress display while waiting")]
MaxPpl = Annotated[float | None, typer.Option(
    "--max-ppl-increase", metavar="PCT",
    help="Exit 6 when the quantized perplexity rose by more than PCT % over full precision (needs a job with an "
         "evaluation file; implies --wait)")]
Timeout = Annotated[float | None, typer.Option("--timeout", help="Give up waiting after this many seconds "
                                                                      "(exit 8)")]


def _client(url: str | None, api_key: str | None) -> MopeqClient:
    return MopeqClient(url, api_key)


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _fail(exit_code: int, message: str, as_json: bool, **extra: Any) -> None:
    err.print(f"[red]error:[/] {message}")
    if as_json:
        _out({"error": {"message": message, **extra}, "exit_code": exit_code})
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def _errors(as_json: bool) -> Iterator[None]:
    """SDK exceptions → messages and exit codes."""
    try:
        yield
    except AuthenticationError as exc:
        _fail(EXIT_AUTH, f"{exc.detail} (HTTP {exc.status}; check --api-key / MOPEQ_API_KEY)", as_json,
              status=exc.status, code=exc.code)
    except ServiceUnreachableError as exc:
        _fail(EXIT_UNREACHABLE, str(exc), as_json, code="unreachable")
    except (RateLimitError, ServerError) as exc:
        _fail(EXIT_UNREACHABLE, f"the service is unavailable: {exc.detail} (HTTP {exc.status}, after retries)",
              as_json, status=exc.status, code=exc.code)
    except MopeqAPIError as exc:  # 400 404 409 413 422 and other 4xx
        extra = {"feasible": exc.body["feasible"]} if exc.body.get("feasible") else {}
        _fail(EXIT_INVALID, f"{exc.detail} (HTTP {exc.status}{', ' + exc.code if exc.code else ''})", as_json,
              status=exc.status, code=exc.code, **extra)
    except ChecksumError as exc:
        _fail(EXIT_CHECKSUM, str(exc), as_json, code="checksum_mismatch")
    except WaitTimeoutError as exc:
        _fail(EXIT_TIMEOUT, str(exc), as_json, code="timeout", job=exc.job.raw if exc.job is not None else None)
    except MopeqError as exc:
        _fail(EXIT_UNREACHABLE, str(exc), as_json, code="stream")


# ---- job outcome -------------------------------------------------------------------------------------------------------
def outcome(job: Job, max_ppl_increase: float | None = None) -> dict[str, Any]:
    """The exit code and reason for a final job (and the perplexity gate when asked for)."""
    out: dict[str, Any] = {"status": job.status, "ppl_increase_pct": job.ppl_increase_pct,
                           "max_ppl_increase": max_ppl_increase}
    if job.status == "failed":
        out.update(exit_code=EXIT_JOB_FAILED, reason=f"job failed: {job.error or job.error_code or 'unknown'}")
    elif job.status == "cancelled":
        out.update(exit_code=EXIT_CANCELLED, reason=f"job cancelled: {job.error or 'by the user'}")
    elif job.status != "succeeded":
        out.update(exit_code=EXIT_JOB_FAILED, reason=f"job is {job.status}, not finished")
    elif max_ppl_increase is None:
        out.update(exit_code=EXIT_OK, reason="job succeeded")
    elif job.ppl_increase_pct is None:
        out.update(exit_code=EXIT_PPL_REGRESSION,
                   reason="--max-ppl-increase: the job measured no perplexity, so no regression check is possible "
                          "(submit with --eval-file, a .txt/.jsonl under the server's model roots)")
    elif job.ppl_increase_pct > max_ppl_increase:
        out.update(exit_code=EXIT_PPL_REGRESSION,
                   reason=f"perplexity regression: +{job.ppl_increase_pct:.3f} % > allowed {max_ppl_increase:g} %")
    else:
        out.update(exit_code=EXIT_OK,
                   reason=f"job succeeded; perplexity {job.ppl_increase_pct:+.3f} % within {max_ppl_increase:g} %")
    return out


def _job_lines(job: Job) -> list[str]:
    lines = [f"job {job.id}: [bold]{job.status}[/]" + (f"  stage {job.stage}" if job.stage else "")
             + (f"  {job.progress * 100:.0f}%" if job.status == "running" else ""),
             f"  model {job.model}" + (f" @ {job.resolved_revision or job.revision}"
                                       if (job.resolved_revision or job.revision) else "")]
    budget = job.budget or {}
    amount = f"{budget['avg_bits']:g} bits" if budget.get("avg_bits") else f"{budget.get('gb') or 0:g} GB"
    knobs = [f"budget {amount}",
             f"bits {','.join(map(str, job.bits or []))}", f"sensitivity {job.sensitivity}",
             f"quantizer {job.quantizer}", f"group {job.group_size}"]
    lines.append("  " + "  ".join(knobs))
    res = job.result or {}
    if res:
        parts = []
        if res.get("avg_bits") is not None:
            parts.append(f"avg bits {res['avg_bits']:.3f}")
        if res.get("total_bytes") is not None:
            parts.append(f"size {res['total_bytes']:,} B")
        ppl = job.perplexity or {}
        if ppl.get("fp_perplexity") is not None and ppl.get("quantized_perplexity") is not None:
            parts.append(f"perplexity {ppl['fp_perplexity']:.3f} → {ppl['quantized_perplexity']:.3f} "
                         f"({job.ppl_increase_pct:+.2f} %)")
        if parts:
            lines.append("  " + "  ".join(parts))
    if job.error:
        lines.append(f"  [red]error[/] ({job.error_code}): {job.error}")
    return lines


def _print_job(job: Job) -> None:
    out = Console(highlight=False)
    for line in _job_lines(job):
        out.print(line)


def _finish(client: MopeqClient, job_id: str, *, progress: bool, timeout: float | None,
            max_ppl_increase: float | None, as_json: bool) -> None:
    job = client.wait(job_id, progress=progress, timeout=timeout)
    res = outcome(job, max_ppl_increase)
    if as_json:
        _out({**job.raw, "outcome": res})
    else:
        _print_job(job)
    code = res["exit_code"]
    if code != EXIT_OK:
        err.print(f"[red]{res['reason']}[/]")
    elif max_ppl_increase is not None:
        err.print(res["reason"])
    raise typer.Exit(code)


# ---- commands ------------------------------------------------------------------------------------------------------------
@app.command()
def submit(
    model: Annotated[str, typer.Argument(help="Hub repo id, or a model directory under the server's model roots")],
    avg_bits: Annotated[float | None, typer.Option("--avg-bits", help="Mean bits per expert weight")] = None,
    budget_gb: Annotated[float | None, typer.Option("--budget-gb", help="Whole-model budget in GB (1e9 B)")] = None,
    bits: Annotated[str | None, typer.Option("--bits", help="Bit widths to choose from, e.g. 2,3,4")] = None,
    sensitivity: Annotated[str | None, typer.Option("--sensitivity")] = None,
    allocator: Annotated[str | None, typer.Option("--allocator")] = None,
    scope: Annotated[str | None, typer.Option("--scope")] = None,
    granularity: Annotated[str | None, typer.Option("--granularity")] = None,
    quantizer: Annotated[str | None, typer.Option("--quantizer")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size")] = None,
    asymmetric: Annotated[bool, typer.Option("--asymmetric", help="Asymmetric (zero-point) quantization")] = False,
    act_order: Annotated[bool, typer.Option("--act-order")] = False,
    probes: Annotated[int | None, typer.Option("--probes")] = None,
    calib_file: Annotated[str | None, typer.Option(
        "--calib-file", help="Calibration .txt/.jsonl: a path on the server, under its model roots")] = None,
    calib_samples: Annotated[int | None, typer.Option("--calib-samples")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len")] = None,
    eval_file: Annotated[str | None, typer.Option(
        "--eval-file", help="Held-out .txt/.jsonl on the server for perplexity (needed by --max-ppl-increase)")] = None,
    eval_samples: Annotated[int | None, typer.Option("--eval-samples")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (Hub models)")] = None,
    fmt: Annotated[str | None, typer.Option("--format")] = None,
    low_memory: Annotated[bool, typer.Option("--low-memory")] = False,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    push: Annotated[bool, typer.Option("--push", help="Push the result to the Hub (default repo name)")] = False,
    push_repo: Annotated[str | None, typer.Option("--push-repo", help="Push to this Hub repo")] = None,
    private: Annotated[bool, typer.Option("--private", help="Make the pushed repo private (implies --push)")] = False,
    hf_token: Annotated[str | None, typer.Option("--hf-token", envvar="MOPEQ_HF_TOKEN", show_envvar=True,
                                                    show_default=False,
                                                    help="Hub token for this job (write-only on the server)")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", help="Reuse to make a re-run of this command return the same job")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job to its end; exit code from its status")] = False,
    max_ppl_increase: MaxPpl = None,
    timeout: Timeout = None,
    no_progress: NoProgress = False,
    as_json: AsJson = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Submit a quantization job to the service (optionally wait for it)."""
    if avg_bits is not None and budget_gb is not None:
        _fail(EXIT_INVALID, "give --avg-bits or --budget-gb, not both", as_json, code="invalid_input")
    try:
        bit_list = [int(x) for x in bits.split(",") if x.strip()] if bits else None
    except ValueError:
        _fail(EXIT_INVALID, "--bits takes a comma-separated list such as 2,3,4", as_json, code="invalid_input")
    if max_ppl_increase is not None and not wait:
        wait = True
        err.print("--max-ppl-increase implies --wait")
    if max_ppl_increase is not None and eval_file is None:
        err.print("[yellow]warning:[/] --max-ppl-increase without --eval-file: the job may measure no perplexity, "
                  "and the check then fails (exit 6)")
    with _errors(as_json), _client(url, api_key) as client:
        job = client.submit(
            model, idempotency_key=idempotency_key, revision=revision, avg_bits=avg_bits, budget_gb=budget_gb,
            bits=bit_list, sensitivity=sensitivity, allocator=allocator, scope=scope, granularity=granularity,
            quantizer=quantizer, group_size=group_size, symmetric=False if asymmetric else None,
            act_order=True if act_order else None, probes=probes, calib_file=calib_file,
            calib_samples=calib_samples, seq_len=seq_len, eval_file=eval_file, eval_samples=eval_samples,
            format=fmt, low_memory=True if low_memory else None, seed=seed,
            trust_remote_code=True if trust_remote_code else None, push=push or private or bool(push_repo),
            push_repo=push_repo or None, private=True if private else None, hf_token=hf_token or None)
        _show_or_follow(client, job, "submitted", wait=wait, no_progress=no_progress, timeout=timeout,
                        max_ppl_increase=max_ppl_increase, as_json=as_json)


def _show_or_follow(client: Any, job: Any, verb: str, *, wait: bool, no_progress: bool, timeout: float | None,
                    max_ppl_increase: float | None, as_json: bool) -> None:
    if not wait:
        if as_json:
            _out(job.raw)
        else:
            _print_job(job)
        raise typer.Exit(EXIT_OK)
    err.print(f"{verb} job {job.id}")
    _finish(client, job.id, progress=not no_progress, timeout=timeout, max_ppl_increase=max_ppl_increase,
            as_json=as_json)


@app.command()
def retry(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    hf_token: Annotated[str | None, typer.Option("--hf-token", envvar="MOPEQ_HF_TOKEN", show_envvar=True,
                                                 help="Hub token for the new job (needed when it pushes)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the new job to its end; exit code from its status")]
    = False,
    max_ppl_increase: MaxPpl = None, timeout: Timeout = None, no_progress: NoProgress = False,
    as_json: AsJson = False, url: Url = None, api_key: ApiKey = None,
) -> None:
    """Retry a failed or cancelled job as a new job (same model, commit and settings; finished stages reused)."""
    with _errors(as_json), _client(url, api_key) as client:
        job = client.retry(job_id, hf_token=hf_token or None)
        _show_or_follow(client, job, f"retrying {job_id} as", wait=wait, no_progress=no_progress, timeout=timeout,
                        max_ppl_increase=max_ppl_increase, as_json=as_json)


@app.command()
def status(job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: AsJson = False, url: Url = None,
           api_key: ApiKey = None) -> None:
    """Show a job (exit 0 whatever its status; use `mopeq wait` for an exit code from the status)."""
    with _errors(as_json), _client(url, api_key) as client:
        job = client.get(job_id)
        if as_json:
            _out(job.raw)
        else:
            _print_job(job)


@app.command("wait")
def wait_cmd(job_id: Annotated[str, typer.Argument(metavar="ID")], max_ppl_increase: MaxPpl = None,
             timeout: Timeout = None, no_progress: NoProgress = False, as_json: AsJson = False, url: Url = None,
             api_key: ApiKey = None) -> None:
    """Follow a job to its end with a progress bar; exit 0 succeeded, 1 failed, 3 cancelled, 6 regression."""
    with _errors(as_json), _client(url, api_key) as client:
        _finish(client, job_id, progress=not no_progress, timeout=timeout, max_ppl_increase=max_ppl_increase,
                as_json=as_json)


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: AsJson = False, url: Url = None,
           api_key: ApiKey = None) -> None:
    """Cancel a job: a queued one at once, a running one at the worker's next check."""
    with _errors(as_json), _client(url, api_key) as client:
        job = client.cancel(job_id)
        if as_json:
            _out(job.raw)
        else:
            _print_job(job)
            if job.status != "cancelled":
                err.print("cancel requested; the worker stops at its next check (`mopeq wait ID` to follow it)")


@app.command()
def delete(job_id: Annotated[str, typer.Argument(metavar="ID")], as_json: AsJson = False, url: Url = None,
           api_key: ApiKey = None) -> None:
    """Delete a finished job with its stored artifact files (refused while it is queued or running)."""
    with _errors(as_json), _client(url, api_key) as client:
        client.delete(job_id)
        if as_json:
            _out({"id": job_id, "deleted": True})
        else:
            err.print(f"deleted job {job_id} and its files")


@app.command()
def bitmap(job_id: Annotated[str, typer.Argument(metavar="ID")],
           as_csv: Annotated[bool, typer.Option("--csv", help="One CSV row per expert")] = False,
           as_json: AsJson = False, url: Url = None, api_key: ApiKey = None) -> None:
    """The job's bit map (bits per expert, sensitivity, frequency) as a table, CSV or JSON."""
    with _errors(as_json), _client(url, api_key) as client:
        bm = client.bitmap(job_id)
    if as_json:
        _out(bm)
    elif as_csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["layer", "module", "expert", "bits", "sensitivity", "frequency",
                                            "params"], lineterminator="\n")
        w.writeheader()
        w.writerows(bitmap_rows(bm))
        sys.stdout.write(buf.getvalue())
    else:
        Console().print(bitmap_table(bm, title=f"job {job_id}: mean {bm.get('avg_bits', 0):.3f} bits"))


@app.command()
def estimate(
    model: Annotated[str, typer.Argument(help="Hub repo id, or a model directory under the server's model roots")],
    revision: Annotated[str | None, typer.Option("--revision")] = None,
    bits: Annotated[str | None, typer.Option("--bits")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size")] = None,
    avg_bits: Annotated[float | None, typer.Option("--avg-bits", help="Check this budget's feasibility")] = None,
    budget_gb: Annotated[float | None, typer.Option("--budget-gb", help="Check this budget's feasibility")] = None,
    as_json: AsJson = False, url: Url = None, api_key: ApiKey = None,
) -> None:
    """Size a model and its feasible budget range (headers only); exit 2 when a given budget is infeasible."""
    try:
        bit_list = [int(x) for x in bits.split(",") if x.strip()] if bits else None
    except ValueError:
        _fail(EXIT_INVALID, "--bits takes a comma-separated list such as 2,3,4", as_json, code="invalid_input")
    with _errors(as_json), _client(url, api_key) as client:
        est = client.estimate(model, revision=revision, bits=bit_list, group_size=group_size, avg_bits=avg_bits,
                              budget_gb=budget_gb)
    show_estimate(est, as_json)


def show_estimate(est: Estimate, as_json: bool) -> None:
    """Print an estimate (the service's, or the full distribution's ``--local`` one); exit 2 when the budget asked
    about is infeasible."""
    if as_json:
        _out(est.raw)
    else:
        out = Console(highlight=False)
        out.print(f"{est.model} ({est.model_type or '?'}, {est.source}): {est.moe_layers} MoE layers, "
                  f"{est.num_experts} experts, {est.total_params or 0:,} parameters, stored {est.stored_bytes or 0:,} B")
        feas = est.feasible or {}
        ab, gb = feas.get("avg_bits"), feas.get("gb") or [est.min_gb, est.max_gb]
        out.print(f"feasible budget: {gb[0]:.6g}–{gb[1]:.6g} GB"
                  + (f", avg bits {ab[0]:g}–{ab[1]:g}" if isinstance(ab, (list, tuple)) and len(ab) == 2 else "")
                  + f" (bits {','.join(map(str, est.bits or []))}, group size {est.group_size})")
        for name, e in ((est.raw or {}).get("engines") or {}).items():
            out.print(f"  {name}: granularity {'/'.join(e['granularities'])}, "
                      f"bits {','.join(map(str, e['bits'])) or 'none for this model'}")
        if est.budget_feasible is not None:
            out.print(f"budget: {'feasible' if est.budget_feasible else '[red]infeasible[/]'} — {est.budget_message}")
    if est.budget_feasible is False:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def jobs(status_: Annotated[str | None, typer.Option("--status", help="queued|running|succeeded|failed|"
                                                                          "cancelled")] = None,
         model: Annotated[str | None, typer.Option("--model")] = None,
         limit: Annotated[int, typer.Option("--limit")] = 20,
         offset: Annotated[int, typer.Option("--offset")] = 0,
         as_json: AsJson = False, url: Url = None, api_key: ApiKey = None) -> None:
    """List your jobs, newest first."""
    with _errors(as_json), _client(url, api_key) as client:
        try:
            page = client.list(status=status_, model=model, limit=limit, offset=offset)
        except ValueError as exc:
            _fail(EXIT_INVALID, str(exc), as_json, code="invalid_input")
    if as_json:
        _out(page.raw)
        return
    t = Table(title=f"jobs {page.offset + 1 if page.items else 0}–{page.offset + len(page.items)} of {page.total}")
    for col in ("id", "status", "stage", "model", "budget", "created"):
        t.add_column(col)
    for j in page.items:
        b = j.budget or {}
        t.add_row(j.id, j.status, j.stage or "", j.model or "",
                  f"{b['avg_bits']:g} bits" if b.get("avg_bits") else f"{b.get('gb')} GB",
                  j.created_at.strftime("%Y-%m-%d %H:%M:%S") if j.created_at else "")
    Console().print(t)
    if page.next_offset is not None:
        err.print(f"more: --offset {page.next_offset}")


@app.command()
def download(job_id: Annotated[str, typer.Argument(metavar="ID")],
             dest: Annotated[Path, typer.Argument(help="Folder for the files (or the file path with --file)")],
             name: Annotated[str | None, typer.Option("--file", help="Only this artifact (e.g. bitmap.json)")] = None,
             as_json: AsJson = False, url: Url = None, api_key: ApiKey = None) -> None:
    """Download a job's artifact files, each checked against its SHA-256 (exit 7 on a mismatch)."""
    with _errors(as_json), _client(url, api_key) as client:
        paths = client.download(job_id, dest, name)
    if as_json:
        _out({"job_id": job_id, "files": [str(p) for p in paths]})
    else:
        for p in paths:
            print(p)
        err.print(f"{len(paths)} file(s) verified (SHA-256) and written")
