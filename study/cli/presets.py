"""Study presets: a named YAML file of study settings, a base trial config, a search
space and per-hardware profiles, applied under what the user types.

`run --preset NAME` reads presets/NAME.yaml; `run --preset PATH.yaml` reads any file, so a
user extends the set by writing one (see presets/compare-modes.yaml). Precedence, lowest
first: the dataclass defaults, the preset (its profile over its `trial`), `--config`, the
typed flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from study.cli.flags import study_dest
from study.config import TrialConfig, load_config_file
from study.paths import Json, JsonObject

PRESET_DIR = Path(__file__).resolve().parents[2] / "presets"
PRESET_KEYS = ("description", "study", "trial", "space", "profiles")
PROFILES = ("cpu", "gpu")
# Preset `study` keys: the StudyConfig fields a preset may set (to the `run` parser's names
# through flags.study_dest, the one owner of renames such as seed -> study_seed).
STUDY_KEYS = ("name", "num_samples", "metric", "objectives", "scheduler", "grace_period", "max_concurrent",
              "cpus_per_trial", "gpus_per_trial", "image_every", "seed")


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    study: JsonObject              # StudyConfig settings (STUDY_KEYS)
    trial: JsonObject              # TrialConfig fields
    space: Path | None
    profiles: dict[str, JsonObject]  # per profile (PROFILES): TrialConfig fields over `trial`


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.endswith(".space"))


def find_preset(spec: str) -> Path:
    p = Path(spec)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or "/" in spec:
        if not p.is_file():
            raise ValueError(f"preset file {spec!r} does not exist")
        return p.absolute()
    q = PRESET_DIR / f"{spec}.yaml"
    if not q.is_file():
        raise ValueError(f"unknown preset {spec!r}; allowed: {', '.join(list_presets())} or a path to a YAML file")
    return q


def _mapping(data: JsonObject, key: str, path: Path) -> JsonObject:
    v = data.get(key) or {}
    if not isinstance(v, dict):
        raise ValueError(f"preset {str(path)!r}: `{key}` must be a mapping, got {v!r}")
    return v


def load_preset(spec: str) -> Preset:
    path = find_preset(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"preset {str(path)!r} cannot be read as YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"preset {str(path)!r} must hold a mapping with keys {', '.join(PRESET_KEYS)}")
    unknown = sorted(set(data) - set(PRESET_KEYS))
    if unknown:
        raise ValueError(f"preset {str(path)!r}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(PRESET_KEYS)}")
    study = _mapping(data, "study", path)
    bad = sorted(set(study) - set(STUDY_KEYS))
    if bad:
        raise ValueError(f"preset {str(path)!r}: unknown study setting(s) {', '.join(bad)}; "
                         f"allowed: {', '.join(STUDY_KEYS)}")
    profiles = _mapping(data, "profiles", path)
    if set(profiles) - set(PROFILES):
        raise ValueError(f"preset {str(path)!r}: unknown profile(s) {', '.join(sorted(set(profiles) - set(PROFILES)))}; "
                         f"allowed: {', '.join(PROFILES)}")
    trial = _mapping(data, "trial", path)
    for d in (trial, *profiles.values()):
        _check_trial_keys(d, path)
    space = data.get("space")
    space_path = (path.parent / space).absolute() if space else None
    if space_path is not None and not space_path.is_file():
        raise ValueError(f"preset {str(path)!r}: space file {str(space_path)!r} does not exist")
    return Preset(path.stem, path, str(data.get("description", "")), study, trial, space_path,
                  {k: dict(v or {}) for k, v in profiles.items()})


def _check_trial_keys(d: Json, path: Path) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"preset {str(path)!r}: a trial section must be a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(TrialConfig)}
    bad = sorted(set(d) - names)
    if bad:
        raise ValueError(f"preset {str(path)!r}: unknown config field(s) {', '.join(bad)}; "
                         f"allowed: {', '.join(sorted(names))}")


def choose_profile(preset: Preset, gpus_per_trial: float | None) -> str:
    return "gpu" if gpus_per_trial is not None and gpus_per_trial > 0 else "cpu"


def preset_values(preset: Preset, profile: str) -> JsonObject:
    """The run-parser attributes the preset sets."""
    trial = {**preset.trial, **preset.profiles.get(profile, {})}
    values = {study_dest(k): v for k, v in {**trial, **preset.study}.items()}
    if preset.space is not None:
        values["space_file"] = str(preset.space)
    values.setdefault("name", f"{preset.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return values


def apply_preset(ns: argparse.Namespace) -> argparse.Namespace:
    """A copy of `ns` with the preset's values where the user typed nothing (and, for
    trial fields, where a --config file does not set them). No preset: `ns` unchanged."""
    spec = getattr(ns, "preset", None)
    if not spec:
        return ns
    preset = load_preset(spec)
    profile = choose_profile(preset, getattr(ns, "gpus_per_trial", None))
    values = preset_values(preset, profile)
    in_config = set(load_config_file(ns.config)) if getattr(ns, "config", None) else set()
    out = argparse.Namespace(**vars(ns))
    typed_objectives = getattr(ns, "objectives", None)
    overridden = []
    for k, v in values.items():
        if k == "metric" and typed_objectives:  # typed objectives replace the preset's metric
            overridden.append(f"metric by --objective {typed_objectives[0]}")
        elif getattr(out, k, None) is None and k not in in_config:
            setattr(out, k, tuple(v) if k == "images" else v)
        elif k != "name":
            now = "from --config" if getattr(out, k, None) is None else _shown(getattr(out, k))
            overridden.append(f"{k} {now} (preset: {_shown(v)})")
    print(f"preset {preset.name} ({profile} profile): {preset.description}"
          + (f"; overridden: {', '.join(overridden)}" if overridden else ""), flush=True)
    return out


def _shown(v: object) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def add_preset_flag(p: argparse.ArgumentParser) -> None:
    names = ", ".join(list_presets())
    p.add_argument("--preset", metavar="NAME_OR_FILE",
                   help=f"a study preset: {names}, or a YAML file of your own (see presets/); "
                   "typed flags override it")
