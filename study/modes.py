"""Input modes, and the one owner of the rule "this field only matters for some modes"
(or some losses): the search space asks such a field only for those, run names
(`trial_run_name`), MLflow params, the report and `status` show it only for them.
Standard library only.
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
# differs from MSE only for the inputs built from the observation (`check_sure`).
SEARCHED_ONLY = {"loss": DDPM_MODES}
# Fields that only matter for some losses (the loss is a field value, not a mode): the
# space asks them, run names and MLflow params show them, only for those losses.
# sigma_estimate: only SURE uses the noise sigma in training (study/engine/sigma.py).
LOSS_ONLY = {"sigma_estimate": ("sure",)}


def mode_uses(name: str, mode: str) -> bool:
    """Whether field `name` matters for input mode `mode` (True unless it is mode-only and
    `mode` is not among its modes)."""
    return mode in MODE_ONLY.get(name, (mode,))


def mode_searches(name: str, mode: str) -> bool:
    """Whether the search space asks field `name` for a trial of input mode `mode`."""
    return mode_uses(name, mode) and mode in SEARCHED_ONLY.get(name, (mode,))


def loss_uses(name: str, loss: str) -> bool:
    """Whether field `name` matters for a trial of loss `loss` (see LOSS_ONLY)."""
    return loss in LOSS_ONLY.get(name, (loss,))


def config_uses(name: str, cfg: Mapping[str, object]) -> bool:
    """Whether field `name` matters for the trial of `cfg` (a TrialConfig.to_dict()): its
    input mode uses it (MODE_ONLY) and its loss does (LOSS_ONLY)."""
    return mode_uses(name, str(cfg["noise_mode"])) and loss_uses(name, str(cfg["loss"]))


StopRule = Literal["eswmv", "holdout"]
STOP_RULES: tuple[str, ...] = get_args(StopRule)
# TrialConfig.stop_rule: a rule, or "default", resolved by the task (`default_stop_rule`).
StopRuleChoice = Literal["default", "eswmv", "holdout"]
# Tasks whose noise is independent from pixel to pixel, as the held-out rule needs
# (study/engine/holdout.py): not inpaint (the held-out pixel may be a missing one), sr (a
# low-resolution observation: every pixel mixes its neighbours) or reconstruct (no noise).
HOLDOUT_TASKS: tuple[str, ...] = ("denoise",)
# Metrics only one stop rule reports: a study cannot rank by them under the other.
RULE_METRICS = {"psnr_estimate": ("holdout",)}


def default_stop_rule(task: str) -> StopRule:
    """The default no-reference stop, chosen by measurement (docs/science.md, issue 22): held-out
    pixels, which recovered more of the final-to-oracle gap than ES-WMV on average and in the
    worst case, where the task allows it; ES-WMV elsewhere."""
    return "holdout" if task in HOLDOUT_TASKS else "eswmv"


# Saved records (study.json, best.json) from before `stop_rule` existed ran ES-WMV, the
# default then: reading one fills that in, so a resumed or replayed study keeps its rule.
LEGACY_DEFAULTS = {"stop_rule": "eswmv"}


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
RUN_NAME_LABELS = {"timestep": "t", "reg_noise_std": "reg", "sigma_estimate": "sigma_est"}


def _run_name_value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.1e}" if v != 0 and (abs(v) < 0.01 or abs(v) >= 1000) else f"{v:.3g}"
    return str(v)


def trial_run_name(cfg: Mapping[str, object], searched: list[str], trial: str = "") -> str:
    """What a trial tries, for its MLflow run name: e.g. `ddpm_resample t=120 lr=3.2e-03`.
    The input mode comes first and bare; fields its mode or loss does not use are left
    out (a uniform trial has no t, an MSE trial no sigma_est); with nothing searched, the
    mode alone. `cfg`: a trial's config as a mapping (TrialConfig.to_dict()). `trial`: the
    trial's name (Tune's trial_NNNN, the one name that the summary, status, export,
    best.json and the report use), put first, so that the MLflow UI's search finds the run
    by it."""
    mode = str(cfg["noise_mode"])
    parts = [trial, mode] if trial else [mode]
    for name in searched:
        if name == "noise_mode" or not config_uses(name, cfg):
            continue
        parts.append(f"{RUN_NAME_LABELS.get(name, name)}={_run_name_value(cfg[name])}")
    return " ".join(parts)


def check_sure(task: str, mode: str) -> None:
    """SURE needs the noise's sigma (denoise) and an input built from the observation:
    for the other inputs its divergence term is zero and it is MSE less a constant."""
    if task != "denoise":
        raise ValueError(f"loss 'sure' needs a known noise sigma, so task {task!r} cannot use it; "
                         "allowed: task denoise (or loss mse / l1)")
    if mode not in DDPM_MODES:
        raise ValueError(f"loss 'sure' with noise_mode {mode!r} is MSE (that input does not depend on "
                         f"the observation); allowed: noise_mode {', '.join(DDPM_MODES)} (or loss mse / l1)")
