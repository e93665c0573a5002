#!/usr/bin/env python3
"""Benchmark: network-iterations per second of the DIP notebook's loop and of the project's
packed loop at K = 1, 2, 4, 8, 16 networks, on one device, in one run.

reference: one network, the deep-image-prior denoising notebook's loop: every iteration
    reads the loss and computes three PSNRs on the CPU (a host sync per iteration).
project:   `study.engine.trial.Trial` with `repeats=K` (K networks packed into one computation,
    no host sync in the step), once per step variant (models/step.py `StepOptions`):
    on the CPU fp32 eager, packed and separate; on a GPU also channels_last, cat-reflection,
    CUDA graph + fused Adam, `auto` (what trials use) and auto + bf16.

One line per measurement (net_it_per_s = K x steps / s; report_s = one evaluation of all
K networks, which a trial pays every report_every steps; psnr_ema = mean over the K
networks after the timed steps), then `ratio_vs_reference: X` for the fastest project
measurement. --check-iterations N adds a trajectory check: the mean psnr_ema of K
networks every N/10 steps, fp32 eager against the fastest variant.

    python bench/throughput.py                    # CPU: 64 px, the default trial network, ~1 min
    python bench/throughput.py --size 256 --net reference --check-iterations 1500   # a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio  # noqa: E402

from models import build_network  # noqa: E402
from models.step import StepOptions  # noqa: E402
from study.engine import images as img  # noqa: E402
from study.config import TrialConfig  # noqa: E402
from study.engine.trial import Trial, resolve_device  # noqa: E402

NETS = {  # name: (scales, channels) ; skips of 4, input depth 32 for both
    "reference": (5, 128),  # the DIP denoising notebook's skip network
    "small": (3, 32),       # the project's default trial network
}


def variants(device: torch.device) -> dict[str, StepOptions]:
    auto = StepOptions.auto(device)
    if device.type != "cuda":
        return {"fp32_eager": StepOptions(), "separate": StepOptions(pack=False)}
    return {
        "fp32_eager": StepOptions(),
        "channels_last": StepOptions(channels_last=True),
        "channels_last+reflect_cat": StepOptions(channels_last=True, reflect="cat"),
        "cuda_graph+fused_adam": StepOptions(cuda_graph=True, fused_adam=True),
        "auto": auto,
        "auto+bf16": dataclasses.replace(auto, bf16=True),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, help="image side in px [64 on CPU, 512 on GPU]")
    p.add_argument("--net", choices=sorted(NETS), help="network [small on CPU, reference on GPU]")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="networks per trial [1 2 4 8 16]")
    p.add_argument("--steps", type=int, help="timed steps per measurement [20 on CPU, 50 on GPU]")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (CUDA graph capture) [5]")
    p.add_argument("--variants", nargs="+", help="project step variants [all for the device]")
    p.add_argument("--check-iterations", type=int, default=0,
                   help="also compare psnr_ema trajectories over this many steps [0: no]")
    p.add_argument("--check-k", type=int, default=4, help="networks averaged in the check [4]")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N [auto]")
    p.add_argument("--threads", type=int, help="CPU threads for torch [torch's default]")
    return p.parse_args(argv)


def config(ns: argparse.Namespace, k: int, iterations: int = 10**6) -> TrialConfig:
    scales, channels = NETS[ns.net]
    return TrialConfig(images=("camera",), size=ns.size, color="gray", task="denoise",
                       noise_mode="uniform", input_depth=32, net="skip", scales=scales,
                       channels=channels, skip_channels=4, lr=0.01, iterations=iterations,
                       report_every=max(1, iterations // 10), repeats=k, device=ns.device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reference_loop(ns: argparse.Namespace, device: torch.device) -> float:
    """The notebook's closure: forward, MSE, backward, Adam, then loss.item(), the output
    EMA and three skimage PSNRs on the CPU, every iteration. Returns iterations/s."""
    cfg = config(ns, 1)
    clean = img.load_image("camera", cfg.size, "gray")
    noisy = img.degrade(clean, cfg, torch.Generator().manual_seed(0)).observation
    clean_np, noisy_np = clean[0].numpy(), noisy[0].numpy()
    noisy = noisy.to(device)
    torch.manual_seed(0)
    net = build_network("skip", 32, 1, scales=cfg.scales, channels=cfg.channels,
                        skip_channels=4, upsample="bilinear").to(device)
    z = torch.rand(1, 32, cfg.size, cfg.size, device=device) * 0.1
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    ema = None

    def closure() -> None:
        nonlocal ema
        out = net(z + cfg.reg_noise_std * torch.randn_like(z))
        loss = F.mse_loss(out, noisy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = out.detach()
        ema = out if ema is None else ema * 0.99 + out * 0.01
        loss.item()
        out_np, ema_np = out.cpu()[0].numpy(), ema.cpu()[0].numpy()
        peak_signal_noise_ratio(noisy_np, out_np, data_range=1)
        peak_signal_noise_ratio(clean_np, out_np, data_range=1)
        peak_signal_noise_ratio(clean_np, ema_np, data_range=1)

    for _ in range(ns.warmup):
        closure()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(ns.steps):
        closure()
    sync(device)
    return ns.steps / (time.perf_counter() - t0)


def project_loop(ns: argparse.Namespace, device: torch.device, k: int,
                 options: StepOptions) -> dict[str, float]:
    trial = Trial(config(ns, k), options=options)
    for _ in range(ns.warmup):
        trial.step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(ns.steps):
        trial.step()
    sync(device)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    m = trial.evaluate()
    return {"net_it_per_s": k * ns.steps / seconds, "it_per_s": ns.steps / seconds,
            "report_s": time.perf_counter() - t1, "psnr_ema": m["psnr_ema"]}


def trajectory(ns: argparse.Namespace, k: int, options: StepOptions) -> list[float]:
    """Mean psnr_ema of k networks at every tenth of --check-iterations."""
    cfg = config(ns, k, ns.check_iterations)
    trial = Trial(cfg, options=options)
    curve = []
    while trial.iteration < cfg.iterations:
        trial.step()
        if trial.iteration % cfg.report_every == 0:
            curve.append(trial.evaluate()["psnr_ema"])
    return curve


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device = resolve_device(ns.device)
    gpu = device.type == "cuda"
    ns.size = ns.size or (512 if gpu else 64)
    ns.net = ns.net or ("reference" if gpu else "small")
    ns.steps = ns.steps or (50 if gpu else 20)
    table = variants(device)
    chosen = ns.variants or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; allowed here: {', '.join(table)}",
              file=sys.stderr)
        return 2
    cmd = shlex.join(["python", "bench/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"# {cmd}\n# device: {device_name(device)}; torch {torch.__version__}; "
          f"camera {ns.size}px gray, skip {ns.net} {NETS[ns.net]}, {ns.steps} timed steps "
          f"after {ns.warmup}; load average {os.getloadavg()[0]:.1f}", flush=True)
    reset_memory(device)
    ref = reference_loop(ns, device)
    print(f"loop=reference variant=notebook K=1 size={ns.size} net_it_per_s={ref:.2f} "
          f"it_per_s={ref:.2f} gpu_mem_mib={memory_mib(device):.0f}", flush=True)
    best, best_name = 0.0, ""
    for name in chosen:
        for k in ns.ks:
            reset_memory(device)
            r = project_loop(ns, device, k, table[name])
            print(f"loop=project variant={name} K={k} size={ns.size} "
                  f"net_it_per_s={r['net_it_per_s']:.2f} it_per_s={r['it_per_s']:.2f} "
                  f"report_s={r['report_s']:.3f} psnr_ema={r['psnr_ema']:.2f} "
                  f"gpu_mem_mib={memory_mib(device):.0f}", flush=True)
            if r["net_it_per_s"] > best:
                best, best_name = r["net_it_per_s"], f"{name} K={k}"
    if ns.check_iterations:
        k = ns.check_k
        variant = best_name.split()[0]
        a = trajectory(ns, k, StepOptions())
        b = trajectory(ns, k, table[variant])
        step = max(1, ns.check_iterations // 10)
        for i, (x, y) in enumerate(zip(a, b, strict=True), start=1):
            print(f"trajectory it={i * step} K={k} psnr_ema_fp32_eager={x:.3f} "
                  f"psnr_ema_{variant}={y:.3f} delta_db={y - x:+.3f}", flush=True)
        print(f"trajectory_max_abs_delta_db: {max(abs(y - x) for x, y in zip(a, b)):.3f}")
    print(f"best: {best_name} at {best:.2f} network-iterations/s")
    print(f"ratio_vs_reference: {best / ref:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
