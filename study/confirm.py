"""The confirmation: a study's finalists re-run on fresh seeds and on images the search may
never have seen, every variant on the same observations, so the comparisons pair per
image and seed (the winner's curse, measured). The story, told as `service.run` tells
the search's: plan (everything refused here, nothing written), run the re-runs as Tune
trials (study/cluster/confirm.py), wait for MLflow, write NAME/confirm.json
(study/confirmation.py) and the report.

A plan is kept under NAME/confirm/KEY/ (KEY: the command's options), so the same command
after Ctrl-C restores its Tune experiment and re-runs nothing that finished.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import TYPE_CHECKING, Sequence

from study import studydir
from study.config import StudyConfig, TrialConfig, check_image_spec
from study.confirmation import Plan, Variant
from study.engine.imagefiles import preflight
from study.engine.sure import forwards_per_step
from study.modes import mode_uses
from study.paths import JsonObject, command, write_json

if TYPE_CHECKING:
    from study.cluster.context import StudyContext
    from study.results import FitSummary
    from study.tracking.store import TrialSummary

# A network of trial seed s draws from the generator seeds s .. s + 3 (study/engine/pack.py):
# fresh seeds start this far past the largest the search used, so none of them is shared.
SEED_GAP = 4


def plan_key(top: int | None, seeds: int, images: Sequence[str], equal_compute: bool) -> str:
    digest = hashlib.sha1(json.dumps(list(images)).encode()).hexdigest()[:8]
    return f"{f'top{top}' if top else 'best'}-seeds{seeds}-{'equal' if equal_compute else 'own'}-{digest}"


def _value(t: TrialSummary, metric: str) -> float | None:
    v = t.metrics.get(metric)
    return v if v is not None and math.isfinite(v) else None


def choose(trials: Sequence[TrialSummary], s: StudyConfig, searched: Sequence[str],
           top: int | None) -> list[TrialSummary]:
    """The best completed trial of each variant (input mode, and loss where the space
    searched it), or with `top` the `top` best completed trials; best first."""
    sign = 1 if s.mode == "max" else -1
    done = sorted((t for t in trials if t.completed and _value(t, s.metric) is not None),
                  key=lambda t: (-sign * _value(t, s.metric), t.trial_id))
    if not done:
        raise ValueError(f"study {s.name!r} has no completed trial that reported {s.metric}; "
                         "nothing to confirm (run or resume it first)")
    if top:
        return done[:top]
    best: dict[tuple[str, str], TrialSummary] = {}
    for t in done:
        mode = t.params.get("noise_mode", s.trial.noise_mode)
        loss = t.params.get("loss", s.trial.loss) if "loss" in searched else ""
        best.setdefault((mode, loss), t)
    return list(best.values())


def _config(t: TrialSummary, base: TrialConfig) -> JsonObject:
    from study.tracking.records import CONFIG_TAG

    text = t.tags.get(CONFIG_TAG)
    return {**base.to_dict(), **json.loads(text)} if text else base.to_dict()


def fresh_seeds(trials: Sequence[TrialSummary], meta: studydir.StudyRecord, n: int) -> list[int]:
    """`n` consecutive trial seeds no trial of the study used (repeat r of a trial of seed s
    is seed s + r), SEED_GAP past the largest."""
    bases = [meta.study.trial, *(e.study.trial for e in meta.extensions)]
    used = {c.seed + r for c in bases for r in range(c.repeats)}
    for t in trials:
        c = _config(t, meta.study.trial)
        used |= {int(c["seed"]) + r for r in range(int(c["repeats"]))}
    first = max(used) + SEED_GAP
    return list(range(first, first + n))


def _budgets(configs: list[TrialConfig], equal_compute: bool) -> list[int]:
    """Iterations per variant: its own, or with equal compute the same forward passes for
    all (the fewest any variant's own budget holds; SURE costs two per step)."""
    if not equal_compute:
        return [c.iterations for c in configs]
    forwards = min(c.iterations * forwards_per_step(c.loss) for c in configs)
    return [forwards // forwards_per_step(c.loss) for c in configs]


def _variants(chosen: list[TrialSummary], meta: studydir.StudyRecord, seeds: list[int],
              images: list[str], equal_compute: bool) -> list[Variant]:
    base = meta.current.trial
    own = [TrialConfig.from_dict(_config(t, base)).replace(seed=seeds[0], repeats=len(seeds),
                                                          images=tuple(images)) for t in chosen]
    out = []
    for t, c, it in zip(chosen, own, _budgets(own, equal_compute), strict=True):
        c = c.replace(iterations=it)
        preflight(c)  # an image too small for this network, or one that does not load
        shown = [k for k in meta.space if mode_uses(k, c.noise_mode)] + ["seed", "repeats", "iterations"]
        d = c.to_dict()
        out.append(Variant(run=t.name, trial=t.trial, run_id=t.run_id,
                           search_value=float(t.metrics[meta.study.metric]), config=d,
                           params={k: d[k] for k in shown}))
    return out


def check_options(top: int | None, seeds: int, images: Sequence[str]) -> None:
    if seeds < 1:
        raise ValueError(f"--seeds {seeds} is not a number of fresh seeds; allowed: 1 or more")
    if top is not None and top < 1:
        raise ValueError(f"--top {top} is not a number of trials; allowed: 1 or more")
    for spec in images:
        check_image_spec(spec)


def prepare(root: str, name: str, top: int | None, seeds: int, images: Sequence[str],
            equal_compute: bool) -> tuple[studydir.StudyRecord, Plan]:
    """The plan of a confirm command: the saved one when the same command ran before, else
    a new one (not yet written). Refuses bad input with one sentence."""
    from study.tracking import store as tracking

    check_options(top, seeds, images)
    meta = studydir.read_study(root, name)
    s = meta.current
    images = list(images or s.trial.images)
    key = plan_key(top, seeds, images, equal_compute)
    saved = studydir.confirm_dir(s, key) / "plan.json"
    if saved.is_file():
        return meta, Plan.from_dict(json.loads(saved.read_text()))
    tracking.check_tracking_uri(s.resolved_tracking_uri)
    trials = tracking.study_runs(s.resolved_tracking_uri, name)
    chosen = choose(trials, s, list(meta.space), top)
    picked = fresh_seeds(trials, meta, seeds)
    return meta, Plan(key=key, top=top, seeds=picked, images=images, metric=s.metric, equal_compute=equal_compute,
                      variants=_variants(chosen, meta, picked, images, equal_compute))


def contexts(s: StudyConfig, meta: studydir.StudyRecord, plan: Plan) -> tuple[StudyContext, ...]:
    """Every re-run's context: the search's (relay, experiment, parent run), its own
    configuration as the base, its run named for what it re-runs and tagged for the plan."""
    from study.service import study_context

    ctx = study_context(s, meta.experiment_id, meta.parent_run_id)
    return tuple(dataclasses.replace(
        ctx, base=v.config, role="confirm", run_name=f"confirm {v.run}",
        tags=(("dip.confirms", v.run_id), ("dip.confirm_plan", plan.key), ("dip.variant", str(i))))
        for i, v in enumerate(plan.variants))


def confirm(root: str, name: str, top: int | None = None, seeds: int = 5, images: Sequence[str] = (),
            equal_compute: bool = False, address: str = "") -> int:
    from study import confirmation
    from study.cluster import confirm as cc, runtime, tune as st
    from study.service import check_storage, write_report

    meta, plan = prepare(root, name, top, seeds, images, equal_compute)
    s = dataclasses.replace(meta.current, address=address or meta.current.address)
    folder = studydir.confirm_dir(s, plan.key)
    ended = folder / "trials.json"
    _say_plan(s, plan)
    runtime.connect(s.address)
    runtime.sigterm_as_sigint()
    try:
        gpus = st.gpus_per_trial(s)
        check_storage(s, st.alive_nodes())
        write_json(folder / "plan.json", plan.to_dict())
        ctxs, params = contexts(s, meta, plan), tuple(v.params for v in plan.variants)
        experiment = f"confirm-{plan.key}"
        if cc.can_restore(s, experiment):
            tuner = cc.restore_tuner(s, experiment, ctxs, params, gpus)
        else:
            tuner = cc.build_tuner(s, experiment, ctxs, params, gpus, ended,
                                   min(v.config["iterations"] for v in plan.variants))
        summary = cc.fit(tuner, ended, len(plan.variants))
        if not _ended(s, summary, plan, root):
            return 130
    finally:
        st.shutdown()
    result = confirmation.build(s, plan)
    write_json(folder / studydir.CONFIRM_FILE, result)
    write_json(s.study_dir / studydir.CONFIRM_FILE, result)
    print(confirmation.summary(result), flush=True)
    print(f"confirmation written to {s.study_dir / studydir.CONFIRM_FILE}", flush=True)
    write_report(root, name)
    return 0


def _ended(s: StudyConfig, summary: FitSummary, plan: Plan, root: str) -> bool:
    """Close the interrupted re-runs' MLflow runs and wait for MLflow; False (exit 130) when
    the confirmation did not finish, with the command that finishes it."""
    from study.cluster import relay as rl
    from study.service import delivered
    from study.tracking.records import end_record

    rl.send(s.name, [end_record("KILLED", "the confirmation was interrupted; the same command "
                                "continues it", trial=t, if_open=True) for t in summary.unended])
    if not delivered(s) or not summary.complete:
        print(f"\nconfirmation of {s.name!r} interrupted: {summary.ended} of {len(plan.variants)} re-runs "
              f"ended. Finish it with the same command:\n  {again(plan, s.name, root)}", flush=True)
        return False
    return True


def again(plan: Plan, name: str, root: str) -> str:
    """The command that made `plan` (and finishes it)."""
    args = ["confirm", name, "--root", root, "--seeds", str(len(plan.seeds))]
    args += ["--top", str(plan.top)] if plan.top else []
    args += ["--images", *plan.images] + (["--equal-compute"] if plan.equal_compute else [])
    return command(*args)


def _say_plan(s: StudyConfig, plan: Plan) -> None:
    for v in plan.variants:
        print(f"confirm {v.run} ({v.trial}, {s.metric} {v.search_value:.4f} in the search): "
              f"{v.config['iterations']} iterations on {len(plan.images)} images x seeds {plan.seeds}",
              flush=True)
