"""`run_study.py apply`: restore a user's own degraded image with a configuration.

The image is the observation as given: no clean image exists, so no metric here looks
at one. It keeps its native size and aspect: the network needs sides divisible by
2**scales, so the observation is padded at the bottom and right (reflection) to the next
multiple, the loss ignores the padding, and the output is cropped back.

The restored image is the output average (bias-corrected EMA, weight `ema_weight`: the
weights sum to one over the outputs seen so far) at the last iteration, or with
`--stop auto` at the iteration ES-WMV picks: the windowed moving variance of the outputs
reaches its minimum and has not improved for `patience` iterations (Wang et al., "Early
Stopping for Deep Image Prior", TMLR 2023; docs/science.md).

The loop is written against the stable pieces (models/, noise/); sharing one loop with
study/engine/trial.py is a follow-up once its packed rewrite settles.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models import build_network
from noise.inputs import make_input
from noise.schedules import alphas_cumprod, make_betas
from study.config import TrialConfig
from study.engine.images import downsample, upsample
from study.paths import write_json
from study.engine.trial import resolve_device

APPLY_TASKS = ("denoise", "inpaint", "sr")
OUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class ApplyOptions:
    task: str = "denoise"         # what the image is: denoise, inpaint (with mask) or sr
    mask: str | None = None       # inpaint: image of the same size, nonzero = known pixel
    sr_factor: int = 4            # sr: the output is this many times larger
    stop: str = "config"          # config: cfg.iterations; auto: ES-WMV
    window: int = 100             # ES-WMV window (paper: 100)
    patience: int = 1000          # ES-WMV patience (paper: 1000)
    max_iterations: int = 10000   # --stop auto: upper bound
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.task not in APPLY_TASKS:
            raise ValueError(f"unknown --task {self.task!r}; allowed: {', '.join(APPLY_TASKS)}")
        if self.stop not in ("config", "auto"):
            raise ValueError(f"unknown --stop {self.stop!r}; allowed: auto (ES-WMV), or leave it out")
        if (self.mask is not None) != (self.task == "inpaint"):
            raise ValueError("--mask goes with --task inpaint, and --task inpaint needs --mask MASK.png")
        for name in ("sr_factor", "window", "patience", "max_iterations"):
            v, lo = getattr(self, name), 2 if name == "sr_factor" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"--{name.replace('_', '-')} = {v!r} is not allowed; allowed: an integer >= {lo}")


@dataclass
class Picture:
    """The user's image: pixels in [0, 1] and what it takes to write it back alike."""

    x: torch.Tensor               # (1, C, H, W) float32, C = 1 or 3
    mode: str                     # PIL mode to write: L, RGB, RGBA, LA or I;16
    alpha: np.ndarray | None      # the alpha channel (H x W, uint8), put back unchanged


def read_picture(path: str | Path) -> Picture:
    try:
        with Image.open(path) as im:
            im.load()
            mode, bands = im.mode, im.getbands()
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im).astype(np.float32) / 65535.0
                return Picture(_tensor(a), "I;16", None)
            if mode == "P":  # a palette image comes back as RGB(A)
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode, bands = im.mode, im.getbands()
            alpha = np.asarray(im.getchannel("A")) if "A" in bands else None
            gray = mode in ("1", "L", "LA")
            a = np.asarray(im.convert("L" if gray else "RGB")).astype(np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from None
    out_mode = ("LA" if alpha is not None else "L") if gray else ("RGBA" if alpha is not None else "RGB")
    return Picture(_tensor(a), out_mode, alpha)


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].clamp(0, 1)


def write_picture(x: torch.Tensor, pic: Picture, path: Path) -> None:
    """(1, C, H, W) in [0, 1] -> a file in the input's mode and bit depth."""
    a = x.detach().float().cpu().clamp(0, 1)[0].permute(1, 2, 0).numpy()
    if pic.mode == "I;16":
        im = Image.fromarray((a[:, :, 0] * 65535).round().astype(np.uint16))
    else:
        u8 = (a * 255).round().astype(np.uint8)
        im = Image.fromarray(u8[:, :, 0] if u8.shape[2] == 1 else u8)
        if pic.alpha is not None:
            alpha = Image.fromarray(pic.alpha).resize(im.size, Image.Resampling.BICUBIC)
            im.putalpha(alpha)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # atomic: no half-written image
    im.save(tmp)
    tmp.replace(path)


def read_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, H, W) float, 1 where the pixel is known."""
    m = read_picture(path).x.mean(1, keepdim=True)
    if tuple(m.shape[-2:]) != size:
        raise ValueError(f"mask {path!r} is {m.shape[-1]}x{m.shape[-2]} but the image is "
                         f"{size[1]}x{size[0]}; allowed: a mask of the image's size")
    known = (m > 0.5).float()
    if known.sum() == 0:
        raise ValueError(f"mask {path!r} marks no pixel as known (white = known, black = missing)")
    return known


def padded_side(side: int, multiple: int, factor: int = 1) -> int:
    """Smallest side >= `side` whose output (`factor` times larger) the network's scales
    divide, with at least a 2x2 map at the bottom (reflection padding needs it)."""
    q = multiple // math.gcd(multiple, factor)
    p = -(-side // q) * q
    while p * factor < 2 * multiple:
        p += q
    return p


def pad(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pad bottom/right to h x w: reflection where the image is large enough, else edge."""
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode) if ph or pw else x


class WindowVariance:
    """ES-WMV: the mean squared deviation of the last `window` outputs from their mean,
    kept with running sums (float64) so each iteration costs one image's worth of work."""

    def __init__(self, window: int):
        self.window, self.items = window, deque()
        self.s1: torch.Tensor | None = None
        self.s2 = 0.0

    def add(self, x: torch.Tensor) -> float | None:
        x = x.detach().double()
        self.items.append(x)
        self.s1 = x.clone() if self.s1 is None else self.s1 + x
        self.s2 += float((x * x).sum())
        if len(self.items) > self.window:
            old = self.items.popleft()
            self.s1 -= old
            self.s2 -= float((old * old).sum())
        if len(self.items) < self.window:
            return None
        n = self.window
        return max(0.0, (self.s2 / n - float((self.s1 / n).pow(2).sum())) / x.numel())


WMV_PIXELS = 65536  # ES-WMV keeps `window` outputs: of a large image, block means of it


def _thumbnail(x: torch.Tensor) -> torch.Tensor:
    """`x` as block means with at most about WMV_PIXELS pixels, so the window of outputs
    stays small for a photo of many megapixels (variance of block means tracks the same
    drift of the output; small images are used as they are)."""
    k = math.ceil(math.sqrt(x.shape[-2] * x.shape[-1] / WMV_PIXELS))
    return x if k <= 1 else F.avg_pool2d(x, k, ceil_mode=True)


@dataclass
class Problem:
    """What the network fits: the padded observation and the loss weights."""

    observation: torch.Tensor     # padded, at observation resolution
    weight: torch.Tensor          # 1 on known pixels of the image, 0 on padding/missing
    input_image: torch.Tensor     # padded, at output resolution (DDPM inputs start here)
    factor: int
    out_size: tuple[int, int]     # output size before padding (crop back to it)


def make_problem(y: torch.Tensor, opts: ApplyOptions, mask: torch.Tensor | None,
                 multiple: int) -> Problem:
    f = opts.sr_factor if opts.task == "sr" else 1
    h, w = y.shape[-2:]
    ph, pw = padded_side(h, multiple, f), padded_side(w, multiple, f)
    known = torch.ones(1, 1, h, w) if mask is None else mask
    obs = pad(y * known, ph, pw)
    weight = F.pad(known, (0, pw - w, 0, ph - h))
    big = upsample(obs, f) if f > 1 else obs
    return Problem(obs, weight.expand_as(obs).contiguous(), big, f, (h * f, w * f))


Progress = Callable[[str], None]


def fit(cfg: TrialConfig, prob: Problem, opts: ApplyOptions, device: torch.device,
        progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train one network on `prob`; returns the restored image (cropped) and the record."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    acp = alphas_cumprod(make_betas(cfg.schedule, cfg.num_timesteps))
    obs, weight = prob.observation.to(device), prob.weight.to(device)
    dip_input = make_input(cfg.noise_mode, prob.input_image.to(device), timestep=cfg.timestep,
                           input_depth=cfg.input_depth, reg_noise_std=cfg.reg_noise_std,
                           alphas_cumprod=acp, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_network(cfg.net, dip_input.channels, obs.shape[1], scales=cfg.scales,
                            channels=cfg.channels, skip_channels=cfg.skip_channels,
                            upsample=cfg.upsample).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = F.l1_loss if cfg.loss == "l1" else F.mse_loss
    h, w = prob.out_size
    total = opts.max_iterations if opts.stop == "auto" else cfg.iterations
    wmv = WindowVariance(opts.window) if opts.stop == "auto" else None
    num, best = None, {"var": math.inf, "iteration": 0, "image": None}
    t0, it, var = time.perf_counter(), 0, None
    for it in range(1, total + 1):
        out = net(dip_input.train_input(gen))
        pred = downsample(out, prob.factor) if prob.factor > 1 else out
        loss = loss_fn(pred * weight, obs * weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        x = out.detach()[..., :h, :w]
        num = (1 - cfg.ema_weight) * x if num is None else cfg.ema_weight * num + (1 - cfg.ema_weight) * x
        ema = num / (1 - cfg.ema_weight**it)  # bias-corrected: weights sum to one
        if wmv is not None:
            var = wmv.add(_thumbnail(x))
            if var is not None and var < best["var"]:
                best = {"var": var, "iteration": it, "image": ema.clone()}
        if it % cfg.report_every == 0 or it == total:
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"the loss became {lv} at iteration {it} (lr = {cfg.lr}); "
                                         "try a smaller lr")
            wtxt = f"  wmv {var:.3e} (min at {best['iteration']})" if wmv is not None and var is not None else ""
            progress(f"it {it:>6}/{total}  loss {lv:.5f}{wtxt}  "
                     f"{(time.perf_counter() - t0) / it:.3f} s/it")
        if wmv is not None and best["image"] is not None and it - best["iteration"] >= opts.patience:
            break
    seconds = time.perf_counter() - t0
    if wmv is not None and best["image"] is not None:
        stopped = {"stop": "es-wmv", "stop_iteration": best["iteration"], "wmv": best["var"]}
        restored = best["image"]
    else:
        why = "es-wmv found no minimum within --max-iterations" if wmv is not None else "config"
        stopped = {"stop": why, "stop_iteration": it}
        restored = ema
    return restored.cpu(), {**stopped, "iterations_run": it, "seconds": round(seconds, 3),
                            "seconds_per_iteration": seconds / max(it, 1)}




def check_out(out: Path, pic: Picture) -> None:
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out {str(out)!r} has no image suffix; allowed: {', '.join(OUT_SUFFIXES)}")
    if out.suffix.lower() in (".jpg", ".jpeg") and pic.mode not in ("L", "RGB"):
        raise ValueError(f"a {pic.mode} image cannot be written as JPEG without loss of "
                         f"{'bit depth' if pic.mode == 'I;16' else 'alpha'}; allowed: --out *.png or *.tif")


def apply(cfg: TrialConfig, image: str, out: Path, opts: ApplyOptions,
          progress: Progress = print) -> dict[str, Any]:
    """Restore `image` with `cfg`; writes `out` and `out` with suffix .json. Every check
    that can refuse runs before training, and nothing is written before the end."""
    pic = read_picture(image)
    check_out(out, pic)
    mask = read_mask(opts.mask, tuple(pic.x.shape[-2:])) if opts.mask else None
    device = resolve_device(cfg.device)
    prob = make_problem(pic.x, opts, mask, 2 ** cfg.scales)
    h, w = pic.x.shape[-2:]
    if not opts.quiet:
        progress(f"restoring {image} ({w}x{h} {pic.mode}, {opts.task}) with {cfg.net} "
                 f"{cfg.noise_mode}{f' t={cfg.timestep}' if cfg.is_ddpm else ''} lr {cfg.lr} on {device}; "
                 f"padded to {prob.observation.shape[-1]}x{prob.observation.shape[-2]}")
    restored, record = fit(cfg, prob, opts, device, (lambda s: None) if opts.quiet else progress)
    write_picture(restored, pic, out)
    info = {"image": str(image), "out": str(out), "task": opts.task, "size_in": [w, h],
            "size_out": [restored.shape[-1], restored.shape[-2]], "mode": pic.mode,
            "device": str(device), **record,
            "config": cfg.to_dict() | {"images": [str(image)]}}
    if opts.task == "sr":
        info["sr_factor"] = opts.sr_factor
    write_json(out.with_suffix(".json"), info)
    if not opts.quiet:
        where = (f"stopped by ES-WMV at iteration {record['stop_iteration']} "
                 f"(ran {record['iterations_run']})" if record["stop"] == "es-wmv"
                 else f"{record['iterations_run']} iterations ({record['stop']})")
        progress(f"done in {record['seconds']:.1f} s: {where}; wrote {out} and {out.with_suffix('.json')}")
    return info
