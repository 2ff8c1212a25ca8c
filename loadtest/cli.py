"""`oss-loadtest` command line.

Exit status: 0 when every run was valid, 3 when a run failed its validity checks (see
``loadtest/README.md``), 2 for usage errors, 1 for other failures.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtest.config import LoadTestConfig, load_loadtest_config, parse_slos
from loadtest.metrics import compute_run_metrics
from loadtest.results import run_result, write_csv, write_run
from loadtest.runner import RawRun, execute, plan_run, run_coroutine
from loadtest.tokenizer import load_tokenizer
from loadtest.workload import load_workload, simple_workload

EXIT_INVALID = 3
F = TypeVar("F", bound=Callable[..., Any])


def _common(fn: F) -> F:
    opts = [
        click.option(
            "--config",
            "config_path",
            type=click.Path(exists=True, dir_okay=False),
            help="LoadTestConfig YAML.",
        ),
        click.option("--base-url", help="Endpoint root, e.g. http://127.0.0.1:8000."),
        click.option("--model", help="Model id sent in requests."),
        click.option(
            "--api-key", envvar="OSS_LOADTEST_API_KEY", help="Bearer key (env OSS_LOADTEST_API_KEY)."
        ),
        click.option("--arrival", type=click.Choice(["poisson", "gamma", "constant", "concurrency"])),
        click.option("--rate", type=float, help="Requests per second (open loop)."),
        click.option("--burstiness", type=float, help="Gamma shape (1 = Poisson)."),
        click.option("--concurrency", type=int, help="Clients of a closed loop (--arrival concurrency)."),
        click.option("--num-requests", type=int, help="Most requests."),
        click.option("--duration", type=float, help="Longest schedule (s)."),
        click.option(
            "--workload", "workload_path", type=click.Path(exists=True, dir_okay=False), help="Workload YAML."
        ),
        click.option("--input-tokens", type=int, help="Fixed input length (instead of --workload)."),
        click.option("--output-tokens", type=int, help="Fixed output length (instead of --workload)."),
        click.option("--tokenizer", help="'words' or 'hf:<model folder>' (the target model's tokenizer)."),
        click.option(
            "--percentile", "percentiles", type=float, multiple=True, help="Percentile to report (repeat)."
        ),
        click.option(
            "--slo", "slos", multiple=True, help="SLO as METRIC:MS, e.g. ttft:2000 tpot:50 (repeat)."
        ),
        click.option(
            "--scrape", "scrape_urls", multiple=True, help="Prometheus /metrics URL to scrape (repeat)."
        ),
        click.option("--replicas", type=int, help="Engine replicas behind the endpoint."),
        click.option("--seed", type=int, help="Seed of arrivals and prompts."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output folder."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
        click.option(
            "--profile",
            "profile_path",
            type=click.Path(exists=True, dir_okay=False),
            help="Run against a SIMULATED engine with this profile, in virtual time (no endpoint).",
        ),
        click.option(
            "--sim-replicas",
            type=int,
            help="With --profile: simulated replicas behind --routing (default 1).",
        ),
        click.option(
            "--routing",
            type=click.Choice(["prefix", "power_of_two", "round_robin"]),
            help="With --profile and several replicas: the routing policy (default prefix).",
        ),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    if value is None or value == ():
        return
    node = data
    *head, last = path.split(".")
    for key in head:
        node = node.setdefault(key, {})
    node[last] = value


def build_config(opts: dict[str, Any], extra: dict[str, Any] | None = None) -> LoadTestConfig:
    """The config file (or defaults) with command-line overrides applied, validated."""
    base = load_loadtest_config(opts.get("config_path")).model_dump(mode="json", exclude_none=False)
    o = opts
    for path, key in [
        ("target.base_url", "base_url"),
        ("target.model", "model"),
        ("target.api_key", "api_key"),
        ("target.replicas", "replicas"),
        ("load.arrival", "arrival"),
        ("load.rate", "rate"),
        ("load.burstiness", "burstiness"),
        ("load.concurrency", "concurrency"),
        ("load.num_requests", "num_requests"),
        ("load.max_duration_s", "duration"),
        ("load.seed", "seed"),
        ("metrics.tokenizer", "tokenizer"),
        ("output.dir", "out_dir"),
        ("fleet.replicas", "sim_replicas"),
        ("fleet.routing", "routing"),
    ]:
        _set(base, path, o.get(key))
    if o.get("percentiles"):
        base["metrics"]["percentiles"] = list(o["percentiles"])
    if o.get("slos"):
        base["metrics"]["slos"] = parse_slos(o["slos"])
    if o.get("scrape_urls"):
        base["scrape"]["urls"] = list(o["scrape_urls"])
    if o.get("no_progress"):
        base["output"]["progress"] = False
    if o.get("workload_path"):
        base["workload"] = load_workload(o["workload_path"]).model_dump(mode="json")
    elif o.get("input_tokens") or o.get("output_tokens"):
        base["workload"] = simple_workload(
            o.get("input_tokens") or 256, o.get("output_tokens") or 128
        ).model_dump(mode="json")
    for path, value in (extra or {}).items():
        _set(base, path, value)
    return LoadTestConfig.model_validate(base)


def _config_or_exit(opts: dict[str, Any], extra: dict[str, Any] | None = None) -> LoadTestConfig:
    try:
        return build_config(opts, extra)
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc


@contextmanager
def _progress(enabled: bool, console: Console) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*cols, console=console, transient=False) as prog:
        yield prog


def make_runner(
    cfg: LoadTestConfig, profile_path: str | None, prog: Progress | None
) -> Callable[[LoadTestConfig], RawRun]:
    """A function running one configuration: live over HTTP, or simulated with a profile."""
    if profile_path:
        from loadtest.sim import load_profile

        profile = load_profile(profile_path)
        return functools.partial(_simulated, profile=profile)

    def live(c: LoadTestConfig) -> RawRun:
        tok = load_tokenizer(c.metrics.tokenizer)
        reqs, offsets = plan_run(c, tok)
        label = (
            f"rate {c.load.rate:g}/s"
            if c.load.arrival != "concurrency"
            else f"concurrency {c.load.concurrency}"
        )
        if prog is None:
            return run_coroutine(c, execute(c, reqs, offsets, tok))
        sent = prog.add_task(f"{label}: sent", total=len(reqs))
        done = prog.add_task(f"{label}: done", total=len(reqs))

        def update(n_sent: int, n_done: int) -> None:
            prog.update(sent, completed=n_sent)
            prog.update(done, completed=n_done)

        try:
            return run_coroutine(c, execute(c, reqs, offsets, tok, update))
        finally:
            prog.remove_task(sent)
            prog.remove_task(done)

    return live


def _simulated(c: LoadTestConfig, profile: Any) -> RawRun:
    from loadtest.simulate import simulate_run

    return simulate_run(c, profile)


def _print_run(console: Console, result: dict[str, Any]) -> None:
    m = result["metrics"]
    v = result["validity"]
    t = Table(title=f"{result['workload']} ({result['mode']}, target {result['target_rate'] or '-'} req/s)")
    t.add_column("metric")
    keys = [k for k in m["latency"]["ttft"] if k not in ("count", "std")]
    for k in keys:
        t.add_column(f"{k} ms", justify="right")
    for name, dist in m["latency"].items():
        t.add_row(name, *("-" if dist[k] is None else f"{dist[k] * 1e3:.1f}" for k in keys))
    console.print(t)
    console.print(
        f"completed {m['completed']}/{m['total']}  req/s {m['request_throughput']:.3f}  "
        f"out tok/s {m['output_token_throughput']:.1f}  total tok/s {m['total_token_throughput']:.1f}  "
        f"goodput {m['goodput']['requests_per_s']:.3f} req/s  errors {m['error_rate']:.1%}  "
        f"rejections {m['rejection_rate']:.1%}  outcomes {m['outcomes']}"
    )
    verdict = "[green]VALID[/green]" if result["valid"] else "[red]INVALID[/red]"
    lag = v["send_lag_p99_s"]
    console.print(
        f"run {verdict}: achieved {v['achieved_rate'] or 0:.3g}/s "
        f"of scheduled {v['scheduled_rate'] or 0:.3g}/s "
        f"(target {v['target_rate'] or '-'}), send lag p99 {'-' if lag is None else f'{lag * 1e3:.2f} ms'}, "
        f"client CPU {v['client_cpu']:.0%}"
    )
    for reason in v["reasons"] + v["warnings"]:
        console.print(f"  - {reason}")


def _save_run(folder: Path, cfg: LoadTestConfig, raw: RawRun) -> dict[str, Any]:
    metrics = compute_run_metrics(raw.records, cfg.metrics.percentiles, cfg.metrics.slos)
    result = run_result(cfg, raw, metrics)
    write_run(folder, result, raw)
    if cfg.output.html:
        from loadtest.report import render_run_report

        rows = [
            {"scheduled": r.scheduled, "ttft": m.ttft, "e2e": m.e2e}
            for r, m in zip(raw.records, metrics.per_request, strict=True)
        ]
        render_run_report(result, rows, folder / "report.html")
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Load-test any OpenAI-compatible endpoint and plan capacity."""


@main.command()
@_common
def run(**opts: Any) -> None:
    """One run: send on schedule, score, report; exit 3 if the run is invalid."""
    cfg = _config_or_exit(opts)
    console = Console(stderr=True)
    with _progress(cfg.output.progress and not opts["profile_path"], console) as prog:
        raw = make_runner(cfg, opts["profile_path"], prog)(cfg)
    result = _save_run(cfg.output.dir, cfg, raw)
    _print_run(console, result)
    console.print(f"results in {cfg.output.dir}/ (result.json, requests.jsonl, summary.csv, report.html)")
    if not result["valid"]:
        raise SystemExit(EXIT_INVALID)


def _sweep_opts(fn: F) -> F:
    fn = click.option("--rates", help="Comma-separated rates (default: geometric from --start-rate).")(fn)
    fn = click.option("--start-rate", type=float)(fn)
    fn = click.option("--factor", type=float, help="Rate multiplier between points.")(fn)
    fn = click.option("--max-points", type=int)(fn)
    return click.option("--point-duration", type=float, help="Seconds of schedule per point.")(fn)


def _sweep_extra(opts: dict[str, Any]) -> dict[str, Any]:
    return {
        "sweep.rates": [float(x) for x in opts["rates"].split(",")] if opts.get("rates") else None,
        "sweep.start_rate": opts.get("start_rate"),
        "sweep.factor": opts.get("factor"),
        "sweep.max_points": opts.get("max_points"),
        "sweep.duration_s": opts.get("point_duration"),
    }


def do_sweep(
    cfg: LoadTestConfig, profile_path: str | None, console: Console
) -> tuple[Any, list[dict[str, Any]]]:
    """Run a sweep, save every point and the sweep files; returns (SweepResult, point results)."""
    from loadtest.sweep import run_sweep, sweep_rates

    out = cfg.output.dir
    results: list[dict[str, Any]] = []
    ttfts: list[list[float]] = []
    with _progress(cfg.output.progress, console) as prog:
        outer = prog.add_task("sweep points", total=len(sweep_rates(cfg))) if prog else None
        runner = make_runner(cfg, profile_path, prog)

        def on_point(p: Any) -> None:
            folder = out / f"rate_{p.rate:.4g}"
            write_run(folder, p.result, p.raw)
            results.append(p.result)
            ttfts.append([m.ttft for m in p.metrics.per_request if m.ttft is not None])
            if prog is not None and outer is not None:
                prog.advance(outer)
            m = p.metrics
            console.print(
                f"rate {p.rate:.4g}/s: {m.request_throughput:.3f} req/s, TTFT p50 "
                f"{(m.distributions['ttft'].percentiles.get('p50') or 0) * 1e3:.0f} ms, "
                f"{'SATURATED: ' + '; '.join(p.why) if p.saturated else 'ok'}"
                f"{'' if p.result['valid'] else _invalid_why(p.result)}"
            )

        res = run_sweep(cfg, runner, on_point)
    from loadtest.results import csv_row

    out.mkdir(parents=True, exist_ok=True)
    doc = res.to_dict(cfg)
    (out / "sweep.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    write_csv(out / "sweep.csv", [csv_row(r) for r in results])
    if cfg.output.html:
        from loadtest.report import render_sweep_report

        render_sweep_report(doc, results, out / "report.html", ttfts)
    return res, results


@main.command()
@_common
@_sweep_opts
def sweep(**opts: Any) -> None:
    """Rates from low to saturation, stopping early once clearly over-saturated."""
    cfg = _config_or_exit(opts, _sweep_extra(opts))
    console = Console(stderr=True)
    res, results = do_sweep(cfg, opts["profile_path"], console)
    console.print(
        f"knee {res.knee_rate} req/s, saturation throughput {res.saturation_throughput:.3f} req/s "
        f"({res.saturation_output_tps:.1f} output tok/s); {res.stop_reason}; results in {cfg.output.dir}/"
    )
    if not all(r["valid"] for r in results):
        raise SystemExit(EXIT_INVALID)


@main.command()
@_common
@click.option("--slo-percentile", type=float, help="Percentile the SLOs hold at (default 99).")
@click.option("--repeats", type=int, help="Independent searches for the confidence interval.")
@click.option("--start-rate", type=float)
@click.option("--trial-duration", type=float, help="Seconds of schedule per trial.")
def slo(**opts: Any) -> None:
    """The highest rate per replica meeting the SLOs, with a confidence interval."""
    from loadtest.slo import slo_search

    extra = {
        "slo_search.percentile": opts.get("slo_percentile"),
        "slo_search.repeats": opts.get("repeats"),
        "slo_search.start_rate": opts.get("start_rate"),
        "slo_search.duration_s": opts.get("trial_duration"),
    }
    cfg = _config_or_exit(opts, extra)
    console = Console(stderr=True)
    with _progress(cfg.output.progress and not opts["profile_path"], console) as prog:
        runner = make_runner(cfg, opts["profile_path"], prog)

        def on_trial(k: int, t: Any) -> None:
            console.print(
                f"search {k + 1}: {t.rate:.4g} req/s "
                f"{'pass' if t.passed else 'FAIL: ' + '; '.join(t.binding)}"
            )

        try:
            res = slo_search(cfg, runner, on_trial)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
    doc = res.to_dict(cfg)
    cfg.output.dir.mkdir(parents=True, exist_ok=True)
    (cfg.output.dir / "slo.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    r = doc["rate_per_replica"]
    console.print(
        f"highest rate per replica meeting the SLOs: {r['mean']:.4g} req/s "
        f"({doc['confidence']:.0%} CI {r['low']:.4g} - {r['high']:.4g}); {cfg.output.dir / 'slo.json'}"
    )


@main.command()
@_common
@click.option(
    "--from", "from_path", type=click.Path(exists=True, dir_okay=False), help="slo.json of a measured search."
)
@click.option("--target-rate", type=float, help="Peak requests per second to carry.")
@click.option(
    "--serving-config", type=click.Path(exists=True, dir_okay=False), help="oss-serving config YAML."
)
@click.option("--serving-model", help="Model of the serving configuration.")
@click.option("--gpus-per-replica", type=int)
@click.option("--gpu-hour-price", type=float)
@click.option("--n-plus", type=int, help="Replicas that may fail with the SLOs kept (N+k).")
@click.option("--max-unavailable", type=int)
@click.option("--max-surge", type=int)
@click.option("--max-utilization", type=float)
@click.option(
    "--validation",
    "validation_path",
    type=click.Path(exists=True, dir_okay=False),
    help="validation.json of `oss-loadtest validate` for this profile: its error becomes the margin.",
)
@click.option(
    "--refuse-outside", is_flag=True, help="Refuse (exit 2) a workload outside the validated ranges."
)
@click.option(
    "--compare-routing",
    is_flag=True,
    help="With --profile: simulate the planned fleet at the target rate under each routing policy.",
)
def plan(**opts: Any) -> None:
    """Replicas and GPUs for a target load and SLOs (from measured results or a profile).

    A plan on a profile gives away a margin for the simulator's error: the largest
    absolute saturation-throughput error of --validation (usable = predicted x
    max_utilization x (1 - margin)), or ``plan.unvalidated_margin`` without one.
    """
    from loadtest.plan import capacity_plan

    extra = {
        "plan.target_rate": opts.get("target_rate"),
        "plan.serving_config": opts.get("serving_config"),
        "plan.model": opts.get("serving_model"),
        "plan.gpus_per_replica": opts.get("gpus_per_replica"),
        "plan.gpu_hour_price": opts.get("gpu_hour_price"),
        "plan.failure_tolerance": opts.get("n_plus"),
        "plan.max_unavailable": opts.get("max_unavailable"),
        "plan.max_surge": opts.get("max_surge"),
        "plan.max_utilization": opts.get("max_utilization"),
    }
    cfg = _config_or_exit(opts, extra)
    console = Console(stderr=True)
    margin, margin_source = 0.0, "measured capacity: no simulation margin"
    extra_notes: list[str] = []
    if opts.get("profile_path"):
        margin, margin_source, extra_notes = _plan_margin(cfg, opts.get("validation_path"), opts, console)
    elif opts.get("validation_path"):
        console.print("[yellow]warning:[/yellow] --validation ignored: a measured capacity needs no margin")
    if opts.get("from_path"):
        doc = json.loads(Path(opts["from_path"]).read_text(encoding="utf-8"))
        capacity, source, slos = (
            doc["rate_per_replica"],
            f"measured search {opts['from_path']}",
            doc["slos_s"],
        )
    elif opts.get("profile_path"):
        from loadtest.slo import slo_search

        try:
            res = slo_search(cfg, make_runner(cfg, opts["profile_path"], None))
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        doc = res.to_dict(cfg)
        capacity, source, slos = (
            doc["rate_per_replica"],
            f"simulated profile {opts['profile_path']}",
            doc["slos_s"],
        )
    else:
        raise click.UsageError("give --from slo.json (measured) or --profile PROFILE (simulated)")
    try:
        result = capacity_plan(cfg.plan, capacity, source, slos, margin, margin_source)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    result["assumptions"].extend(extra_notes)
    if opts.get("compare_routing"):
        if not opts.get("profile_path"):
            raise click.UsageError("--compare-routing simulates the fleet: give --profile")
        n = max(2, result["replicas_for_load"])
        rc = cfg.model_copy(deep=True)
        rc.load.rate = cfg.plan.target_rate
        result["routing"] = _routing_rows(rc, opts["profile_path"], n)
        _print_routing(
            console, result["routing"], f"the planned fleet: {n} replicas at {rc.load.rate:g} req/s"
        )
    cfg.output.dir.mkdir(parents=True, exist_ok=True)
    (cfg.output.dir / "capacity_plan.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    console.print(
        f"{result['replicas']} replicas x {result['gpus_per_replica']} GPU = {result['gpus']} GPUs "
        f"({result['replicas_for_load']} for the load + N+{cfg.plan.failure_tolerance} + "
        f"{cfg.plan.max_unavailable} for rolling updates; {result['gpus_during_update']} GPUs during updates)"
    )
    if "cost" in result:
        c = result["cost"]
        console.print(
            f"cost {c['per_hour']:.2f}/hour, {c['per_month']:.0f}/month, "
            f"{c['per_million_requests']:.2f}/M requests"
        )
    console.print(f"margin {result['margin']:.1%}: {result['margin_source']}")
    for a in result["assumptions"]:
        console.print(f"  - {a}")
    click.echo(json.dumps({k: result[k] for k in ("replicas", "gpus", "gpus_per_replica", "margin")}))


def _plan_margin(
    cfg: LoadTestConfig, validation_path: str | None, opts: dict[str, Any], console: Console
) -> tuple[float, str, list[str]]:
    """(margin, where it came from, notes for the plan's assumptions) of a profile plan;
    warns, or refuses with --refuse-outside, for a workload outside the validated ranges."""
    from loadtest.validation import (
        margin_from_validation,
        outside_validated_range,
        ttft_error_summary,
        workload_lengths,
    )

    if validation_path is None:
        m = cfg.plan.unvalidated_margin
        why = f"default plan.unvalidated_margin {m:.0%}, UNVALIDATED: no --validation table given"
        return m, why, ["the margin is a default, not a measured error: run `oss-loadtest validate`"]
    doc = json.loads(Path(validation_path).read_text(encoding="utf-8"))
    try:
        margin = margin_from_validation(doc, validation_path)
    except (ValueError, KeyError) as exc:
        raise click.UsageError(f"--validation: {exc}") from exc
    notes = [ttft_error_summary(doc)]
    outside = outside_validated_range(doc, workload_lengths(cfg.workload), cfg.plan.range_tolerance)
    for why in outside:
        msg = f"the planned workload is outside what was validated: {why}"
        if opts.get("refuse_outside"):
            raise click.UsageError(msg + " (--refuse-outside)")
        console.print(f"[yellow]warning:[/yellow] {msg}")
        notes.append(f"WARNING: {msg}; the margin may not cover it")
    return margin.value, margin.source, notes


def do_design(cfg: LoadTestConfig, console: Console) -> list[Any]:
    """Run the designed calibration experiment (``calibrate.design``) against the endpoint,
    saving each run under ``conc_<N>_in<prompt>/`` (``conc_<N>/`` for a mixed design,
    ``conc_<N>_shared/`` for the shared-prefix block);
    returns its :class:`CalibrationPoint` s."""
    from loadtest.calibrate import (
        CalibrationPoint,
        design_configs,
        template_probe_config,
        template_tokens_of,
        warmup_configs,
    )

    points = []
    d = cfg.calibrate.design
    console.print(
        f"calibration design: prompts {d.input_tokens} x outputs {d.output_tokens} tokens"
        + (
            f", a block behind {d.shared_prefix.groups} shared {d.shared_prefix.tokens}-token system prompts"
            if d.shared_prefix
            else ""
        )
        + f", closed loop at concurrency {d.concurrency}"
    )
    with _progress(cfg.output.progress, console) as prog:
        runner = make_runner(cfg, None, prog)
        warm = warmup_configs(cfg)
        for wc in warm:
            wm = compute_run_metrics(runner(wc).records, [50.0], None)
            console.print(
                f"warm-up (not fitted): {wm.completed}/{wm.total} requests of "
                f"{wc.workload.classes[0].input_tokens.value} prompt tokens"
            )
        if cfg.calibrate.chat_template_system_tokens is None:
            probe = template_probe_config(cfg)
            cfg.calibrate.chat_template_system_tokens = template_tokens_of(runner(probe).records)
            console.print(
                "chat template with a system message (probe, not fitted): "
                f"{cfg.calibrate.chat_template_system_tokens} tokens"
            )
        for pc in design_configs(cfg):
            raw = runner(pc)
            first = pc.workload.classes[0]
            if first.shared_prefix is not None:
                block, label = "_shared", f", behind {first.shared_prefix.groups} shared system prompts"
            else:
                block = "" if d.blocks == "mixed" else f"_in{first.input_tokens.value}"
                label = block.replace("_in", ", prompts of ")
            result = _save_run(cfg.output.dir / f"conc_{pc.load.concurrency}{block}", pc, raw)
            m = result["metrics"]
            console.print(
                f"concurrency {pc.load.concurrency}{label}: "
                f"{m['completed']}/{m['total']} completed, "
                f"{m['request_throughput']:.3f} req/s{'' if result['valid'] else _invalid_why(result)}"
            )
            points.append(CalibrationPoint(float(pc.load.concurrency), raw.records, raw.samples))
    return points


def _invalid_why(result: dict[str, Any]) -> str:
    """' [INVALID RUN: why]' for a run the validity rules rejected."""
    reasons = result.get("validity", {}).get("reasons") or []
    return f" [INVALID RUN: {'; '.join(reasons)}]" if reasons else " [INVALID RUN]"


def print_fit(console: Console, report: Any) -> None:
    """The fitted coefficients with their standard errors, and the identification warnings."""
    t = Table(
        title=f"fit (decode R^2 {report.decode_r2:.3f}, {report.decode_samples} TPOT rows, "
        f"{report.prefill_samples} first-token rows)"
    )
    for col in ("coefficient", "value", "standard error", "relative"):
        t.add_column(col, justify="left" if col == "coefficient" else "right")
    for name, value in report.coefficients.items():
        se = report.standard_errors[name]
        rse = report.relative_se(name)
        flag = "[yellow]" if name in report.poorly_identified else ""
        t.add_row(
            f"{flag}{name}",
            f"{value:.4g}",
            "-" if math.isnan(se) else f"{se:.2g}",
            "-" if not math.isfinite(rse) else f"{rse:.0%}",
        )
    console.print(t)
    for note in report.notes:
        console.print(f"[yellow]warning:[/yellow] {note}")


@main.command()
@_common
@_sweep_opts
@click.option(
    "--from-sweep", type=click.Path(exists=True, file_okay=False), help="Fit an existing sweep folder."
)
@click.option("--max-num-seqs", type=int, help="The engine's max_num_seqs.")
@click.option("--num-kv-blocks", type=int, help="KV blocks (default: scraped vllm:cache_config_info).")
@click.option("--profile-out", type=click.Path(dir_okay=False), default="profile.yaml", show_default=True)
def calibrate(**opts: Any) -> None:
    """Fit a simulated-engine profile against a real endpoint.

    Without a workload or rates, runs the designed experiment of ``calibrate.design``
    (prompt length x output length x concurrency); with --workload/--input-tokens/
    --output-tokens or --rates/--start-rate (or ``sweep.rates`` in the config), a rate
    sweep of that workload. Writes the profile and, next to it, ``<name>.fit.json`` with
    each coefficient's standard error; warns about poorly identified coefficients.
    """
    from loadtest.calibrate import CalibrationPoint, fit_profile
    from loadtest.results import load_run_records, load_run_samples

    extra = {
        **_sweep_extra(opts),
        "calibrate.max_num_seqs": opts.get("max_num_seqs"),
        "calibrate.num_kv_blocks": opts.get("num_kv_blocks"),
    }
    cfg = _config_or_exit(opts, extra)
    console = Console(stderr=True)
    points: list[CalibrationPoint] = []
    if opts.get("from_sweep"):
        folder = Path(opts["from_sweep"])
        for sub in sorted(p for p in folder.iterdir() if (p / "requests.jsonl").exists()):
            result = json.loads((sub / "result.json").read_text(encoding="utf-8"))
            samples = load_run_samples(sub)
            level = result["target_rate"] or result.get("concurrency") or math.nan
            points.append(CalibrationPoint(level, load_run_records(sub), samples))
    else:
        if opts["profile_path"]:
            raise click.UsageError("calibrate fits a real endpoint: drop --profile")
        chosen = [
            opts.get(k) for k in ("workload_path", "input_tokens", "output_tokens", "rates", "start_rate")
        ]
        if any(chosen) or cfg.sweep.rates:
            res, _ = do_sweep(cfg, None, console)
            points = [CalibrationPoint(p.rate, p.raw.records, p.raw.samples) for p in res.points]
        else:
            points = do_design(cfg, console)
    try:
        report = fit_profile(points, cfg.calibrate, name=f"calibrated:{cfg.target.model}")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    out = Path(opts["profile_out"])
    out.write_text(yaml.safe_dump(report.profile.model_dump(mode="json"), sort_keys=False))
    fit_json = out.with_name(out.stem + ".fit.json")
    fit_json.write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    print_fit(console, report)
    console.print(f"profile written to {out}, fit with standard errors to {fit_json}")


@main.command()
@_common
@_sweep_opts
@click.option(
    "--set",
    "set_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Validation set YAML (default: loadtest/validation_set.yaml).",
)
@click.option("--only", multiple=True, help="Run only this workload of the set (repeat).")
@click.option(
    "--measured-from",
    type=click.Path(exists=True, file_okay=False),
    help="Take the real sweeps from this earlier validate output (<dir>/<workload>/measured) "
    "instead of running them: a new profile checked against the same measurements.",
)
@click.option(
    "--start-fraction",
    type=float,
    help="Start each workload's sweep at this share of its saturation throughput predicted by "
    "--profile (so that its lowest rate is low load), instead of --start-rate.",
)
def validate(**opts: Any) -> None:
    """Sweep held-out workloads for real and with --profile in virtual time; print the error
    table and write validation.json (what `plan --validation` reads)."""
    from loadtest.sweep import load_sweep
    from loadtest.validation import (
        load_validation_set,
        margin_from_validation,
        validation_document,
        validation_row,
    )

    if not opts.get("profile_path"):
        raise click.UsageError("validate needs --profile: the calibrated profile to check")
    cfg = _config_or_exit(opts, _sweep_extra(opts))
    if 50.0 not in cfg.metrics.percentiles:
        cfg.metrics.percentiles = [*cfg.metrics.percentiles, 50.0]
    try:
        vset = load_validation_set(opts.get("set_path"))
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    unknown = set(opts["only"]) - {w.name for w in vset.workloads}
    if unknown:
        raise click.UsageError(f"not in the set {vset.name}: {sorted(unknown)}")
    workloads = [w for w in vset.workloads if not opts["only"] or w.name in opts["only"]]
    console = Console(stderr=True)
    rows = []
    all_valid = True
    for spec in workloads:
        sweeps: list[Any] = []
        for kind, profile in (("measured", None), ("predicted", opts["profile_path"])):
            wc = cfg.model_copy(deep=True)
            wc.workload = spec
            wc.output.dir = cfg.output.dir / spec.name / kind
            if sweeps:  # the simulation runs exactly the rates the real sweep ran, none stopped early
                wc.sweep.rates = [p.rate for p in sweeps[0].points]
                wc.sweep.stop_after_saturated = len(wc.sweep.rates) + 1
            elif opts.get("start_fraction") and not wc.sweep.rates and not opts.get("measured_from"):
                capacity = predicted_capacity(wc, opts["profile_path"])
                wc.sweep.start_rate = float(f"{opts['start_fraction'] * capacity:.2g}")
                console.print(
                    f"{spec.name}: predicted saturation {capacity:.3g} req/s, sweep from "
                    f"{wc.sweep.start_rate:g} req/s"
                )
            if profile is None and opts.get("measured_from"):
                folder = Path(opts["measured_from"]) / spec.name / "measured"
                console.print(f"[bold]{spec.name}[/bold]: measured, read from {folder}")
                res = load_sweep(folder, wc)
                results = [p.result for p in res.points]
                all_valid = all_valid and all(r["valid"] for r in results)
                sweeps.append(res)
                continue
            console.print(f"[bold]{spec.name}[/bold]: {kind}")
            res, results = do_sweep(wc, profile, console)
            all_valid = all_valid and all(r["valid"] for r in results)
            sweeps.append(res)
        rows.append(validation_row(spec, *sweeps))
    doc = validation_document(vset.name, opts["profile_path"], rows)
    cfg.output.dir.mkdir(parents=True, exist_ok=True)
    path = cfg.output.dir / "validation.json"
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    _print_validation(console, doc)
    try:
        m = margin_from_validation(doc, str(path))
        console.print(f"plan margin from this table: {m.value:.1%} ({m.source})")
    except ValueError as exc:
        console.print(f"[yellow]warning:[/yellow] {exc}")
    console.print(f"error table in {path}")
    if not all_valid:
        raise SystemExit(EXIT_INVALID)


def predicted_capacity(cfg: LoadTestConfig, profile_path: str) -> float:
    """Saturation throughput of ``cfg``'s workload on the profile: a geometric sweep in virtual
    time from 0.01 req/s, doubling, until two points saturate."""
    from loadtest.sweep import run_sweep

    pc = cfg.model_copy(deep=True)
    pc.sweep.rates = []
    pc.sweep.start_rate, pc.sweep.factor, pc.sweep.max_points = 0.01, 2.0, 20
    pc.sweep.stop_after_saturated = 2
    pc.output.progress = False
    res = run_sweep(pc, make_runner(pc, profile_path, None))
    return float(res.saturation_throughput)


def _print_validation(console: Console, doc: dict[str, Any]) -> None:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:+.1%}"

    def num(x: float | None, scale: float = 1.0, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x * scale, fmt)

    t = Table(title=f"validation of {doc['profile']} on {doc['set']}")
    t.add_column("workload", no_wrap=True)
    for col in ("in tok", "out tok", "sat. req/s meas.", "pred.", "error"):
        t.add_column(col, justify="right")
    for col in ("TTFT p50 ms meas.", "pred.", "error"):
        t.add_column(col, justify="right")
    for r in doc["rows"]:
        m, p = r["measured"], r["predicted"]
        t.add_row(
            r["workload"] + ("" if m["saturated"] else " *"),
            f"{r['input_tokens']:.0f}",
            f"{r['output_tokens']:.0f}",
            num(m["saturation_rps"]),
            num(p["saturation_rps"]),
            pct(r["saturation_error"]),
            num(m["ttft_p50_lowest_rate_s"], 1e3, ".0f") + (" +" if "ttft_note" in r else ""),
            num(p["ttft_p50_lowest_rate_s"], 1e3, ".0f"),
            pct(r["ttft_p50_error"]),
        )
    console.print(t)
    if any(not r["measured"]["saturated"] for r in doc["rows"]):
        console.print("* the measured sweep never saturated: its throughput error is at the highest rate")
    if any("ttft_note" in r for r in doc["rows"]):
        console.print(
            "+ the streams carried no token timing (one text chunk at the end): TTFT measured at the "
            "stream's first event, the role chunk sent with the first generated token"
        )


def _routing_rows(cfg: LoadTestConfig, profile_path: str, replicas: int) -> list[dict[str, Any]]:
    from loadtest.sim import load_profile
    from loadtest.simulate import compare_routing

    return compare_routing(cfg, load_profile(profile_path), replicas)


def _print_routing(console: Console, rows: list[dict[str, Any]], title: str) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.0f}"

    rr = next((r for r in rows if r["policy"] == "round_robin"), None)
    t = Table(title=title)
    for col in ("policy", "hit rate", "TTFT p50 ms", "TTFT p99 ms", "req/s", "requests per replica"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        t.add_row(
            r["policy"],
            f"{r['hit_rate']:.3f}",
            ms(r["ttft_p50_s"]),
            ms(r["ttft_p99_s"]),
            f"{r['request_throughput']:.3f}",
            " / ".join(str(n) for n in r["routed"].values()),
        )
    console.print(t)
    ours = next((r for r in rows if r["policy"] == "prefix"), None)
    ref = rows[0]
    if ours and rr and ref["hit_rate"] and rr["ttft_p50_s"] and ours["ttft_p50_s"] is not None:
        console.print(
            f"prefix routing: hit rate {ours['hit_rate'] / ref['hit_rate']:.3f} of the single-cache "
            f"reference; TTFT p50 {ours['ttft_p50_s'] / rr['ttft_p50_s']:.3f} of round robin's"
        )


@main.command()
@_common
@click.option("--out-json", type=click.Path(dir_okay=False), help="Write the rows here as JSON.")
def routing(**opts: Any) -> None:
    """What prefix routing buys: the workload on --sim-replicas simulated replicas of --profile
    under round robin, Ray Serve's default (power of two choices) and oss-serving's prefix
    affinity, next to one replica with the KV cache of all (the hit-rate reference)."""
    if not opts.get("profile_path"):
        raise click.UsageError("routing simulates a fleet: give --profile")
    cfg = _config_or_exit(opts)
    n = opts.get("sim_replicas") or 2
    if n < 2:
        raise click.UsageError("--sim-replicas: a routing comparison needs at least 2 replicas")
    rows = _routing_rows(cfg, opts["profile_path"], n)
    console = Console(stderr=True)
    _print_routing(console, rows, f"{cfg.workload.name} on {n} simulated replicas at {cfg.load.rate:g} req/s")
    if opts.get("out_json"):
        Path(opts["out_json"]).write_text(json.dumps(rows, indent=1), encoding="utf-8")


@main.command("sim-engine", context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sim_engine(args: tuple[str, ...]) -> None:
    """Serve a SIMULATED engine (planning and test tool): python -m loadtest.sim ARGS."""
    from loadtest.sim.__main__ import main as sim_main

    sim_main.main(args=list(args), prog_name="oss-loadtest sim-engine")


if __name__ == "__main__":
    main()
