"""The inputs z fed to the Deep Image Prior network, one class for all modes.

References:
    Ulyanov, Vedaldi, Lempitsky (2018), "Deep Image Prior": z ~ U(0, 0.1) with
        `input_depth` channels, fixed, perturbed by N(0, reg_noise_std^2) each step.
    Ho, Jain, Abbeel (2020), DDPM eq. 4: the forward process that noises the
        observation for the `ddpm*` modes.

The DDPM modes noise the DEGRADED observation (never the clean image): noising the
clean target lets the network copy it back, a shortcut rather than a restoration.
"""

import torch

from noise.forward import add_noise, from_model_range, to_model_range

INPUT_MODES = ("uniform", "gaussian", "gaussian_resample", "ddpm", "ddpm_resample", "ddpm_random_t")
DDPM_MODES = ("ddpm", "ddpm_resample", "ddpm_random_t")
# Modes whose training input is the buffer `z`, drawn once at construction.
_FIXED_MODES = ("uniform", "gaussian", "ddpm")
# DIP's reference input scale: U(0, 1) * 0.1 (deep-image-prior, utils/common_utils.py).
_UNIFORM_SCALE = 0.1


class DipInput(torch.nn.Module):
    """The network input of one DIP trial; build it with `make_input`.

    Buffers (saved by state_dict, so a resumed trial gets the same input):
        z:  (1, channels, H, W) float32; the fixed input for fixed modes, and one
            representative draw (for `view`) for resampling modes.
        x0: (1, C, H, W) the observation in [-1, 1] for DDPM modes, else empty.
    `alphas_cumprod` is config, not state: it stays a float64 CPU tensor.
    """

    def __init__(self, mode: str, x0: torch.Tensor, timestep: int, input_depth: int,
                 reg_noise_std: float, alphas_cumprod: torch.Tensor,
                 generator: torch.Generator):
        super().__init__()
        self.mode = mode
        self.timestep = timestep
        self.reg_noise_std = reg_noise_std
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.channels = x0.shape[1] if mode in DDPM_MODES else input_depth
        self.stochastic = mode not in _FIXED_MODES or (mode == "uniform" and reg_noise_std > 0)
        self.last_t = timestep  # the timestep of the latest DDPM draw, for inspection
        self._shape = (1, self.channels, x0.shape[2], x0.shape[3])
        self.register_buffer("x0", x0 if mode in DDPM_MODES else x0.new_empty(0))
        self.register_buffer("z", self._draw(generator))

    def _draw(self, generator: torch.Generator) -> torch.Tensor:
        """One fresh draw of the mode's base distribution."""
        like = dict(generator=generator, device=self.x0.device, dtype=torch.float32)
        if self.mode == "uniform":
            return torch.rand(self._shape, **like) * _UNIFORM_SCALE
        if self.mode in ("gaussian", "gaussian_resample"):
            return torch.randn(self._shape, **like)
        t = self.timestep
        if self.mode == "ddpm_random_t":
            # t ~ U{0..timestep}, inclusive: the input ranges from the observation itself
            # to its most noised version.
            t = int(torch.randint(0, t + 1, (1,), generator=generator, device=self.x0.device))
        self.last_t = t
        eps = torch.randn(self._shape, **like)
        return add_noise(self.x0, eps, t, self.alphas_cumprod)

    def train_input(self, generator: torch.Generator) -> torch.Tensor:
        """The input for one training iteration, drawing fresh noise where the mode says so."""
        if self.mode == "uniform" and self.reg_noise_std > 0:
            # DIP's input regularisation: perturb the fixed z afresh every step.
            like = dict(generator=generator, device=self.z.device, dtype=self.z.dtype)
            return self.z + self.reg_noise_std * torch.randn(self._shape, **like)
        if self.mode in _FIXED_MODES:
            return self.z
        return self._draw(generator)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """One draw from the distribution the network is trained on, for evaluation.

        Evaluating on an input the network never saw was a bug of the original
        experiment; sharing `train_input`'s code path rules it out.
        """
        return self.train_input(generator)

    def view(self) -> torch.Tensor:
        """A (1, 3 or 1, H, W) picture of the input in [0, 1], for saving as input.png."""
        if self.mode in DDPM_MODES:
            return from_model_range(self.z).clamp(0.0, 1.0)
        picture = self.z[:, :3] if self.channels >= 3 else self.z[:, :1]
        low, high = picture.min(), picture.max()
        return (picture - low) / (high - low).clamp_min(1e-12)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, channels={self.channels}, timestep={self.timestep}, "
                f"reg_noise_std={self.reg_noise_std}")


def _check_args(mode: str, observation: torch.Tensor, timestep: int, input_depth: int,
                reg_noise_std: float, alphas_cumprod: torch.Tensor,
                generator: torch.Generator) -> None:
    if mode not in INPUT_MODES:
        raise ValueError(f"unknown input mode {mode!r}; allowed: {', '.join(INPUT_MODES)}")
    if observation.ndim != 4 or observation.shape[0] != 1:
        raise ValueError(f"observation must have shape (1, C, H, W), got {tuple(observation.shape)}")
    if isinstance(input_depth, bool) or not isinstance(input_depth, int) or input_depth < 1:
        raise ValueError(f"input_depth must be an integer >= 1, got {input_depth!r}")
    if reg_noise_std < 0:
        raise ValueError(f"reg_noise_std must be >= 0, got {reg_noise_std}")
    if torch.device(generator.device).type != observation.device.type:
        raise ValueError(f"the generator is on {generator.device} but the observation on {observation.device}")
    if mode in DDPM_MODES:
        num_timesteps = alphas_cumprod.shape[0]
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < num_timesteps:
            raise ValueError(f"timestep must be an integer in 0..{num_timesteps - 1}, got {timestep!r}")


def make_input(mode: str, observation: torch.Tensor, *, timestep: int, input_depth: int,
               reg_noise_std: float, alphas_cumprod: torch.Tensor,
               generator: torch.Generator) -> DipInput:
    """Build the DIP input of `mode` (one of INPUT_MODES) for one trial.

    `observation` is the degraded image the method is given, (1, C, H, W) in [0, 1]
    at the output resolution; DDPM modes noise to_model_range(observation) to
    `timestep` (or up to it for `ddpm_random_t`). All draws use `generator`, which
    must live on the observation's device; all tensors are float32 there.
    """
    _check_args(mode, observation, timestep, input_depth, reg_noise_std, alphas_cumprod, generator)
    x0 = to_model_range(observation.detach().to(torch.float32))
    return DipInput(mode, x0, timestep, input_depth, reg_noise_std, alphas_cumprod, generator)
