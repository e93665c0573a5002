"""The parser of run_study.py: every command's parser, registered here."""
from __future__ import annotations

import argparse
import os
import sys

from study.cli.answer import add_answer_parsers
from study.cli.jobs import add_parsers as add_job_parsers
from study.cli.studies import add_study_parsers
from study.cli.train import add_train_parser

DESCRIPTION = """DIP study service: the command line. Parse, then call study.*.

    python run_study.py                  a small study on this machine (embedded defaults)
    python run_study.py train ...        one trial, no Ray, no MLflow
    python run_study.py run|resume|export|ui ...   a study on this machine or a cluster
    python run_study.py report|apply ...           the answer: a report, a restored image
    python run_study.py submit|status|logs|stop|list|extend ...   a study on a cluster, by name
"""


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_study.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    add_train_parser(sub)
    add_study_parsers(sub)
    add_answer_parsers(sub)  # report, apply, run --preset (study/cli/answer.py)
    add_job_parsers(sub)  # submit, status, logs, stop, list, extend (study/cli/jobs.py)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, but an unknown flag is refused with the subcommand's usage (argparse
    hands a subcommand's leftovers to the top-level parser, whose usage lists commands)."""
    ns, extra = parser.parse_known_args(argv)
    if ns.command is None:  # the bare command: a small study with the embedded defaults
        return _parse(parser, ["run", *argv])
    if extra:
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subs.choices[ns.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return ns


def main(argv: list[str] | None = None) -> int:
    # MLflow's "Downloading artifacts" bars (export, status, report) are noise in a terminal.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    ns = _parse(make_parser(), sys.argv[1:] if argv is None else argv)
    return ns.func(ns)
