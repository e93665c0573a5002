"""The best configuration out of a study: chosen from MLflow's record of the trials (so the
parent run, `export` and a study on a remote tracking server all agree), written as JSON
that `run_study.py train --config` replays."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from study import pareto
from study.config import StudyConfig
from study.engine.machine import from_tags
from study.paths import JsonObject, write_json
from study.results import BestTrial

if TYPE_CHECKING:  # mlflow is slow to import
    from study.tracking.store import StudyTracker, TrialSummary


def pick_best(trials: Sequence[TrialSummary], metric: str, mode: str) -> TrialSummary | None:
    """Among trials that ran all their iterations, the best final `metric`; if none did
    (every one stopped early or failed), the best of those that reported it. Trials an
    early-stopping scheduler cut short are only a fallback: their value is from an earlier
    iteration and is not comparable."""
    def value(t: TrialSummary) -> float | None:
        v = t.metrics.get(metric)
        return v if v is not None and math.isfinite(v) else None

    for pool in ([t for t in trials if t.completed], [t for t in trials if t.status != "FAILED"]):
        scored = [t for t in pool if value(t) is not None]
        if scored:
            sign = 1 if mode == "max" else -1
            # Ties broken by trial id (then run name, for runs without one), so the choice
            # does not depend on listing order.
            return max(sorted(scored, key=lambda t: (t.trial_id, t.name)), key=lambda t: sign * value(t))
    return None


def pick_member(trials: Sequence[TrialSummary], s: StudyConfig, choice: str | None = None
                ) -> tuple[TrialSummary, JsonObject] | None:
    """A multi-objective study's choice: the Pareto front's member best on the first
    objective, or the one `choice` names (`export --pick`); with best.json's extra fields."""
    objectives = s.objective_list
    members = pareto.front(trials, objectives)
    if not members:
        return None
    chosen = members[0] if choice is None else pareto.pick(trials, members, choice)
    return chosen, {"objectives": tuple({"metric": m, "mode": d, "value": chosen.metrics[m]} for m, d in objectives),
                    "front_size": len(members), "picked": pareto.why_picked(members, chosen, choice, objectives)}


def best_trial(tracker: StudyTracker, s: StudyConfig, choice: str | None = None) -> BestTrial | None:
    """The study's best trial (pick_best); with several objectives the front's member best on
    the first objective, or the one `choice` names."""
    if choice is not None and not s.multi_objective:
        raise ValueError(f"--pick {choice} chooses on a Pareto front, but study {s.name!r} has one "
                         f"objective ({s.metric}); allowed: export without --pick")
    trials = tracker.trial_summaries()
    extra: JsonObject = {}
    if s.multi_objective:
        found = pick_member(trials, s, choice)
        best, extra = found if found is not None else (None, {})
    else:
        best = pick_best(trials, s.metric, s.mode)
    if best is None:
        return None
    return BestTrial(
        study=s.name, metric=s.metric, mode=s.mode, value=best.metrics[s.metric],
        trial_id=best.trial_id, mlflow_run_id=best.run_id, completed=best.completed,
        tracking_uri=s.resolved_tracking_uri, metrics=best.metrics,
        config=tracker.load_dict(best.run_id, "config.json"),
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra, machine=from_tags(best.tags),
        trial=best.trial)


def confirmed_best(s: StudyConfig, result: JsonObject, runs: Sequence[TrialSummary]) -> BestTrial:
    """The variant with the best confirmed mean in `result` (NAME/confirm.json), as its
    re-run's MLflow run records it: its config replays the confirmed values."""
    sign = 1 if s.mode == "max" else -1
    scored = [v for v in result["variants"] if v["mean"] is not None]
    if not scored:
        raise ValueError(f"the confirmation of study {s.name!r} has no finished re-run; nothing to export")
    v = max(scored, key=lambda v: sign * v["mean"])
    run = next((r for r in runs if r.run_id == v["confirm_run_id"]), None)
    if run is None:
        raise ValueError(f"the re-run of {v['run']!r} (MLflow run {v['confirm_run_id']}) is not in the "
                         f"tracking store {s.resolved_tracking_uri}")
    return BestTrial(
        study=s.name, metric=result["compared_on"], mode=s.mode, value=v["mean"], trial_id=run.trial_id,
        mlflow_run_id=run.run_id, completed=run.completed, tracking_uri=s.resolved_tracking_uri,
        metrics=run.metrics, config=v["config"], exported_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        confirmation={"stage": "confirm", "pairs": len(v["values"]), "seeds": result["seeds"],
                      "images": result["images"], "ci95": v["ci95"], "search_run": v["run"],
                      "search_value": v["search_value"]})


def write(best: BestTrial, path: Path) -> None:
    write_json(path, best.to_dict())
