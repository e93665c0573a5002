"""The study report: what a study found, readable by someone who did not run it.

`make_report(root, name)` writes ROOT/NAME/report/report.md with PNG figures: per input
mode and per image (with the image's mean brightness), the metric against timestep and
learning rate, a classical baseline on the same observations (BM3D for denoising,
bicubic for super-resolution), the oracle `psnr_best` labelled as such, the best
configuration's output next to the observation and the clean image, and Optuna's own
plots. It reads the trials through the tracking room (study/tracking/store.py) and draws
Optuna's plots through the space room (study/space.py optuna_figures); the images, the
baseline and the best-output grid are study/report_images.py. It never imports mlflow or optuna.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from study.config import StudyConfig, TrialConfig  # noqa: E402
from study.modes import DDPM_MODES, NOISE_MODES, mode_uses  # noqa: E402
from study.report_images import ImageFacts, best_grid, best_output, image_facts  # noqa: E402
from study.space import optuna_figures  # noqa: E402

if TYPE_CHECKING:  # mlflow is slow to import
    from study.tracking.store import TrialSummary

HONEST = "psnr_ema"   # the honest final number of a trial (no clean image involved in choosing it)
AUTOSTOP = "psnr_autostop"  # honest too: the output ES-WMV picks, with no clean image
ORACLE = "psnr_best"  # the best EMA PSNR over iterations: it looks at the clean image
THREE = ((HONEST, "honest final"), (AUTOSTOP, "honest autostop"), (ORACLE, "oracle best"))


@dataclass(frozen=True)
class TrialRow:
    """One trial as the report needs it (from its MLflow child run)."""

    name: str
    run_id: str
    state: str                 # completed, stopped early, failed, or the run's status
    mode: str
    timestep: int | None       # None for the non-DDPM modes
    lr: float
    iteration: int
    metrics: dict[str, float]
    loss: str = "mse"

    @property
    def variant(self) -> str:
        """What the input mode and the loss make of it: `ddpm (sure)` when not MSE."""
        return self.mode if self.loss == "mse" else f"{self.mode} ({self.loss})"

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return v if v is not None and math.isfinite(v) else None


def trial_rows(runs: list[TrialSummary], base: TrialConfig) -> list[TrialRow]:
    rows = []
    for r in runs:
        p = r.params
        mode = p.get("noise_mode", base.noise_mode)
        t = int(p.get("timestep", base.timestep)) if mode_uses("timestep", mode) else None
        rows.append(TrialRow(r.name, r.run_id, r.state, mode, t, float(p.get("lr", base.lr)),
                             int(r.metrics.get("iteration", 0)), r.metrics, p.get("loss", base.loss)))
    return sorted(rows, key=lambda row: row.name)


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "best": max(values), "median": statistics.median(values),
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _f(v: float | None, nd: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --- figures ---

def _scatter(rows: list[TrialRow], x: str, metric: str, path: Path, log: bool) -> bool:
    pts = [r for r in rows if r.value(metric) is not None and (x != "timestep" or r.timestep is not None)]
    if not pts:
        return False
    with plt.style.context("default"):  # optuna's plots switch the global style to ggplot
        _draw_scatter(pts, x, metric, path, log)
    return True


def _draw_scatter(pts: list[TrialRow], x: str, metric: str, path: Path, log: bool) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for mode in (m for m in NOISE_MODES if any(r.mode == m for r in pts)):
        k = NOISE_MODES.index(mode)  # one colour per mode in every figure
        for done, marker in ((True, "o"), (False, "x")):
            sel = [r for r in pts if r.mode == mode and (r.state == "completed") == done]
            if sel:
                ax.scatter([getattr(r, x) for r in sel], [r.value(metric) for r in sel], marker=marker,
                           color=f"C{k}", label=mode + ("" if done else " (stopped early)"))
    ax.set_xscale("log" if log else "linear")
    if log:  # the minor ticks' labels overlap on a range of one or two decades
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("DDPM timestep t" if x == "timestep" else "learning rate")
    ax.set_ylabel(f"{metric} at the trial's last report (dB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- sections ---

def _cost_per_network(r: TrialRow, gpu: bool) -> float | None:
    """Device-seconds one network of the trial cost: training `seconds` x what it held (its
    GPU share, or CPUs) / its networks (images x repeats), all as its run logged them."""
    held, k, sec = r.value("trial/gpus" if gpu else "trial/cpus"), r.value("trial/networks"), r.value("seconds")
    return sec * held / k if held is not None and k and sec is not None else None


def _mode_section(rows: list[TrialRow], metric: str) -> str:
    gpu = any((r.value("trial/gpus") or 0) > 0 for r in rows)
    unit = "GPU" if gpu else "CPU"
    body = []
    for mode in (m for m in NOISE_MODES if any(r.mode == m for r in rows)):
        mine = [r for r in rows if r.mode == mode]
        done = [v for r in mine if r.state == "completed" and (v := r.value(metric)) is not None]
        spread = [v for r in mine if r.state == "completed" and (v := r.value(f"{metric}_repeat_std")) is not None]
        st = summarize(done)
        count = {k: sum(r.state == k for r in mine) for k in ("completed", "stopped early", "failed")}
        cost = [c for r in mine if r.state == "completed" and (c := _cost_per_network(r, gpu)) is not None]
        body.append([mode, str(len(mine)), str(count["completed"]), str(count["stopped early"]), str(count["failed"]),
                     _f(st.get("best")), _f(st.get("median")),
                     f"{_f(st.get('mean'))} ± {_f(st.get('std'))}" if st else "-",
                     _f(statistics.fmean(spread)) if spread else "-",
                     _f(statistics.median(cost)) if cost else "-"])
    share = "GPU share" if gpu else "CPUs"
    return _table(["input mode", "trials", "completed", "stopped early", "failed", f"best {metric}",
                   f"median {metric}", "mean ± std over trials", "mean spread over repeats (std)",
                   f"{unit}-s per network (median over completed: `seconds` x {share} / networks)"], body)


def _three_section(rows: list[TrialRow], facts: list[ImageFacts]) -> str:
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
                k = key if label is None else _image_key(key, label, labels)
                vals = [x for r in mine if (x := r.value(k)) is not None]
                cells.append(_f(statistics.median(vals)) if vals else "-")
            body.append([scope, v, str(len(mine)), *cells])
    return _table(["image", "input (loss)", "completed trials",
                   *[f"{label} (median `{key}`)" for key, label in THREE]], body)


def _image_key(metric: str, label: str, labels: list[str]) -> str:
    return f"{metric}/{label}" if len(labels) > 1 else metric


def _image_section(rows: list[TrialRow], facts: list[ImageFacts], base: TrialConfig) -> tuple[str, str]:
    labels = [f.label for f in facts]
    modes = [m for m in NOISE_MODES if any(r.mode == m and r.state == "completed" for r in rows)]
    bl = {"denoise": "BM3D", "sr": "bicubic"}.get(base.task)
    body, by_mode = [], {}
    for f in sorted(facts, key=lambda f: f.brightness):
        key = _image_key(HONEST, f.label, labels)
        done = [r for r in rows if r.state == "completed" and r.value(key) is not None]
        best = max(done, key=lambda r: r.value(key), default=None)
        med = {m: statistics.median([r.value(key) for r in done if r.mode == m])
               for m in modes if any(r.mode == m for r in done)}
        by_mode[f.label] = med
        body.append([f.label, _f(f.brightness, 3), _f(f.observation_psnr), _f(f.baseline_psnr),
                     _f(best.value(key) if best else None), best.mode if best else "-",
                     _f(best.value(_image_key(ORACLE, f.label, labels)) if best else None)])
    table = _table(["image (darkest first)", "mean brightness", "observation PSNR",
                    f"{bl or 'baseline'} PSNR" if bl else "baseline", f"best trial {HONEST}", "its mode",
                    f"its {ORACLE} (oracle)"], body)
    per_mode = _table(["image (darkest first)", *modes],
                      [[f.label, *[_f(by_mode[f.label].get(m)) for m in modes]]
                       for f in sorted(facts, key=lambda f: f.brightness)])
    return table, per_mode


def observation_check(rows: list[TrialRow], facts: list[ImageFacts]) -> tuple[float | None, str]:
    """Largest gap between the observations regenerated here and the trials' own logged
    `psnr_observation`: the baseline is only fair if it sees the same noisy pixels."""
    labels = [f.label for f in facts]
    gaps = [abs(v - f.observation_psnr) for f in facts for r in rows
            if (v := r.value(_image_key("psnr_observation", f.label, labels))) is not None]
    if not gaps:
        return None, "The trials logged no `psnr_observation`, so the observations could not be cross-checked."
    gap = max(gaps)
    if gap > 0.01:
        return gap, (f"**Warning**: the observations regenerated for the baseline differ from the trials' "
                     f"by up to {gap:.3f} dB PSNR; the baseline column is not on the same pixels.")
    return gap, (f"Check: the regenerated observations match every trial's logged `psnr_observation` "
                 f"(largest gap {gap:.1e} dB), so the baseline saw the same noisy pixels.")


def _darkness_sentence(rows: list[TrialRow], facts: list[ImageFacts]) -> str:
    """Is a DDPM input better than the DIP reference's uniform input on darker images? The
    original experiment's claim, in numbers (the Gaussian inputs are no reference: they
    would flatter any comparison)."""
    labels = [f.label for f in facts]
    if len(facts) < 2:
        return "One image only: the study cannot say how brightness matters."
    parts = []
    for f in sorted(facts, key=lambda f: f.brightness):
        key = _image_key(HONEST, f.label, labels)
        done = [r for r in rows if r.state == "completed" and r.value(key) is not None]
        ddpm = [r.value(key) for r in done if r.mode in DDPM_MODES]
        uni = [r.value(key) for r in done if r.mode == "uniform"]
        if ddpm and uni:
            parts.append((f, statistics.median(ddpm) - statistics.median(uni)))
    if len(parts) < 2:
        return ("Too few completed trials of the DDPM modes and of the uniform input to compare "
                "them per image.")
    text = "; ".join(f"{f.label} (brightness {f.brightness:.2f}): {d:+.2f} dB" for f, d in parts)
    darkest, brightest = parts[0][1], parts[-1][1]
    verdict = ("a DDPM advantage that grows on darker images: consistent with the claim"
               if darkest > max(brightest, 0) else "the claim (DDPM inputs do better on darker images) "
               "is not supported here")
    return (f"Median {HONEST} of the DDPM-input trials minus that of the trials with the DIP "
            f"reference's uniform input, per image (completed trials): {text}. Darkest "
            f"{darkest:+.2f} dB against brightest {brightest:+.2f} dB: {verdict}.")


def _headline(rows: list[TrialRow], facts: list[ImageFacts], s: StudyConfig, best: TrialRow | None) -> str:
    sign = 1 if s.mode == "max" else -1
    med = {m: (statistics.median(v), len(v)) for m in NOISE_MODES
           if (v := [x for r in rows if r.mode == m and r.state == "completed" and (x := r.value(s.metric)) is not None])}
    out = []
    if med:
        top = max(med, key=lambda m: sign * med[m][0])
        out.append(f"By median `{s.metric}` over completed trials the best input mode is **{top}** "
                   f"({med[top][0]:.2f}, {med[top][1]} trials)")
        if "uniform" in med and top != "uniform":
            out[-1] += f"; the DIP reference's uniform input: {med['uniform'][0]:.2f} ({med['uniform'][1]} trials)"
        out[-1] += "."
    bl = [f.baseline_psnr for f in facts if f.baseline_psnr is not None]
    if best is not None and bl and best.value(HONEST) is not None:
        name = "BM3D" if s.trial.task == "denoise" else "bicubic"
        out.append(f"The best trial's `{HONEST}` is {best.value(HONEST):.2f} dB averaged over the images; "
                   f"{name} scores {statistics.fmean(bl):.2f} dB on the same observations.")
    return " ".join(out) or "No trial completed."


def _best_section(best: TrialRow | None, s: StudyConfig, searched: list[str]) -> str:
    if best is None:
        return "No trial reported the metric."
    shown = ", ".join(f"{k} = {v}" for k, v in (("noise_mode", best.mode), ("timestep", best.timestep),
                                                ("lr", f"{best.lr:.3g}")) if v is not None and k in searched)
    return (f"Best trial `{best.name}` ({best.state}, {best.iteration} iterations): {shown}. "
            + (f"{s.metric} = {_f(best.value(s.metric), 3)}; " if s.metric not in (HONEST, ORACLE) else "")
            + f"{HONEST} = {_f(best.value(HONEST))} dB (honest: "
            f"the output average at the end); {ORACLE} = {_f(best.value(ORACLE))} dB at iteration "
            f"{int(best.value('best_iteration') or 0)} (**oracle**: chosen by looking at the clean image, "
            "so no method can claim it; it is the ceiling early stopping could reach).")


def _pick_best(rows: list[TrialRow], s: StudyConfig) -> TrialRow | None:
    """The same choice as `export` (study/export.py pick_best)."""
    from study.export import pick_best
    from study.tracking.store import TrialSummary

    trials = [TrialSummary(run_id=r.run_id, name=r.name, trial_id="", completed=r.state == "completed",
                           status="FAILED" if r.state == "failed" else "FINISHED", params={},
                           metrics=r.metrics, tags={}, start=0.0, end=0.0) for r in rows]
    chosen = pick_best(trials, s.metric, s.mode)
    return next(r for r in rows if r.run_id == chosen.run_id) if chosen else None


def _figures(rows: list[TrialRow], facts: list[ImageFacts], s: StudyConfig, out: Path) -> list[str]:
    md = []
    if _scatter(rows, "timestep", s.metric, out / "metric_vs_timestep.png", log=False):
        md.append(f"![{s.metric} against t](metric_vs_timestep.png)")
    if _scatter(rows, "lr", s.metric, out / "metric_vs_lr.png", log=True):
        md.append(f"![{s.metric} against lr](metric_vs_lr.png)")
    labels = [f.label for f in facts]
    if len(labels) > 1:
        for f in facts:
            name = f"{HONEST}_vs_timestep_{f.label}.png"
            if _scatter(rows, "timestep", _image_key(HONEST, f.label, labels), out / name, log=False):
                md.append(f"![{f.label}: {HONEST} against t]({name})")
    return md


def _header(s: StudyConfig, rows: list[TrialRow], meta: Any, searched: list[str]) -> str:
    t = s.trial
    net = f"{t.net} {t.scales} scales x {t.channels} channels"
    return (f"# Study `{s.name}`: report\n\n"
            f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `run_study.py report {s.name}`. "
            f"Study created {meta.created}.\n\n"
            f"- Task: {t.task}" + (f" (sigma = {t.sigma * 255:.0f}/255)" if t.task == "denoise" else "") +
            f"; images: {', '.join(t.images)} at {t.size} px; {net}; {t.iterations} iterations; "
            f"{getattr(t, 'repeats', 1)} repeat(s) (seeds) per image.\n"
            f"- Searched: {', '.join(f'`{k}`' for k in searched)}; {len(rows)} trials "
            f"({s.num_samples} asked), objective `{s.metric}` ({s.mode}), scheduler {s.scheduler}.\n"
            f"- `{HONEST}`: PSNR of the output average at the trial's last report (the honest number). "
            f"`{AUTOSTOP}`: PSNR of the output the no-reference rule ES-WMV picks (window {t.window}, "
            f"patience {t.patience}; until it fires, its candidate so far), honest too. "
            f"`{ORACLE}`: the best `{HONEST}` over iterations, an **oracle** (it looks at the clean image).\n"
            "- Medians and means use completed trials only: a trial stopped early by the scheduler "
            "reports an earlier iteration's value, not comparable. The sampler (TPE) gives promising "
            "modes more trials, so counts differ by mode.\n")


def make_report(root: str, name: str, out: Path | None = None, baseline: bool = True,
                log: bool = True) -> Path:
    """Write the report of study `name` under ROOT and (log) attach it to the parent run
    under `report/`. Returns the path of report.md."""
    from study.tracking import store as tracking
    from study.studydir import read_study

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # quiet downloads
    meta = read_study(root, name)
    s = meta.study
    runs = tracking.study_runs(s.resolved_tracking_uri, s.name)
    rows = trial_rows(runs, s.trial)
    if not rows:
        raise ValueError(f"study {name!r} has no trial runs yet; nothing to report")
    out = Path(out) if out is not None else s.study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    searched = list(meta.space)
    facts = image_facts(s.trial, baseline)
    best = _pick_best(rows, s)
    labels = [f.label for f in facts]
    if best is not None:
        outputs = [best_output(s.resolved_tracking_uri, best.run_id, lb, len(labels) > 1) for lb in labels]
        best_grid(facts, outputs, out / "best_outputs.png")
    image_table, per_mode = _image_section(rows, facts, s.trial)
    optuna_figs = optuna_figures(s.study_dir, s.name, out)
    bl = {"denoise": "BM3D (PyPI `bm3d`, sigma given)", "sr": "bicubic upsampling"}.get(s.trial.task)
    parts = [
        _header(s, rows, meta, searched),
        "## The answer\n", _headline(rows, facts, s, best) + "\n", _best_section(best, s, searched) + "\n", _darkness_sentence(rows, facts) + "\n",
        "## Per input mode\n", _mode_section(rows, s.metric) + "\n",
        "Honest final, honest autostop and oracle best, per input mode and per image:\n",
        _three_section(rows, facts) + "\n", *[f + "\n" for f in _figures(rows, facts, s, out)],
        "## Per image\n", f"Baseline: {bl or 'none for this task'}, on the very observations the trials "
        "fitted (same seeds), averaged over repeats. " + observation_check(rows, facts)[1]
        + (f" At {s.trial.size} px BM3D finds few similar blocks to group, so it is handicapped; "
           "docs/science.md gives its figures at 128-512 px." if s.trial.task == "denoise" and s.trial.size < 128 else "")
        + "\n",
        image_table + "\n",
        f"Median {HONEST} by input mode (completed trials):\n", per_mode + "\n",
    ]
    if best is not None:
        parts += ["## The best configuration's output\n",
                  f"Per image: observation | best trial's output ({HONEST} image, repeat 0) | "
                  f"{bl.split(' (')[0] if bl else 'no baseline'} | clean.\n",
                  "![observation, output, baseline, clean](best_outputs.png)\n"]
    parts.append("## Optuna's view\n")
    parts += [f"![{t}]({f})\n" if f else f"- {t}\n" for f, t in optuna_figs] or \
        ["No Optuna record (ROOT/NAME/optuna.db) for this study.\n"]
    parts.append(_trials_appendix(rows, s.metric, s.trial, searched))
    path = out / "report.md"
    path.write_text("\n".join(parts))
    if log:
        tracking.log_folder(s.resolved_tracking_uri, meta.parent_run_id, out, "report")
    return path


def _trials_appendix(rows: list[TrialRow], metric: str, base: TrialConfig, searched: list[str]) -> str:
    keys = list(dict.fromkeys([metric, HONEST, AUTOSTOP, ORACLE]))
    body = [[r.name, f"`{_tries(r, base, searched)}`", r.state, str(r.iteration), *[_f(r.value(k)) for k in keys]]
            for r in sorted(rows, key=lambda r: -(r.value(metric) or -math.inf))]
    head = ["run", "what it tries", "state", "iterations", *[f"{k} (oracle)" if k == ORACLE else k for k in keys]]
    return "## Every trial\n\n" + _table(head, body) + "\n"


def _tries(r: TrialRow, base: TrialConfig, searched: list[str]) -> str:
    from study.config import trial_run_name

    cfg = base.replace(noise_mode=r.mode, lr=r.lr, **({"timestep": r.timestep} if r.timestep is not None else {}),
                       **({"loss": r.loss} if r.loss in ("mse", "l1") or r.mode in DDPM_MODES else {}))
    return trial_run_name(cfg, searched)
