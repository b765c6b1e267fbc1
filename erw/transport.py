"""Interpolant paths between data and noise (SiT/REPA convention: t = 0 is data, t = 1 is noise).

    x_t = alpha_t * x + sigma_t * eps,     v_t = d_alpha_t * x + d_sigma_t * eps  (the training target)

Training draws (x_t, v) from `Path.interpolate`; the samplers in erw/samplers.py integrate the
velocity from t = 1 to t = 0 and, for the SDE, turn it into a score with `Path.velocity_to_score`.
"""
import math
from typing import Tuple

import torch


PATH_TYPES = ("linear", "cosine")


def _expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample times -> (N, 1, ..., 1) so they broadcast over x (N, ...); a 0-dim t (one time for the
    whole batch, as the samplers use) is returned as it is."""
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (N,) = ({x.shape[0]},) or be 0-dim, got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class Path:
    """An interpolant; subclasses give alpha_t, sigma_t and their time derivatives (elementwise in t)."""

    name: str

    def alpha_sigma(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def d_alpha_sigma(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def interpolate(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """x, noise: (N, ...), t: (N,) or 0-dim -> (x_t, velocity target), both (N, ...)."""
        t = _expand_like(t, x).to(x.dtype)
        alpha, sigma = self.alpha_sigma(t)
        d_alpha, d_sigma = self.d_alpha_sigma(t)
        return alpha * x + sigma * noise, d_alpha * x + d_sigma * noise

    def velocity_to_score(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x_t) from the velocity: v, x_t: (N, ...), t: (N,) or 0-dim, 0 < t <= 1.

        Eliminating x from x_t and v gives eps = (alpha v - d_alpha x_t) / (alpha d_sigma - d_alpha sigma),
        and the score of the Gaussian conditional is -E[eps | x_t] / sigma_t.
        """
        t = _expand_like(t, x_t).to(x_t.dtype)
        alpha, sigma = self.alpha_sigma(t)
        d_alpha, d_sigma = self.d_alpha_sigma(t)
        return (d_alpha * x_t - alpha * v) / (sigma * (alpha * d_sigma - d_alpha * sigma))


class LinearPath(Path):
    """alpha_t = 1 - t, sigma_t = t (SiT's default, rectified flow)."""

    name = "linear"

    def alpha_sigma(self, t):
        return 1 - t, t

    def d_alpha_sigma(self, t):
        return -torch.ones_like(t), torch.ones_like(t)


class CosinePath(Path):
    """alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2) (SiT's GVP path)."""

    name = "cosine"

    def alpha_sigma(self, t):
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)

    def d_alpha_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t), 0.5 * math.pi * torch.cos(0.5 * math.pi * t)


def get_path(path_type: str) -> Path:
    """"linear" | "cosine" -> the Path object."""
    if path_type == "linear":
        return LinearPath()
    if path_type == "cosine":
        return CosinePath()
    raise ValueError(f"unknown path type {path_type!r}; choose one of {', '.join(PATH_TYPES)}")
