"""A confirmation's records: its plan (NAME/confirm/KEY/plan.json, what study/confirm.py
re-runs) and NAME/confirm.json, what a finished confirmation measured, read back from the re-runs'
MLflow runs (their result.json: every network's image, seed and metrics), with BM3D on
the same observations (study/report/images.py, the report's baseline) and the paired
statistics of study/stats.py. Other tools read it: its keys are kept (issue 20):

    seeds, images, metric, reference (the uniform variant's run name, or null),
    variants: [{run, config, search_value, values: [{image, seed, psnr_autostop, psnr_ema,
                psnr_best}], mean, ci95, vs_reference: {mean_diff, ci95, p_value, wins, n}}],
    bm3d: {values: [{image, seed, psnr}], mean, ci95, vs_reference}, forwards: {run: count}

and adds: `compared_on` (the value the statistics use: the study's metric), per variant
`trial`, `confirm_run_id`, `status`, `iterations`, `forwards` and `vs_bm3d`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from study import stats
from study.config import StudyConfig, TrialConfig
from study.paths import JsonObject

if TYPE_CHECKING:
    from study.tracking.store import TrialSummary

VALUES = ("psnr_autostop", "psnr_ema", "psnr_best")


@dataclass(frozen=True)
class Variant:
    """One re-run: a search trial's configuration on the confirmation's seeds and images."""

    run: str                     # the search trial's run name
    trial: str                   # its trial_NNNN
    run_id: str                  # its MLflow run
    search_value: float          # its objective in the search
    config: JsonObject           # the re-run's whole TrialConfig (seed, repeats, images, iterations)
    params: JsonObject           # what the re-run's MLflow params show


@dataclass(frozen=True)
class Plan:
    """NAME/confirm/KEY/plan.json: what a confirm command re-runs."""

    key: str
    top: int | None              # --top K, or None: the best trial of each variant
    seeds: list[int]
    images: list[str]
    metric: str
    equal_compute: bool
    variants: list[Variant]

    def to_dict(self) -> JsonObject:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: JsonObject) -> "Plan":
        return cls(**{**d, "variants": [Variant(**v) for v in d["variants"]]})




def _values(uri: str, run: TrialSummary, keys: tuple[str, ...]) -> list[JsonObject]:
    """Every network of a re-run, as its result.json recorded it (re-measured, not copied)."""
    from study.tracking.store import load_run_dict

    nets = load_run_dict(uri, run.run_id, "result.json")["networks"]
    rows = [{"image": n["image"], "seed": int(n["seed"]),
             **{k: float(n["metrics"][k]) for k in keys if k in n["metrics"]}} for n in nets]
    return sorted(rows, key=lambda r: (r["image"], r["seed"]))


def _bm3d(plan: Plan) -> list[JsonObject] | None:
    """BM3D's PSNR on each image x seed observation (denoising only: else None)."""
    from study.report.images import image_facts

    first = TrialConfig.from_dict(plan.variants[0].config)
    if first.task != "denoise":
        return None
    facts = image_facts(first, baseline=True)
    rows = [{"image": f.label, "seed": first.seed + r, "psnr": p}
            for f in facts for r, p in enumerate(f.baseline_psnrs)]
    return sorted(rows, key=lambda r: (r["image"], r["seed"]))


def _column(rows: list[JsonObject], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def _variant(plan: Plan, i: int, run: TrialSummary | None, uri: str, keys: tuple[str, ...]) -> JsonObject:
    v = plan.variants[i]
    values = _values(uri, run, keys) if run is not None and run.completed else []
    return {"run": v.run, "trial": v.trial, "config": v.config, "search_value": v.search_value,
            "confirm_run_id": run.run_id if run else None,
            "status": run.state if run else "not run", "iterations": v.config["iterations"],
            "forwards": run.metrics.get("forwards") if run else None, "values": values}


def _pairs(rows: list[JsonObject]) -> list[tuple[str, int]]:
    return [(r["image"], r["seed"]) for r in rows]


def compare(d: JsonObject, key: str, reference: JsonObject | None, bm3d: list[JsonObject] | None) -> None:
    """Fill a variant's mean, interval, and paired comparisons against the reference and BM3D."""
    d["mean"], d["ci95"] = stats.mean_ci(_column(d["values"], key)) if d["values"] else (None, [None, None])
    d["vs_reference"] = None
    if reference is not None and reference is not d and d["values"] and _pairs(d["values"]) == _pairs(reference["values"]):
        d["vs_reference"] = stats.paired(_column(d["values"], key), _column(reference["values"], key))
    pkey = key if key.startswith("psnr") else "psnr_autostop"
    d["vs_bm3d"] = None
    if bm3d and d["values"] and _pairs(d["values"]) == _pairs(bm3d):
        d["vs_bm3d"] = stats.paired(_column(d["values"], pkey), _column(bm3d, "psnr"))


def build(s: StudyConfig, plan: Plan) -> JsonObject:
    from study.tracking.store import study_runs

    uri = s.resolved_tracking_uri
    runs = {int(r.tags["dip.variant"]): r for r in study_runs(uri, s.name, role="confirm")
            if r.tags.get("dip.confirm_plan") == plan.key and "dip.variant" in r.tags}
    keys = tuple(dict.fromkeys((*VALUES, plan.metric)))
    variants = [_variant(plan, i, runs.get(i), uri, keys) for i in range(len(plan.variants))]
    key = plan.metric if all(plan.metric in r for d in variants for r in d["values"]) else "psnr_autostop"
    reference = next((d for d in variants if d["config"]["noise_mode"] == "uniform" and d["values"]), None)
    bm3d_rows = _bm3d(plan)
    for d in variants:
        compare(d, key, reference, bm3d_rows)
    bm3d = None
    if bm3d_rows:
        mean, ci = stats.mean_ci(_column(bm3d_rows, "psnr"))
        pkey = key if key.startswith("psnr") else "psnr_autostop"
        vs = (stats.paired(_column(bm3d_rows, "psnr"), _column(reference["values"], pkey))
              if reference is not None and _pairs(reference["values"]) == _pairs(bm3d_rows) else None)
        bm3d = {"values": bm3d_rows, "mean": mean, "ci95": ci, "vs_reference": vs}
    return {"seeds": plan.seeds, "images": plan.images, "metric": plan.metric, "compared_on": key,
            "equal_compute": plan.equal_compute, "key": plan.key,
            "reference": reference["run"] if reference is not None else None,
            "variants": variants, "bm3d": bm3d, "forwards": {d["run"]: d["forwards"] for d in variants}}


def _ci(ci: list[float | None]) -> str:
    return "-" if ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def summary(result: JsonObject) -> str:
    """What the driver prints at the end: each variant's confirmed mean against its search value."""
    n = len(result["seeds"]) * len(result["images"])
    lines = [f"\nconfirmed on {n} image x seed pairs (seeds {result['seeds']}), {result['compared_on']}:"]
    for d in result["variants"]:
        if d["mean"] is None:
            lines.append(f"  {d['run']}: {d['status']}, no values")
            continue
        vs = d["vs_reference"]
        ref = (f"; vs reference {vs['mean_diff']:+.2f} {_ci(vs['ci95'])}, p = "
               f"{vs['p_value'] if vs['p_value'] is None else format(vs['p_value'], '.3g')}, "
               f"wins {vs['wins']}/{vs['n']}") if vs else ""
        lines.append(f"  {d['run']}: {d['mean']:.2f} {_ci(d['ci95'])} (search {d['search_value']:.2f}){ref}")
    if result["bm3d"]:
        lines.append(f"  BM3D: {result['bm3d']['mean']:.2f} {_ci(result['bm3d']['ci95'])}")
    return "\n".join(lines)
