"""Capacity plan: replicas and GPUs for a target load under SLOs, with headroom and cost.

Inputs: the per-replica rate that meets the SLOs (``oss-loadtest slo`` result, measured,
or the same search run on a simulated engine profile) and the replica layout from the
oss-serving configuration (GPUs per replica = ``tensor_parallel_size``, times
``data_parallel_size`` for an expert-parallel group).

Arithmetic (all documented in the plan's ``assumptions``)::

    capacity   = lower end of the per-replica interval (or its mean)
    usable     = capacity x max_utilization x (1 - margin)
    for_load   = ceil(target_rate / usable)
    replicas   = for_load + failure_tolerance (N+k) + max_unavailable (rolling update)
    gpus       = replicas x gpus_per_replica; during updates + max_surge x gpus_per_replica
    cost/hour  = gpus x gpu_hour_price

``margin`` is the simulator's error carried into the plan (see
:mod:`loadtest.validation`): 0 for a measured capacity, the largest absolute
saturation-throughput error of a validation table for a simulated profile, or
``unvalidated_margin`` when the profile was never validated.
"""

from __future__ import annotations

import math
from typing import Any

from loadtest.config import PlanConfig

__all__ = ["PLAN_SCHEMA", "capacity_plan", "gpus_per_replica"]

PLAN_SCHEMA = "oss-loadtest/plan/1"
HOURS_PER_MONTH = 730.0


def gpus_per_replica(plan: PlanConfig) -> tuple[int, str]:
    """GPUs of one replica and where that figure came from."""
    if plan.gpus_per_replica is not None:
        return plan.gpus_per_replica, "--gpus-per-replica"
    if plan.serving_config is None:
        return 1, "default (no serving configuration given)"
    from serving.config import load_config

    config = load_config(plan.serving_config)
    model = config.model(plan.model) if plan.model else config.models[0]
    if model is None:
        raise ValueError(f"model {plan.model!r} is not in {plan.serving_config}")
    topo = model.topology
    n = topo.tensor_parallel_size * (topo.data_parallel_size if topo.kind == "expert_parallel" else 1)
    return n, f"{plan.serving_config}: model {model.name}, {topo.kind}, TP{topo.tensor_parallel_size}" + (
        f" x DP{topo.data_parallel_size}" if topo.kind == "expert_parallel" else ""
    )


def capacity_plan(
    plan: PlanConfig,
    capacity: dict[str, float],
    source: str,
    slos: dict[str, float],
    margin: float = 0.0,
    margin_source: str = "measured capacity: no simulation margin",
) -> dict[str, Any]:
    """The plan document. ``capacity`` has ``mean``, ``low``, ``high`` requests per second
    per replica; ``margin`` the share of it given away for the simulator's error."""
    per_replica = capacity["low"] if plan.use_lower_bound else capacity["mean"]
    if per_replica <= 0:
        raise ValueError("the per-replica capacity under these SLOs is 0: no replica count can meet them")
    if not 0 <= margin < 1:
        raise ValueError(f"a margin of {margin:.0%} leaves no usable capacity")
    gpr, layout = gpus_per_replica(plan)
    derate = plan.max_utilization * (1 - margin)
    usable = per_replica * derate
    for_load = math.ceil(plan.target_rate / usable - 1e-9)
    replicas = for_load + plan.failure_tolerance + plan.max_unavailable
    gpus = replicas * gpr
    out: dict[str, Any] = {
        "schema": PLAN_SCHEMA,
        "target_rate": plan.target_rate,
        "slos_s": slos,
        "capacity_source": source,
        "rate_per_replica": capacity,
        "planned_rate_per_replica": per_replica,
        "margin": margin,
        "margin_source": margin_source,
        "usable_rate_per_replica": usable,
        "replicas_for_load": for_load,
        "replicas": replicas,
        "gpus_per_replica": gpr,
        "layout": layout,
        "gpus": gpus,
        "gpus_during_update": gpus + plan.max_surge * gpr,
        "utilization_at_target": plan.target_rate / (replicas * per_replica),
        "utilization_after_k_failures": plan.target_rate
        / ((replicas - plan.failure_tolerance) * per_replica),
        "replicas_at_mean_capacity": math.ceil(plan.target_rate / (capacity["mean"] * derate) - 1e-9)
        + plan.failure_tolerance
        + plan.max_unavailable
        if capacity["mean"] > 0
        else None,
        "assumptions": [
            f"capacity per replica {per_replica:.4g} req/s "
            f"({'lower end of the confidence interval' if plan.use_lower_bound else 'mean'}) from {source}",
            f"replicas run at most at {plan.max_utilization:.0%} of that capacity",
            f"{margin:.1%} of it is given away for the prediction error ({margin_source})",
            f"N+{plan.failure_tolerance}: {plan.failure_tolerance} replica(s) may fail with the SLOs kept",
            f"rolling updates take {plan.max_unavailable} replica(s) down and start {plan.max_surge} extra",
            "the workload mix (input/output lengths, reasoning effort, prefix sharing) is the one measured; "
            "a different mix needs a new measurement or profile run",
            "load is spread evenly over replicas (prefix-affinity skew lowers effective capacity)",
        ],
    }
    if plan.gpu_hour_price is not None:
        out["cost"] = {
            "gpu_hour_price": plan.gpu_hour_price,
            "per_hour": gpus * plan.gpu_hour_price,
            "per_month": gpus * plan.gpu_hour_price * HOURS_PER_MONTH,
            "per_million_requests": gpus * plan.gpu_hour_price / (plan.target_rate * 3600) * 1e6,
        }
    return out
