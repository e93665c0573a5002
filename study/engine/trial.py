"""One DIP trial: fit a fresh network to each image's observation, report as it goes.

Runs with no Ray and no MLflow: the caller passes `report(metrics, trial)`, which may
checkpoint `trial.state_dict()`. A trial trains K = images x repeats networks; repeat r
of an image is exactly the network a trial with `seed + r` trains (see `SEED_STRIDE`).
The K networks step together as one packed computation (models/packed.py), one `Pack`
per architecture (images of different channel counts need different networks).

The step never waits for the device: the loss, the divergence check and the oracle best
are kept on the device and read at report time (`evaluate`). Metrics are means over all
networks; with several images `<metric>/<image>` is an image's mean over its repeats, and
with several repeats `<metric>_repeat_std` is the spread over repeats (the sample standard
deviation of the per-repeat means over images). `Trial.result` lists every network.
"""
from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from models import build_network, pack_networks, set_reflect
from models.packed import from_channels, pack_state_dicts, to_channels, unpack_state_dict
from noise.inputs import DipInput, make_input
from noise.schedules import alphas_cumprod, make_betas
from study.engine import images as img
from study.config import TrialConfig
from study.engine.metrics import psnr_batch, ssim
from models.step import StepOptions, Stepper

Report = Callable[[dict[str, float], "Trial"], None]
SEED_STRIDE = 7919  # seeds of image j in a trial of seed s: s + j * SEED_STRIDE + {0, 1, 2}
# Metrics whose spread over repeats is reported as `<metric>_repeat_std`.
SPREAD = ("loss", "psnr", "ssim", "psnr_ema", "ssim_ema", "psnr_best")


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends with this reason."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(name)


class Draw:
    """DipInput.train_input without host syncs: the same generator calls and float32
    arithmetic (a test pins them equal for every mode), with the DDPM coefficients
    sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) looked up on the device, so a CUDA graph
    can capture the draw and `ddpm_random_t` needs no int() of its timestep."""

    def __init__(self, dip: DipInput):
        self.dip = dip
        dev = dip.z.device
        self.signal = dip.alphas_cumprod.sqrt().to(dev)        # float64, as add_noise
        self.noise = (1.0 - dip.alphas_cumprod).sqrt().to(dev)
        self.t = torch.tensor([dip.timestep], device=dev)

    def __call__(self, gen: torch.Generator) -> torch.Tensor:
        d = self.dip
        if d.mode not in ("ddpm_resample", "ddpm_random_t"):
            return d.train_input(gen)  # no host sync on these paths
        t = self.t
        if d.mode == "ddpm_random_t":
            t = torch.randint(0, d.timestep + 1, (1,), generator=gen, device=d.z.device)
        eps = torch.randn(d.z.shape, generator=gen, device=d.z.device, dtype=torch.float32)
        return self.signal[t].float() * d.x0 + self.noise[t].float() * eps


@dataclass
class Network:
    """One network of a trial: image `label`, trained as a trial of seed `seed` would."""

    label: str
    repeat: int
    seed: int                            # the trial seed this network reproduces: cfg.seed + repeat
    data: img.Degraded
    dip_input: DipInput
    draw: Draw
    gen: torch.Generator                 # training draws
    eval_gen: torch.Generator            # evaluation draws: reports never change training
    init_seed: int                       # network initialisation


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def build_network_state(cfg: TrialConfig, spec: str, label: str, index: int, repeat: int,
                        device: torch.device) -> Network:
    trial_seed = cfg.seed + repeat
    seed = trial_seed + index * SEED_STRIDE
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
    return Network(label, repeat, trial_seed, data, dip_input, Draw(dip_input), gen,
                   _generator(device, seed + 2), seed)


def unique_labels(specs: list[str]) -> list[str]:
    """Two files with one stem (a/x.png, b/x.png), or one image listed twice, would share
    a label and so overwrite each other's metrics and files: later ones get `_<index>`."""
    seen: set[str] = set()
    out = []
    for j, spec in enumerate(specs):
        base = label = img.image_label(spec)
        k = j
        while label in seen:
            label, k = f"{base}_{k}", k + 1
        seen.add(label)
        out.append(label)
    return out


def _cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if ts[0] is None else torch.cat(ts)


class Pack:
    """Networks of one architecture (input and output channels), packed into one; the
    per-network loop state is stacked on the first axis of each tensor here."""

    def __init__(self, cfg: TrialConfig, networks: list[Network], index: list[int],
                 device: torch.device, options: StepOptions):
        self.networks, self.index, self.options = networks, index, options
        self.k = k = len(networks)
        c_in, c_out = networks[0].dip_input.channels, networks[0].data.clean.shape[1]

        def build(groups: int) -> torch.nn.Module:
            return build_network(cfg.net, c_in, c_out, scales=cfg.scales, channels=cfg.channels,
                                 skip_channels=cfg.skip_channels, upsample=cfg.upsample,
                                 groups=groups)

        nets = []
        for n in networks:  # each network starts from its own seed's initialisation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(n.init_seed)
                nets.append(build(1))
        self.net = pack_networks(nets, build).to(device)
        set_reflect(self.net, options.reflect)
        if options.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        d = [n.data for n in networks]
        self.data = img.Degraded(_cat([x.clean for x in d]), _cat([x.observation for x in d]),
                                 _cat([x.input_image for x in d]), _cat([x.mask for x in d]),
                                 d[0].sr_factor)
        f64 = dict(device=device, dtype=torch.float64)
        self.ema = torch.zeros_like(self.data.clean)     # un-normalised: see Trial.ema_norm
        self.loss = torch.full((k,), math.nan, device=device)
        self.best_psnr = torch.full((k,), -math.inf, **f64)
        self.best_iteration = torch.zeros(k, dtype=torch.long, device=device)
        self.diverged_at = torch.zeros(k, dtype=torch.long, device=device)
        self.diverged_loss = torch.zeros(k, device=device)
        self.last_output: torch.Tensor | None = None      # from the latest evaluation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """K inputs (K, C, H, W) -> K outputs (K, C_out, H, W), float32."""
        x = to_channels(z)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return from_channels(self.net(x), self.k)

    def losses(self, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One training forward: the outputs and each network's loss (K,)."""
        out = self.forward(torch.cat([n.draw(n.gen) for n in self.networks]))
        err = self.data.forward_op(out) - self.data.observation
        per = err.abs() if loss == "l1" else err.square()
        return out, per.mean(dim=(1, 2, 3))

    def track(self, out: torch.Tensor, loss: torch.Tensor, it: torch.Tensor,
              ema_norm: torch.Tensor, w: float) -> None:
        """Device-side bookkeeping after a step: first divergence, EMA, oracle best."""
        loss = loss.detach()
        new = ~torch.isfinite(loss) & (self.diverged_at == 0)
        self.diverged_at.copy_(torch.where(new, it, self.diverged_at))
        self.diverged_loss.copy_(torch.where(new, loss, self.diverged_loss))
        self.loss.copy_(loss)
        self.ema.mul_(w).add_(out.detach(), alpha=1 - w)
        p = psnr_batch(self.ema / ema_norm, self.data.clean)
        better = p > self.best_psnr
        self.best_psnr.copy_(torch.where(better, p, self.best_psnr))
        self.best_iteration.copy_(torch.where(better, it, self.best_iteration))

    @torch.no_grad()
    def eval_outputs(self, draws: int) -> torch.Tensor:
        """The outputs on a well-defined input: the fixed input, or for a stochastic input
        the mean over `draws` draws from the distribution it was trained on."""
        draws = draws if self.networks[0].dip_input.stochastic else 1
        outs = [self.forward(torch.cat([n.draw(n.eval_gen) for n in self.networks]))
                for _ in range(draws)]
        return torch.stack(outs).mean(0)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def aggregate(networks: list[Network], per: list[dict[str, float]]) -> dict[str, float]:
    """Means over networks, `<metric>/<image>` per image (several images), and
    `<metric>_repeat_std` over repeats (several repeats)."""
    keys = list(per[0])
    m = {k: _mean([p[k] for p in per]) for k in keys}
    labels = list(dict.fromkeys(n.label for n in networks))
    if len(labels) > 1:
        for label in labels:
            mine = [p for n, p in zip(networks, per, strict=True) if n.label == label]
            m.update({f"{k}/{label}": _mean([p[k] for p in mine]) for k in keys})
    repeats = sorted({n.repeat for n in networks})
    if len(repeats) > 1:
        for k in (k for k in SPREAD if k in keys):
            by_r = [_mean([p[k] for n, p in zip(networks, per, strict=True) if n.repeat == r])
                    for r in repeats]
            m[f"{k}_repeat_std"] = statistics.stdev(by_r)
    return m


class Trial:
    """All networks of one configuration (images x repeats), stepped together."""

    def __init__(self, cfg: TrialConfig, specs: list[str] | None = None,
                 options: StepOptions | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.options = options or StepOptions.auto(self.device)
        self.options.check(self.device)
        specs = specs if specs is not None else img.expand_images(cfg.images)
        labels = unique_labels(specs)
        self.networks = [build_network_state(cfg, s, labels[j], j, r, self.device)
                         for j, s in enumerate(specs) for r in range(cfg.repeats)]
        self.packs = self._packs()
        self.iteration = 0
        self.seconds = 0.0  # training time so far (excluding evaluation)
        self._t_mark: float | None = None
        self._it = torch.zeros((), dtype=torch.long, device=self.device)
        # Bias correction of the output EMA: after n steps the raw average's weights sum
        # to 1 - w**n; dividing by it makes them sum to one at every iteration.
        self.ema_norm = torch.zeros((), device=self.device)
        self._observation: tuple[dict[str, float], list[dict[str, float]]] | None = None
        self._per: list[dict[str, float]] = []
        params = [p for pack in self.packs for p in pack.net.parameters()]
        self.optimizer = self.options.adam(params, cfg.lr)
        self.stepper = Stepper(self._step_body, self.optimizer, self.options,
                               [n.gen for n in self.networks])

    def _packs(self) -> list[Pack]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, n in enumerate(self.networks):
            key = (n.dip_input.channels, n.data.clean.shape[1]) if self.options.pack else (i,)
            groups.setdefault(key, []).append(i)
        return [Pack(self.cfg, [self.networks[i] for i in idx], idx, self.device, self.options)
                for idx in groups.values()]

    @property
    def image_labels(self) -> list[str]:
        return list(dict.fromkeys(n.label for n in self.networks))

    def _autocast(self) -> Any:
        if not self.options.bf16:
            return nullcontext()
        # No cache: a CUDA graph must not capture casts cached from eager iterations.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _step_body(self) -> None:
        """One iteration of every network, all on the device (no host sync): the caller
        has zeroed the gradients."""
        with self._autocast():
            steps = [pack.losses(self.cfg.loss) for pack in self.packs]
        # The networks share no parameter, so the gradient of the sum is each network's own.
        torch.stack([loss.sum() for _, loss in steps]).sum().backward()
        self.optimizer.step()
        self._it.add_(1)
        w = self.cfg.ema_weight
        self.ema_norm.mul_(w).add_(1 - w)
        for pack, (out, loss) in zip(self.packs, steps, strict=True):
            pack.track(out, loss, self._it, self.ema_norm, w)

    def step(self) -> None:
        if self._t_mark is None:
            self._t_mark = time.perf_counter()
        self.stepper()
        self.iteration += 1

    def _sync_time(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self._t_mark is not None:
            self.seconds += time.perf_counter() - self._t_mark
            self._t_mark = None

    def _check_diverged(self) -> None:
        for pack in self.packs:
            for n, at, loss in zip(pack.networks, pack.diverged_at.tolist(),
                                   pack.diverged_loss.tolist(), strict=True):
                if at:
                    rep = f" (repeat {n.repeat}, seed {n.seed})" if self.cfg.repeats > 1 else ""
                    raise TrialDiverged(
                        f"loss became {loss} at iteration {at} on image {n.label!r}{rep} "
                        f"(lr = {self.cfg.lr}); the trial was stopped")

    def _evaluate_pack(self, pack: Pack) -> list[dict[str, float]]:
        with self._autocast():
            pack.last_output = out = pack.eval_outputs(self.cfg.eval_draws)
        ema = pack.ema / self.ema_norm if self.iteration else out
        clean = pack.data.clean
        host = [t.cpu() for t in (out, ema, clean)]
        p_out, p_ema = psnr_batch(out, clean).tolist(), psnr_batch(ema, clean).tolist()
        loss, best = pack.loss.tolist(), pack.best_psnr.tolist()
        best_it = pack.best_iteration.tolist()
        return [{
            "loss": loss[k], "psnr": p_out[k], "ssim": ssim(host[0][k:k + 1], host[2][k:k + 1]),
            "psnr_ema": p_ema[k], "ssim_ema": ssim(host[1][k:k + 1], host[2][k:k + 1]),
            "psnr_best": best[k], "best_iteration": float(best_it[k]),
        } for k in range(pack.k)]

    def evaluate(self) -> dict[str, float]:
        """Metrics of every network, aggregated (see the module docstring); raises
        TrialDiverged if a loss became NaN or infinite since the last report. Keeps each
        pack's outputs in `last_output` for the images of this report."""
        self._sync_time()
        self._check_diverged()
        per: list[dict[str, float]] = [{}] * len(self.networks)
        for pack in self.packs:
            for i, m in zip(pack.index, self._evaluate_pack(pack), strict=True):
                per[i] = m
        self._per = per
        m = aggregate(self.networks, per)
        m["iteration"] = float(self.iteration)
        m["seconds"] = self.seconds
        m["seconds_per_iteration"] = self.seconds / max(self.iteration, 1)
        return m

    def observation_metrics(self) -> dict[str, float]:
        """How good the observation itself is (at output resolution): the bar to beat.
        The observation never changes, so it is measured once."""
        if self._observation is None:
            per = [{"psnr_observation": float(psnr_batch(n.data.input_image, n.data.clean)[0]),
                    "ssim_observation": ssim(n.data.input_image, n.data.clean)}
                   for n in self.networks]
            self._observation = (aggregate(self.networks, per), per)
        return dict(self._observation[0])

    def result(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What result.json holds: the aggregated metrics, the observation's, and every
        network (image, repeat, seed, its own metrics of the latest evaluation)."""
        obs = self.observation_metrics()
        assert self._observation is not None
        networks = [{"image": n.label, "repeat": n.repeat, "seed": n.seed,
                     "metrics": {**p, **o}}
                    for n, p, o in zip(self.networks, self._per or [{}] * len(self.networks),
                                       self._observation[1], strict=True)]
        return {**metrics, **obs, "iterations": self.iteration, "networks": networks,
                "config": self.cfg.to_dict()}

    def report_images(self, setup: bool = False, final: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor, int]]:
        """What a report shows, as (name, (1, C, H, W) image in [0, 1], step), for repeat 0
        of each image (other repeats differ only in seeds; their numbers are in `result`).
        setup: the observation and the input, at step 0; then the output of the latest
        evaluation; final: also the output EMA. Names are `<image>/<name>` when a trial
        has several images."""
        several = len(self.image_labels) > 1
        for pack in self.packs:
            for k, n in enumerate(pack.networks):
                if n.repeat:
                    continue
                pre = f"{n.label}/" if several else ""
                if setup:
                    yield f"{pre}observation", n.data.observation, 0
                    yield f"{pre}input", n.dip_input.view(), 0
                if pack.last_output is not None and self.iteration:
                    yield f"{pre}output", pack.last_output[k:k + 1], self.iteration
                    if final:
                        yield f"{pre}output_ema", (pack.ema[k:k + 1] / self.ema_norm), self.iteration

    # --- checkpointing: plain tensors, numbers, strings, lists and dicts, one entry per
    # network, so torch.load(weights_only=True) reads it ---
    def state_dict(self) -> dict[str, Any]:
        nets: list[dict[str, Any]] = [{} for _ in self.networks]
        for pack in self.packs:
            weights = unpack_state_dict(pack.net.state_dict(), pack.k)
            moments = self._adam_moments(pack)
            vals = [t.tolist() for t in (pack.loss, pack.best_psnr, pack.best_iteration,
                                         pack.diverged_at, pack.diverged_loss)]
            for k, (i, n) in enumerate(zip(pack.index, pack.networks, strict=True)):
                nets[i] = {
                    "net": {key: t.cpu().contiguous() for key, t in weights[k].items()},
                    "adam": moments[k], "input": {key: t.cpu() for key, t in n.dip_input.state_dict().items()},
                    "gen": n.gen.get_state(), "eval_gen": n.eval_gen.get_state(),
                    "ema": pack.ema[k].cpu().clone(), "loss": vals[0][k], "best_psnr": vals[1][k],
                    "best_iteration": vals[2][k], "diverged_at": vals[3][k], "diverged_loss": vals[4][k],
                }
        step = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        return {"config": self.cfg.to_dict(), "iteration": self.iteration, "seconds": self.seconds,
                "ema_norm": float(self.ema_norm), "adam_step": float(step[0]) if step else 0.0,
                "networks": nets}

    def _adam_moments(self, pack: Pack) -> list[dict[str, list[torch.Tensor]]]:
        out: list[dict[str, list[torch.Tensor]]] = [{"exp_avg": [], "exp_avg_sq": []} for _ in range(pack.k)]
        for p in pack.net.parameters():
            s = self.optimizer.state.get(p)
            if not s:
                return [{} for _ in range(pack.k)]
            for name in ("exp_avg", "exp_avg_sq"):
                for k, t in enumerate(unpack_state_dict({"t": s[name]}, pack.k)):
                    out[k][name].append(t["t"].cpu().contiguous())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("config") != self.cfg.to_dict()
                or len(state.get("networks", ())) != len(self.networks)):
            raise ValueError("the checkpoint belongs to another configuration")
        self.iteration, self.seconds = state["iteration"], state["seconds"]
        self._it.fill_(self.iteration)
        self.ema_norm.fill_(state["ema_norm"])
        adam_state: dict[int, dict[str, Any]] = {}
        offset = 0
        for pack in self.packs:
            saved = [state["networks"][i] for i in pack.index]
            pack.net.load_state_dict(pack_state_dicts([s["net"] for s in saved]))
            for n, s in zip(pack.networks, saved, strict=True):
                n.dip_input.load_state_dict(s["input"])
                n.gen.set_state(s["gen"])
                n.eval_gen.set_state(s["eval_gen"])
            pack.ema.copy_(torch.stack([s["ema"] for s in saved]))
            for name, t in (("loss", pack.loss), ("best_psnr", pack.best_psnr),
                            ("best_iteration", pack.best_iteration),
                            ("diverged_at", pack.diverged_at), ("diverged_loss", pack.diverged_loss)):
                t.copy_(torch.tensor([s[name] for s in saved], dtype=t.dtype))
            for j, _ in enumerate(pack.net.parameters()):
                if saved[0]["adam"]:
                    adam_state[offset + j] = {"step": torch.tensor(state["adam_step"]), **{
                        name: pack_state_dicts([{"t": s["adam"][name][j]} for s in saved])["t"]
                        for name in ("exp_avg", "exp_avg_sq")}}
            offset += len(list(pack.net.parameters()))
        opt = self.optimizer.state_dict()
        self.optimizer.load_state_dict({**opt, "state": adam_state})
        self.stepper.reset()  # a captured graph holds the old optimizer state


def run_trial(cfg: TrialConfig, report: Report, state: dict[str, Any] | None = None,
              trial: Trial | None = None) -> dict[str, Any]:
    """Train to `cfg.iterations`, reporting every `cfg.report_every` iterations and at the
    end; resume from `state` (a `Trial.state_dict()`) when given. Returns `trial.result`."""
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
    return trial.result(metrics)
