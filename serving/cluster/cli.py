"""Cluster commands of ``oss-serve``: ``preflight`` and the body of ``status --cluster``.

``serving/cli.py`` registers :data:`preflight` with ``main.add_command(preflight)`` and
calls :func:`run_cluster_status` when ``status`` is given ``--cluster``. The Kubernetes
client is imported only when a command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from serving.cluster.kube import ClusterReader, ClusterUnavailable
from serving.cluster.preflight import Finding, load_values, merge_values, parse_set_values, run_preflight
from serving.cluster.status import ClusterStatus, collect_status
from serving.config import ConfigError

__all__ = ["preflight", "print_findings", "print_status", "run_cluster_status"]

LEVEL_STYLE = {"ok": "[green]ok[/green]", "warning": "[yellow]warning[/yellow]", "error": "[red]error[/red]"}

ReaderFactory = Callable[[str | None], ClusterReader]


def _kube_reader(context: str | None) -> ClusterReader:
    from serving.cluster.kube import KubeReader

    return KubeReader(context)


def print_findings(findings: list[Finding], console: Console) -> None:
    table = Table(show_header=True, header_style="bold", expand=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("details", overflow="fold")
    for finding in findings:
        table.add_row(finding.check, LEVEL_STYLE[finding.level], finding.message)
    console.print(table)


@click.command("preflight")
@click.option(
    "-f",
    "--values",
    "values_files",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Values file of the release (repeatable, as with helm -f), e.g. a profile.",
)
@click.option(
    "--chart",
    "chart_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("helm/oss-serving"),
    show_default=True,
    help="The oss-serving chart directory.",
)
@click.option(
    "--set",
    "set_values",
    multiple=True,
    metavar="KEY=VALUE",
    help="A value of the release (repeatable, as with helm --set), e.g. weights.cache.type=shared.",
)
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace of the release.")
@click.option("--context", default=None, help="kube context (default: the current one).")
@click.pass_context
def preflight(
    ctx: click.Context,
    values_files: tuple[Path, ...],
    chart_dir: Path,
    set_values: tuple[str, ...],
    namespace: str,
    context: str | None,
) -> None:
    """Check the current cluster can run the chart with these values, before `helm install`."""
    console = Console(highlight=False)
    factory: ReaderFactory = (ctx.obj or {}).get("cluster_reader_factory", _kube_reader)
    try:
        values = merge_values(load_values(chart_dir, values_files), parse_set_values(set_values))
    except ConfigError as exc:
        console.print(f"[red]invalid values[/red]: {exc}")
        sys.exit(2)
    try:
        reader = factory(context)
        console.print(f"cluster: kube context [bold]{reader.context_name()}[/bold], namespace {namespace}")
        findings = run_preflight(reader, values, namespace)
    except ClusterUnavailable as exc:
        console.print(f"[red]cannot read the cluster[/red]: {exc}")
        sys.exit(2)
    print_findings(findings, console)
    errors = sum(1 for f in findings if f.level == "error")
    warnings = sum(1 for f in findings if f.level == "warning")
    if errors:
        console.print(
            f"[red]{errors} error(s)[/red], {warnings} warning(s): fix the errors before installing"
        )
        sys.exit(1)
    console.print(f"[green]ready to install[/green] ({warnings} warning(s))")


def print_status(state: ClusterStatus, console: Console) -> None:
    if not state.found:
        console.print(f"[red]RayService {state.namespace}/{state.name} not found[/red]")
        return
    ready = (
        "[green]ready[/green]"
        if state.ready == "True"
        else f"[yellow]not ready[/yellow] {state.ready_message}"
    )
    console.print(f"RayService {state.namespace}/{state.name}: {state.service_status or 'unknown'}, {ready}")
    if state.upgrading:
        console.print(f"  upgrade in progress: new cluster {state.pending_cluster or 'starting'}")
    console.print(f"  active Ray cluster: {state.active_cluster or 'none yet'}")
    head = {True: "ready", False: "not ready", None: "missing"}[state.head_ready]
    console.print(f"  head pod: {head}")
    for group, (ready_pods, total) in sorted(state.worker_pods.items()):
        console.print(f"  worker group {group}: {ready_pods}/{total} pods ready")
    app = state.application_status + (f" ({state.application_message})" if state.application_message else "")
    console.print(f"  application oss-serving: {app}")
    table = Table(show_header=True, header_style="bold")
    table.add_column("deployment")
    table.add_column("status")
    table.add_column("replicas (running/target)")
    table.add_column("message", overflow="fold")
    for dep in state.deployments:
        running = "?" if dep.running_replicas is None else str(dep.running_replicas)
        target = "?" if dep.target_replicas is None else str(dep.target_replicas)
        table.add_row(dep.name, dep.status, f"{running}/{target}", dep.message)
    if state.deployments:
        console.print(table)
    if state.queue_depth is None:
        console.print("  queue depth: unknown (the gateway's /metrics could not be read)")
    elif not state.queue_depth:
        console.print("  queue depth: 0 (nothing waiting)")
    else:
        parts = ", ".join(f"{model} {depth:g}" for model, depth in sorted(state.queue_depth.items()))
        console.print(f"  queue depth: {parts}")


def run_cluster_status(
    namespace: str,
    release: str,
    *,
    context: str | None = None,
    console: Console | None = None,
    reader_factory: ReaderFactory | None = None,
) -> int:
    """Print the release's cluster status; 0 when healthy, 1 when not, 2 when unreadable."""
    out = console or Console(highlight=False)
    factory = reader_factory or _kube_reader
    try:
        state = collect_status(factory(context), namespace, release)
    except ClusterUnavailable as exc:
        out.print(f"[red]cannot read the cluster[/red]: {exc}")
        return 2
    print_status(state, out)
    return 0 if state.healthy else 1
