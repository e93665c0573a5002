"""Input modes, and the one owner of the rule "this field only matters for some modes":
the search space asks such a field only for those modes, run names (`trial_run_name`),
MLflow params, the report and `status` show it only for them. Standard library only.
"""
from __future__ import annotations

from typing import Literal, Mapping, get_args

NoiseMode = Literal[
    "uniform", "gaussian", "gaussian_resample", "ddpm", "ddpm_resample", "ddpm_random_t"
]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
DDPM_MODES: tuple[str, ...] = ("ddpm", "ddpm_resample", "ddpm_random_t")

# Fields that only matter for some input modes: the search space suggests them, run names
# and the report show them, only for those modes.
MODE_ONLY = {"timestep": DDPM_MODES, "reg_noise_std": ("uniform",)}
# Fields the search space asks only for some modes, though every mode uses them: SURE
# differs from MSE only for the inputs built from the observation (study/config.py `check_sure`).
SEARCHED_ONLY = {"loss": DDPM_MODES}


def mode_uses(name: str, mode: str) -> bool:
    """Whether field `name` matters for input mode `mode` (True unless it is mode-only and
    `mode` is not among its modes)."""
    return mode in MODE_ONLY.get(name, (mode,))


def mode_searches(name: str, mode: str) -> bool:
    """Whether the search space asks field `name` for a trial of input mode `mode`."""
    return mode_uses(name, mode) and mode in SEARCHED_ONLY.get(name, (mode,))


StopRule = Literal["eswmv", "holdout"]
STOP_RULES: tuple[str, ...] = get_args(StopRule)
# Tasks whose noise is independent from pixel to pixel, as the held-out rule needs
# (study/engine/holdout.py): not inpaint (the held-out pixel may be a missing one), sr (a
# low-resolution observation: every pixel mixes its neighbours) or reconstruct (no noise).
HOLDOUT_TASKS: tuple[str, ...] = ("denoise",)
# Metrics only one stop rule reports: a study cannot rank by them under the other.
RULE_METRICS = {"psnr_estimate": ("holdout",)}


def check_stop_rule(rule: str, task: str) -> None:
    if rule == "holdout" and task not in HOLDOUT_TASKS:
        raise ValueError(f"stop_rule 'holdout' needs noise independent per pixel, so task {task!r} cannot "
                         f"use it; allowed: task {', '.join(HOLDOUT_TASKS)} (or stop_rule eswmv)")


def check_rule_metrics(metrics: list[str], rule: str) -> None:
    for m in metrics:
        if rule not in RULE_METRICS.get(m, (rule,)):
            raise ValueError(f"metric {m!r} is reported only with stop_rule {', '.join(RULE_METRICS[m])}, and "
                             f"the trial's stop_rule is {rule!r}; allowed: --stop-rule holdout, or another metric")


# Short labels of searched fields in run names; the others show as `field=value`.
RUN_NAME_LABELS = {"timestep": "t", "reg_noise_std": "reg"}


def _run_name_value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.1e}" if v != 0 and (abs(v) < 0.01 or abs(v) >= 1000) else f"{v:.3g}"
    return str(v)


def trial_run_name(cfg: Mapping[str, object], searched: list[str]) -> str:
    """What a trial tries, for its MLflow run name: e.g. `ddpm_resample t=120 lr=3.2e-03`.
    The input mode comes first and bare; fields its mode does not use are left out (a
    uniform trial has no t); with nothing searched, the mode alone. `cfg`: a trial's
    config as a mapping (TrialConfig.to_dict())."""
    mode = str(cfg["noise_mode"])
    parts = [mode]
    for name in searched:
        if name == "noise_mode" or not mode_uses(name, mode):
            continue
        parts.append(f"{RUN_NAME_LABELS.get(name, name)}={_run_name_value(cfg[name])}")
    return " ".join(parts)
