"""Command-line flags for every TrialConfig and StudyConfig field, and the configs they build.

Flags default to None so that only what a user typed overrides the config file, which in
turn overrides the dataclass defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from typing import Literal, get_args, get_origin, get_type_hints

from study.config import METRICS, SCHEDULERS, StudyConfig, TrialConfig, load_config_file
from study.paths import JsonObject

STUDY_CHOICES = {"metric": tuple(METRICS), "scheduler": SCHEDULERS}

# Flags whose names differ from the field (the spelling).
FLAG_NAMES = {"images": "--image"}
# Defaults shown as a user thinks of them, not as the float they are.
DEFAULT_TEXT = {"sigma": "25/255", "stop_rule": "holdout for denoise, eswmv otherwise"}


# Resolved once: get_type_hints evaluates every annotation of the class on each call.
HINTS = get_type_hints(TrialConfig)


def _field_type(f: dataclasses.Field) -> tuple[type, tuple[str, ...] | None]:
    t = HINTS[f.name]
    if get_origin(t) is Literal:
        return str, get_args(t)
    return t, None


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrialConfig field; the default is shown but only typed flags apply."""
    g = p.add_argument_group("trial configuration (defaults in brackets)")
    for f in dataclasses.fields(TrialConfig):
        if f.name in skip:
            continue
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        if f.name == "images":
            g.add_argument(flag, dest="images", nargs="+", default=None, metavar="NAME_OR_PATH",
                           help=f"bundled image name, PNG/JPEG file or folder [{' '.join(f.default)}]")
            continue
        typ, choices = _field_type(f)
        if typ is bool:  # a switch: `--sigma-estimate` sets it (type=bool would read "False" as true)
            g.add_argument(flag, dest=f.name, action="store_const", const=True, default=None,
                           help=f"[{f.default}]")
            continue
        g.add_argument(flag, dest=f.name, type=typ, default=None, metavar=None if choices else typ.__name__.upper(),
                       help=f"[{DEFAULT_TEXT.get(f.name, f.default)}]" + (f" one of: {', '.join(choices)}" if choices else ""))


def config_overrides(ns: argparse.Namespace) -> JsonObject:
    names = {f.name for f in dataclasses.fields(TrialConfig)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def build_config(ns: argparse.Namespace, base: JsonObject | None = None) -> TrialConfig:
    """Defaults <- --config FILE <- base <- typed flags. Raises ValueError on bad input."""
    d: JsonObject = {}
    if getattr(ns, "config", None):
        d.update(load_config_file(ns.config))
    d.update(base or {})
    d.update(config_overrides(ns))
    return TrialConfig.from_dict(d)


# --- study flags, generated from StudyConfig like the trial flags above ---

# Field -> flag where the spelling differs; `seed` seeds both Optuna and the trials.
STUDY_FLAG_NAMES = {"space_file": "--space", "seed": "--seed", "objectives": "--objective"}
STUDY_METAVARS = {"objectives": "METRIC[:max|min]"}  # list settings' metavars (default NAME)
STUDY_DESTS = {"seed": "study_seed"}
# Not flags: the trial config has its own; name/root have defaults computed by the CLI.
STUDY_SKIP = ("trial",)
STUDY_DEFAULT_TEXT = {"name": "demo-TIMESTAMP", "root": "./studies, made absolute",
                      "grace_period": "iterations/4", "tracking_uri": "sqlite:///ROOT/mlflow.db",
                      "storage": "ROOT/NAME/ray", "address": "local Ray",
                      "gpus_per_trial": "auto", "max_concurrent": "as many as fit",
                      "checkpoint_every": "about 10 per trial", "space_file": "the default space",
                      "warm_start": "none", "objectives": "--metric alone"}


def _field_comments(cls: type) -> dict[str, str]:
    """The comment beside each field in the class source: the one description of a
    setting, so help text cannot drift from it."""
    src = inspect.getsource(cls)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.*)$", src, re.M)}


def add_study_flags(p: argparse.ArgumentParser) -> None:
    """One flag per StudyConfig field; defaults in brackets come from the dataclass."""
    hints, comments = get_type_hints(StudyConfig), _field_comments(StudyConfig)
    g = p.add_argument_group("study settings (defaults in brackets)")
    for f in dataclasses.fields(StudyConfig):
        if f.name in STUDY_SKIP:
            continue
        flag = STUDY_FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        dest = study_dest(f.name)
        default = STUDY_DEFAULT_TEXT.get(f.name, f.default)
        text = f"{comments.get(f.name, '')} [{default}]"
        if f.name in STUDY_CHOICES:
            text += " one of: " + ", ".join(STUDY_CHOICES[f.name])
        if hints[f.name] is bool:
            g.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=text)
        elif get_origin(hints[f.name]) is tuple:  # a list setting: the flag repeats
            g.add_argument(flag, dest=dest, action="append", default=None,
                           metavar=STUDY_METAVARS.get(f.name, "NAME"),
                           help=text.replace("%", "%%") + " (repeatable)")
        else:
            g.add_argument(flag, dest=dest, type=hints[f.name], default=None,
                           metavar=hints[f.name].__name__.upper(), help=text.replace("%", "%%"))


def study_dest(name: str) -> str:
    """The parser attribute of a study or trial field: `seed` seeds the whole study on `run`."""
    return STUDY_DESTS.get(name, name)


def study_overrides(ns: argparse.Namespace) -> JsonObject:
    """The study settings a user typed (the trial ones go through `build_config`)."""
    out = {}
    for f in dataclasses.fields(StudyConfig):
        v = getattr(ns, study_dest(f.name), None)
        if f.name not in STUDY_SKIP and v is not None:
            out[f.name] = v
    return out
