"""The report's "Confirmed" section, from NAME/confirm.json (study/confirm_result.py): per
variant its search value, its confirmed mean with a 95% interval and the drop between them
(the winner's curse, measured); the paired differences against the reference and against
BM3D; one point per image and seed; and the answer from the confirmed numbers."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt

from study.paths import JsonObject
from study.report.images import save_figure
from study.report.tables import fmt, table
from study.stats import excludes_zero, mean_ci

FIGURE = "confirmed_values.png"


def _ci(ci: list[float | None] | None) -> str:
    return "-" if not ci or ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def _vs(c: JsonObject | None) -> list[str]:
    if not c:
        return ["-", "-", "-", "-"]
    return [f"{c['mean_diff']:+.2f}", _ci(c["ci95"]), _p(c["p_value"]), f"{c['wins']}/{c['n']}"]


def _on_search_images(v: JsonObject, key: str, searched: list[str]) -> tuple[float | None, list[float | None]]:
    """The confirmed mean on the images the search was scored on (fresh seeds only), the
    like-for-like measure of the winner's curse when the confirmation adds other images."""
    vals = [x[key] for x in v["values"] if x["image"] in searched]
    return mean_ci(vals) if vals else (None, [None, None])


def _main_table(r: JsonObject, searched: list[str]) -> str:
    body = []
    for v in r["variants"]:
        same, same_ci = _on_search_images(v, r["compared_on"], searched)
        drop = v["search_value"] - same if same is not None else None
        body.append([f"`{v['run']}`" + (" (reference)" if v["run"] == r["reference"] else ""),
                     str(v["iterations"]), fmt(v["forwards"], 0) if v["forwards"] is not None else "-",
                     fmt(v["search_value"]), fmt(v["mean"]), _ci(v["ci95"]), f"{fmt(same)} {_ci(same_ci)}",
                     fmt(drop)])
    return table(["variant (search run)", "iteration budget", "forwards per network (as run)",
                  "search value", f"confirmed mean `{r['compared_on']}`, all images", "95% CI (bootstrap)",
                  "confirmed on the search's images [95% CI]", "drop (search - confirmed, search's images)"],
                 body)


def _paired_table(r: JsonObject) -> str:
    body = [[f"`{v['run']}`", *_vs(v["vs_reference"]), *_vs(v["vs_bm3d"])] for v in r["variants"]]
    if r["bm3d"]:
        body.append(["BM3D", *_vs(r["bm3d"]["vs_reference"]), "-", "-", "-", "-"])
    return table(["variant", "vs reference: mean diff", "95% CI", "Wilcoxon p", "wins",
                  "vs BM3D: mean diff", "95% CI", "Wilcoxon p", "wins"], body)


def _figure(r: JsonObject, out: Path) -> None:
    key = r["compared_on"]
    rows = [(v["run"], v["values"], key) for v in r["variants"] if v["values"]]
    if r["bm3d"]:
        rows.append(("BM3D", r["bm3d"]["values"], "psnr"))
    images = sorted({x["image"] for _, src, _ in rows for x in src})
    fig, ax = plt.subplots(figsize=(9.0, 0.6 * len(rows) + 2.0))  # long run names, legend beside
    for y, (_, src, k) in enumerate(rows):
        for j, image in enumerate(images):
            vals = [x[k] for x in src if x["image"] == image]
            ax.scatter(vals, [y + 0.08 * (j - (len(images) - 1) / 2)] * len(vals), color=f"C{j}", s=14,
                       label=image if y == 0 else None)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
    ax.set_xlabel(f"{key}, dB (BM3D: its PSNR); one point per image and seed")
    save_figure(fig, ax, out / FIGURE, legend_outside=True)


def _answer(r: JsonObject) -> str:
    scored = [v for v in r["variants"] if v["mean"] is not None]
    if not scored:
        return "No re-run finished: nothing is confirmed."
    best = max(scored, key=lambda v: v["mean"])
    n = len(best["values"])
    text = (f"**Confirmed answer**: the best input is `{best['run']}` with a mean `{r['compared_on']}` "
            f"of {best['mean']:.2f} dB {_ci(best['ci95'])} on {n} image x seed pairs "
            f"(search value {best['search_value']:.2f}).")
    vs = best["vs_reference"]
    if vs:
        verdict = "excludes zero" if excludes_zero(vs["ci95"]) else "includes zero: not a confirmed difference"
        if excludes_zero(vs["ci95"]) and (vs["p_value"] is None or vs["p_value"] >= 0.05):
            verdict += (", but Wilcoxon's signed-rank test does not reject equal medians at 5%: the mean "
                        "gain rests on a few pairs, so it is not confirmed pair by pair")
        text += (f" Against the DIP reference's uniform input `{r['reference']}` it is {vs['mean_diff']:+.2f} dB "
                 f"{_ci(vs['ci95'])} paired (Wilcoxon p = {_p(vs['p_value'])}, higher on {vs['wins']} of "
                 f"{vs['n']} pairs); the interval {verdict}.")
    elif r["reference"] == best["run"]:
        text += " It is the DIP reference's uniform input itself."
    else:
        text += " No uniform variant was confirmed, so there is no reference to compare with."
    if best["vs_bm3d"]:
        b = best["vs_bm3d"]
        text += f" Against BM3D on the same observations: {b['mean_diff']:+.2f} dB {_ci(b['ci95'])}."
    return text


def confirmed_section(study_dir: Path, out: Path, searched: list[str]) -> str:
    """The section, or '' when the study has no confirm.json; `searched`: the labels of the
    images the search was scored on."""
    path = study_dir / "confirm.json"
    if not path.is_file():
        return ""
    r = json.loads(path.read_text())
    with plt.style.context("default"):
        _figure(r, out)
    how = ("equal compute: every variant the same network forward passes (SURE: two per step)"
           if r.get("equal_compute") else "each variant its own configuration's iterations")
    return "\n".join([
        "## Confirmed\n",
        f"The finalists re-run by `run_study.py confirm` on {len(r['seeds'])} fresh seeds {r['seeds']} "
        f"(none used by the search) and images {', '.join(r['images'])}, every variant on the same "
        f"observations; {how}. Intervals: 95% bootstrap (BCa) over the image x seed pairs; "
        "paired differences on the same pairs, Wilcoxon signed-rank p.\n",
        _answer(r) + "\n", _main_table(r, searched) + "\n", _paired_table(r) + "\n",
        f"![confirmed values, one point per image and seed]({FIGURE})\n"])
