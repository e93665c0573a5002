"""A study's objectives: the metrics a study may rank trials by, each with its direction, and
the `--objective METRIC[:max|min]` spelling of one (repeatable: several make the study
multi-objective). Standard library only: study/config.py validates with it.
"""
from __future__ import annotations

import json
from typing import Mapping

METRICS: dict[str, str] = {  # study objective -> Tune mode
    "psnr_ema": "max", "psnr": "max", "ssim_ema": "max", "ssim": "max",
    "psnr_best": "max", "loss": "min",
    # no-reference: the output ES-WMV picks (study/engine/autostop.py)
    "psnr_autostop": "max", "ssim_autostop": "max",
    # no-reference, stop_rule holdout: the PSNR at the stop estimated from held-out pixels
    "psnr_estimate": "max",
}
# What a trial costs, reported at every report (study/engine/trial.py `metrics`): objectives
# to trade quality against, not to rank a single-objective study by.
COST_METRICS: dict[str, str] = {
    "seconds": "min",             # training seconds so far (evaluation excluded)
    "autostop_iteration": "min",  # where ES-WMV stops: the iterations a user pays with --stop auto
}
OBJECTIVE_METRICS: dict[str, str] = {**METRICS, **COST_METRICS}
DIRECTIONS = ("max", "min")
SPELLING = "METRIC or METRIC:max or METRIC:min"


def parse_objective(spec: object) -> str:
    """`METRIC[:max|min]` normalized to `METRIC:DIRECTION` (the metric's own direction when
    none is given). Raises ValueError naming the bad value and what is allowed."""
    if not isinstance(spec, str):
        raise ValueError(f"objective {spec!r} is not text; allowed: {SPELLING}")
    metric, _, direction = spec.partition(":")
    if not metric or ":" in direction or (spec.endswith(":") and not direction):
        raise ValueError(f"objective {spec!r} is malformed; allowed: {SPELLING}")
    if metric not in OBJECTIVE_METRICS:
        where = f" in {spec!r}" if spec != metric else ""
        raise ValueError(f"unknown objective metric {metric!r}{where}; allowed: "
                         f"{', '.join(OBJECTIVE_METRICS)}")
    if direction and direction not in DIRECTIONS:
        raise ValueError(f"objective {spec!r} has direction {direction!r}; allowed: max or min")
    return f"{metric}:{direction or OBJECTIVE_METRICS[metric]}"


def split(objective: str) -> tuple[str, str]:
    """A normalized objective as (metric, direction)."""
    metric, _, direction = objective.partition(":")
    return metric, direction


def check_objectives(objectives: tuple[str, ...], metric: str, scheduler: str) -> None:
    """Each metric once; `metric` is the first objective's; several objectives only with
    the fifo scheduler. `objectives`: normalized (parse_objective)."""
    metrics = [split(o)[0] for o in objectives]
    twice = sorted({m for m in metrics if metrics.count(m) > 1})
    if twice:
        raise ValueError(f"objective metric {twice[0]!r} is given twice ({', '.join(objectives)}); "
                         "allowed: each metric once")
    if objectives and metric != metrics[0]:
        raise ValueError(f"metric {metric!r} is not the first objective's ({objectives[0]}); allowed: "
                         f"--metric {metrics[0]}, or no --metric with --objective")
    if len(objectives) > 1 and scheduler != "fifo":
        raise ValueError(f"scheduler {scheduler!r} cannot run several objectives ({', '.join(objectives)}): "
                         "a scheduler compares trials on one metric at each rung and several objectives "
                         "have no single order; allowed: --scheduler fifo")


def objectives_text(pairs: list[tuple[str, str]]) -> str:
    """How a study's objectives read in a sentence: a metric alone where its direction is its
    own (`psnr_ema`), else `metric:direction`."""
    return ", ".join(m if OBJECTIVE_METRICS.get(m) == d else f"{m}:{d}" for m, d in pairs)


def from_params(params: Mapping[str, str]) -> list[tuple[str, str]]:
    """(metric, direction) per objective from a study's parent-run params (its StudyConfig,
    flattened: `objectives` a JSON list); a study of one, or one recorded before objectives
    existed: its metric."""
    metric = params.get("metric", "psnr_ema")
    try:
        listed = json.loads(params.get("objectives") or "[]")
    except ValueError:
        listed = []
    return [split(o) for o in listed] or [(metric, OBJECTIVE_METRICS.get(metric, "max"))]
