"""The report's Pareto front, for a study of several objectives: a figure of the first two
objectives with the front highlighted, and the table of its members (numbered as `export
--pick N` takes them) with their objective values and what each tries. The front itself is
study/pareto.py's; study/report/document.py puts this section in."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from study import pareto  # noqa: E402
from study.config import StudyConfig  # noqa: E402
from study.report.images import save_figure  # noqa: E402
from study.report.tables import TrialRow, table, tries  # noqa: E402

if TYPE_CHECKING:
    from study.tracking.store import TrialSummary

FIGURE = "pareto_front.png"


def _figure(scored: list[TrialSummary], members: list[TrialSummary], objectives: pareto.Objectives,
            path: Path) -> None:
    (mx, dx), (my, dy) = objectives[:2]
    with plt.style.context("default"):  # optuna's plots switch the global style to ggplot
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        others = [t for t in scored if t not in members]
        ax.scatter([t.metrics[mx] for t in others], [t.metrics[my] for t in others], color="0.6",
                   label="dominated" if len(objectives) == 2 else "dominated (on every objective)")
        xs, ys = [t.metrics[mx] for t in members], [t.metrics[my] for t in members]
        ax.scatter(xs, ys, color="C3", zorder=3, label="Pareto front")
        order = sorted(range(len(members)), key=lambda i: xs[i])
        ax.plot([xs[i] for i in order], [ys[i] for i in order], color="C3", alpha=0.5, zorder=2)
        for i, (x, y) in enumerate(zip(xs, ys), 1):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{mx} ({dx}imise)")
        ax.set_ylabel(f"{my} ({dy}imise)")
        save_figure(fig, ax, path)


def pareto_section(runs: list[TrialSummary], rows: list[TrialRow], s: StudyConfig, searched: list[str],
                   out: Path) -> str:
    """The section's Markdown (the figure written under `out`); '' for a study of one objective."""
    if not s.multi_objective:
        return ""
    objectives = s.objective_list
    members = pareto.front(runs, objectives)
    scored = pareto.scored(runs, objectives)
    head = (f"## Pareto front\n\nObjectives: {', '.join(f'`{m}` ({d})' for m, d in objectives)}. "
            f"{len(members)} of the {len(scored)} completed "
            "trials with every objective are on the front: no other completed trial is at least as good "
            "on every objective and better on one. Rows are numbered as `export --pick N` takes them; row 1 "
            f"(best `{objectives[0][0]}`) is what `export` writes by default.\n")
    if not members:
        return head + "\nNo completed trial reported every objective.\n"
    _figure(scored, members, objectives, out / FIGURE)
    by_run = {r.run_id: r for r in rows}
    body = [[str(i), t.trial, f"`{tries(by_run[t.run_id], s.trial, searched)}`" if t.run_id in by_run else "-",
             *[f"{t.metrics[m]:.4g}" for m, _ in objectives]] for i, t in enumerate(members, 1)]
    what = f"{objectives[0][0]} against {objectives[1][0]}" + (
        f" (the first two of {len(objectives)} objectives: a member may look dominated here)"
        if len(objectives) > 2 else "")
    return (head + f"\n![Pareto front: {what}]({FIGURE})\n\n"
            + table(["row", "trial", "what it tries", *[f"{m} ({d})" for m, d in objectives]], body) + "\n")
