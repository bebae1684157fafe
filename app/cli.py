"""The full distribution's ``mopeq`` command: the light client's remote commands (``mopeq_client.cli``), the
engine's ``mopeq quantize`` (in this process; imports torch lazily) and the service's ``mopeq admin``
(``app.cli_admin``). The light ``mopeq-client`` distribution installs ``mopeq_client.cli`` alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from app.cli_admin import app as admin_app
from mopeq_client.cli import EXIT_CANCELLED, EXIT_INVALID, EXIT_JOB_FAILED, bitmap_table
from mopeq_client.cli import app as remote_app
from mopeq_client.cli import main as run
from mopeq_client.remote_cli import ApiKey, AsJson, Url, _fail, show_estimate
from mopeq_client.remote_cli import estimate as remote_estimate
from mopeq_client.sdk import Estimate

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="MoPEQ: per-expert mixed-precision quantization of Mixture-of-Experts models.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """MoPEQ: per-expert mixed-precision quantization of Mixture-of-Experts models."""


def parse_bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter("--bits takes a comma-separated list such as 2,3,4") from None


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Local model directory or Hub repo id"),
    out: Path = typer.Option(..., "--out", help="Output directory"),
    avg_bits: float | None = typer.Option(None, "--avg-bits", help="Mean bits per expert weight"),
    budget_gb: float | None = typer.Option(None, "--budget-gb", help="Whole-model size budget in GB (1e9 B)"),
    bits: str = typer.Option("2,3,4", "--bits"),
    sensitivity: str = typer.Option("auto", "--sensitivity"),
    allocator: str = typer.Option("knapsack", "--allocator"),
    scope: str = typer.Option("model", "--scope"),
    granularity: str = typer.Option("expert", "--granularity"),
    quantizer: str = typer.Option("gptq", "--quantizer"),
    cost: str = typer.Option("output", "--cost", help="Allocator error: output (tr(dW H dW^T), default) or weight"),
    sequential: bool = typer.Option(True, "--sequential/--no-sequential",
                                    help="GPTQ each layer from the outputs of the quantized layers before it"),
    group_size: int = typer.Option(128, "--group-size"),
    asymmetric: bool = typer.Option(False, "--asymmetric", help="Asymmetric (zero-point) quantization"),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ columns in decreasing Hessian order"),
    probes: int = typer.Option(64, "--probes", help="Maximum Hutchinson probes"),
    probe_tol: float = typer.Option(0.02, "--probe-tol", help="Stop probing at this median relative std error"),
    calib_file: Path | None = typer.Option(None, "--calib-file"),
    calib_samples: int = typer.Option(32, "--calib-samples"),
    seq_len: int = typer.Option(256, "--seq-len"),
    calib_all_experts: bool = typer.Option(False, "--calib-all-experts",
                                           help="Every token through every expert for statistics"),
    eval_file: Path | None = typer.Option(None, "--eval-file"),
    eval_samples: int = typer.Option(64, "--eval-samples"),
    eval_suite: list[str] | None = typer.Option(
        None, "--eval-suite", help="Evaluation suite run before and after, e.g. lm-eval:TASK (repeatable)"),
    eval_suite_include: Path | None = typer.Option(None, "--eval-suite-include",
                                                      help="Folder of custom task YAMLs"),
    eval_suite_limit: int | None = typer.Option(None, "--eval-suite-limit", help="Examples per task"),
    device: str = typer.Option("cpu", "--device"),
    revision: str | None = typer.Option(None, "--revision"),
    low_memory: bool = typer.Option(False, "--low-memory"),
    fmt: str = typer.Option("mopeq", "--format"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print the bit map as JSON instead of a table"),
) -> None:
    """Quantize MODEL in this process and write the artifact to --out."""
    from mopeq_core.config import Budget, QuantizeConfig
    from mopeq_core.errors import CancelledError, MopeqError, UserInputError

    if avg_bits is not None and budget_gb is not None:
        console.print("[red]give --avg-bits or --budget-gb, not both[/]")
        raise typer.Exit(EXIT_INVALID)
    budget = Budget(gb=budget_gb) if budget_gb is not None else Budget(avg_bits=avg_bits if avg_bits else 3.0)
    import os

    cfg = QuantizeConfig(
        model=model, budget=budget, revision=revision, bits=parse_bits(bits), sensitivity=sensitivity,
        allocator=allocator, scope=scope, granularity=granularity, quantizer=quantizer, cost=cost, sequential=sequential,
        group_size=group_size,
        symmetric=not asymmetric, act_order=act_order, probes=probes, probe_tol=probe_tol,
        calib_file=str(calib_file) if calib_file else None, calib_samples=calib_samples, seq_len=seq_len,
        calib_all_experts=calib_all_experts, eval_file=str(eval_file) if eval_file else None,
        eval_samples=eval_samples, eval_suites=tuple(eval_suite or ()),
        eval_suite_include=str(eval_suite_include) if eval_suite_include else None,
        eval_suite_limit=eval_suite_limit, device=device, low_memory=low_memory, format=fmt,
        trust_remote_code=trust_remote_code, seed=seed, token=os.environ.get("HF_TOKEN"))
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        with Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            tasks: dict[str, int] = {}

            def on_event(ev) -> None:
                if ev.stage not in tasks:
                    tasks[ev.stage] = bar.add_task(ev.stage, total=1.0)
                bar.update(tasks[ev.stage], completed=ev.progress)

            from mopeq_core.engine import run

            result = run(cfg, out, on_event=on_event)
    except UserInputError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_INVALID) from None
    except CancelledError as exc:
        console.print(f"[yellow]cancelled:[/] {exc}")
        raise typer.Exit(EXIT_CANCELLED) from None
    except MopeqError as exc:
        console.print(f"[red]failed:[/] {exc}")
        raise typer.Exit(EXIT_JOB_FAILED) from None
    if as_json:
        print(json.dumps(result.bitmap, indent=1))
    else:
        out_console = Console()
        out_console.print(bitmap_table(result.bitmap))
        ppl = result.report["perplexity"]
        if ppl.get("fp_perplexity"):
            out_console.print(f"perplexity: full precision {ppl['fp_perplexity']:.3f} → quantized "
                              f"{ppl['quantized_perplexity']:.3f} ({ppl['increase_pct']:+.2f} %)")
        out_console.print(f"sensitivity: {result.report['selected_sensitivity']}   "
                          f"size: {result.bitmap['total_bytes']:,} B   artifact: {out}")


@app.command()
def estimate(
    model: str = typer.Argument(..., help="Hub repo id, or a model directory (with --local: on this machine)"),
    revision: str | None = typer.Option(None, "--revision"),
    bits: str | None = typer.Option(None, "--bits"),
    group_size: int | None = typer.Option(None, "--group-size"),
    avg_bits: float | None = typer.Option(None, "--avg-bits", help="Check this budget's feasibility"),
    budget_gb: float | None = typer.Option(None, "--budget-gb", help="Check this budget's feasibility"),
    local: bool = typer.Option(False, "--local", help="Size a local directory here instead of asking the service; "
                               "a directory with only config.json is sized from the model built on the meta device"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="With --local: allow auto_map code"),
    as_json: AsJson = False, url: Url = None, api_key: ApiKey = None,
) -> None:
    """Size a model and its feasible budget range (headers only); exit 2 when a given budget is infeasible."""
    if not local:
        return remote_estimate(model, revision=revision, bits=bits, group_size=group_size, avg_bits=avg_bits,
                               budget_gb=budget_gb, as_json=as_json, url=url, api_key=api_key)
    from mopeq_core.errors import MopeqError
    from mopeq_core.meta_checkpoint import estimate_local

    try:
        est = estimate_local(Path(model), bits=parse_bits(bits) if bits else (2, 3, 4), group_size=group_size or 128,
                             trust_remote_code=trust_remote_code)
        raw = est.to_dict()
        if avg_bits is not None or budget_gb is not None:
            try:
                est.check_budget(avg_bits=avg_bits, gb=budget_gb)
                raw.update(budget_feasible=True, budget_message="the budget is feasible")
            except MopeqError as exc:
                raw.update(budget_feasible=False, budget_message=str(exc))
    except MopeqError as exc:
        _fail(EXIT_INVALID, str(exc), as_json, code=type(exc).__name__)
    show_estimate(Estimate.from_dict(raw), as_json)


# The service's estimate is replaced by the one above, which adds --local.
app.registered_commands.extend(c for c in remote_app.registered_commands if c.callback is not remote_estimate)
app.add_typer(admin_app, name="admin", help="Service administration (API keys)")


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
