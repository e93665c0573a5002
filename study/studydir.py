"""The study folder, ROOT/NAME: its record study.json (StudyRecord, one StudyStage per
`extend`), read, written and listed here only.

    ROOT/mlflow.db                 the MLflow store (unless --tracking-uri names a server)
    ROOT/artifacts/NAME/           MLflow artifacts of study NAME (local store)
    ROOT/NAME/study.json           the StudyConfig and the ids of its experiment and parent run
    ROOT/NAME/ray/tune/            Ray Tune's results, checkpoints and searcher (Optuna) state
    ROOT/NAME/trials.json          which trials started and which the driver saw end
    ROOT/NAME/spool/               MLflow records waiting for the server (empty when delivered)
    ROOT/NAME/best.json            the exported best configuration
    ROOT/NAME/report/              the study's report
    ROOT/NAME/confirm.json         the latest finished confirmation (study/confirm.py)
    ROOT/NAME/confirm/KEY/         one confirm command's plan, its re-runs' ends, its confirm.json
    ROOT/NAME/ray/confirm-KEY/     its Tune experiment
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from study.config import StudyConfig, check_keys
from study.modes import LEGACY_DEFAULTS
from study.paths import JsonObject, write_json

STUDY_FILE = "study.json"
CONFIRM_FILE = "confirm.json"


@dataclass(frozen=True)
class StudyStage:
    """One `extend` of a study: its own Tune experiment, the whole study's trial count."""

    study: StudyConfig           # the settings this stage runs with
    added: int                   # trials it adds
    first_trial: int             # number of its first trial (trial_NNNN)
    created: str                 # local time it started

    def to_dict(self) -> JsonObject:
        return {**dataclasses.asdict(self), "study": self.study.to_dict()}

    @classmethod
    def from_dict(cls, d: JsonObject) -> "StudyStage":
        check_keys(cls, d, "study stage key")
        return cls(**{**d, "study": StudyConfig.from_dict(_legacy(d["study"]))})


def _legacy(study: JsonObject) -> JsonObject:
    """A saved study's settings with the defaults of the time it was written where a field
    postdates it (study/modes.py LEGACY_DEFAULTS): a resumed study keeps its stop rule."""
    trial = study.get("trial")
    if not isinstance(trial, dict):
        return study
    return {**study, "trial": {**LEGACY_DEFAULTS, **trial}}


@dataclass(frozen=True)
class StudyRecord:
    """ROOT/NAME/study.json: a study's settings and where MLflow keeps it."""

    study: StudyConfig           # the settings of its first `run`
    experiment_id: str           # its MLflow experiment
    parent_run_id: str           # its MLflow parent run
    space: JsonObject            # the search space's spec (study/space.py)
    created: str                 # local time it started
    extensions: tuple[StudyStage, ...] = ()  # every `extend`, oldest first

    @property
    def current(self) -> StudyConfig:
        """The settings as the latest stage runs them (a `resume` continues that one)."""
        return self.extensions[-1].study if self.extensions else self.study

    def moved_to(self, root: str) -> "StudyRecord":
        """The record as read from ROOT: a study root copied or moved elsewhere (rsync from a
        cluster's head to a laptop) works where it now lies, not where it was made. Its default
        MLflow store (ROOT/mlflow.db) moves with it; a `--tracking-uri` it named stays."""
        if Path(self.study.root).resolve() == Path(root).resolve():
            return self
        return dataclasses.replace(
            self, study=dataclasses.replace(self.study, root=root),
            extensions=tuple(dataclasses.replace(e, study=dataclasses.replace(e.study, root=root))
                             for e in self.extensions))

    def extended(self, stage: StudyStage) -> "StudyRecord":
        return dataclasses.replace(self, extensions=(*self.extensions, stage))

    def to_dict(self) -> JsonObject:
        return {"study": self.study.to_dict(), "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id, "space": self.space, "created": self.created,
                "extensions": [e.to_dict() for e in self.extensions]}

    @classmethod
    def from_dict(cls, d: JsonObject) -> "StudyRecord":
        check_keys(cls, d, "study.json key")
        return cls(**{**d, "study": StudyConfig.from_dict(_legacy(d["study"])),
                      "extensions": tuple(StudyStage.from_dict(e) for e in d.get("extensions") or ())})


def record_path(root: str, name: str) -> Path:
    return Path(root) / name / STUDY_FILE


def study_files(root: str) -> list[Path]:
    """Every study record under `root`, oldest first (by when it was last written)."""
    if not Path(root).is_dir():
        return []
    return sorted(Path(root).glob(f"*/{STUDY_FILE}"), key=lambda p: p.stat().st_mtime)


def study_names(root: str) -> list[str]:
    return sorted(p.parent.name for p in study_files(root))


def exists(s: StudyConfig) -> bool:
    return (s.study_dir / STUDY_FILE).exists()


def read_record(path: Path) -> StudyRecord:
    """One study.json; ValueError with a sentence when it is not one this version reads."""
    try:
        return StudyRecord.from_dict(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a study record this version can read ({e}); "
                         "it must hold study, experiment_id, parent_run_id, space and created") from None


def read_study(root: str, name: str) -> StudyRecord:
    path = record_path(root, name)
    if not path.is_file():
        raise ValueError(f"no study {name!r} under {root!r}; studies there: {', '.join(study_names(root)) or 'none'}")
    return read_record(path).moved_to(root)


def write_study(record: StudyRecord) -> None:
    write_json(record.study.study_dir / STUDY_FILE, record.to_dict())


def confirm_dir(s: StudyConfig, key: str) -> Path:
    """Where confirm command KEY keeps its plan (study/confirm.py plan_key)."""
    return s.study_dir / "confirm" / key
