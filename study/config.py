"""The one configuration object of a trial: built by the CLI, overridden by the search
space, rebuilt from Ray's dict in the trainable, logged to MLflow, written out by export.

Standard library only, so every layer can import it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

from study.modes import (DDPM_MODES, LEGACY_DEFAULTS, NOISE_MODES, STOP_RULES, NoiseMode, StopRuleChoice,
                         check_rule_metrics, check_stop_rule, check_sure, config_uses, default_stop_rule)
from study.objectives import METRICS, OBJECTIVE_METRICS, check_objectives, parse_objective, split
from study.paths import JsonObject

Task = Literal["denoise", "inpaint", "sr", "reconstruct"]
Schedule = Literal["linear", "cosine"]
Network = Literal["skip", "unet"]
Upsample = Literal["bilinear", "nearest"]
Loss = Literal["mse", "l1", "sure"]
Stop = Literal["budget", "auto"]
Color = Literal["auto", "gray", "rgb"]

TASKS: tuple[str, ...] = get_args(Task)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
NETWORKS: tuple[str, ...] = get_args(Network)
UPSAMPLES: tuple[str, ...] = get_args(Upsample)
LOSSES: tuple[str, ...] = get_args(Loss)
STOPS: tuple[str, ...] = get_args(Stop)
COLORS: tuple[str, ...] = get_args(Color)

# Images scikit-image 0.26 bundles (they load with no network). Others in skimage.data
# are fetched on first use and fail offline, so they are not offered.
BUNDLED_IMAGES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "checkerboard", "clock", "coffee",
    "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
    "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
    "shepp_logan_phantom", "text")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class TrialConfig:
    # --- data ---
    images: tuple[str, ...] = ("camera",)  # bundled names or paths to PNG/JPEG files or folders
    size: int = 64                # side of the square crop the images are resized to (px)
    color: Color = "auto"         # auto keeps each image's own channels; gray/rgb convert
    task: Task = "denoise"        # the degradation the network must undo
    sigma: float = 25 / 255       # denoise: std of the additive Gaussian noise on [0, 1]
    missing: float = 0.5          # inpaint: fraction of pixels hidden by the random mask
    sr_factor: int = 4            # sr: downsampling factor of the observation
    # --- network input ---
    noise_mode: NoiseMode = "ddpm"  # how the network input is made (see noise/inputs.py)
    timestep: int = 100           # DDPM t (ddpm modes; ddpm_random_t draws from 0..timestep)
    schedule: Schedule = "linear"  # DDPM beta schedule
    num_timesteps: int = 1000     # DDPM T
    input_depth: int = 32         # channels of the uniform/gaussian inputs (DIP reference: 32)
    reg_noise_std: float = 1 / 30  # uniform: std of the fresh perturbation per iteration
    # --- network ---
    net: Network = "skip"         # skip: DIP reference; unet: the original experiment's
    scales: int = 3               # encoder-decoder depth (reference: 5)
    channels: int = 32            # channels per scale, down and up (reference: 128)
    skip_channels: int = 4        # channels of each skip connection (reference: 4)
    upsample: Upsample = "bilinear"  # upsampling on the decoder path
    # --- optimisation ---
    lr: float = 0.01              # Adam learning rate (reference: 0.01)
    loss: Loss = "mse"            # mse as the reference; l1 as the original experiment; sure: Stein's
                                  # unbiased risk estimate (denoise, DDPM inputs; see study/engine/sure.py)
    iterations: int = 300         # optimisation steps (with stop = auto: at most this many)
    stop: Stop = "budget"         # budget: run every iteration; auto: end once ES-WMV fired on every network
    window: int = 100             # ES-WMV: outputs in the moving variance (Wang et al. 2023: 100)
    patience: int = 1000          # ES-WMV: iterations without a lower variance before it fires (paper: 1000)
    ema_weight: float = 0.99      # weight of the running average of outputs (reference: 0.99)
    eval_draws: int = 4           # stochastic inputs: outputs averaged over this many draws
    report_every: int = 25        # iterations between reports
    seed: int = 0                 # seeds network init, degradation and input draws
    repeats: int = 1              # networks per image, seeds seed..seed+repeats-1 (repeat r = a trial
                                  # with seed + r); the objective is the mean over images x repeats
    device: str = "auto"          # auto: cuda if available, else cpu
    sigma_estimate: bool = False  # loss sure: use the noise sigma estimated from each network's observation
                                  # (noise/sigma.py), not `sigma`; the degradation still adds `sigma`
    stop_rule: StopRuleChoice = "default"  # the no-reference stop (psnr_autostop; stop = auto): eswmv, or
                                  # holdout (denoise); default: holdout for denoise, eswmv otherwise
    holdout_fraction: float = 0.1  # holdout: fraction of pixels left out of the loss to stop on, in (0, 0.5]

    def __post_init__(self) -> None:
        # Ray and JSON hand lists back; keep the config hashable and comparable.
        if isinstance(self.images, (list, str)):
            object.__setattr__(
                self, "images", (self.images,) if isinstance(self.images, str) else tuple(self.images)
            )
        if self.stop_rule == "default":
            object.__setattr__(self, "stop_rule", default_stop_rule(self.task))
        validate(self)

    # --- derived ---
    @property
    def is_ddpm(self) -> bool:
        return self.noise_mode in DDPM_MODES

    @property
    def min_size(self) -> int:
        """Smallest side the network's scales divide (each scale halves the image)."""
        return 2 ** self.scales

    # --- round trip ---
    def to_dict(self) -> JsonObject:
        d = dataclasses.asdict(self)
        d["images"] = list(self.images)
        return d

    def used_dict(self) -> JsonObject:
        """The fields this trial's input mode (and loss) uses (what MLflow shows as its
        params: a uniform trial has no timestep); `to_dict` stays the complete record."""
        d = self.to_dict()
        return {k: v for k, v in d.items() if config_uses(k, d)}

    @classmethod
    def from_dict(cls, d: JsonObject) -> "TrialConfig":
        check_keys(cls, d, "config key")
        return cls(**d)

    def replace(self, **changes: object) -> "TrialConfig":
        """A stop rule that is its task's default follows a new task (denoise made inpaint
        stops by ES-WMV, not by a rule inpaint refuses); one set apart stays, and is checked."""
        if changes.get("task", self.task) != self.task and "stop_rule" not in changes \
                and self.stop_rule == default_stop_rule(self.task):
            changes["stop_rule"] = "default"
        return dataclasses.replace(self, **changes)

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def check_keys(cls: type, d: JsonObject, what: str) -> None:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")


def load_config_file(path: str | os.PathLike) -> JsonObject:
    """The config part of a JSON file: a bare config, or an export with a `config` key."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"cannot read config file {str(p)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {str(p)!r} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = {**LEGACY_DEFAULTS, **data["config"]}  # an export: a complete record
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a JSON object")
    return data


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _number(name: str, value: object, kind: type, lo: float | None = None,
            hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> None:
    ok_type = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name} = {value!r} is out of range; allowed: {rng}")


def check_image_spec(spec: object) -> None:
    """A bundled name, or an existing PNG/JPEG file or folder; the pixels are read later."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"image must be a name or a path, got {spec!r}")
    if spec in BUNDLED_IMAGES:
        return
    p = Path(spec)
    if p.is_dir():
        if not any(q.suffix.lower() in IMAGE_SUFFIXES for q in p.iterdir()):
            raise ValueError(f"image folder {spec!r} holds no PNG or JPEG file")
        return
    if p.is_file():
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"image file {spec!r} is not a PNG or JPEG ({', '.join(IMAGE_SUFFIXES)})")
        if not os.access(p, os.R_OK):
            raise ValueError(f"image file {spec!r} is not readable")
        return
    raise ValueError(
        f"unknown image {spec!r}: not a file or folder, nor a bundled image "
        f"({', '.join(BUNDLED_IMAGES)})"
    )


def validate(c: TrialConfig) -> None:
    """Raise ValueError with one sentence naming the bad value and what is allowed."""
    if not isinstance(c.images, tuple):
        raise ValueError(f"images must be a list of names or paths, got {c.images!r}")
    if not c.images:
        raise ValueError("images must name at least one image")
    for spec in c.images:
        check_image_spec(spec)
    _choice("task", c.task, TASKS)
    _choice("noise_mode", c.noise_mode, NOISE_MODES)
    _choice("schedule", c.schedule, SCHEDULES)
    _choice("net", c.net, NETWORKS)
    _choice("upsample", c.upsample, UPSAMPLES)
    _choice("loss", c.loss, LOSSES)
    _choice("stop", c.stop, STOPS)
    _choice("color", c.color, COLORS)
    _number("num_timesteps", c.num_timesteps, int, 2, 100_000)
    _number("timestep", c.timestep, int, 0, c.num_timesteps - 1)
    _number("scales", c.scales, int, 1, 8)
    _number("channels", c.channels, int, 1, 1024)
    _number("skip_channels", c.skip_channels, int, 0, 1024)
    _number("input_depth", c.input_depth, int, 1, 1024)
    # 16: SSIM's 11x11 Gaussian window (sigma 1.5, Wang et al. 2004) must fit the image.
    _number("size", c.size, int, 16, 4096)
    if c.size < 2 * c.min_size:  # reflection padding needs a 2x2 map at the bottom
        raise ValueError(
            f"size = {c.size} is too small for {c.scales} scales; allowed: at least {2 * c.min_size}"
        )
    if c.size % c.min_size:
        raise ValueError(
            f"size = {c.size} is not divisible by 2**scales = {c.min_size}; "
            f"allowed: a multiple of {c.min_size} (e.g. {max(c.min_size, c.size - c.size % c.min_size)})"
        )
    _number("sigma", c.sigma, float, 0, 1)
    _number("missing", c.missing, float, 0, 1, hi_open=True)
    _number("sr_factor", c.sr_factor, int, 2, 16)
    if c.task == "sr" and c.size % c.sr_factor:
        raise ValueError(f"size = {c.size} is not divisible by sr_factor = {c.sr_factor}")
    _number("reg_noise_std", c.reg_noise_std, float, 0, 10)
    _number("lr", c.lr, float, 0, 10, lo_open=True)
    _number("iterations", c.iterations, int, 1, 10_000_000)
    _number("ema_weight", c.ema_weight, float, 0, 1, hi_open=True)
    _number("eval_draws", c.eval_draws, int, 1, 1000)
    _number("report_every", c.report_every, int, 1, 10_000_000)
    _number("window", c.window, int, 1, 100_000)
    _number("patience", c.patience, int, 1, 10_000_000)
    if c.loss == "sure":
        check_sure(c.task, c.noise_mode)
    _number("seed", c.seed, int, 0, 2**63 - 1)
    # Every network of a trial is trained at once, so this bounds the memory a trial takes.
    _number("repeats", c.repeats, int, 1, 256)
    if not isinstance(c.sigma_estimate, bool):
        raise ValueError(f"sigma_estimate must be true or false, got {c.sigma_estimate!r}")
    if not isinstance(c.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        raise ValueError(f"unknown device {c.device!r}; allowed: auto, cpu, cuda, cuda:N")
    _choice("stop_rule", c.stop_rule, STOP_RULES)
    _number("holdout_fraction", c.holdout_fraction, float, 0, 0.5, lo_open=True)
    check_stop_rule(c.stop_rule, c.task)


SCHEDULERS: tuple[str, ...] = ("asha", "median", "fifo")
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class StudyConfig:
    name: str                          # the study's name: its folder under root, its MLflow experiment
    root: str                          # absolute folder holding every study (MLflow store, Ray results)
    trial: TrialConfig = field(default_factory=TrialConfig)  # base config; the space overrides it
    num_samples: int = 8               # trials in the study
    metric: str = "psnr_ema"           # objective, at each trial's last report
    objectives: tuple[str, ...] = ()   # objectives, METRIC[:max|min] each (the first is metric); 2 or more: a Pareto front, scheduler fifo
    scheduler: str = "asha"            # early stopping: asha, median (stopping rule) or fifo (none)
    grace_period: int = 0              # iterations before a trial may be stopped (0: iterations // 4)
    reduction_factor: int = 3          # ASHA: keep 1 / reduction_factor of trials at each rung
    max_concurrent: int = 0            # trials at once (0: as many as the resources fit)
    cpus_per_trial: float = 1.0        # CPUs reserved per trial (also torch's thread count)
    gpus_per_trial: float = -1.0       # GPUs per trial, fractions allowed (-1: 1 if the cluster has GPUs, else 0)
    address: str = ""                  # Ray cluster address ("" starts a local Ray; "auto" joins the running one)
    tracking_uri: str = ""             # MLflow tracking URI ("" : sqlite store under root)
    storage: str = ""                  # Ray storage for results/checkpoints ("" : under root; s3://... on a cloud)
    space_file: str = ""               # YAML/JSON search space ("" : the default space)
    seed: int = 0                      # seeds the Optuna sampler (and, from the CLI, the trials)
    image_every: int = 100             # iterations between output images logged to MLflow
    max_failures: int = 3              # retries of a trial whose node or worker died (from its checkpoint)
    checkpoint_every: int = 0          # reports between checkpoints (0: about 10 per trial)
    shared_storage: bool = False       # storage is a path every node mounts (NFS), not this node's disk
    warm_start: tuple[str, ...] = ()   # earlier studies under root whose finished trials the sampler starts from

    def __post_init__(self) -> None:
        if isinstance(self.trial, dict):
            object.__setattr__(self, "trial", TrialConfig.from_dict(self.trial))
        if isinstance(self.warm_start, list):  # from JSON or a repeated flag
            object.__setattr__(self, "warm_start", tuple(self.warm_start))
        if isinstance(self.objectives, (list, tuple)):  # from JSON or a repeated flag: normalized
            object.__setattr__(self, "objectives", tuple(parse_objective(o) for o in self.objectives))
        validate_study(self)

    @property
    def mode(self) -> str:
        return self.objective_list[0][1] if self.objectives else METRICS[self.metric]

    @property
    def objective_list(self) -> list[tuple[str, str]]:
        """(metric, direction) per objective: [(metric, mode)] for a study of one."""
        return [split(o) for o in self.objectives] or [(self.metric, METRICS[self.metric])]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def study_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{Path(self.root) / 'mlflow.db'}"

    @property
    def resolved_storage(self) -> str:
        return self.storage or str(self.study_dir / "ray")

    @property
    def ended_file(self) -> Path:
        """Driver-side record of the trials that started and whose end the driver saw."""
        return self.study_dir / "trials.json"

    @property
    def spool_dir(self) -> Path:
        """MLflow records waiting for the server, on the driver's disk."""
        return self.study_dir / "spool"

    @property
    def resolved_checkpoint_every(self) -> int:
        """About 10 checkpoints per trial: a 512 px reference trial's checkpoint is ~27 MB
        per image (weights and Adam's moments), too much to write at every report."""
        if self.checkpoint_every:
            return self.checkpoint_every
        return max(1, round(self.trial.iterations / self.trial.report_every / 10))

    @property
    def resolved_grace_period(self) -> int:
        return self.grace_period or max(self.trial.report_every, self.trial.iterations // 4)

    def to_dict(self) -> JsonObject:
        d = dataclasses.asdict(self)
        d["trial"] = self.trial.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: JsonObject) -> "StudyConfig":
        check_keys(cls, d, "study setting")
        return cls(**d)


def validate_study(s: StudyConfig) -> None:
    if not isinstance(s.name, str) or not s.name or len(s.name) > 64 or set(s.name) - NAME_CHARS:
        raise ValueError(
            f"study name {s.name!r} is not allowed; allowed: 1-64 letters, digits, '-', '_' or '.'"
        )
    if s.name.startswith("."):
        raise ValueError(f"study name {s.name!r} must not start with '.'")
    if not isinstance(s.root, str) or not os.path.isabs(s.root):
        raise ValueError(f"root {s.root!r} must be an absolute path")
    _number("num_samples", s.num_samples, int, 1, 1_000_000)
    _choice("metric", s.metric, tuple(OBJECTIVE_METRICS if s.objectives else METRICS))
    _choice("scheduler", s.scheduler, SCHEDULERS)
    if not isinstance(s.objectives, tuple):
        raise ValueError(f"objectives must be a list of METRIC[:max|min], got {s.objectives!r}")
    check_objectives(s.objectives, s.metric, s.scheduler)
    check_rule_metrics([m for m, _ in s.objective_list], s.trial.stop_rule)
    _number("grace_period", s.grace_period, int, 0, 10_000_000)
    _number("reduction_factor", s.reduction_factor, int, 2, 100)
    _number("max_concurrent", s.max_concurrent, int, 0, 100_000)
    _number("cpus_per_trial", s.cpus_per_trial, float, 0, 1024, lo_open=True)
    if s.gpus_per_trial != -1:
        _number("gpus_per_trial", s.gpus_per_trial, float, 0, 64)
    _number("seed", s.seed, int, 0, 2**32 - 1)
    _number("image_every", s.image_every, int, 1, 10_000_000)
    _number("max_failures", s.max_failures, int, 0, 1000)
    _number("checkpoint_every", s.checkpoint_every, int, 0, 10_000_000)
    if not isinstance(s.shared_storage, bool):
        raise ValueError(f"shared_storage must be true or false, got {s.shared_storage!r}")
    if not isinstance(s.warm_start, tuple):
        raise ValueError(f"warm_start must be a list of study names, got {s.warm_start!r}")
    for other in s.warm_start:
        if not isinstance(other, str) or not other or set(other) - NAME_CHARS or other == s.name:
            raise ValueError(f"warm_start {other!r} is not the name of another study")
    if len(set(s.warm_start)) < len(s.warm_start):
        raise ValueError(f"warm_start names a study twice: {', '.join(s.warm_start)}")
    if s.storage and "://" not in s.storage and not os.path.isabs(s.storage):
        raise ValueError(f"storage {s.storage!r} must be an absolute path or a URI such as s3://bucket/path")
