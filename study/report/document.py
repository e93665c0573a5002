"""The study report: what a study found, readable by someone who did not run it.

`make_report(root, name)` writes ROOT/NAME/report/report.md with PNG figures: per input
mode and per image (with the image's mean brightness), the metric against timestep and
learning rate, a classical baseline on the same observations (BM3D for denoising,
bicubic for super-resolution), the oracle `psnr_best` labelled as such, the best
configuration's output next to the observation and the clean image, and Optuna's own
plots. It reads the trials through the tracking room (study/tracking/store.py) and draws
Optuna's plots through the space room (study/space.py optuna_figures); the images, the
baseline and the best-output grid are study/report/images.py. It never imports mlflow or optuna.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from study.config import StudyConfig, TrialConfig  # noqa: E402
from study.modes import DDPM_MODES, NOISE_MODES  # noqa: E402
from study.report.confirmed import confirmed_section  # noqa: E402
from study.report.images import ImageFacts, best_grid, best_output, image_facts, save_figure  # noqa: E402
from study.report.pareto_section import pareto_section  # noqa: E402
from study.report.tables import (AUTOSTOP, ESTIMATE, HONEST, ORACLE, TrialRow, estimate_section,  # noqa: E402
                                 fmt, image_key, mode_section, sigma_section, table, three_section, trial_rows,
                                 trials_appendix)
from study.space import optuna_figures, warm_start_counts  # noqa: E402

if TYPE_CHECKING:  # mlflow is slow to import
    from study.tracking.store import TrialSummary

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
    unit = " (dB)" if metric.split("/")[0].startswith("psnr") else ""
    ax.set_ylabel(f"{metric} at the trial's last report{unit}")
    save_figure(fig, ax, path)


# --- sections ---

def _image_section(rows: list[TrialRow], facts: list[ImageFacts], base: TrialConfig) -> tuple[str, str]:
    labels = [f.label for f in facts]
    modes = [m for m in NOISE_MODES if any(r.mode == m and r.state == "completed" for r in rows)]
    bl = {"denoise": "BM3D", "sr": "bicubic"}.get(base.task) if any(f.baseline is not None for f in facts) else None
    body, by_mode = [], {}
    for f in sorted(facts, key=lambda f: f.brightness):
        key = image_key(HONEST, f.label, labels)
        done = [r for r in rows if r.state == "completed" and r.value(key) is not None]
        best = max(done, key=lambda r: r.value(key), default=None)
        med = {m: statistics.median([r.value(key) for r in done if r.mode == m])
               for m in modes if any(r.mode == m for r in done)}
        by_mode[f.label] = med
        body.append([f.label, fmt(f.brightness, 3), fmt(f.observation_psnr), fmt(f.baseline_psnr),
                     fmt(best.value(key) if best else None), best.mode if best else "-",
                     fmt(best.value(image_key(ORACLE, f.label, labels)) if best else None)])
    per_image = table(["image (darkest first)", "mean brightness", "observation PSNR",
                    f"{bl or 'baseline'} PSNR" if bl else "baseline", f"best trial {HONEST}", "its mode",
                    f"its {ORACLE} (oracle)"], body)
    per_mode = table(["image (darkest first)", *modes],
                      [[f.label, *[fmt(by_mode[f.label].get(m)) for m in modes]]
                       for f in sorted(facts, key=lambda f: f.brightness)])
    return per_image, per_mode


def observation_check(rows: list[TrialRow], facts: list[ImageFacts]) -> tuple[float | None, str]:
    """Largest gap between the observations regenerated here and the trials' own logged
    `psnr_observation`: the baseline is only fair if it sees the same noisy pixels."""
    labels = [f.label for f in facts]
    gaps = [abs(v - f.observation_psnr) for f in facts for r in rows
            if (v := r.value(image_key("psnr_observation", f.label, labels))) is not None]
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
        key = image_key(HONEST, f.label, labels)
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
            + (f"{s.metric} = {fmt(best.value(s.metric), 3)}; " if s.metric not in (HONEST, ORACLE) else "")
            + f"{HONEST} = {fmt(best.value(HONEST))} dB (honest: "
            f"the output average at the end); {ORACLE} = {fmt(best.value(ORACLE))} dB at iteration "
            f"{int(best.value('best_iteration') or 0)} (**oracle**: chosen by looking at the clean image, "
            "so no method can claim it; it is the ceiling early stopping could reach).")


def _pick_best(rows: list[TrialRow], s: StudyConfig, runs: list[TrialSummary]) -> TrialRow | None:
    """The same choice as `export`, on the same records: pick_best over the trials as `runs`
    summarises them (with several objectives the Pareto front's row 1)."""
    from study.export import pick_best, pick_member

    if s.multi_objective:
        found = pick_member(runs, s)
        chosen = found[0] if found else None
    else:
        chosen = pick_best(runs, s.metric, s.mode)
    return next((r for r in rows if r.run_id == chosen.run_id), None) if chosen else None


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
            if _scatter(rows, "timestep", image_key(HONEST, f.label, labels), out / name, log=False):
                md.append(f"![{f.label}: {HONEST} against t]({name})")
    return md


def _warm_start_line(s: StudyConfig) -> str:
    """How many earlier trials the sampler started from (study/warmstart.py): in the
    Optuna record, not trials of this study."""
    counts = warm_start_counts(s.study_dir, s.name) if s.warm_start else {}
    if not counts:
        return ""
    where = ", ".join(f"{n} from `{k}`" for k, n in counts.items())
    return (f"- Warm start: the sampler began from {sum(counts.values())} finished trials of earlier "
            f"studies ({where}). They are not trials of this study and no table here counts them; "
            "Optuna's figures below do include them.\n")


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
            f"({s.num_samples} asked), objective{'s' if s.multi_objective else ''} "
            f"{', '.join(f'`{m}` ({d})' for m, d in s.objective_list)}, scheduler {s.scheduler}.\n"
            + _warm_start_line(s) +
            f"- `{HONEST}`: PSNR of the output average at the trial's last report (the honest number). "
            f"`{AUTOSTOP}`: PSNR of the output the no-reference stop picks ({_rule_words(t)}), honest too. "
            f"`{ORACLE}`: the best `{HONEST}` over iterations, an **oracle** (it looks at the clean image).\n"
            "- Medians and means use completed trials only: a trial stopped early by the scheduler "
            "reports an earlier iteration's value, not comparable. The sampler (TPE) gives promising "
            "modes more trials, so counts differ by mode.\n")


def _rule_words(t: Any) -> str:
    """The stop rule the trials ran, in the words the header uses."""
    if t.stop_rule == "holdout":
        return (f"held-out pixels: {t.holdout_fraction:.0%} of the pixels left out of the loss, the "
                f"output where their error is lowest, patience {t.patience}; until it fires, its "
                "candidate so far")
    return f"ES-WMV: window {t.window}, patience {t.patience}; until it fires, its candidate so far"


def _estimate_part(rows: list[TrialRow], facts: list[ImageFacts]) -> list[str]:
    """The held-out PSNR estimate beside the truth and the oracle (stop_rule holdout only)."""
    body = estimate_section(rows, facts)
    return [f"The no-reference PSNR estimate from held-out pixels (`{ESTIMATE}`, noise power "
            "corrected for clipping; docs/science.md) beside the true PSNR of the output it "
            "estimates and the oracle, per image:\n", body + "\n"] if body else []


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
    best = _pick_best(rows, s, runs)
    labels = [f.label for f in facts]
    if best is not None:
        outputs = [best_output(s.resolved_tracking_uri, best.run_id, lb, len(labels) > 1) for lb in labels]
        best_grid(facts, outputs, out / "best_outputs.png")
    image_table, per_mode = _image_section(rows, facts, s.trial)
    optuna_figs = optuna_figures(s.study_dir, s.name, out, s.metric)
    bl = {"denoise": "BM3D (PyPI `bm3d`, sigma given)", "sr": "bicubic upsampling"}.get(s.trial.task) if baseline else None
    no_bl = "none for this task" if baseline else "none (report --no-baseline)"
    parts = [
        _header(s, rows, meta, searched),
        "## The answer\n", _headline(rows, facts, s, best) + "\n", _best_section(best, s, searched) + "\n", _darkness_sentence(rows, facts) + "\n",
        confirmed_section(s.study_dir, out, labels),
        pareto_section(runs, rows, s, searched, out),
        "## Per input mode\n", mode_section(rows, s.metric) + "\n",
        "Honest final, honest autostop and oracle best, per input mode and per image:\n",
        three_section(rows, facts) + "\n", *_estimate_part(rows, facts),
        *[f + "\n" for f in _figures(rows, facts, s, out)],
        "## Per image\n", (f"Baseline: {bl}, on the very observations the trials fitted (same seeds), "
                            "averaged over repeats. " if bl else f"Baseline: {no_bl}. ") + observation_check(rows, facts)[1]
        + (f" At {s.trial.size} px BM3D finds few similar blocks to group, so it is handicapped; "
           "docs/science.md gives its figures at 128-512 px." if bl and s.trial.task == "denoise" and s.trial.size < 128 else "")
        + "\n",
        image_table + "\n", sigma_section(rows, facts),
        f"Median {HONEST} by input mode (completed trials):\n", per_mode + "\n",
    ]
    if best is not None:
        parts += ["## The best configuration's output\n",
                  f"Per image: observation | best trial's output ({HONEST} image, repeat 0) | "
                  + (f"{bl.split(' (')[0]} | " if bl else "") + "clean.\n",
                  f"![observation, output, {'baseline, ' if bl else ''}clean](best_outputs.png)\n"]
    parts.append("## Optuna's view\n")
    parts += [f"![{t}]({f})\n" if f else f"- {t}\n" for f, t in optuna_figs] or \
        ["No Optuna record (ROOT/NAME/optuna.db) for this study.\n"]
    parts.append(trials_appendix(rows, s.metric, s.trial, searched, s.mode))
    path = out / "report.md"
    path.write_text("\n".join(parts))
    if log:
        tracking.log_folder(s.resolved_tracking_uri, meta.parent_run_id, out, "report")
    return path
