"""Samplers for velocity-predicting SiT models, as REPA's samplers.py: Euler-Maruyama SDE and Euler/Heun ODE, and
classifier-free guidance with a guidance interval.

A sampler integrates a `velocity_fn(x, t, y) -> v` from noise (t = 1) to data (t = 0); x: (N, C, H, W),
t: a Python float (one time for the whole batch), y: (N,) int64 labels. The state is kept in float64 as in REPA's
samplers; a model wrapper (GuidedVelocity) casts to the model's precision. Plain callables let the tests plug in
the exact velocity of a Gaussian data distribution. The SDE's step noise comes from a noise source: one generator
for the batch, or one per sample (what erw/generation.py passes, so that a sample does not depend on its batch).

A step never waits for the GPU: the times live on the host as floats (the model's (N,) time tensor is filled on the
device), and per-sample noise, drawn by CPU generators, reaches the GPU through pinned memory without blocking.

What turns a checkpoint into files (per-sample seeds, sharding over processes, PNGs and the .npz, resume) is
erw/generation.py.
"""
import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from erw.transport import Path
from models.sit import SiT

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Union[torch.Generator, Sequence[torch.Generator]]

SDE_LAST_T = 0.04  # SiT/REPA: the stochastic steps stop here; one deterministic mean step goes on to t = 0.
MODES = ("sde", "ode")


#################################################################################
#                                    Samplers                                   #
#################################################################################

def _check_num_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


@functools.lru_cache(maxsize=None)
def sde_time_grid(num_steps: int) -> Tuple[float, ...]:
    """num_steps + 1 times: linspace(1, SDE_LAST_T, num_steps), then 0 (one model evaluation per interval). Made once
    per step count: a batch's steps then touch no tensor on the host but the 0-dim times."""
    _check_num_steps(num_steps)
    return tuple(torch.linspace(1.0, SDE_LAST_T, num_steps, dtype=torch.float64).tolist()) + (0.0,)


@functools.lru_cache(maxsize=None)
def ode_time_grid(num_steps: int) -> Tuple[float, ...]:
    """num_steps + 1 times: linspace(1, 0, num_steps + 1), made once per step count."""
    _check_num_steps(num_steps)
    return tuple(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist())


def standard_normal(shape: Sequence[int], source: NoiseSource, device, dtype=torch.float64) -> torch.Tensor:
    """(N, ...) standard normals on `device`: from one generator for the whole batch, or from one generator per
    row (a sequence of N generators; each row then depends only on its own generator)."""
    if isinstance(source, torch.Generator):
        return torch.randn(tuple(shape), generator=source, dtype=dtype, device=source.device).to(device)
    if len(source) != shape[0]:
        raise ValueError(f"got {len(source)} per-sample generators for a batch of {shape[0]}")
    if any(g.device.type != "cpu" for g in source):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device)
                            for g in source]).to(device)
    # Each row gets the values torch.randn(shape[1:], generator=g) gives. For a CUDA batch they are drawn into pinned
    # memory and copied without blocking (a copy from pageable memory waits for the GPU); the caching host allocator
    # keeps the buffer until the copy has run.
    rows = torch.empty(tuple(shape), dtype=dtype, pin_memory=torch.device(device).type == "cuda")
    for row, g in zip(rows, source):
        row.normal_(generator=g)
    return rows.to(device, non_blocking=True)


@torch.no_grad()
def sample_ode(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, num_steps: int,
               heun: bool = False) -> torch.Tensor:
    """Probability-flow ODE from t = 1 to t = 0 on linspace(1, 0, num_steps + 1), Euler or Heun.

    noise: (N, C, H, W), labels: (N,) -> samples (N, C, H, W) in noise's dtype. Heun corrects every step except
    the last (as EDM and REPA do, the model is never called at t = 0): 2 * num_steps - 1 model evaluations.
    """
    t_grid = ode_time_grid(num_steps)
    x = noise.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        dt = t_next - t_cur
        v_cur = velocity_fn(x, t_cur, labels)
        x_next = x + dt * v_cur
        if heun and i < num_steps - 1:
            v_next = velocity_fn(x_next, t_next, labels)
            x_next = x + dt * (0.5 * v_cur + 0.5 * v_next)
        x = x_next
    return x.to(noise.dtype)


@torch.no_grad()
def sample_sde(velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, num_steps: int, path: Path,
               noise_source: NoiseSource) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE  dx = [v - w_t * score] dt + sqrt(2 w_t) dW  (dt < 0).

    Diffusion coefficient w_t = sigma_t of the path (SiT's "sigma" form; t for the linear path, sin(pi t / 2) for
    the cosine path); the score comes from the velocity (Path.velocity_to_score). Times: linspace(1, 0.04,
    num_steps), num_steps - 1 stochastic steps, then one deterministic mean step from 0.04 to 0: num_steps model
    evaluations. Step noise is drawn from `noise_source` (see standard_normal).
    noise: (N, C, H, W), labels: (N,) -> samples (N, C, H, W) in noise's dtype.
    """
    t_grid = sde_time_grid(num_steps)
    x = noise.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = t_grid[i], t_grid[i + 1]
        dt = t_next - t_cur
        v = velocity_fn(x, t_cur, labels)
        # Path coefficients from one 0-dim CPU time: every row then sees the same rounding (vectorised and scalar
        # kernels of sin/cos may differ in the last bit); a 0-dim CPU tensor enters device kernels as a scalar.
        t_scalar = torch.tensor(t_cur, dtype=torch.float64)
        w = path.alpha_sigma(t_scalar)[1]
        drift = v - w * path.velocity_to_score(v, x, t_scalar)
        x = x + dt * drift
        if i < num_steps - 1:
            x = x + torch.sqrt(2.0 * w * abs(dt)) * standard_normal(x.shape, noise_source, x.device)
    return x.to(noise.dtype)


def check_sampler(mode: str, heun: bool) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown sampling mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "sde" and heun:
        raise ValueError("--heun applies to --mode ode only (the SDE sampler is Euler-Maruyama)")


def sample_batch(mode: str, velocity_fn: VelocityFn, noise: torch.Tensor, labels: torch.Tensor, num_steps: int,
                 path: Path, heun: bool = False, noise_source: Optional[NoiseSource] = None) -> torch.Tensor:
    """Dispatch to sample_sde (needs noise_source) or sample_ode; see those for shapes."""
    check_sampler(mode, heun)
    if mode == "sde":
        if noise_source is None:
            raise ValueError("the SDE sampler needs a noise source for its step noise")
        return sample_sde(velocity_fn, noise, labels, num_steps, path, noise_source)
    return sample_ode(velocity_fn, noise, labels, num_steps, heun=heun)


def model_evaluations_per_sample(mode: str, num_steps: int, heun: bool = False) -> int:
    """Calls of velocity_fn per sample (each costs one or, inside the CFG interval, two model rows)."""
    if mode == "ode" and heun:
        return 2 * num_steps - 1
    return num_steps


#################################################################################
#                        SiT as a velocity_fn, with CFG                         #
#################################################################################

def run_in_chunks(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor], chunk_size: int
                  ) -> torch.Tensor:
    """fn over row chunks of at most chunk_size (0 = all rows at once), outputs concatenated along dim 0. A chunk
    that runs out of GPU memory is split in two and retried, down to one row: a batch that no longer fits (512 px, a
    larger model) still runs, in chunks that do."""
    n = tensors[0].shape[0]
    size = n if chunk_size <= 0 else min(chunk_size, n)
    outputs, start = [], 0
    while start < n:
        try:
            outputs.append(fn(*(x[start:start + size] for x in tensors)))
        except torch.OutOfMemoryError:
            if size == 1:
                raise
            size = (size + 1) // 2
            torch.cuda.empty_cache()
            continue
        start += size
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def check_guidance(cfg_scale: float, guidance_low: float, guidance_high: float) -> None:
    """Classifier-free guidance settings as the flags name them: a scale >= 1, an interval inside [0, 1]."""
    if not cfg_scale >= 1.0:  # nan too
        raise ValueError(f"--cfg-scale must be >= 1 (1 = no guidance), got {cfg_scale}")
    if not 0.0 <= guidance_low <= guidance_high <= 1.0:
        raise ValueError(f"need 0 <= --guidance-low <= --guidance-high <= 1, got {guidance_low}, {guidance_high}")


class GuidedVelocity:
    """A SiT as a velocity_fn: classifier-free guidance inside [guidance_low, guidance_high], optional autocast, and
    at most `chunk_size` rows per model call (0 = all at once).

    Guidance v = v_uncond + cfg_scale * (v_cond - v_uncond) is applied to all latent channels, as REPA's samplers
    do (DiT/SiT's forward_with_cfg guides only the first 3 of the 4 channels, kept for reproducing DiT's numbers).
    It is active when cfg_scale > 1 and guidance_low <= t <= guidance_high for the time of that model call (for
    Heun's corrector, its own time); outside the interval the unconditional rows are not computed. The SDE drift
    is affine in v at fixed (x, t) and the guidance weights (1 - cfg_scale, cfg_scale) sum to one, so guiding v
    equals guiding the drift as REPA does. The projector heads are skipped (return_projections=False).
    """

    def __init__(self, model: SiT, cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                 autocast_dtype: Optional[torch.dtype] = None, chunk_size: int = 0):
        check_guidance(cfg_scale, guidance_low, guidance_high)
        if chunk_size < 0:
            raise ValueError(f"--chunk-size must be >= 0 (0 = the whole batch), got {chunk_size}")
        self.model = model
        self.cfg_scale = cfg_scale
        self.guidance_low = guidance_low
        self.guidance_high = guidance_high
        self.autocast_dtype = autocast_dtype
        self.chunk_size = chunk_size

    def guided_at(self, t: float) -> bool:
        return self.cfg_scale > 1.0 and self.guidance_low <= t <= self.guidance_high

    def _model_velocity(self, x, t, y):
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model(x, t, y, return_projections=False)[0].float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: the batch's time, y: (N,) -> v (N, C, H, W) in x's dtype. The model gets t as an
        (N,) float32 tensor filled on x's device."""
        guided = self.guided_at(t)
        x_in, y_in = x.float(), y
        t_in = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        if guided:
            x_in, t_in = torch.cat([x_in, x_in]), torch.cat([t_in, t_in])
            y_in = torch.cat([y, torch.full_like(y, self.model.num_classes)])
        v = run_in_chunks(self._model_velocity, (x_in, t_in, y_in), self.chunk_size).to(x.dtype)
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return v
