"""The search space: what Optuna proposes for each trial (define-by-run), and the space
file (YAML or JSON) that narrows or widens it; also the study's Optuna record (optuna.db)
and Optuna's plots of it for the report. The only module that imports optuna.

A space file maps a TrialConfig field to one of:
    [a, b, c]               categorical choice
    {low: x, high: y}       a range (add `log: true` for a log scale; ints stay ints)
    value                   fixed: not searched
Example:
    noise_mode: [uniform, ddpm, ddpm_resample]
    timestep: {low: 0, high: 300}
    lr: {low: 1.0e-4, high: 0.1, log: true}
    channels: [16, 32]
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import optuna
import yaml

from study.config import TrialConfig
from study.paths import Json, JsonObject
from study.modes import LOSS_ONLY, NOISE_MODES, loss_uses, mode_searches, mode_uses

# The default space: every input mode, t over the useful range of the linear schedule
# (alpha_bar_300 = 0.39: past that little of the image survives), lr on a log scale.
DEFAULT_SPACE: JsonObject = {
    "noise_mode": list(NOISE_MODES),
    "timestep": {"low": 0, "high": 300},
    "lr": {"low": 1e-4, "high": 1e-1, "log": True},
}
NOT_SEARCHABLE = ("images", "device", "iterations", "report_every", "seed")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str                     # "choice", "int", "float" or "fixed"
    choices: tuple = ()
    low: float = 0
    high: float = 0
    log: bool = False

    def suggest(self, trial: optuna.Trial) -> Json:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The distribution `suggest` records: equal to it, or TPE would not see the trials
        a warm start adds (it reads only trials whose distribution matches its own)."""
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)

    def contains(self, v: Json) -> bool:
        """Whether `suggest` could have proposed `v`."""
        if self.kind in ("choice", "fixed"):
            return v in self.choices
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        whole = isinstance(v, int) if self.kind == "int" else number
        return number and whole and self.low <= v <= self.high

    def extremes(self) -> list[Json]:
        """Values to check against the base config: every choice, every integer of a range
        that is not huge (a size range holds sizes the network's scales do not divide),
        else the ends."""
        if self.kind in ("choice", "fixed"):
            return list(self.choices)
        if self.kind == "int":
            lo, hi = int(self.low), int(self.high)
            return list(range(lo, hi + 1)) if hi - lo <= 5000 else [lo, hi]
        return [self.low, self.high]

    def to_spec(self) -> Json:
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "fixed":
            return self.choices[0]
        return {"low": self.low, "high": self.high, "log": self.log}


def _parse_param(name: str, spec: Json, base: TrialConfig) -> Param:
    default = getattr(base, name)
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"space parameter {name!r} has an empty list of choices")
        return Param(name, "choice", tuple(spec))
    if isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(spec):
            raise ValueError(f"space parameter {name!r} must be {{low, high[, log]}}, got {spec!r}")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"space parameter {name!r}: low and high must be numbers, got {spec!r}")
        if low > high:
            raise ValueError(f"space parameter {name!r}: low = {low} is above high = {high}")
        if log and low <= 0:
            raise ValueError(f"space parameter {name!r}: a log range needs low > 0, got {low}")
        kind = "int" if isinstance(default, int) and not isinstance(default, bool) else "float"
        if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
            raise ValueError(f"space parameter {name!r} is an integer; got range {low}..{high}")
        return Param(name, kind, (), low, high, log)
    return Param(name, "fixed", (spec,))


class SearchSpace:
    """Parsed, validated space; callable as Optuna's define-by-run function (a class, not a
    closure, so Ray can pickle it into the searcher's checkpoint)."""

    # The base config's loss (what a trial not asked `loss` trains with); a class default
    # too, so a space pickled before the field existed (a resumed study) still loads.
    base_loss = "mse"

    def __init__(self, spec: JsonObject, base: TrialConfig):
        if not isinstance(spec, dict) or not spec:
            raise ValueError("a search space must be a non-empty mapping of parameter to range")
        fields = {f.name for f in dataclasses.fields(TrialConfig)}
        for name in spec:
            if name not in fields or name in NOT_SEARCHABLE:
                allowed = sorted(fields - set(NOT_SEARCHABLE))
                raise ValueError(f"unknown search-space parameter {name!r}; allowed: {', '.join(allowed)}")
        # Fields that hang on the loss (study/modes.py LOSS_ONLY) come after it, so the
        # trial's loss is known when they are asked; the others keep the file's order.
        order = sorted(spec, key=lambda n: n in LOSS_ONLY)
        self.params = [_parse_param(n, spec[n], base) for n in order]
        self.base_loss = base.loss
        self.spec = {p.name: p.to_spec() for p in self.params}
        self._check(base)

    def _check(self, base: TrialConfig) -> None:
        """Every value the space can propose must make a valid TrialConfig, with each mode
        of the space it is applied to (`_applies`)."""
        modes = next((p.extremes() for p in self.params if p.name == "noise_mode"), [base.noise_mode])
        for p in self.params:
            loss = LOSS_ONLY.get(p.name, (base.loss,))[0]  # a loss that uses the field
            for v in p.extremes():
                for mode in ([v] if p.name == "noise_mode" else [m for m in modes if _applies(p, m, loss)]):
                    try:
                        base.replace(**{"noise_mode": mode, p.name: v})
                    except (ValueError, TypeError) as e:
                        raise ValueError(f"search space: {p.name} = {v!r} is not allowed: {e}") from None

    def __call__(self, trial: optuna.Trial) -> JsonObject:
        """Define-by-run: suggest each parameter; those a mode does not use are skipped, so
        Optuna's history holds only values that mattered (study/modes.py MODE_ONLY,
        SEARCHED_ONLY).
        Returns the fixed values."""
        chosen: JsonObject = {}
        fixed: JsonObject = {}
        for p in self.params:
            mode = chosen.get("noise_mode", fixed.get("noise_mode"))
            loss = chosen.get("loss", fixed.get("loss", self.base_loss))
            if not _applies(p, mode, loss):
                continue
            if p.kind == "fixed":
                fixed[p.name] = p.choices[0]
            else:
                chosen[p.name] = p.suggest(trial)
        return fixed

    def mode_points(self, n: int, tried: set[str] = frozenset()) -> list[JsonObject]:
        """A study's first trials when it searches `noise_mode`: one per mode the space
        offers that `tried` lacks, in the space's order, at most `n` (OptunaSearch's
        points_to_evaluate). TPE's random start-up alone can miss modes: the demo's 8 trials
        with seed 0 drew gaussian 6 times and ddpm_random_t twice. Only the mode is set;
        the sampler draws the rest as in its start-up, so these trials still explore t and
        lr (the base config's values may even lie outside the space's ranges)."""
        p = next((p for p in self.params if p.name == "noise_mode" and p.kind == "choice"), None)
        modes = [m for m in dict.fromkeys(p.choices) if m not in tried] if p else []
        return [{"noise_mode": m} for m in modes[:max(n, 0)]]


def _applies(p: Param, mode: str | None, loss: str) -> bool:
    """Whether a trial of input mode `mode` (None: not known here, any) and loss `loss`
    takes `p`: a fixed value wherever the mode uses the field (study/modes.py MODE_ONLY),
    a searched one where the space asks it for that mode (SEARCHED_ONLY: `loss` for the
    DDPM modes only); either only where the loss uses it (LOSS_ONLY: `sigma_estimate`
    for SURE only)."""
    if not loss_uses(p.name, loss):
        return False
    if mode is None:
        return True
    return mode_uses(p.name, mode) if p.kind == "fixed" else mode_searches(p.name, mode)


def load_space(path: str | None, base: TrialConfig) -> SearchSpace:
    """The default space, or the one in a YAML/JSON file."""
    if path is None:
        return SearchSpace(dict(DEFAULT_SPACE), base)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read space file {path!r}: {e.strerror}") from None
    try:
        spec = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"space file {path!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    return SearchSpace(spec, base)


def make_sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE, seeded, so a study's proposals repeat for the same seed. TPE is also Optuna 5's
    default sampler for several objectives (MOTPE): one sampler for both kinds of study."""
    return optuna.samplers.TPESampler(seed=seed)


OPTUNA_DB = "optuna.db"  # under the study's folder: ROOT/NAME/optuna.db


def make_storage(path: Path) -> optuna.storages.RDBStorage:
    """The study's Optuna record on sqlite. Ray's OptunaSearch loads the study of that name
    if it exists, so every trial ever asked stays there: `extend` conditions the sampler
    on them, the report reads them, `optuna-dashboard sqlite:///PATH` opens them."""
    # A reader (the report, optuna-dashboard) may hold the file for a moment: wait for it.
    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 30}})


def load_optuna_study(study_dir: str | Path, name: str) -> optuna.Study | None:
    """The study's Optuna record (ROOT/NAME/optuna.db, study `name`) for the report, or
    None if it has none (a study run before the record existed)."""
    path = Path(study_dir) / OPTUNA_DB
    if not path.is_file():
        return None
    try:
        return optuna.load_study(study_name=name, storage=make_storage(path))
    except KeyError:  # the file exists but holds no study of that name
        return None


def tried_modes(study_dir: str | Path, name: str) -> set[str]:
    """The input modes the study's Optuna record holds a trial of, in any state (queued
    ones included), so that `extend` does not queue them again."""
    study = load_optuna_study(study_dir, name)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    return {t.params.get("noise_mode") or t.system_attrs.get("fixed_params", {}).get("noise_mode")
            for t in trials} - {None}


def optuna_figures(study_dir: str | Path, name: str, out: Path,
                   first_name: str = "Objective Value") -> list[tuple[str, str]]:
    """Optuna's own view of the study (optimisation history, importances, slices) as PNGs
    under `out`, for the report: (file name, title) per plot, or ("", why not drawn); none
    if the study has no Optuna record. The caller picks the matplotlib backend."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    study = load_optuna_study(study_dir, name)
    if study is None:
        return []
    # Several objectives: Optuna plots one, the first (the report draws the front itself).
    first = {"target": lambda t: t.values[0], "target_name": first_name} if len(study.directions) > 1 else {}
    made = []
    for fname, title, plot in (("optuna_history.png", "optimisation history", ovm.plot_optimization_history),
                               ("optuna_importances.png", "parameter importances", ovm.plot_param_importances),
                               ("optuna_slice.png", "slice plot", ovm.plot_slice)):
        try:
            with warnings.catch_warnings():  # "experimental" since optuna 2.2; tight_layout notes
                warnings.simplefilter("ignore")
                ax = plot(study, **first)
        except (ValueError, RuntimeError) as e:  # e.g. too few finished trials
            made.append(("", f"{title}: not drawn ({e})"))
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fig.tight_layout()
        fig.savefig(Path(out) / fname, dpi=110)
        plt.close(fig)
        made.append((fname, title))
    return made


# --- The warm start (study/warmstart.py): earlier studies' trials in a new study's record ---

WARM_START_ATTR = "warm_start_from"  # user attr of a trial a warm start added: the study it came from


@dataclasses.dataclass(frozen=True)
class EarlierTrial:
    """A finished trial of an earlier study, as its Optuna record holds it."""

    study: str
    number: int                  # its number in that study's record
    params: JsonObject       # what the sampler proposed (fixed values are not in it)
    values: tuple[float, ...]    # that study's objectives, in its order

    @property
    def value(self) -> float:
        """Its first objective's value (the only one of a single-objective study)."""
        return self.values[0]


def finished_trials(study_dir: str | Path, name: str) -> list[EarlierTrial]:
    """The study's own COMPLETE trials (not those it was warm-started with itself: name that
    study to start from them), with every objective's value; none without a record."""
    try:
        study = load_optuna_study(study_dir, name)
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if study else []
    except Exception as e:  # noqa: BLE001 - sqlalchemy's and sqlite's errors on a damaged file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"the Optuna record of study {name!r} ({str(Path(study_dir) / OPTUNA_DB)!r}) "
                         f"cannot be read ({first}); restore it or leave that study out") from None
    return [EarlierTrial(name, t.number, dict(t.params), tuple(t.values)) for t in trials
            if WARM_START_ATTR not in t.user_attrs and t.values]


def fits(space: SearchSpace, params: JsonObject) -> bool:
    """Whether the new `space` could have asked a trial with these `params` (an earlier
    study's Optuna record): the very names `SearchSpace.__call__` suggests for the trial's
    input mode, each value inside its distribution."""
    asked, mode, loss = set(), None, space.base_loss
    for p in space.params:
        if not _applies(p, mode, loss):
            continue
        if p.kind == "fixed":
            mode = p.choices[0] if p.name == "noise_mode" else mode
            loss = p.choices[0] if p.name == "loss" else loss
            continue
        if p.name not in params or not p.contains(params[p.name]):
            return False
        asked.add(p.name)
        mode = params[p.name] if p.name == "noise_mode" else mode
        loss = params[p.name] if p.name == "loss" else loss
    return asked == set(params)


def add_warm_trials(study_dir: str | Path, name: str, modes: list[str], space: SearchSpace,
                    trials: list[tuple[EarlierTrial, list[float]]]) -> int:
    """Create study `name`'s Optuna record (ROOT/NAME/optuna.db, a direction per objective,
    "max" or "min") holding each (earlier trial, its values) as a COMPLETE trial with the
    new space's distributions, marked WARM_START_ATTR; OptunaSearch then loads it. Returns
    the number added."""
    Path(study_dir).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=make_storage(Path(study_dir) / OPTUNA_DB), study_name=name,
                                directions=["maximize" if m == "max" else "minimize" for m in modes])
    dists = {p.name: p.distribution() for p in space.params if p.kind != "fixed"}
    study.add_trials([optuna.trial.create_trial(
        params=t.params, distributions={k: dists[k] for k in t.params},
        values=list(values), user_attrs={WARM_START_ATTR: t.study, "warm_start_number": t.number})
        for t, values in trials])
    return len(trials)


def warm_start_counts(study_dir: str | Path, name: str) -> dict[str, int]:
    """Trials of the study's Optuna record that a warm start added, per study they came from."""
    study = load_optuna_study(study_dir, name)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False) if study is not None else []:
        if WARM_START_ATTR in t.user_attrs:
            counts[t.user_attrs[WARM_START_ATTR]] = counts.get(t.user_attrs[WARM_START_ATTR], 0) + 1
    return counts
