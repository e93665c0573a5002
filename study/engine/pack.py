"""The networks of a trial and their packs: each network's observation, input and
generators (`build_network_state`), one `Pack` per architecture stepping its networks as
one packed computation (models/packed.py), and `aggregate`, the metrics over networks.

Repeat r of image j in a trial of seed s is exactly the network a trial of seed `s + r`
trains: its seeds are s + r + j * SEED_STRIDE + {0, 1, 2}.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from models import build_network, pack_networks, set_reflect
from models.packed import from_channels, set_convs, set_phantom, to_channels
from models.step import StepOptions
from noise.inputs import DipInput, make_input
from noise.schedules import alphas_cumprod, make_betas
from study.config import TrialConfig
from study.engine import images as img
from study.engine.autostop import AutoStop
from study.engine.holdout import MASK_SEED_OFFSET, HoldOutStop, fill, keep_mask
from study.engine.metrics import psnr_batch
from study.engine.sigma import used_sigma
from study.engine.sure import sure_losses

SEED_STRIDE = 7919  # seeds of image j in a trial of seed s: s + j * SEED_STRIDE + {0, 1, 2}
# Metrics whose spread over repeats is reported as `<metric>_repeat_std`.
SPREAD = ("loss", "psnr", "ssim", "psnr_ema", "ssim_ema", "psnr_best")


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
        # d(input)/d(observation) of the latest draw, for SURE (study/engine/sure.py): the
        # DDPM input is sqrt(alpha_bar_t) * (2 y - 1) + ..., the others do not depend on y.
        self.gain = torch.zeros(1, device=dev)

    def __call__(self, gen: torch.Generator) -> torch.Tensor:
        d = self.dip
        if d.mode not in ("ddpm_resample", "ddpm_random_t"):
            if d.mode == "ddpm":
                self.gain.copy_(2 * self.signal[self.t].float())
            return d.train_input(gen)  # no host sync on these paths
        t = self.t
        if d.mode == "ddpm_random_t":
            t = torch.randint(0, d.timestep + 1, (1,), generator=gen, device=d.z.device)
        eps = torch.randn(d.z.shape, generator=gen, device=d.z.device, dtype=torch.float32)
        signal = self.signal[t].float()
        self.gain.copy_(2 * signal)
        return signal * d.x0 + self.noise[t].float() * eps


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
    probe_gen: torch.Generator           # SURE's probes (its own: the other draws stay as with mse)
    sigma: float = 0.0                   # the noise sigma it uses (study/engine/sigma.py `used_sigma`)
    sigma_source: str = "given"          # "estimated" from its observation, or "given" (cfg.sigma)
    keep: torch.Tensor | None = None     # stop_rule holdout: (1, 1, H, W), 0 on the held-out pixels


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def build_network_state(cfg: TrialConfig, spec: str, label: str, index: int, repeat: int,
                        device: torch.device) -> Network:
    trial_seed = cfg.seed + repeat
    seed = trial_seed + index * SEED_STRIDE
    clean = img.load_image(spec, cfg.size, cfg.color)
    # The degradation is drawn on the CPU so an observation is the same on every device.
    data = img.degrade(clean, cfg, _generator(torch.device("cpu"), seed)).to(device)
    return network_for(cfg, data, label, repeat, seed, device)


def network_for(cfg: TrialConfig, data: img.Degraded, label: str, repeat: int, seed: int,
                device: torch.device, keep: torch.Tensor | None = None) -> Network:
    """The network of observation `data` (on `device`) whose draws are seeded from `seed`:
    a trial's, or `apply`'s on a user's image (seed = cfg.seed). With stop_rule holdout,
    `keep` marks the pixels the loss sees (default: drawn from `seed`)."""
    trial_seed = cfg.seed + repeat
    gen = _generator(device, seed + 1)
    acp = alphas_cumprod(make_betas(cfg.schedule, cfg.num_timesteps))
    image = data.input_image
    if cfg.stop_rule == "holdout":
        if keep is None:
            keep = keep_mask(tuple(data.observation.shape[-2:]), cfg.holdout_fraction,
                             seed + MASK_SEED_OFFSET)
        keep = keep.to(device)
        image = fill(image, keep)  # no held-out value may reach the input (J-invariance)
    # Built from the observation only (never `data.clean`): see noise/inputs.py.
    dip_input = make_input(
        cfg.noise_mode, image, timestep=cfg.timestep, input_depth=cfg.input_depth,
        reg_noise_std=cfg.reg_noise_std, alphas_cumprod=acp, generator=gen,
    )
    sigma, source = used_sigma(cfg, data.observation)
    return Network(label, repeat, trial_seed, data, dip_input, Draw(dip_input), gen,
                   _generator(device, seed + 2), seed, _generator(device, seed + 3), sigma, source, keep)


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
                 device: torch.device, options: StepOptions, crop: tuple[int, int] | None = None):
        self.networks, self.index, self.options = networks, index, options
        self.k = k = len(networks)
        c_in, c_out = networks[0].dip_input.channels, networks[0].data.observation.shape[1]

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
        # A network's numbers must not depend on how many share its pack. Split convs
        # (the CPU's) give that at any K (set_convs); grouped ones (a GPU's) get it for a
        # pack of one by computing as a pack of two, the second a detached copy
        # (set_phantom). Not with pack=False: the plain separate networks, the reference.
        set_convs(self.net, options.conv)
        set_phantom(self.net, k == 1 and options.pack and options.conv == "grouped")
        if options.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        d = [n.data for n in networks]
        self.data = img.Degraded(_cat([x.clean for x in d]), _cat([x.observation for x in d]),
                                 _cat([x.input_image for x in d]), _cat([x.mask for x in d]),
                                 d[0].sr_factor)
        f64 = dict(device=device, dtype=torch.float64)
        self.ema = torch.zeros_like(self.data.input_image)  # un-normalised: see Trial.ema_norm
        self.loss = torch.full((k,), math.nan, device=device)
        self.best_psnr = torch.full((k,), -math.inf, **f64)
        self.best_iteration = torch.zeros(k, dtype=torch.long, device=device)
        self.diverged_at = torch.zeros(k, dtype=torch.long, device=device)
        self.diverged_loss = torch.zeros(k, device=device)
        self.last_output: torch.Tensor | None = None      # from the latest evaluation
        # Each network's sigma; a float when they share one (the config's), so the
        # arithmetic, and the numbers, stay those of a plain float sigma.
        sigmas = [n.sigma for n in networks]
        self.sigma: float | torch.Tensor = (sigmas[0] if len(set(sigmas)) == 1
                                            else torch.tensor(sigmas, device=device))
        self.keep = _cat([n.keep for n in networks])  # (K, 1, H, W) or None
        self.autostop: AutoStop | HoldOutStop = self._stop_rule(cfg, crop, device)

    def _stop_rule(self, cfg: TrialConfig, crop: tuple[int, int] | None,
                   device: torch.device) -> AutoStop | HoldOutStop:
        if self.keep is None:
            return AutoStop(cfg.window, cfg.patience, self.ema.shape,
                            crop or tuple(self.ema.shape[-2:]), device)
        # The error is taken on held-out pixels of the image (in `apply` not the padding).
        known = 1.0 if self.data.mask is None else self.data.mask[:, :1]
        return HoldOutStop(cfg.patience, self.data.observation, (1 - self.keep) * known,
                           self.sigma, self.keep * known)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """K inputs (K, C, H, W) -> K outputs (K, C_out, H, W), float32."""
        x = to_channels(z)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return from_channels(self.net(x), self.k)

    def losses(self, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One training forward: the outputs and each network's loss (K,)."""
        z = torch.cat([n.draw(n.gen) for n in self.networks])
        out = self.forward(z)
        err = self.data.forward_op(out) - self.data.observation
        if self.keep is not None:  # held-out pixels are not in the loss
            err = err * self.keep
        if loss == "sure":
            gain = torch.cat([n.draw.gain for n in self.networks])
            probe = torch.cat([torch.randn(n.data.observation.shape, generator=n.probe_gen,
                                           device=out.device) for n in self.networks])
            return out, sure_losses(self.forward, z, gain, out, err, self.sigma, probe, self.keep)
        per = err.abs() if loss == "l1" else err.square()
        per = per.mean(dim=(1, 2, 3))
        # As deepinv's SplittingLoss: the mean over the pixels the loss sees.
        return out, per if self.keep is None else per / self.keep.mean(dim=(1, 2, 3))

    def track(self, out: torch.Tensor, loss: torch.Tensor, it: torch.Tensor,
              ema_norm: torch.Tensor, w: float) -> None:
        """Device-side bookkeeping after a step: first divergence, EMA, oracle best."""
        loss = loss.detach()
        new = ~torch.isfinite(loss) & (self.diverged_at == 0)
        self.diverged_at.copy_(torch.where(new, it, self.diverged_at))
        self.diverged_loss.copy_(torch.where(new, loss, self.diverged_loss))
        self.loss.copy_(loss)
        self.ema.mul_(w).add_(out.detach(), alpha=1 - w)
        ema = self.ema / ema_norm
        self.autostop.track(out, ema, it)
        if self.data.clean is None:  # `apply`: a user's image has no clean one
            return
        p = psnr_batch(ema, self.data.clean)
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

    @torch.no_grad()
    def untrained_outputs(self, draws: int) -> torch.Tensor:
        """`eval_outputs` before any step, leaving no trace: the evaluation generators and
        the BatchNorm buffers (a forward in training mode moves them) are as before."""
        gens = [n.eval_gen.get_state() for n in self.networks]
        buffers = {k: b.clone() for k, b in self.net.named_buffers()}
        out = self.eval_outputs(draws)
        for n, g in zip(self.networks, gens, strict=True):
            n.eval_gen.set_state(g)
        self.net.load_state_dict(buffers, strict=False)
        return out


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
