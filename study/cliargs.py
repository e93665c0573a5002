"""Command-line flags for every TrialConfig field, and the config they build.

Flags default to None so that only what a user typed overrides the config file, which in
turn overrides the dataclass defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal, get_args, get_origin, get_type_hints

from study.config import TrialConfig, load_config_file

# Flags whose names differ from the field (the spelling).
FLAG_NAMES = {"images": "--image"}


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
        g.add_argument(flag, dest=f.name, type=typ, default=None, metavar=None if choices else typ.__name__.upper(),
                       help=f"[{f.default}]" + (f" one of: {', '.join(choices)}" if choices else ""))


def config_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrialConfig)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}


def build_config(ns: argparse.Namespace, base: dict[str, Any] | None = None) -> TrialConfig:
    """Defaults <- --config FILE <- base <- typed flags. Raises ValueError on bad input."""
    d: dict[str, Any] = {}
    if getattr(ns, "config", None):
        d.update(load_config_file(ns.config))
    d.update(base or {})
    d.update(config_overrides(ns))
    return TrialConfig.from_dict(d)
