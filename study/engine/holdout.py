"""Held-out pixels: a stopping rule and a no-reference PSNR estimate (Noise2Self, Batson
and Royer, ICML 2019; for DIP "self-validation", Li et al., BMVC 2021).

A random fraction of the observation's pixels (every channel of a pixel together, as
deepinv's SplittingLoss with `pixelwise=True`) is left out of the loss, and no path
carries their observed values to the network: the loss never sees them, and an input
built from the observation (the DDPM inputs) sees each replaced by the mean of its kept
neighbours (`fill`). The network's output there is then J-invariant: it does not depend
on the noise at those pixels, so for noise independent per pixel

    E ||f_J - y_J||^2 / |J| = E ||f_J - x_J||^2 / |J| + sigma^2

and the held-out error is the true error plus a constant. Its minimum over iterations is
the oracle's stop up to sampling noise (that noise is the same at every iteration of one
network: the argmin is far more precise than the level).

The estimate of the PSNR (`HoldOutStop.estimates`) is of the whole output, not of the
held-out pixels only, which the network interpolates and so fits worse than the kept ones
(measured: docs/science.md). Two corrections on top of "held-out error less the noise
power", both from the observation alone:
- The kept pixels, by the leave-one-out identity of a linear smoother f = S y (Craven and
  Wahba 1979; Hastie, Tibshirani and Friedman, ESL 7.10): the residual of the prediction
  that did not see pixel i is (y_i - f_i) / (1 - S_ii). The held-out residual E_J stands
  for that prediction's and the kept one E_K for the fit's, so the share of its own noise a
  kept pixel has absorbed is lam = 1 - sqrt(E_K / E_J), and SURE over the kept pixels is
  E_K - sigma^2 + 2 sigma^2 lam. The network is not linear: this is a first-order model.
- The held-out sample, by a control variate (the regression estimator of survey sampling,
  Cochran, "Sampling Techniques", ch. 7): the held-out pixels are a random tenth, so the
  squared difference of a pixel from its 8 neighbours' mean, rho, has the same mean over
  them as over all pixels; the part of E_J that moves with rho_J - rho_all is the chance
  of the draw (mostly how much noise power the held-out pixels happen to hold) and is
  removed: E_J - beta (rho_J - rho_all), beta fitted over the held-out pixels.

Clipping. The observation is clip(x + n, 0, 1): near 0 and 1 the noise is neither zero
mean nor of variance sigma^2, and on a dark image the plain sigma^2 overstates the noise
power. `clipped_noise_power` is E[(clip(x + n) - x)^2] in closed form, evaluated at the
output as a plug-in for x: what `psnr_estimate` subtracts (it is sigma^2 where no pixel
is near 0 or 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


MASK_SEED_OFFSET = 4  # the mask of a network of seed s is drawn from s + 4 (s + 1..3: its draws)


def keep_mask(shape: tuple[int, int], fraction: float, seed: int) -> torch.Tensor:
    """(1, 1, H, W) float, 0 on the held-out pixels (each with probability `fraction`),
    drawn on the CPU from `seed` so a repeat, its replay and every device agree."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((1, 1, *shape), generator=gen) >= fraction).float()


_KERNEL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])


def fill(y: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`y` (N, C, H, W) with each held-out pixel (keep = 0) replaced by the mean of its kept
    8-neighbours (Noise2Self's replacement), or where it has none the mean of the kept
    pixels: linear in `y`, and no held-out value enters the result."""
    kept = y * keep
    c = y.shape[1]
    k = _KERNEL.to(y).view(1, 1, 3, 3)
    num = F.conv2d(F.pad(kept, (1, 1, 1, 1), mode="replicate").flatten(0, 1)[:, None], k).view_as(y)
    den = F.conv2d(F.pad(keep, (1, 1, 1, 1), mode="replicate"), k).expand(y.shape[0], c, -1, -1)
    mean_kept = kept.sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1)
    near = torch.where(den > 0, num / den.clamp_min(1e-12), mean_kept.expand_as(y))
    return torch.where(keep > 0, y, near)


def neighbour_residual(y: torch.Tensor) -> torch.Tensor:
    """(y - the mean of its 8 neighbours)^2 per value of `y` (N, C, H, W), edges
    replicated: the control variate of the estimate (noise power plus local detail)."""
    k = (_KERNEL / 8).to(y).view(1, 1, 3, 3)
    near = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate").flatten(0, 1)[:, None], k).view_as(y)
    return (y - near).square()


def _mean(x: torch.Tensor, where: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Per network, the mean of `x` (K, C, H, W) over the pixels `where` (K, 1, H, W)
    marks, `count` of them times C, (K,)."""
    return (x * where).flatten(1).sum(1) / count


def clipped_noise_power(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """E[(clip(x + n, 0, 1) - x)^2] for n ~ N(0, sigma^2), per pixel of `x` in [0, 1]:
    with a = -x / sigma, b = (1 - x) / sigma and z standard normal,
    sigma^2 E[clip(z, a, b)^2] = sigma^2 (a^2 Phi(a) + b^2 (1 - Phi(b))
    + Phi(b) - Phi(a) - b phi(b) + a phi(a)). `sigma`: one for all, or (K,) one per
    network of a pack `x` (K, C, H, W); 0 where sigma is 0."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    s = s.view(-1, 1, 1, 1) if s.dim() else s
    x = x.double().clamp(0, 1)
    a, b = -x / s.clamp_min(1e-12), (1 - x) / s.clamp_min(1e-12)
    cdf, pdf = torch.special.ndtr, (lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi))
    m2 = (a * a * cdf(a) + b * b * (1 - cdf(b)) + cdf(b) - cdf(a) - b * pdf(b) + a * pdf(a))
    return torch.where(s > 0, s**2 * m2, torch.zeros_like(m2)).float()


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR on [0, 1] images."""
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


class HoldOutStop:
    """The held-out rule for the K networks of a pack, in AutoStop's shape (study/engine/
    autostop.py): per network the candidate (iteration, its held-out error `var`, the output
    EMA there) and the iteration the rule fired at (0: not yet), all on the device."""

    def __init__(self, patience: int, observation: torch.Tensor, held: torch.Tensor,
                 sigma: float | torch.Tensor, kept: torch.Tensor | None = None):
        """`observation` (K, C, H, W); `held` (K, 1, H, W) 1 on the held-out pixels the
        error is taken on; `sigma` the noise's, one or (K,) (study/engine/sigma.py `used_sigma`:
        the true sigma in a benchmark, the estimate with `sigma_estimate`); `kept` 1 on the
        pixels in the loss (default: all the others; in `apply` not the padding)."""
        self.patience, self.sigma = patience, sigma
        self.observation, self.held = observation, held
        self.kept = 1 - held if kept is None else kept
        k, c = observation.shape[:2]
        self.count = held.flatten(1).sum(1).clamp_min(1) * c  # values in the error, (K,)
        self.kept_count = self.kept.flatten(1).sum(1).clamp_min(1) * c
        # The control variate of `estimates`: fixed, as the observation is.
        # one network at a time: a network's numbers must not depend on its pack's size
        rho = torch.cat([neighbour_residual(o[None].double()) for o in observation])
        known = held + self.kept
        self.rho_shift = (_mean(rho, held, self.count)
                          - _mean(rho, known, self.count + self.kept_count))  # rho_J - rho_all
        self.rho_held = (rho - _mean(rho, held, self.count).view(-1, 1, 1, 1)) * held
        dev = observation.device
        self.var = torch.full((k,), math.inf, dtype=torch.float64, device=dev)
        self.iteration = torch.zeros(k, dtype=torch.long, device=dev)
        self.fired_at = torch.zeros(k, dtype=torch.long, device=dev)
        self.ema = torch.zeros_like(observation)

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error of outputs `x` (K, C, H, W) against the observation on the
        held-out pixels, (K,) float64."""
        d = x.detach().float() - self.observation
        return _mean(d.double().square(), self.held, self.count)

    def track(self, out: torch.Tensor, ema: torch.Tensor, it: torch.Tensor) -> None:
        """After a step: the candidate is the EMA `ema` at its lowest held-out error so far;
        the rule fires `patience` iterations after it with no lower error since."""
        del out  # the EMA is both what is watched and what is returned
        err = self.error(ema)
        live = self.fired_at == 0
        better = live & (err < self.var)
        self.var.copy_(torch.where(better, err, self.var))
        self.iteration.copy_(torch.where(better, it, self.iteration))
        self.ema.copy_(torch.where(better.view(-1, 1, 1, 1), ema.detach(), self.ema))
        fire = live & (self.iteration > 0) & (it - self.iteration >= self.patience)
        self.fired_at.copy_(torch.where(fire, it, self.fired_at))

    def output(self, ema: torch.Tensor) -> torch.Tensor:
        return torch.where((self.iteration > 0).view(-1, 1, 1, 1), self.ema, ema)

    def estimates(self, ema: torch.Tensor) -> list[dict[str, float]]:
        """Per network: `holdout_mse`, the held-out error of the output the rule picks, and
        `psnr_estimate`, the PSNR of that whole output estimated with no clean image: the
        held-out error (less the draw's chance, by the control variate) and the kept
        pixels' SURE (the module docstring), each less the (clipped) noise power, weighted
        by their pixel counts; an MSE below the held-out noise power's sampling error is not
        claimed: there `psnr_estimate` is that ceiling, not resolved (a lower bound
        where the noise model holds, clock; above the truth where the clipping plug-in
        reads low, sigma 50 colour on the grid), and `estimate_at_ceiling` is 1 (0 where
        the estimate is resolved). How far it is off, measured: docs/science.md."""
        pick = self.output(ema)
        r2 = (pick.detach().double() - self.observation).square()
        e_j = _mean(r2, self.held, self.count)
        e_k = _mean(r2, self.kept, self.kept_count)
        rc = self.rho_held
        beta = (r2 * rc).flatten(1).sum(1) / rc.square().flatten(1).sum(1).clamp_min(1e-30)
        e_j_cv = e_j - beta * self.rho_shift
        # Where the held-out residual is no larger than the kept one the fit shows no
        # absorbed noise (also when both are 0: an observation the output equals).
        lam = torch.where(e_j_cv > e_k, 1 - (e_k / e_j_cv.clamp_min(1e-30)).sqrt(), torch.zeros_like(e_k))
        power = clipped_noise_power(pick, self.sigma).double()
        p_j, p_k = _mean(power, self.held, self.count), _mean(power, self.kept, self.kept_count)
        share = self.count / (self.count + self.kept_count)
        mse = share * (e_j_cv - p_j) + (1 - share) * (e_k - p_k + 2 * p_k * lam)
        # The held-out noise power is known only up to its sampling error, about
        # sqrt(2 / m) * power for m held-out values, and the estimate leans on the held-out
        # residual (through lam too): an MSE below that is not resolved, so the estimate stops
        # there (a ceiling on the PSNR it can claim, not 100 dB from a difference that came
        # out negative by chance). Measured: a floor from the estimate's own standard error
        # (delta method, after the control variate) claimed 36.7 dB on clock (64 px, true 32.8).
        floor = p_j * (2 / self.count).sqrt()
        est = psnr_from_mse(torch.maximum(mse, floor))
        capped = (mse <= floor).double()
        return [{"holdout_mse": e, "psnr_estimate": p, "estimate_at_ceiling": c}
                for e, p, c in zip(e_j.tolist(), est.tolist(), capped.tolist(), strict=True)]

    def state_dict(self, k: int) -> dict[str, object]:
        """Network k's part of the state (its held-out pixels too: a resume checks them)."""
        return {"held": self.held[k].cpu().clone(), "var": float(self.var[k]),
                "iteration": int(self.iteration[k]), "fired_at": int(self.fired_at[k]),
                "ema": self.ema[k].cpu().clone()}

    def load_state_dict(self, states: list[dict[str, object]]) -> None:
        held = torch.stack([s["held"] for s in states]).to(self.held)  # type: ignore[misc]
        if not torch.equal(held, self.held):
            raise ValueError("the checkpoint belongs to another configuration (its held-out pixels differ)")
        for name, dtype in (("var", torch.float64), ("iteration", torch.long), ("fired_at", torch.long)):
            getattr(self, name).copy_(torch.tensor([s[name] for s in states], dtype=dtype))
        self.ema.copy_(torch.stack([s["ema"] for s in states]))  # type: ignore[misc]
