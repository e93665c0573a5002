"""No-reference stopping: ES-WMV (Wang et al., "Early Stopping for Deep Image Prior",
TMLR 2023), the one rule of both `apply --stop auto` and every trial.

The windowed moving variance of the network's outputs (the mean squared deviation of the
last `window` outputs from their mean) falls while the network fits the image and rises
again once it fits the noise. The candidate is the output EMA at the iteration where the
variance was lowest so far; the rule fires `patience` iterations after that minimum with
no lower value since, and the candidate is then final. It needs no clean image.

Everything stays on the device (no host sync, CUDA-graph capturable): a ring buffer of
the last `window` outputs of each network and running sums in float64, so an iteration
costs a few passes over one output per network. Of a large image the rule sees block
means of at most about WMV_PIXELS pixels (`thumbnail`): the variance of block means
tracks the same drift and the window stays small for a photo of many megapixels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WMV_PIXELS = 65536


def thumbnail(x: torch.Tensor) -> torch.Tensor:
    """(K, C, H, W) -> block means with at most about WMV_PIXELS pixels per image (small
    images unchanged)."""
    k = math.ceil(math.sqrt(x.shape[-2] * x.shape[-1] / WMV_PIXELS))
    return x if k <= 1 else F.avg_pool2d(x, k, ceil_mode=True)


class WindowVariance:
    """The windowed variance of K streams of images, one value per stream, on the device."""

    def __init__(self, window: int, shape: torch.Size | tuple[int, ...], device: torch.device):
        if window < 1:
            raise ValueError(f"window = {window} is not allowed; allowed: an integer >= 1")
        self.window = window
        self.items = torch.zeros((window, *shape), device=device)          # ring buffer
        self.s1 = torch.zeros(shape, dtype=torch.float64, device=device)   # sum of the window
        self.s2 = torch.zeros(shape[0], dtype=torch.float64, device=device)  # sum of squares
        self.numel = math.prod(shape[1:])

    def add(self, x: torch.Tensor, it: torch.Tensor) -> torch.Tensor:
        """Add the outputs `x` (K, ...) of iteration `it` (a device scalar, from 1); returns
        the variance of the last `window` outputs per stream, +inf until `window` are in."""
        x = x.detach().float()
        slot = ((it - 1) % self.window).reshape(1)
        old = self.items.index_select(0, slot)[0]
        self.items.index_copy_(0, slot, x[None])
        xd, od = x.double(), old.double()
        self.s1.add_(xd - od)
        self.s2.add_((xd * xd).flatten(1).sum(1) - (od * od).flatten(1).sum(1))
        n = self.window
        var = (self.s2 / n - (self.s1 / n).square().flatten(1).sum(1)) / self.numel
        return torch.where(it >= n, var.clamp_min(0), torch.full_like(var, math.inf))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"items": self.items.cpu(), "s1": self.s1.cpu(), "s2": self.s2.cpu()}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        for name in ("items", "s1", "s2"):
            getattr(self, name).copy_(s[name])


class AutoStop:
    """ES-WMV for the K networks of a pack: per network the candidate (iteration, its
    variance, the output EMA there) and the iteration the rule fired at (0: not yet)."""

    def __init__(self, window: int, patience: int, shape: torch.Size, crop: tuple[int, int],
                 device: torch.device):
        self.patience, self.crop = patience, crop
        k = shape[0]
        probe = thumbnail(torch.zeros((1, *shape[1:2], *crop)))
        self.wmv = WindowVariance(window, (k, *probe.shape[1:]), device)
        self.var = torch.full((k,), math.inf, dtype=torch.float64, device=device)
        self.iteration = torch.zeros(k, dtype=torch.long, device=device)
        self.fired_at = torch.zeros(k, dtype=torch.long, device=device)
        self.ema = torch.zeros(shape, device=device)  # normalised EMA at the candidate

    def track(self, out: torch.Tensor, ema: torch.Tensor, it: torch.Tensor) -> None:
        """After a step: `out` the training outputs (K, C, H, W), `ema` the normalised output
        EMA, `it` the iteration (device scalar). Once a network's rule fired, its candidate
        no longer moves."""
        h, w = self.crop
        var = self.wmv.add(thumbnail(out.detach()[..., :h, :w]), it)
        live = self.fired_at == 0
        better = live & (var < self.var)
        self.var.copy_(torch.where(better, var, self.var))
        self.iteration.copy_(torch.where(better, it, self.iteration))
        self.ema.copy_(torch.where(better.view(-1, 1, 1, 1), ema.detach(), self.ema))
        fire = live & (self.iteration > 0) & (it - self.iteration >= self.patience)
        self.fired_at.copy_(torch.where(fire, it, self.fired_at))

    def output(self, ema: torch.Tensor) -> torch.Tensor:
        """The output the rule picks so far: the candidate, or before the window has filled
        (no candidate yet) the current normalised EMA `ema`."""
        return torch.where((self.iteration > 0).view(-1, 1, 1, 1), self.ema, ema)

    def state_dict(self, k: int) -> dict[str, object]:
        """Network k's part of the state."""
        wmv = self.wmv.state_dict()
        return {"items": wmv["items"][:, k].clone(), "s1": wmv["s1"][k].clone(),
                "s2": float(wmv["s2"][k]), "var": float(self.var[k]),
                "iteration": int(self.iteration[k]), "fired_at": int(self.fired_at[k]),
                "ema": self.ema[k].cpu().clone()}

    def load_state_dict(self, states: list[dict[str, object]]) -> None:
        """The state of every network, in pack order (see `state_dict`)."""
        self.wmv.load_state_dict({
            "items": torch.stack([s["items"] for s in states], 1),  # type: ignore[misc]
            "s1": torch.stack([s["s1"] for s in states]),  # type: ignore[misc]
            "s2": torch.tensor([s["s2"] for s in states], dtype=torch.float64)})
        for name, dtype in (("var", torch.float64), ("iteration", torch.long), ("fired_at", torch.long)):
            getattr(self, name).copy_(torch.tensor([s[name] for s in states], dtype=dtype))
        self.ema.copy_(torch.stack([s["ema"] for s in states]))  # type: ignore[misc]
