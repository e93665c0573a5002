"""The warm start, `run --warm-start OTHER`: a new study's sampler begins from the finished
trials of earlier studies under the same root. Before the searcher is built, each earlier
trial that the new space could have asked (study/space.py `fits`) is added to the new
study's Optuna record, marked with the study it came from; OptunaSearch loads that record,
so TPE conditions on them from the first proposal. They are not trials of the new study:
it has no Tune trial or MLflow run of them, its trial numbers and counts are its own, and
`extend` (which never comes here) keeps them as they are.

The values Optuna gets are the earlier trial's values of the new study's objectives (one,
or several: study/objectives.py), each its Optuna value when the earlier study optimised
that metric too (exactly what that study's sampler saw), else the metric's last value in
its MLflow child run (the trial's last report, the same rule as an Optuna value), found by
its searched params. A trial lacking one of them is left out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from study import studydir
from study.config import StudyConfig
from study.objectives import objectives_text

if TYPE_CHECKING:
    from study.space import EarlierTrial, SearchSpace

WARM_TAG = "dip.warm_start"  # parent-run tag: the studies a study started from, comma-separated


def check(s: StudyConfig) -> list[str]:
    """Refuses a study to start from that does not exist under the root; returns a warning
    sentence for each one whose objective, task or images differ (allowed: its trials
    still say where the space is good)."""
    names = studydir.study_names(s.root)
    warnings = []
    for other in s.warm_start:
        if other not in names:
            raise ValueError(f"no study {other!r} to warm-start from under {s.root!r}; "
                             f"studies there: {', '.join(names) or 'none'}")
        o = studydir.read_study(s.root, other).current
        several = o.multi_objective or s.multi_objective
        diff = [f"{what} is {a} (this study's: {b})" for what, a, b in (
            ("objectives" if several else "objective", objectives_text(o.objective_list),
             objectives_text(s.objective_list)), ("task", o.trial.task, s.trial.task),
            ("image set", ", ".join(o.trial.images), ", ".join(s.trial.images))) if a != b]
        if diff:
            warnings.append(f"warning: warm start from study {other!r}, whose {'; '.join(diff)}: "
                            f"its trials guide the sampler all the same")
    return warnings


def _values_of(o: StudyConfig, s: StudyConfig) -> Callable[[EarlierTrial], list[float] | None]:
    """The earlier trial's values of `s`'s objectives (see the module's docstring), or None
    if one is missing or not finite. The earlier study's runs are read once, and only when
    one objective is not its own."""
    theirs = [m for m, _ in o.objective_list]
    runs = None
    if any(m not in theirs for m, _ in s.objective_list):
        from study.tracking.store import study_runs

        runs = [r for r in study_runs(o.resolved_tracking_uri, o.name) if r.status == "FINISHED"]

    def one(t: EarlierTrial, metric: str) -> float | None:
        if metric in theirs:
            i = theirs.index(metric)
            return t.values[i] if i < len(t.values) else None
        run = next((r for r in runs or () if all(r.params.get(k) == str(v) for k, v in t.params.items())), None)
        return run.metrics.get(metric) if run is not None else None

    def values(t: EarlierTrial) -> list[float] | None:
        got = [one(t, m) for m, _ in s.objective_list]
        return got if all(x is not None and math.isfinite(x) for x in got) else None
    return values


@dataclass(frozen=True)
class Gathered:
    """What `gather` read from the earlier studies: the trials to add with their values, how
    many came from each study, and the ones left out."""
    picked: list[tuple[EarlierTrial, list[float]]]
    counts: dict[str, int]
    left: list[str]


def gather(s: StudyConfig, space: SearchSpace) -> Gathered:
    """Reads the earlier studies' trials that fit `space` and have a finite value, writing
    nothing: run before the new study writes anything, so that an earlier study whose record
    cannot be read (or whose MLflow store is away) refuses the new one, not half-writes it."""
    from study.space import finished_trials, fits

    picked, counts, left = [], {}, []
    for other in s.warm_start:
        o = studydir.read_study(s.root, other).current
        values = _values_of(o, s)
        counts[other] = 0
        for t in finished_trials(o.study_dir, other):
            v = values(t) if fits(space, t.params) else None
            if v is None:
                left.append(f"{other}#{t.number}")
                continue
            picked.append((t, v))
            counts[other] += 1
    return Gathered(picked, counts, left)


def seed(s: StudyConfig, space: SearchSpace, got: Gathered | None = None) -> int:
    """Create the new study's Optuna record holding the earlier studies' trials that fit
    `space` and have a finite value (`gather`'s, read now if not given); prints one line
    with how many came from where and which were left out. Returns the number added."""
    from study.space import add_warm_trials

    got = got or gather(s, space)
    picked, counts, left = got.picked, got.counts, got.left
    n = add_warm_trials(s.study_dir, s.name, [d for _, d in s.objective_list], space, picked)
    wanted = " and ".join(m for m, _ in s.objective_list)
    rest = (f"; {len(left)} left out (outside this space, or no finite {wanted}): {', '.join(left)}"
            if left else "; none left out")
    print(f"warm start: {n} earlier trials ({', '.join(f'{k} {c}' for k, c in counts.items())}) "
          f"added to the sampler's record{rest}", flush=True)
    return n
