"""One DIP trial: fit a fresh network to each image's observation, report as it goes.

Runs with no Ray and no MLflow: the caller passes `report(metrics, trial)`, which may
checkpoint `trial.state_dict()`. A trial trains K = images x repeats networks; repeat r
of an image is exactly the network a trial with `seed + r` trains (see `SEED_STRIDE`
in study/engine/pack.py). The K networks step together as one packed computation
(models/packed.py), one `Pack` per architecture (images of different channel counts
need different networks).

The step never waits for the device: the loss, the divergence check and the oracle best
are kept on the device and read at report time (`evaluate`). Metrics are means over all
networks; with several images `<metric>/<image>` is an image's mean over its repeats, and
with several repeats `<metric>_repeat_std` is the spread over repeats (the sample standard
deviation of the per-repeat means over images). `Trial.result` lists every network.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator, Union

import torch

from models.packed import pack_state_dicts, unpack_state_dict
from models.step import StepOptions, Stepper
from study.config import TrialConfig
from study.paths import JsonObject
from study.engine import images as img
from study.engine.holdout import HoldOutStop
from study.engine.metrics import psnr_batch, ssim
from study.engine.pack import Network, Pack, aggregate, build_network_state, unique_labels
from study.engine.sure import forwards_per_step

Report = Callable[[dict[str, float], "Trial"], None]
# A checkpoint: tensors, numbers, strings and lists and dicts of them (torch.load with
# weights_only=True reads it back).
State = dict[str, Union[torch.Tensor, float, int, str, list, dict, None]]


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial ends with this reason."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(name)


class Trial:
    """All networks of one configuration (images x repeats), stepped together."""

    def __init__(self, cfg: TrialConfig, specs: list[str] | None = None,
                 options: StepOptions | None = None, networks: list[Network] | None = None,
                 crop: tuple[int, int] | None = None):
        """The networks of `cfg` (its images, or `specs`), or `networks` built by the
        caller (`apply`: a user's image, no clean one); `crop` is the part of the output
        ES-WMV watches (apply's native size inside its padding; default all of it)."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.options = options or StepOptions.auto(self.device)
        self.options.check(self.device)
        if networks is None:
            specs = specs if specs is not None else img.expand_images(cfg.images)
            labels = unique_labels(specs)
            networks = [build_network_state(cfg, s, labels[j], j, r, self.device)
                        for j, s in enumerate(specs) for r in range(cfg.repeats)]
        self.networks = networks
        self.packs = self._packs(crop)
        self.iteration = 0
        self.ended = False  # set by run_trial at its last report (the budget, or ES-WMV with stop = auto)
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

    def _packs(self, crop: tuple[int, int] | None) -> list[Pack]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, n in enumerate(self.networks):
            key = (n.dip_input.channels, n.data.observation.shape[1]) if self.options.pack else (i,)
            groups.setdefault(key, []).append(i)
        return [Pack(self.cfg, [self.networks[i] for i in idx], idx, self.device, self.options, crop)
                for idx in groups.values()]

    @property
    def image_labels(self) -> list[str]:
        return list(dict.fromkeys(n.label for n in self.networks))

    def _autocast(self) -> ContextManager[None]:
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

    def _autostop_of(self, pack: Pack) -> list[dict[str, float]]:
        """Where the stop rule (cfg.stop_rule) stops (or, until it fires, its candidate: the
        EMA at the lowest window variance, or held-out error, so far; before ES-WMV's window
        has filled, the current EMA); with holdout also its PSNR estimate there."""
        a = pack.autostop
        at, fired = a.iteration.tolist(), a.fired_at.tolist()
        extra = (a.estimates(pack.ema / self.ema_norm) if isinstance(a, HoldOutStop) and self.iteration
                 else [{}] * pack.k)
        return [{"autostop_iteration": float(at[k] or self.iteration),
                 "autostop_fired": float(fired[k] > 0), **extra[k]} for k in range(pack.k)]

    def _evaluate_pack(self, pack: Pack) -> list[dict[str, float]]:
        auto = self._autostop_of(pack)
        clean = pack.data.clean
        if clean is None:  # `apply`: nothing to compare with
            return [{"loss": v, **a} for v, a in zip(pack.loss.tolist(), auto, strict=True)]
        with self._autocast():
            pack.last_output = out = pack.eval_outputs(self.cfg.eval_draws)
        ema = pack.ema / self.ema_norm if self.iteration else out
        stop = pack.autostop.output(ema)
        host = [t.cpu() for t in (out, ema, stop, clean)]
        p_out, p_ema, p_stop = (psnr_batch(x, clean).tolist() for x in (out, ema, stop))
        loss, best = pack.loss.tolist(), pack.best_psnr.tolist()
        best_it = pack.best_iteration.tolist()

        def s(i: int, k: int) -> float:
            return ssim(host[i][k:k + 1], host[3][k:k + 1])

        return [{
            "loss": loss[k], "psnr": p_out[k], "ssim": s(0, k),
            "psnr_ema": p_ema[k], "ssim_ema": s(1, k),
            "psnr_autostop": p_stop[k], "ssim_autostop": s(2, k), **auto[k],
            "psnr_best": best[k], "best_iteration": float(best_it[k]),
        } for k in range(pack.k)]

    def autostop_output(self, index: int) -> torch.Tensor:
        """Network `index`'s output as ES-WMV picks it (see `_autostop_of`), (1, C, H, W)."""
        for pack in self.packs:
            if index in pack.index:
                k = pack.index.index(index)
                return pack.autostop.output(pack.ema / self.ema_norm)[k:k + 1]
        raise IndexError(index)

    def all_stopped(self) -> bool:
        """Whether ES-WMV has fired on every network (`stop = auto` ends the trial then)."""
        return all(bool((p.autostop.fired_at > 0).all()) for p in self.packs)

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
        # Training forward passes of one network so far (the evaluations' are not counted).
        m["forwards"] = float(self.iteration * forwards_per_step(self.cfg.loss))
        return m

    def observation_metrics(self) -> dict[str, float]:
        """How good the observation itself is (at output resolution): the bar to beat;
        and `sigma_estimated`, the noise sigma estimated from it where the config asks
        it. The observation never changes, so it is measured once."""
        if self._observation is None:
            per = [{} if n.data.clean is None else  # `apply`: no clean image
                   {"psnr_observation": float(psnr_batch(n.data.input_image, n.data.clean)[0]),
                    "ssim_observation": ssim(n.data.input_image, n.data.clean),
                    # the noise sigma SURE uses, where it was estimated (study/engine/sigma.py)
                    **({"sigma_estimated": n.sigma} if n.sigma_source == "estimated" else {})}
                   for n in self.networks]
            self._observation = (aggregate(self.networks, per), per)
        return dict(self._observation[0])

    def result(self, metrics: dict[str, float]) -> JsonObject:
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
        setup: the observation, the input and (before training) the untrained output, at step 0;
        then the output of the latest evaluation; final: also the output EMA. Names are `<image>/<name>` when a trial
        has several images."""
        several = len(self.image_labels) > 1
        for pack in self.packs:
            # The output before training, at step 0: MLflow's image card opens on step 0.
            first = None
            if setup and not self.iteration:
                with self._autocast():
                    first = pack.untrained_outputs(self.cfg.eval_draws)
            for k, n in enumerate(pack.networks):
                if n.repeat:
                    continue
                pre = f"{n.label}/" if several else ""
                if setup:
                    yield f"{pre}observation", n.data.observation, 0
                    yield f"{pre}input", n.dip_input.view(), 0
                    if first is not None:
                        yield f"{pre}output", first[k:k + 1], 0
                if pack.last_output is not None and self.iteration:
                    yield f"{pre}output", pack.last_output[k:k + 1], self.iteration
                    if final:
                        yield f"{pre}output_ema", (pack.ema[k:k + 1] / self.ema_norm), self.iteration

    # --- checkpointing: plain tensors, numbers, strings, lists and dicts, one entry per
    # network, so torch.load(weights_only=True) reads it ---
    def state_dict(self) -> State:
        nets: list[State] = [{} for _ in self.networks]
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
                    "probe_gen": n.probe_gen.get_state(), "autostop": pack.autostop.state_dict(k),
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

    def load_state_dict(self, state: State) -> None:
        if (state.get("config") != self.cfg.to_dict()
                or len(state.get("networks", ())) != len(self.networks)):
            raise ValueError("the checkpoint belongs to another configuration")
        self.iteration, self.seconds = state["iteration"], state["seconds"]
        self._it.fill_(self.iteration)
        self.ema_norm.fill_(state["ema_norm"])
        adam_state: dict[int, dict[str, torch.Tensor]] = {}
        offset = 0
        for pack in self.packs:
            saved = [state["networks"][i] for i in pack.index]
            pack.net.load_state_dict(pack_state_dicts([s["net"] for s in saved]))
            for n, s in zip(pack.networks, saved, strict=True):
                n.dip_input.load_state_dict(s["input"])
                n.gen.set_state(s["gen"])
                n.eval_gen.set_state(s["eval_gen"])
                n.probe_gen.set_state(s["probe_gen"])
            pack.autostop.load_state_dict([s["autostop"] for s in saved])
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


def run_trial(cfg: TrialConfig, report: Report, state: State | None = None,
              trial: Trial | None = None) -> JsonObject:
    """Train to `cfg.iterations`, reporting every `cfg.report_every` iterations and at the
    end; with `cfg.stop == "auto"` end at the first report after ES-WMV fired on every
    network. Resume from `state` (a `Trial.state_dict()`) when given. Returns `trial.result`."""
    trial = trial or Trial(cfg)
    if state is not None:
        trial.load_state_dict(state)
    metrics: dict[str, float] = {}
    done = trial.ended = state is not None and cfg.stop == "auto" and trial.all_stopped()
    while trial.iteration < cfg.iterations and not done:
        trial.step()
        if trial.iteration % cfg.report_every == 0 or trial.iteration == cfg.iterations:
            metrics = trial.evaluate()
            # with stop = auto the trial ends once ES-WMV fired on every network
            done = trial.ended = (trial.iteration >= cfg.iterations
                                  or (cfg.stop == "auto" and trial.all_stopped()))
            report(metrics, trial)
    if not metrics:  # resumed at the end: report nothing new, but return the result
        metrics = trial.evaluate()
    return trial.result(metrics)
