"""One DIP trial: fit a fresh network to each image's observation, report as it goes.

Runs with no Ray and no MLflow: the caller passes `report(metrics, trial)`, which may
checkpoint `trial.state_dict()`. All loop state lives in `Trial` (network, optimizer,
input, generators, EMA, best) so a trial can be checkpointed and resumed mid-way, and
several images (later: several trials) step together on one device.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from models import build_network
from noise.inputs import make_input
from noise.schedules import alphas_cumprod, make_betas
from study import images as img
from study.config import TrialConfig
from study.metrics import psnr, ssim

Report = Callable[[dict[str, float], "Trial"], None]
SEED_STRIDE = 7919  # seeds of image j: seed + j * SEED_STRIDE + {0, 1, 2}
# Fault injection for the study tests: a sane config does not diverge on demand, so
# DIP_FAULT_NAN_AT="N[:LR]" makes the loss NaN at iteration N (for trials with lr >= LR)
# to exercise the real failure path.
_FAULT = (os.environ.get("DIP_FAULT_NAN_AT", "") + ":0").split(":")[:2]
_FAULT_NAN_AT, _FAULT_MIN_LR = int(_FAULT[0] or 0), float(_FAULT[1])


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends with this reason."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(name)


@dataclass
class ImageRun:
    """The loop state of one image."""

    label: str
    data: img.Degraded
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dip_input: Any                       # noise.inputs.DipInput
    gen: torch.Generator                 # training draws
    eval_gen: torch.Generator            # evaluation draws: reports never change training
    ema: torch.Tensor | None = None
    best_psnr: float = -math.inf         # oracle: best EMA PSNR against the clean image
    best_iteration: int = 0
    loss: float = math.nan
    output: torch.Tensor | None = None   # the last evaluated output, for the images logged with it


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def build_run(cfg: TrialConfig, spec: str, index: int, device: torch.device) -> ImageRun:
    seed = cfg.seed + index * SEED_STRIDE
    clean = img.load_image(spec, cfg.size, cfg.color)
    # The degradation is drawn on the CPU so an observation is the same on every device.
    data = img.degrade(clean, cfg, _generator(torch.device("cpu"), seed)).to(device)
    gen = _generator(device, seed + 1)
    acp = alphas_cumprod(make_betas(cfg.schedule, cfg.num_timesteps))
    # Built from the observation only (never `data.clean`): see noise/inputs.py.
    dip_input = make_input(
        cfg.noise_mode, data.input_image, timestep=cfg.timestep, input_depth=cfg.input_depth,
        reg_noise_std=cfg.reg_noise_std, alphas_cumprod=acp, generator=gen,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(cfg.net, dip_input.channels, clean.shape[1], scales=cfg.scales,
                            channels=cfg.channels, skip_channels=cfg.skip_channels,
                            upsample=cfg.upsample)
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    return ImageRun(img.image_label(spec), data, net, opt, dip_input, gen,
                    _generator(device, seed + 2))


def _unique_labels(runs: list[ImageRun]) -> None:
    """Two files with one stem (a/x.png, b/x.png), or one image listed twice, would share
    a label and so overwrite each other's metrics and files: later ones get `_<index>`."""
    seen: set[str] = set()
    for j, run in enumerate(runs):
        label, k = run.label, j
        while label in seen:
            label, k = f"{run.label}_{k}", k + 1
        run.label = label
        seen.add(label)


def _over_images(per: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over images, plus `<metric>/<image>` when there are several."""
    keys = next(iter(per.values())).keys()
    m = {k: sum(p[k] for p in per.values()) / len(per) for k in keys}
    if len(per) > 1:
        m.update({f"{k}/{label}": v for label, p in per.items() for k, v in p.items()})
    return m


class Trial:
    """All images of one configuration, stepped together."""

    def __init__(self, cfg: TrialConfig, specs: list[str] | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        specs = specs if specs is not None else img.expand_images(cfg.images)
        self.runs = [build_run(cfg, s, j, self.device) for j, s in enumerate(specs)]
        _unique_labels(self.runs)
        self.iteration = 0
        self.seconds = 0.0  # training time so far (excluding evaluation)
        self._observation: dict[str, float] | None = None

    def _loss(self, run: ImageRun, out: torch.Tensor) -> torch.Tensor:
        pred = run.data.forward_op(out)
        if self.cfg.loss == "l1":
            return F.l1_loss(pred, run.data.observation)
        return F.mse_loss(pred, run.data.observation)

    def _step_run(self, run: ImageRun) -> None:
        out = run.net(run.dip_input.train_input(run.gen))
        loss = self._loss(run, out)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.loss = float(loss.detach())
        if self.iteration + 1 == _FAULT_NAN_AT and self.cfg.lr >= _FAULT_MIN_LR:
            run.loss = math.nan
        if not math.isfinite(run.loss):
            raise TrialDiverged(
                f"loss became {run.loss} at iteration {self.iteration + 1} on image "
                f"{run.label!r} (lr = {self.cfg.lr}); the trial was stopped"
            )
        w = self.cfg.ema_weight  # output EMA, as the DIP reference (exp_weight = 0.99)
        out = out.detach()
        run.ema = out if run.ema is None else run.ema * w + out * (1 - w)
        p = psnr(run.ema, run.data.clean)
        if p > run.best_psnr:
            run.best_psnr, run.best_iteration = p, self.iteration + 1

    def step(self) -> None:
        t0 = time.perf_counter()
        for run in self.runs:
            self._step_run(run)
        self.iteration += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def output(self, run: ImageRun) -> torch.Tensor:
        """The output on a well-defined input: the fixed input, or for a stochastic input
        the mean over `eval_draws` draws from the same distribution it was trained on."""
        draws = self.cfg.eval_draws if run.dip_input.stochastic else 1
        outs = [run.net(run.dip_input.sample(run.eval_gen)) for _ in range(draws)]
        return torch.stack(outs).mean(0)

    def evaluate_run(self, run: ImageRun) -> dict[str, float]:
        run.output = out = self.output(run)
        clean = run.data.clean
        ema = run.ema if run.ema is not None else out
        return {
            "loss": run.loss, "psnr": psnr(out, clean), "ssim": ssim(out, clean),
            "psnr_ema": psnr(ema, clean), "ssim_ema": ssim(ema, clean),
            "psnr_best": run.best_psnr, "best_iteration": float(run.best_iteration),
        }

    def evaluate(self) -> dict[str, float]:
        """Means over images, plus `<metric>/<image>` per image when there are several.
        Keeps each image's output in `run.output` for the images logged with the report."""
        m = _over_images({r.label: self.evaluate_run(r) for r in self.runs})
        m["iteration"] = float(self.iteration)
        m["seconds"] = self.seconds
        m["seconds_per_iteration"] = self.seconds / max(self.iteration, 1)
        return m

    def observation_metrics(self) -> dict[str, float]:
        """How good the observation itself is (at output resolution): the bar to beat.
        The observation never changes, so it is measured once."""
        if self._observation is None:
            self._observation = _over_images({r.label: {
                "psnr_observation": psnr(r.data.input_image, r.data.clean),
                "ssim_observation": ssim(r.data.input_image, r.data.clean)} for r in self.runs})
        return dict(self._observation)

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(), "iteration": self.iteration, "seconds": self.seconds,
            "runs": [{
                "net": r.net.state_dict(), "optimizer": r.optimizer.state_dict(),
                "input": r.dip_input.state_dict(), "gen": r.gen.get_state(),
                "eval_gen": r.eval_gen.get_state(), "ema": r.ema, "loss": r.loss,
                "best_psnr": r.best_psnr, "best_iteration": r.best_iteration,
            } for r in self.runs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self.cfg.to_dict() or len(state["runs"]) != len(self.runs):
            raise ValueError("the checkpoint belongs to another configuration")
        self.iteration, self.seconds = state["iteration"], state["seconds"]
        for r, s in zip(self.runs, state["runs"], strict=True):
            r.net.load_state_dict(s["net"])
            r.optimizer.load_state_dict(s["optimizer"])
            r.dip_input.load_state_dict(s["input"])
            r.gen.set_state(s["gen"])
            r.eval_gen.set_state(s["eval_gen"])
            r.ema = None if s["ema"] is None else s["ema"].to(self.device)
            r.loss, r.best_psnr, r.best_iteration = s["loss"], s["best_psnr"], s["best_iteration"]


def run_trial(cfg: TrialConfig, report: Report, state: dict[str, Any] | None = None,
              trial: Trial | None = None) -> dict[str, Any]:
    """Train to `cfg.iterations`, reporting every `cfg.report_every` iterations and at the
    end; resume from `state` (a `Trial.state_dict()`) when given. Returns the result."""
    trial = trial or Trial(cfg)
    if state is not None:
        trial.load_state_dict(state)
    metrics: dict[str, float] = {}
    while trial.iteration < cfg.iterations:
        trial.step()
        if trial.iteration % cfg.report_every == 0 or trial.iteration == cfg.iterations:
            metrics = trial.evaluate()
            report(metrics, trial)
    if not metrics:  # resumed at the end: report nothing new, but return the result
        metrics = trial.evaluate()
    return {**metrics, **trial.observation_metrics(), "iterations": trial.iteration,
            "config": cfg.to_dict()}
