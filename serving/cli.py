"""`oss-serve`: run, inspect and configure oss-serving.

Commands: ``up``, ``down``, ``status``, ``config show``, ``config validate``. Heavy
imports (Ray, vLLM) happen inside the commands that need them, so ``--help`` and the
configuration commands start instantly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from serving.cluster.cli import preflight
from serving.config import ConfigError, ServingConfig, load_config

CONFIG_ENV = "OSS_SERVING_CONFIG"
T = TypeVar("T")


def _console() -> Console:
    return Console(stderr=False, highlight=False)


def _err_console() -> Console:
    return Console(stderr=True, highlight=False)


def resolve_config(path: str | None) -> ServingConfig:
    """The configuration named by ``--config``, else ``$OSS_SERVING_CONFIG``, else the default."""
    chosen = path or os.environ.get(CONFIG_ENV) or None
    return load_config(chosen)


def _load_or_exit(path: str | None) -> ServingConfig:
    try:
        return resolve_config(path)
    except ConfigError as exc:
        _err_console().print(f"[red]invalid configuration[/red]: {exc}")
        sys.exit(2)


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"YAML configuration file (default: ${CONFIG_ENV}, else the built-in SmolLM2 configuration).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """oss-serving: gpt-oss as an OpenAI-compatible API on your own GPUs (or your laptop's CPU)."""


@main.group("config")
def config_group() -> None:
    """Show or check a configuration."""


@config_group.command("show")
@config_option
def config_show(config_path: str | None) -> None:
    """Print the effective configuration as YAML."""
    cfg = _load_or_exit(config_path)
    click.echo(cfg.to_yaml(), nl=False)


@config_group.command("validate")
@click.argument("file", type=click.Path(dir_okay=False))
def config_validate(file: str) -> None:
    """Check FILE; on error name the offending key and exit 2."""
    try:
        cfg = load_config(Path(file))
    except ConfigError as exc:
        _err_console().print(f"[red]invalid[/red]: {exc}")
        sys.exit(2)
    from serving.engine.budget import BudgetError, check_config

    try:
        reports = check_config(cfg)
    except BudgetError as exc:
        _err_console().print(f"[red]does not fit[/red]: {exc}")
        sys.exit(2)
    names = ", ".join(m.name for m in cfg.models)
    _console().print(f"[green]valid[/green]: {file} ({len(cfg.models)} model(s): {names})")
    for report in reports:
        layout = report.layout
        _console().print(
            f"  {layout.model} on {layout.gpu_type}: {report.kv_tokens:,} KV tokens, "
            f"about {report.max_concurrency} sequences of {report.max_model_len:,} tokens per engine"
        )


@main.command("up")
@config_option
@click.option("--port", type=int, default=None, help="Port of the OpenAI API (overrides the configuration).")
@click.option("--detach", is_flag=True, help="Return once every model is ready and leave the stack running.")
def up(config_path: str | None, port: int | None, detach: bool) -> None:
    """Start Redis (if needed), Ray, the gateway and every configured model on this machine."""
    from serving.local.stack import run_up

    cfg = _load_or_exit(config_path)
    if port is not None:
        cfg.gateway.port = port
    sys.exit(run_up(cfg, detach=detach, config_path=config_path, console=_console()))


@main.command("down")
@config_option
def down(config_path: str | None) -> None:
    """Stop what `oss-serve up` started, and nothing else."""
    from serving.local.stack import run_down

    cfg = _load_or_exit(config_path)
    sys.exit(run_down(cfg, console=_console()))


@main.command("status")
@config_option
@click.option("--cluster", is_flag=True, help="Show the Helm release on Kubernetes (current kube context).")
@click.option("-n", "--namespace", default="default", help="With --cluster: namespace of the release.")
@click.option("--release", default="oss", help="With --cluster: Helm release name.")
def status(config_path: str | None, cluster: bool, namespace: str, release: str) -> None:
    """Show the local stack: models, replicas, health (--cluster: the RayService, replicas, queue depth)."""
    if cluster:
        from serving.cluster.cli import run_cluster_status

        sys.exit(run_cluster_status(namespace, release))
    from serving.local.stack import run_status

    cfg = _load_or_exit(config_path)
    sys.exit(run_status(cfg, console=_console()))


main.add_command(preflight)


# --------------------------------------------------------------------------- tenants
redis_option = click.option(
    "--redis-url", default=None, help="Redis URL (default: redis.url of the configuration)."
)


def _tenant_store(config_path: str | None, redis_url: str | None) -> tuple[Any, Any]:
    from serving.gateway.auth import TenantStore
    from serving.redis_conn import redis_client

    cfg = _load_or_exit(config_path)
    if redis_url:
        cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"url": redis_url})})
    # the gateway's own client: same URL, password (OSS_SERVING_REDIS_PASSWORD), TLS and timeouts
    client = redis_client(cfg)
    return TenantStore(client, cfg.queue.key_prefix), client


def _run_store(config_path: str | None, redis_url: str | None, action: Callable[[Any], Awaitable[T]]) -> T:
    import asyncio

    from redis.exceptions import RedisError

    async def go() -> T:
        store, client = _tenant_store(config_path, redis_url)
        try:
            return await action(store)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go())
    except (RedisError, OSError) as exc:
        _err_console().print(f"[red]cannot reach Redis[/red]: {exc}")
        sys.exit(1)


@main.group("tenants")
def tenants_group() -> None:
    """Manage tenants and their API keys (stored hashed in Redis)."""


@tenants_group.command("add")
@click.argument("tenant_id")
@click.option("--weight", type=float, default=1.0, show_default=True, help="Fair-share weight.")
@click.option("--priority", type=click.Choice(["interactive", "standard", "batch"]), default="standard")
@click.option("--rpm", type=int, default=None, help="Requests per minute.")
@click.option("--tpm", type=int, default=None, help="Tokens per minute.")
@click.option("--concurrency", type=int, default=None, help="Requests queued or running at once.")
@click.option("--max-output-tokens", type=int, default=None)
@click.option("--model", "models", multiple=True, help="Allowed model (repeat); default: all.")
@click.option("--handoff", type=click.Choice(["never", "overflow-only", "allowed"]), default="never")
@click.option("--response-cache/--no-response-cache", default=False, help="May use the response cache.")
@config_option
@redis_option
def tenants_add(
    tenant_id: str,
    weight: float,
    priority: str,
    rpm: int | None,
    tpm: int | None,
    concurrency: int | None,
    max_output_tokens: int | None,
    models: tuple[str, ...],
    handoff: str,
    response_cache: bool,
    config_path: str | None,
    redis_url: str | None,
) -> None:
    """Create or update TENANT_ID and print a new API key (shown once).

    Adding a tenant revoked with `tenants revoke --tenant` brings it back; its old keys stay revoked.
    """
    from pydantic import ValidationError

    from serving.gateway.tenants import HandoffRight, PriorityClass, Tenant, TenantLimits

    try:
        tenant = Tenant(
            id=tenant_id,
            weight=weight,
            priority=PriorityClass(priority),
            limits=TenantLimits(
                requests_per_minute=rpm,
                tokens_per_minute=tpm,
                max_concurrent_requests=concurrency,
                max_output_tokens=max_output_tokens,
            ),
            models=list(models) or ["*"],
            handoff=HandoffRight(handoff),
            response_cache=response_cache,
        )
    except ValidationError as exc:
        _err_console().print(
            f"[red]invalid tenant[/red]: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}"
        )
        sys.exit(2)
    issued = _run_store(config_path, redis_url, lambda store: store.add(tenant))
    _console().print(f"tenant [bold]{tenant_id}[/bold]; API key (shown once, store it now):")
    click.echo(issued.api_key)


@tenants_group.command("list")
@config_option
@redis_option
def tenants_list(config_path: str | None, redis_url: str | None) -> None:
    """List tenants, their limits and their keys' hints."""
    from rich.table import Table

    snap = _run_store(config_path, redis_url, lambda store: store.read())
    tenants, hints = snap.tenants, snap.hints
    table = Table(title="tenants")
    for col in ("tenant", "priority", "weight", "rpm", "tpm", "concurrency", "models", "handoff", "keys"):
        table.add_column(col)
    for tid, t in sorted(tenants.items()):
        lim = t.limits
        table.add_row(
            tid,
            t.priority.value,
            f"{t.weight:g}",
            str(lim.requests_per_minute or "-"),
            str(lim.tokens_per_minute or "-"),
            str(lim.max_concurrent_requests or "-"),
            ",".join(t.models),
            t.handoff.value,
            " ".join(hints.get(tid, [])) or "(none)",
        )
    _console().print(table)
    if snap.invalid:
        _err_console().print(
            f"[yellow]skipped {len(snap.invalid)} record(s) that do not parse[/yellow]: "
            + ", ".join(f"{r.kind} {r.name[:12]}" for r in snap.invalid)
        )
    if not snap.seeded:
        _err_console().print(
            "[yellow]no seed marker: Redis lost the directory; running gateways write back their last copy"
        )


@tenants_group.command("revoke")
@click.argument("key_or_tenant")
@click.option("--tenant", "whole_tenant", is_flag=True, help="Revoke every key of the tenant and remove it.")
@config_option
@redis_option
def tenants_revoke(
    key_or_tenant: str, whole_tenant: bool, config_path: str | None, redis_url: str | None
) -> None:
    """Revoke an API key (the key, or its hint from `list`), or with --tenant a whole tenant.

    A revoked key stays revoked even if the configuration or the tenants file still lists it
    (gateways never seed it again); remove it there too. A tenant revoked with --tenant is not
    seeded again either, until `tenants add` brings it back with a new key. If Redis loses its
    data, gateways still running write back the directory they know, revocations and keys
    issued with `add` or `rotate` included; if none is running, the configuration is the rest.
    """
    if whole_tenant:
        removed = _run_store(config_path, redis_url, lambda store: store.revoke_tenant(key_or_tenant))
    else:
        removed = _run_store(config_path, redis_url, lambda store: store.revoke_key(key_or_tenant))
    if not removed and not whole_tenant:
        _err_console().print("[red]no such key[/red]")
        sys.exit(1)
    _console().print(f"revoked {removed} key(s); gateways stop accepting them within auth.refresh_s")


@tenants_group.command("rotate")
@click.argument("tenant_id")
@config_option
@redis_option
def tenants_rotate(tenant_id: str, config_path: str | None, redis_url: str | None) -> None:
    """Issue TENANT_ID a new key and revoke its old ones.

    A revoked key stays revoked even if the configuration or the tenants file still lists it
    (gateways never seed it again); remove it there too.
    """

    async def rotate(store: Any) -> Any:
        try:
            return await store.rotate(tenant_id)
        except KeyError:
            return None

    issued = _run_store(config_path, redis_url, rotate)
    if issued is None:
        _err_console().print(f"[red]no tenant {tenant_id}[/red]")
        sys.exit(1)
    _console().print(f"tenant [bold]{tenant_id}[/bold]; new API key (old keys revoked):")
    click.echo(issued.api_key)


if __name__ == "__main__":
    main()
