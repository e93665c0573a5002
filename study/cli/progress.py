"""How `status` and `list` show a study (study/cli/jobs.py reads it): trials by state, the
best so far (the Pareto front's row 1 with several objectives), speed and ETA, one row
per study."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mlflow is slow to import: the views' module only for the type checker
    from study.tracking.store import StudyView, TrialSummary


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def _best(view: StudyView) -> tuple[TrialSummary, float] | None:
    """pick_best; with several objectives the Pareto front's row 1 (what export writes)."""
    from study.export import pick_best
    from study.objectives import from_params
    from study.pareto import front

    objectives = from_params(view.params)
    if len(objectives) > 1:
        best = next(iter(front(view.trials, objectives)), None)
    else:
        best = pick_best(view.trials, *objectives[0])
    return (best, best.metrics[objectives[0][0]]) if best else None


def _front_lines(view: StudyView) -> list[str]:
    """Several objectives: the front's size and members, numbered as `export --pick N` takes them."""
    from study.objectives import from_params
    from study.pareto import front, front_lines, scored

    objectives = from_params(view.params)
    members = front(view.trials, objectives) if len(objectives) > 1 else None
    return [] if members is None else [
        f"Pareto front: {len(members)} of {len(scored(view.trials, objectives))} completed trials; "
        "export --pick N writes row N:",
        *["  " + x for x in front_lines(members, objectives, {t.run_id: _searched(view, t) for t in members})]]


def _searched(view: StudyView, trial: TrialSummary) -> str:
    """The trial's values of the searched parameters (timestep only where the mode uses it)."""
    from study.tracking import store as tracking
    from study.modes import mode_uses

    try:
        keys = list(tracking.load_run_dict(view.tracking_uri, view.parent_run_id, "search_space.json"))
    except Exception:  # noqa: BLE001 - an older or partial record: the default space's keys
        keys = ["noise_mode", "timestep", "lr"]
    mode = trial.params.get("noise_mode")
    return ", ".join(f"{k} {_short_number(trial.params[k])}" for k in keys if k in trial.params
                     and mode_uses(k, mode))


def _short_number(v: str) -> str:
    try:
        return f"{float(v):.3g}" if "." in v or "e" in v else v
    except ValueError:
        return v


def _busy(trials: tuple[TrialSummary, ...], now: float) -> float:
    """Seconds during which at least one trial ran: the study's time, without the gaps
    between a stop and its resume or between `extend`s."""
    spans = sorted((t.start, t.end or now) for t in trials if t.start)
    total, reach = 0.0, 0.0
    for start, end in spans:
        start = max(start, reach)
        if end > start:
            total, reach = total + end - start, end
    return total


def progress_lines(view: StudyView, now: float) -> list[str]:
    """Trials by state, the best so far, iterations per second and an ETA."""
    counts = {k: sum(t.status == k for t in view.trials) for k in ("FINISHED", "RUNNING", "FAILED", "KILLED")}
    pending = max(0, view.asked - len(view.trials))
    lines = [f"trials: {counts['FINISHED']} finished, {counts['RUNNING']} running, {counts['FAILED']} failed, "
             f"{counts['KILLED']} interrupted, {pending} pending, of {view.asked} asked"]
    best = _best(view)
    metric = view.params.get("metric", "psnr_ema")
    lines.append(f"best so far: {metric} = {best[1]:.4f}  {best[0].trial} ({_searched(view, best[0])})"
                 if best else f"best so far: no trial has reported {metric} yet")
    lines += _front_lines(view)
    if view.status == "RUNNING" and (gpus := view.gpu_line()):
        lines.append(gpus)
    iterations = int(view.params.get("trial.iterations", 0))
    done = sum(int(t.metrics.get("iteration", 0)) for t in view.trials)
    elapsed = _busy(view.trials, now)
    if done and elapsed > 0:
        rate = done / elapsed
        line = f"speed: {rate:.1f} iterations/s over {_duration(elapsed)} of trials running ({done} iterations)"
        if view.status == "RUNNING":
            running = [t for t in view.trials if t.status == "RUNNING"]
            left = pending * iterations + sum(max(0, iterations - int(t.metrics.get("iteration", 0)))
                                              for t in running)
            line += f"; ETA at most {_duration(left / rate)} (early stopping may end it sooner)"
        lines.append(line)
    return lines


def study_row(name: str, view: StudyView | None, store: str, extra: str = "") -> str:
    if view is None:
        return f"{name:<24} {'-':>9}  {'-':<9} {'-':>10}  {'-':<16}  {store}{extra}"
    ended = sum(t.status in ("FINISHED", "FAILED") for t in view.trials)
    best = _best(view)
    value = f"{best[1]:.4f}" if best else "-"
    return (f"{name:<24} {f'{ended}/{view.asked}':>9}  {view.status:<9} {value:>10}  "
            f"{when(view.start):<16}  {store}{extra}")
