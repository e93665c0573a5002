"""How a packed training step runs on its device: options and the step runner.

fp32 eager with native reflection padding is the reference, and what the CPU runs. On a
GPU the small, memory-bound kernels of DIP networks (issue 7: BatchNorm backward,
reflection padding, NCHW/NHWC conversions) leave it mostly idle, so `StepOptions.auto`
turns on what removes launches and copies without changing the arithmetic beyond
float32 rounding: channels-last end to end, reflection padding from slices
(models/packed.py `reflect_pad`), one fused Adam kernel, and the whole step captured
once as a CUDA graph and replayed. bf16 autocast changes the numbers more, so it is
offered (`bf16=True`) but not on by default until a GPU measurement shows the PSNR
trajectory within tolerance (bench/throughput.py prints it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .packed import ConvImpl, ReflectImpl

WARMUP_STEPS = 3  # eager steps on a side stream before capture (lazy cuDNN/cuBLAS setup)


@dataclass(frozen=True)
class StepOptions:
    pack: bool = True                # K networks as one grouped network; False: K separate ones
    channels_last: bool = False      # NHWC tensors end to end (cuDNN's native layout)
    bf16: bool = False               # bf16 autocast of forward and loss; outputs stay float32
    cuda_graph: bool = False         # capture the whole step once, then replay it
    fused_adam: bool = False         # one fused Adam kernel over all parameters
    reflect: ReflectImpl = "native"  # reflection padding: native kernel, or "cat" (slices)
    conv: ConvImpl = "split"         # packed convs: one groups=1 conv per network, or "grouped"

    @classmethod
    def auto(cls, device: torch.device) -> "StepOptions":
        """The fastest exact options for the device: fp32 eager on the CPU."""
        if device.type != "cuda":
            return cls()
        return cls(channels_last=True, cuda_graph=True, fused_adam=True, reflect="cat", conv="grouped")

    def check(self, device: torch.device) -> None:
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device}")
        if self.reflect not in ("native", "cat"):
            raise ValueError(f"unknown reflection padding {self.reflect!r}; allowed: native, cat")
        if self.conv not in ("grouped", "split"):
            raise ValueError(f"unknown conv implementation {self.conv!r}; allowed: grouped, split")

    def adam(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
        """Adam is elementwise, so one optimizer over packed parameters is one per network."""
        kw: dict[str, bool] = {}
        if self.fused_adam:
            kw["fused"] = True
        if self.cuda_graph:
            kw["capturable"] = True
        return torch.optim.Adam(params, lr=lr, **kw)


class Stepper:
    """Runs `body` (forward, backward, optimizer step, bookkeeping; all on the device)
    once per call: eagerly, or with `cuda_graph` eagerly on a side stream for a few
    steps, then captured (the generators registered, so the graph draws fresh noise on
    every replay) and replayed. Gradients are zeroed here, outside the graph: the
    captured backward writes them afresh on every replay."""

    def __init__(self, body: Callable[[], None], optimizer: torch.optim.Optimizer,
                 options: StepOptions, generators: Iterable[torch.Generator]):
        self.body, self.optimizer, self.options = body, optimizer, options
        self.generators = list(generators)
        self.reset()

    def reset(self) -> None:
        """Forget a captured graph (after the state it reads was replaced)."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm = 0

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.optimizer.zero_grad(set_to_none=True)
        if not self.options.cuda_graph:
            self.body()
        elif self._warm < WARMUP_STEPS:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body()
            torch.cuda.current_stream().wait_stream(side)
            self._warm += 1
        else:
            self._capture()
            assert self.graph is not None
            self.graph.replay()  # capture records the step; this runs it

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for gen in self.generators:
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            self.body()
        self.graph = graph
