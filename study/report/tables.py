"""The report's rows and tables: one `TrialRow` per trial run, the per-mode table, the
honest final / honest autostop / oracle best table, and the appendix of every trial
(study/report/document.py puts them together with the figures)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from study.config import TrialConfig
from study.modes import DDPM_MODES, NOISE_MODES, mode_uses, trial_run_name

if TYPE_CHECKING:  # mlflow is slow to import
    from study.report.images import ImageFacts
    from study.tracking.store import TrialSummary

HONEST = "psnr_ema"   # the honest final number of a trial (no clean image involved in choosing it)
AUTOSTOP = "psnr_autostop"  # honest too: the output ES-WMV picks, with no clean image
ORACLE = "psnr_best"  # the best EMA PSNR over iterations: it looks at the clean image
THREE = ((HONEST, "honest final"), (AUTOSTOP, "honest autostop"), (ORACLE, "oracle best"))


@dataclass(frozen=True)
class TrialRow:
    """One trial as the report needs it (from its MLflow child run)."""

    name: str                  # the trial's name, trial_NNNN (its MLflow run's name begins with it)
    run_id: str
    state: str                 # completed, stopped early, failed, or the run's status
    mode: str
    timestep: int | None       # None for the non-DDPM modes
    lr: float
    iteration: int
    metrics: dict[str, float]
    loss: str = "mse"
    sigma: float = 25 / 255    # the noise sigma of its observations (the true one)
    sigma_estimate: bool = False  # SURE used the sigma estimated from each observation

    @property
    def variant(self) -> str:
        """What the input mode and the loss make of it: `ddpm (sure)` when not MSE,
        `ddpm (sure, sigma estimated)` where SURE estimated its sigma."""
        est = ", sigma estimated" if self.sigma_estimate and self.loss == "sure" else ""
        return self.mode if self.loss == "mse" else f"{self.mode} ({self.loss}{est})"

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return v if v is not None and math.isfinite(v) else None


def trial_rows(runs: list[TrialSummary], base: TrialConfig) -> list[TrialRow]:
    rows = []
    for r in runs:
        p = r.params
        mode = p.get("noise_mode", base.noise_mode)
        t = int(p.get("timestep", base.timestep)) if mode_uses("timestep", mode) else None
        rows.append(TrialRow(r.trial, r.run_id, r.state, mode, t, float(p.get("lr", base.lr)),
                             int(r.metrics.get("iteration", 0)), r.metrics, p.get("loss", base.loss),
                             float(p.get("sigma", base.sigma)),
                             str(p.get("sigma_estimate", base.sigma_estimate)) == "True"))
    return sorted(rows, key=lambda row: row.name)


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "best": max(values), "median": statistics.median(values),
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cost_per_network(r: TrialRow, gpu: bool) -> float | None:
    """Device-seconds one network of the trial cost: training `seconds` x what it held (its
    GPU share, or CPUs) / its networks (images x repeats), all as its run logged them."""
    held, k, sec = r.value("trial/gpus" if gpu else "trial/cpus"), r.value("trial/networks"), r.value("seconds")
    return sec * held / k if held is not None and k and sec is not None else None


def mode_section(rows: list[TrialRow], metric: str) -> str:
    gpu = any((r.value("trial/gpus") or 0) > 0 for r in rows)
    unit = "GPU" if gpu else "CPU"
    body = []
    for mode in (m for m in NOISE_MODES if any(r.mode == m for r in rows)):
        mine = [r for r in rows if r.mode == mode]
        done = [v for r in mine if r.state == "completed" and (v := r.value(metric)) is not None]
        spread = [v for r in mine if r.state == "completed" and (v := r.value(f"{metric}_repeat_std")) is not None]
        st = summarize(done)
        count = {k: sum(r.state == k for r in mine) for k in ("completed", "stopped early", "failed")}
        cost = [c for r in mine if r.state == "completed" and (c := cost_per_network(r, gpu)) is not None]
        body.append([mode, str(len(mine)), str(count["completed"]), str(count["stopped early"]), str(count["failed"]),
                     fmt(st.get("best")), fmt(st.get("median")),
                     f"{fmt(st.get('mean'))} ± {fmt(st.get('std'))}" if st else "-",
                     fmt(statistics.fmean(spread)) if spread else "-",
                     fmt(statistics.median(cost)) if cost else "-"])
    share = "GPU share" if gpu else "CPUs"
    return table(["input mode", "trials", "completed", "stopped early", "failed", f"best {metric}",
                   f"median {metric}", "mean ± std over trials", "mean spread over repeats (std)",
                   f"{unit}-s per network (median over completed: `seconds` x {share} / networks)"], body)


def three_section(rows: list[TrialRow], facts: list[ImageFacts]) -> str:
    """Per input mode (and loss), over all images and per image: the median over completed
    trials of the honest final value, the honest autostop value and the oracle best."""
    labels = [f.label for f in facts]
    done = [r for r in rows if r.state == "completed"]
    variants = sorted({r.variant for r in done}, key=lambda v: (NOISE_MODES.index(v.split(" ")[0]), v))
    scopes = [("all images", None)] + ([(f.label, f.label) for f in sorted(facts, key=lambda f: f.brightness)]
                                       if len(labels) > 1 else [])
    body = []
    for scope, label in scopes:
        for v in variants:
            mine = [r for r in done if r.variant == v]
            cells = []
            for key, _ in THREE:
                k = key if label is None else image_key(key, label, labels)
                vals = [x for r in mine if (x := r.value(k)) is not None]
                cells.append(fmt(statistics.median(vals)) if vals else "-")
            body.append([scope, v, str(len(mine)), *cells])
    return table(["image", "input (loss)", "completed trials",
                   *[f"{label} (median `{key}`)" for key, label in THREE]], body)


ESTIMATE = "psnr_estimate"  # stop_rule holdout: the PSNR at the stop estimated from held-out pixels
CEILING = "estimate_at_ceiling"  # 1 where that estimate is its ceiling (not resolved)


def estimate_section(rows: list[TrialRow], facts: list[ImageFacts]) -> str:
    """Per image (darkest first), the median over completed trials of the held-out estimate,
    of the true PSNR of the output it estimates (`psnr_autostop`) and of the oracle, and of
    each trial's difference estimate - true: how far a user can trust the estimate, and in
    how many trials the estimate sat at its ceiling (the MSE it would claim is below its
    sampling error: then it is not resolved). Empty where no trial reported an estimate
    (stop_rule eswmv)."""
    done = [r for r in rows if r.state == "completed" and any(k.startswith(ESTIMATE) for k in r.metrics)]
    if not done:
        return ""
    labels = [f.label for f in facts]
    body = []
    for f in sorted(facts, key=lambda f: f.brightness):
        k = {key: image_key(key, f.label, labels) for key in (ESTIMATE, AUTOSTOP, ORACLE)}
        trio = [(e, a, o) for r in done if None not in (e := r.value(k[ESTIMATE]), a := r.value(k[AUTOSTOP]),
                                                         o := r.value(k[ORACLE]))]
        if not trio:
            continue
        med = [statistics.median(x) for x in zip(*trio)]
        diff = [e - a for e, a, _ in trio]
        flags = [c for r in done if (c := r.value(image_key(CEILING, f.label, labels))) is not None]
        body.append([f.label, fmt(f.brightness), str(len(trio)), *map(fmt, med),
                     f"{statistics.median(diff):+.2f} ({min(diff):+.2f} .. {max(diff):+.2f})",
                     f"{sum(c >= 0.5 for c in flags)} of {len(flags)}" if flags else "-"])
    return table(["image", "mean brightness", "trials", f"estimate (median `{ESTIMATE}`)",
                  f"true at the stop (`{AUTOSTOP}`)", f"oracle (`{ORACLE}`)",
                  "estimate - true: median (min .. max)",
                  f"at its ceiling, not resolved (`{CEILING}`)"], body)


def image_key(metric: str, label: str, labels: list[str]) -> str:
    return f"{metric}/{label}" if len(labels) > 1 else metric


def trials_appendix(rows: list[TrialRow], metric: str, base: TrialConfig, searched: list[str],
                    mode: str = "max") -> str:
    """Every trial, best first on `metric` in its direction `mode`; those without it last."""
    keys = list(dict.fromkeys([metric, HONEST, AUTOSTOP, ORACLE]))
    sign = 1 if mode == "max" else -1

    def order(r: TrialRow) -> float:
        v = r.value(metric)
        return -sign * v if v is not None and math.isfinite(v) else math.inf

    body = [[r.name, f"`{tries(r, base, searched)}`", r.state, str(r.iteration), *[fmt(r.value(k)) for k in keys]]
            for r in sorted(rows, key=order)]
    head = ["trial", "what it tries", "state", "iterations", *[f"{k} (oracle)" if k == ORACLE else k for k in keys]]
    return "## Every trial\n\n" + table(head, body) + "\n"


def tries(r: TrialRow, base: TrialConfig, searched: list[str]) -> str:
    """What the trial tries (its searched values its mode uses), as its run name says it."""

    cfg = base.replace(noise_mode=r.mode, lr=r.lr, **({"timestep": r.timestep} if r.timestep is not None else {}),
                       **({"loss": r.loss} if r.loss in ("mse", "l1") or r.mode in DDPM_MODES else {}),
                       sigma_estimate=r.sigma_estimate)
    return trial_run_name(cfg.to_dict(), searched)


def sigma_section(rows: list[TrialRow], facts: list[ImageFacts]) -> str:
    """The noise sigma SURE used where the trials estimated it (`sigma_estimate`), beside
    the true one, per image and true sigma; "" when no trial estimated it."""
    labels = [f.label for f in facts]
    body = []
    for f in facts:
        key = image_key("sigma_estimated", f.label, labels)
        for true in sorted({r.sigma for r in rows}):
            vals = [v for r in rows if r.sigma == true and (v := r.value(key)) is not None]
            if vals:
                med = statistics.median(vals)
                body.append([f.label, fmt(255 * true, 1), fmt(255 * med, 1),
                             f"{255 * min(vals):.1f}-{255 * max(vals):.1f}",
                             f"{100 * (med / true - 1):+.0f} %", str(len(vals))])
    if not body:
        return ""
    return ("## Noise level: true and estimated\n\nSURE used the sigma estimated from each "
            "observation (`sigma_estimate`; noise/sigma.py, Chen et al. 2015 with a clipping "
            "correction), not the true one the degradation added. Of 255; median and range "
            "over the trials that estimated it (a trial's value is its mean over repeats):\n\n"
            + table(["image", "true sigma", "estimated (median)", "range", "error", "trials"], body) + "\n")
