"""Periodic sample grids during Phase 2: the EMA model, fixed noise and labels, Euler ODE, VAE decode -> PNG."""
import math
import os

import numpy as np
import torch
from PIL import Image

from erw.cli import refusals_of_models
from erw.files import atomic_write
from erw.samplers import GuidedVelocity, sample_ode
from models.vae import decode_latents, load_vae

SAMPLE_GRID_SEED = 0


def image_grid(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 (rows*H, cols*W, 3) grid, cols = ceil(sqrt(N)), black padding."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


class SampleGridHook:
    """Trainer hook: at step 0, every `every` steps and at the last step, write samples/NNNNNNN.png."""

    all_processes = False  # the main process samples the grid alone

    def __init__(self, vae: str, num_images: int, num_classes: int, latent_shape, num_steps: int, every: int,
                 last_step: int):
        self.num_steps, self.every, self.last_step = num_steps, every, last_step
        g = torch.Generator().manual_seed(SAMPLE_GRID_SEED)
        self.noise = torch.randn((num_images, *latent_shape), generator=g)
        self.labels = torch.arange(num_images) % num_classes
        # Now, on the CPU: a resumed run meets its first grid many steps later, and must not fail there.
        with refusals_of_models("--vae"):
            self.vae = load_vae(vae)

    def __call__(self, trainer, step: int, ema) -> None:
        if step % self.every and step != self.last_step:
            return
        self.vae = self.vae.to(trainer.device)
        latents = sample_ode(GuidedVelocity(ema), self.noise.to(trainer.device), self.labels.to(trainer.device),
                             self.num_steps)
        grid = image_grid(decode_latents(self.vae, latents.float()).cpu().numpy())
        path = os.path.join(trainer.exp_dir, "samples", f"{step:07d}.png")
        atomic_write(path, lambda f: Image.fromarray(grid).save(f, format="PNG"))
        trainer.log_image("samples", grid, step)
        trainer.log(f"Saved sample grid {path}")
