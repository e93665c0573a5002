"""The commands that answer a study's question: `report` (what the study found) and
`apply` (the best configuration on a user's own image), and the `run --preset` hook.

run_study.py registers them with `add_answer_parsers(sub)`; heavy imports (torch,
matplotlib, mlflow) happen inside the command functions.
"""
from __future__ import annotations

import argparse
import urllib.parse
from pathlib import Path

from study.cli.common import root as common_root
from study.cli.common import add_threads_flag, set_threads, user_error
from study.cli.presets import add_preset_flag, apply_preset

__all__ = ["add_answer_parsers", "apply_preset", "cmd_apply", "cmd_report", "study_links"]


def _report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a study's report: per mode and image, baselines, Optuna's view",
                       description="Write a self-contained Markdown report with PNG figures for study "
                       "NAME (under ROOT/NAME/report unless --out) and log it to the study's parent run.")
    p.add_argument("study", metavar="NAME")
    p.add_argument("--root", help="the study's root [./studies]")
    p.add_argument("--out", metavar="DIR", help="folder for report.md and its figures [ROOT/NAME/report]")
    p.add_argument("--no-baseline", action="store_true", help="skip the BM3D/bicubic baseline")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    p.set_defaults(func=cmd_report)


def cmd_report(ns: argparse.Namespace) -> int:
    from study import report

    try:
        root = common_root(ns)
        out = Path(ns.out).absolute() if ns.out else None
        path = report.make_report(root, ns.study, out, baseline=not ns.no_baseline, log=not ns.no_log)
    except ValueError as e:
        return user_error(e)
    print(f"report written to {path}")
    return 0


def _apply_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="restore your own degraded image with a (best) configuration",
                       description="Restore IMAGE (the observation as it is: no clean image needed) "
                       "with the configuration in --config (a study export or a config JSON), at "
                       "its native size; writes --out and a JSON beside it.")
    p.add_argument("--config", required=True, metavar="FILE.json", help="best.json from export, or a config")
    p.add_argument("--image", required=True, metavar="MY.png", help="the degraded image (gray or colour)")
    p.add_argument("--out", required=True, metavar="RESTORED.png", help="where to write the restored image")
    p.add_argument("--task", choices=("denoise", "inpaint", "sr"),
                   help="what the image needs [the config's task if it is one of these, else denoise]")
    p.add_argument("--mask", metavar="MASK.png", help="inpaint: white = known pixel, black = missing")
    p.add_argument("--sr-factor", type=int, help="sr: the output is this many times larger [the config's]")
    p.add_argument("--stop", choices=("auto",), help="auto: stop by the no-reference rule "
                   "(--stop-rule) instead of after the config's iterations [the config's stop]")
    p.add_argument("--iterations", type=int, help="iterations without --stop auto [the config's]")
    p.add_argument("--max-iterations", type=int, default=10000, help="--stop auto: at most this many [10000]")
    p.add_argument("--window", type=int, help="ES-WMV window [the config's; paper: 100]")
    p.add_argument("--patience", type=int, help="iterations without improvement before the rule fires [the config's; ES-WMV paper: 1000]")
    p.add_argument("--stop-rule", help="--stop auto: eswmv or holdout (held-out pixels, denoise) "
                   "[the config's; a denoise config's is holdout by default; other tasks: eswmv]")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N [the config's]")
    p.add_argument("--sigma", help="denoise: the noise sigma on [0, 1] (0.098 for 25/255), or auto: "
                   "estimated from the image, one value over a colour image's channels [auto]")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_threads_flag(p)
    p.set_defaults(func=cmd_apply)


def _apply_config(ns: argparse.Namespace):  # noqa: ANN202 - TrialConfig, imported here
    from study.config import TrialConfig, load_config_file

    d = load_config_file(ns.config)
    d.pop("images", None)  # the user's image replaces the study's (recorded in the JSON)
    for k in ("iterations", "device"):
        if getattr(ns, k) is not None:
            d[k] = getattr(ns, k)
    return TrialConfig.from_dict(d)


def cmd_apply(ns: argparse.Namespace) -> int:
    from study.engine.apply import APPLY_TASKS, ApplyOptions, apply
    from study.paths import check_writable

    try:
        set_threads(ns.threads)
        cfg = _apply_config(ns)
        task = ns.task or (cfg.task if cfg.task in APPLY_TASKS else "denoise")
        opts = ApplyOptions(task=task, mask=ns.mask, sr_factor=ns.sr_factor or cfg.sr_factor,
                            stop=ns.stop or "config", window=ns.window, patience=ns.patience,
                            max_iterations=ns.max_iterations, quiet=ns.quiet, sigma=ns.sigma,
                            stop_rule=ns.stop_rule)
        out = Path(ns.out).absolute()
        check_writable(out.parent, "--out folder")
        apply(cfg, ns.image, out, opts, progress=lambda s: print(s, flush=True))
    except ValueError as e:
        return user_error(e)
    except FloatingPointError as e:
        return user_error(e, code=1)
    return 0


def study_link(base: str, experiment_id: str, metric: str, mode: str, tracking_uri: str = "") -> str:
    """The MLflow UI's runs table of one study: its saved view (study/tracking/view.py: the
    trials, best first, a column per objective and searched parameter, in the training
    workflow); for a study recorded before it, the trial runs best `metric` first from URL
    parameters (`searchFilter`, `orderByKey`, `orderByAsc`, MLflow 3.17)."""
    from study.tracking import view

    if tracking_uri and view.has_trials_view(tracking_uri, experiment_id):
        return view.trials_link(base, experiment_id)
    query = urllib.parse.urlencode({
        "searchFilter": "tags.`dip.role` = 'trial'", "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": "true" if mode == "min" else "false", "workflowType": view.WORKFLOW},
        quote_via=urllib.parse.quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def study_links(root: str, host: str, port: int, limit: int = 10) -> list[str]:
    """One line per study under `root` (the latest `limit`): its name and runs-table link."""
    from study.studydir import read_record, study_files

    lines = []
    for path in study_files(root)[-limit:]:
        try:
            meta = read_record(path)
            metric = meta.study.metric
            link = study_link(f"http://{host}:{port}", meta.experiment_id, metric, meta.study.mode,
                              meta.study.resolved_tracking_uri)
        except (OSError, ValueError, KeyError):
            continue  # a study.json being written, or of another format: no link
        lines.append(f"  {path.parent.name}: {link}")
    return lines


def add_answer_parsers(sub: argparse._SubParsersAction) -> None:
    """`report` and `apply`, and `--preset` on the existing `run` parser."""
    _report_parser(sub)
    _apply_parser(sub)
    if "run" in sub.choices:
        add_preset_flag(sub.choices["run"])
