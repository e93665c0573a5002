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

It trains through the trial loop (study/engine/trial.py, a Trial of one network built
from the user's image), so the seeding, input, loss, EMA and ES-WMV are the study's own;
with `--stop auto` the loop ends at the first report after the rule fired (the restored
image is the one it picked, which no later iteration changes). The rule is the config's
`stop_rule` (or `--stop-rule`): ES-WMV, or held-out pixels (denoise only; the mask is
drawn at the image's native size from the config's seed and padded as the image is, so
no reflected copy of a held-out value reaches the network either). Without `--stop auto`
every pixel is fitted: holding pixels out only pays where their error picks the stop.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.step import StepOptions
from noise.sigma import estimate_sigma
from study.config import TrialConfig
from study.engine import images as img
from study.engine.holdout import MASK_SEED_OFFSET, keep_mask
from study.engine.images import Degraded, upsample
from study.engine.pack import network_for
from study.engine.trial import Trial, TrialDiverged, resolve_device, run_trial
from study.modes import HOLDOUT_TASKS, STOP_RULES, check_stop_rule, default_stop_rule
from study.paths import write_json

APPLY_TASKS = ("denoise", "inpaint", "sr")
OUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class ApplyOptions:
    task: str = "denoise"         # what the image is: denoise, inpaint (with mask) or sr
    mask: str | None = None       # inpaint: image of the same size, nonzero = known pixel
    sr_factor: int = 4            # sr: the output is this many times larger
    stop: str = "config"          # config: as the config says (its stop, iterations); auto: ES-WMV
    window: int | None = None     # ES-WMV window [the config's; paper: 100]
    patience: int | None = None   # ES-WMV patience [the config's; paper: 1000]
    max_iterations: int = 10000   # --stop auto: upper bound
    quiet: bool = False
    sigma: str | None = None      # denoise: "auto" (estimated from the image) or a number in (0, 1]; None: auto
    stop_rule: str | None = None  # --stop auto: eswmv or holdout [the config's]

    def __post_init__(self) -> None:
        if self.task not in APPLY_TASKS:
            raise ValueError(f"unknown --task {self.task!r}; allowed: {', '.join(APPLY_TASKS)}")
        if self.stop not in ("config", "auto"):
            raise ValueError(f"unknown --stop {self.stop!r}; allowed: auto (the stop rule), or leave it out")
        if (self.mask is not None) != (self.task == "inpaint"):
            raise ValueError("--mask goes with --task inpaint, and --task inpaint needs --mask MASK.png")
        check_sigma(self.sigma, self.task)
        if self.stop_rule is not None and self.stop_rule not in STOP_RULES:
            raise ValueError(f"unknown --stop-rule {self.stop_rule!r}; allowed: {', '.join(STOP_RULES)}")
        for name in ("sr_factor", "window", "patience", "max_iterations"):
            v, lo = getattr(self, name), 2 if name == "sr_factor" else 1
            if v is None and name in ("window", "patience"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"--{name.replace('_', '-')} = {v!r} is not allowed; allowed: an integer >= {lo}")


def check_sigma(sigma: str | None, task: str) -> None:
    """`--sigma`: auto or a number in (0, 1], and only for denoising."""
    if sigma is None:
        return
    if task != "denoise":
        raise ValueError(f"--sigma {sigma} goes with --task denoise only (task here: {task}); "
                         "allowed: leave --sigma out")
    if sigma == "auto":
        return
    try:
        v = float(sigma)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1:
        raise ValueError(f"--sigma {sigma!r} is not allowed; allowed: auto, or a number in (0, 1] "
                         "on the image's [0, 1] scale (0.098 for 25/255)")


def choose_sigma(cfg: TrialConfig, y: torch.Tensor,
                 opts: ApplyOptions) -> tuple[TrialConfig, dict[str, float | str]]:
    """Denoise: the sigma the network uses, given (`--sigma S`) or estimated from the
    user's image `y` (noise/sigma.py, one value over the channels), set as the config's
    `sigma` (so SURE uses it; with MSE it only tells how noisy the image is). Other
    tasks: the config unchanged, no record."""
    if opts.task != "denoise":
        return cfg, {}
    if opts.sigma not in (None, "auto"):
        sigma, source = float(opts.sigma), "given"
    else:
        sigma, source = estimate_sigma(y), "estimated"
    return cfg.replace(sigma=sigma, sigma_estimate=False), {"sigma": sigma, "sigma_source": source}


Picture = img.Pixels  # a user's image: pixels, the mode to write back, its alpha


def read_picture(path: str | Path) -> Picture:
    """The user's image (images.py `read_file`; `.x` is its (1, C, H, W) tensor)."""
    return img.read_file(path)


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


def stop_rule(cfg: TrialConfig, opts: ApplyOptions) -> str:
    """--stop-rule, else the config's where apply's task allows it, else the task's default
    (a denoise config's held-out rule does not carry over to `--task inpaint`)."""
    if opts.stop_rule:
        return opts.stop_rule
    return cfg.stop_rule if opts.task in HOLDOUT_TASKS else default_stop_rule(opts.task)


def fit(cfg: TrialConfig, prob: Problem, opts: ApplyOptions, device: torch.device,
        progress: Progress) -> tuple[torch.Tensor, dict[str, Any]]:
    """Train one network on `prob` with the trial loop (study/engine/trial.py, the packed
    Trial of one network); returns the restored image (cropped) and the record."""
    auto = opts.stop == "auto" or (opts.stop == "config" and cfg.stop == "auto")
    cfg = cfg.replace(stop="auto" if auto else "budget",
                      window=opts.window or cfg.window, patience=opts.patience or cfg.patience,
                      iterations=opts.max_iterations if opts.stop == "auto" else cfg.iterations,
                      stop_rule=stop_rule(cfg, opts) if auto else "eswmv")
    # The loss is taken on the known pixels only: the observation and the output masked
    # by `weight` (0 on padding and on missing pixels).
    data = Degraded(None, prob.observation * prob.weight, prob.input_image, prob.weight,
                    prob.factor).to(device)
    # One network, not packed: on a GPU a pack of one computes as a pack of two so that its
    # numbers match a study's repeats (study/engine/pack.py), which a user's own image
    # does not need at twice the cost (on the CPU the two are the same computation).
    options = dataclasses.replace(StepOptions.auto(device), pack=False)
    h, w = prob.out_size
    keep = None
    if cfg.stop_rule == "holdout":
        keep = pad(keep_mask((h, w), cfg.holdout_fraction, cfg.seed + MASK_SEED_OFFSET), *data.observation.shape[-2:])
    trial = Trial(cfg, options=options, networks=[network_for(cfg, data, "image", 0, cfg.seed, device, keep)],
                  crop=prob.out_size)
    rule = "es-wmv" if cfg.stop_rule == "eswmv" else "holdout"
    t0 = time.perf_counter()

    def report(m: dict[str, float], t: Trial) -> None:
        lv = m["loss"]
        if not math.isfinite(lv):
            raise FloatingPointError(f"the loss became {lv} at iteration {t.iteration} (lr = {cfg.lr}); "
                                     "try a smaller lr")
        var = float(t.packs[0].autostop.var[0])
        what = "wmv" if rule == "es-wmv" else "held-out mse"
        wtxt = f"  {what} {var:.3e} (min at {int(m['autostop_iteration'])})" if auto and math.isfinite(var) else ""
        progress(f"it {t.iteration:>6}/{cfg.iterations}  loss {lv:.5f}{wtxt}  "
                 f"{(time.perf_counter() - t0) / t.iteration:.3f} s/it")

    try:
        run_trial(cfg, report, trial=trial)
    except TrialDiverged as e:
        raise FloatingPointError(f"{e}; try a smaller lr") from None
    seconds, it = time.perf_counter() - t0, trial.iteration
    a = trial.packs[0].autostop
    if auto and int(a.iteration[0]):
        stopped = {"stop": rule, "stop_iteration": int(a.iteration[0]),
                   "wmv" if rule == "es-wmv" else "holdout_mse": float(a.var[0]), "fired_at": int(a.fired_at[0])}
        if rule == "holdout":  # the estimate needs no clean image: a user's too
            at_stop = trial.evaluate()
            stopped["psnr_estimate"] = at_stop["psnr_estimate"]
            stopped["estimate_at_ceiling"] = at_stop["estimate_at_ceiling"] > 0  # then not resolved
        restored = trial.autostop_output(0)
    else:
        why = f"{rule} found no minimum within --max-iterations" if auto else "config"
        stopped = {"stop": why, "stop_iteration": it}
        restored = trial.packs[0].ema[:1] / trial.ema_norm
    return restored[..., :h, :w].cpu(), {**stopped, "iterations_run": it, "seconds": round(seconds, 3),
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
    if opts.stop == "auto" or (opts.stop == "config" and cfg.stop == "auto"):
        check_stop_rule(stop_rule(cfg, opts), opts.task)
    mask = read_mask(opts.mask, tuple(pic.x.shape[-2:])) if opts.mask else None
    device = resolve_device(cfg.device)
    prob = make_problem(pic.x, opts, mask, 2 ** cfg.scales)
    h, w = pic.x.shape[-2:]
    cfg, noise = choose_sigma(cfg, pic.x, opts)
    if not opts.quiet:
        progress(f"restoring {image} ({w}x{h} {pic.mode}, {opts.task}) with {cfg.net} "
                 f"{cfg.noise_mode}{f' t={cfg.timestep}' if cfg.is_ddpm else ''} lr {cfg.lr} {cfg.loss} on {device}; "
                 f"padded to {prob.observation.shape[-1]}x{prob.observation.shape[-2]}")
        if noise:
            progress(f"noise sigma {noise['sigma']:.4f} ({255 * noise['sigma']:.1f}/255), {noise['sigma_source']}"
                     + ("" if cfg.loss == "sure" else f"; the {cfg.loss} loss does not use it"))
    restored, record = fit(cfg, prob, opts, device, (lambda s: None) if opts.quiet else progress)
    write_picture(restored, pic, out)
    info = {"image": str(image), "out": str(out), "task": opts.task, "size_in": [w, h],
            "size_out": [restored.shape[-1], restored.shape[-2]], "mode": pic.mode,
            "device": str(device), **noise, **record,
            "config": cfg.to_dict() | {"images": [str(image)]}}
    if opts.task == "sr":
        info["sr_factor"] = opts.sr_factor
    write_json(out.with_suffix(".json"), info)
    if not opts.quiet:
        by = {"es-wmv": "ES-WMV", "holdout": "held-out pixels"}
        where = (f"stopped by {by[record['stop']]} at iteration {record['stop_iteration']} "
                 f"(ran {record['iterations_run']})" if record["stop"] in by
                 else f"{record['iterations_run']} iterations ({record['stop']})")
        progress(f"done in {record['seconds']:.1f} s: {where}; wrote {out} and {out.with_suffix('.json')}")
    return info
