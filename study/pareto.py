"""The Pareto front of a multi-objective study: the completed trials no other completed trial
beats on every objective. Its rows are numbered from 1, best on the first objective first,
so `export --pick N`, the report's table and `status` name the same member. Pure: it reads
the trials as the tracking room summarises them (study/tracking/store.py TrialSummary).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from study.tracking.store import TrialSummary

Objectives = Sequence[tuple[str, str]]  # (metric, "max" or "min") per objective


def values(t: TrialSummary, objectives: Objectives) -> tuple[float, ...] | None:
    """The trial's value of each objective, or None if one is missing or not finite."""
    out = tuple(t.metrics.get(m) for m, _ in objectives)
    return out if all(v is not None and math.isfinite(v) for v in out) else None


def _gains(v: tuple[float, ...], objectives: Objectives) -> tuple[float, ...]:
    """The values turned so that larger is better on every objective."""
    return tuple(x if d == "max" else -x for x, (_, d) in zip(v, objectives, strict=True))


def dominates(a: tuple[float, ...], b: tuple[float, ...], objectives: Objectives) -> bool:
    """`a` is at least as good as `b` on every objective and better on one."""
    ga, gb = _gains(a, objectives), _gains(b, objectives)
    return all(x >= y for x, y in zip(ga, gb)) and ga != gb


def front(trials: Sequence[TrialSummary], objectives: Objectives) -> list[TrialSummary]:
    """The non-dominated trials among the completed ones with every objective finite (equal
    values dominate neither: both stay), in row order: best on the first objective first,
    ties by the next objectives, then by trial id and run name (not by listing order)."""
    scored = [(t, v) for t in trials if (v := _scored_values(t, objectives)) is not None]
    members = [(t, v) for t, v in scored if not any(dominates(w, v, objectives) for _, w in scored)]
    members.sort(key=lambda tv: (tuple(-g for g in _gains(tv[1], objectives)), tv[0].trial_id, tv[0].name))
    return [t for t, _ in members]


def _scored_values(t: TrialSummary, objectives: Objectives) -> tuple[float, ...] | None:
    return values(t, objectives) if t.completed else None


def scored(trials: Sequence[TrialSummary], objectives: Objectives) -> list[TrialSummary]:
    """Completed trials with every objective finite: those the front is chosen from."""
    return [t for t in trials if _scored_values(t, objectives) is not None]


def _names(t: TrialSummary) -> set[str]:
    return {t.trial, t.name, t.trial_id} - {""}


def pick(trials: Sequence[TrialSummary], members: list[TrialSummary], choice: str) -> TrialSummary:
    """The member `choice` names: N, its 1-based row, or its trial name (trial_NNNN), run name
    or trial id. Refuses, in one sentence, a row out of range, an unknown name and a trial
    that is not on the front."""
    allowed = (f"allowed: a row 1 to {len(members)} or one of "
               f"{', '.join(t.trial for t in members)}") if members else "the front is empty"
    if choice.strip().isdigit():
        n = int(choice)
        if not 1 <= n <= len(members):
            raise ValueError(f"--pick {choice} is not a row of the Pareto front; {allowed}")
        return members[n - 1]
    found = next((t for t in members if choice in _names(t)), None)
    if found is not None:
        return found
    if any(choice in _names(t) for t in trials):
        raise ValueError(f"--pick {choice!r} is a trial of the study but not on its Pareto front; {allowed}")
    raise ValueError(f"--pick {choice!r} names no trial of the study; {allowed}")


def why_picked(members: list[TrialSummary], chosen: TrialSummary, choice: str | None,
               objectives: Objectives) -> str:
    """best.json's `picked`: which member and why."""
    if choice is None:
        return (f"best {objectives[0][0]} of the {len(members)} trials on the Pareto front "
                f"({chosen.trial}, row 1)")
    return f"--pick {choice} ({chosen.trial}, row {members.index(chosen) + 1} of {len(members)} on the Pareto front)"


def front_lines(members: list[TrialSummary], objectives: Objectives, tries: dict[str, str]) -> list[str]:
    """One line per member, numbered as `--pick N` takes it; `tries`: run id -> what it tries."""
    return [f"{i}. {t.trial}  " + "  ".join(f"{m} {t.metrics[m]:.4g}" for m, _ in objectives)
            + (f"  ({tries[t.run_id]})" if tries.get(t.run_id) else "")
            for i, t in enumerate(members, 1)]
