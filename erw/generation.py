"""Images from a SiT, the same way for sample_ddp.py and the in-training FID: `generate_images`.

Sample i draws its label, its starting noise and every SDE step's noise from its own torch.Generator seeded from
(global seed, i), so it does not depend on which process made it, in which batch, or whether the run was
interrupted; seeds -> erw/samplers.py -> VAE decode -> pixels as REPA writes them.

Bitwise mode (`bitwise_scope`, sample_ddp.py --bitwise): one row per model and VAE call on one CPU thread. CPU
kernels round a row differently depending on the batch shape, and with several threads the reductions' order
varies, so only then are the images bitwise independent of the batch size and the number of processes.
"""
import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from erw.precision import cpu_threads
from erw.samplers import GuidedVelocity, run_in_chunks, sample_batch, standard_normal
from erw.transport import get_path
from models.sit import SiT
from models.vae import check_pixel_rounding, decode_latents

LABEL_MODES = ("random", "balanced")


#################################################################################
#                     Per-sample seeds, labels and noise                        #
#################################################################################

_UINT64 = (1 << 64) - 1
_SEED_INDEX_MULTIPLIER = 0x9E3779B1  # odd, so index -> seed is a bijection modulo 2**32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _UINT64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _UINT64
    return x ^ (x >> 31)


def sample_seed(global_seed: int, index: int) -> int:
    """The seed of sample `index`. torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the
    seed lives modulo 2**32: an offset hashed from the global seed plus an odd multiple of the index, which gives
    every index < 2**32 of one run its own seed."""
    if global_seed < 0 or not 0 <= index < 2 ** 32:
        raise ValueError(f"need global_seed >= 0 and 0 <= index < 2**32, got {global_seed}, {index}")
    return (_splitmix64(global_seed) + index * _SEED_INDEX_MULTIPLIER) % 2 ** 32


def sample_generator(global_seed: int, index: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sample_seed(global_seed, index))


def draw_label(generator: torch.Generator, index: int, num_classes: int, label_mode: str) -> int:
    """random: uniform from the sample's generator (its first draw); balanced: index mod num_classes, so any
    multiple of num_classes consecutive indices holds every class equally often."""
    if label_mode == "random":
        return int(torch.randint(num_classes, (1,), generator=generator))
    if label_mode == "balanced":
        return index % num_classes
    raise ValueError(f"unknown label mode {label_mode!r}; choose one of {', '.join(LABEL_MODES)}")


def sample_inputs(global_seed: int, indices: Sequence[int], latent_shape: Sequence[int], num_classes: int,
                  label_mode: str) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Generator]]:
    """Noise (N, C, H, W) float32, labels (N,) int64, and the N generators, positioned for the SDE's step noise.
    Each sample draws its label, then its noise, from its own generator."""
    generators = [sample_generator(global_seed, i) for i in indices]
    labels = [draw_label(g, i, num_classes, label_mode) for g, i in zip(generators, indices)]
    noise = standard_normal((len(indices), *latent_shape), generators, "cpu", dtype=torch.float32)
    return noise, torch.tensor(labels, dtype=torch.int64), generators


def all_labels(global_seed: int, num_samples: int, num_classes: int, label_mode: str) -> np.ndarray:
    """Labels of samples 0..num_samples-1 (int64), without drawing their noise."""
    return np.array([draw_label(sample_generator(global_seed, i), i, num_classes, label_mode)
                     for i in range(num_samples)], dtype=np.int64)


#################################################################################
#                      Images from a model: the one loop                        #
#################################################################################

def bitwise_scope(bitwise: bool, device: torch.device):
    """The context generation runs in: one CPU thread in bitwise mode on the CPU (module docstring)."""
    return cpu_threads(1) if bitwise and device.type == "cpu" else contextlib.nullcontext()


def generate_images(model: SiT, vae, indices: Sequence[int], *, global_seed: int, label_mode: str = "random",
                    mode: str = "sde", num_steps: int = 250, heun: bool = False, path_type: str = "linear",
                    cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
                    autocast_dtype: Optional[torch.dtype] = None, batch_size: int = 32, chunk_size: int = 0,
                    pixel_rounding: str = "repa", progress: bool = True, desc: str = "Sampling"
                    ) -> Iterator[Tuple[List[int], np.ndarray]]:
    """Yields (indices of the batch, uint8 images (n, H, W, 3)) for `indices`, batch_size at a time, in order.

    Sample i: label and noise from its own generator (sample_inputs), then `mode` with num_steps model evaluations
    (erw/samplers.py; CFG inside [guidance_low, guidance_high] when cfg_scale > 1), then the VAE and pixels by
    `pixel_rounding` (models/vae.py). model (eval mode) and vae sit on the device generation runs on; the model and
    the VAE see at most chunk_size rows per call (0 = the whole batch). In bitwise mode (chunk_size 1), run it
    inside bitwise_scope.
    """
    if batch_size < 1:
        raise ValueError(f"the sampling batch size must be >= 1, got {batch_size}")
    path = get_path(path_type)
    velocity_fn = GuidedVelocity(model, cfg_scale, guidance_low, guidance_high, autocast_dtype, chunk_size)
    check_pixel_rounding(pixel_rounding)
    device = next(model.parameters()).device
    latent_size = model.grid_size * model.patch_size
    latent_shape = (model.in_channels, latent_size, latent_size)
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(indices), batch_size):
            batch = list(indices[start:start + batch_size])
            noise, labels, generators = sample_inputs(global_seed, batch, latent_shape, model.num_classes,
                                                      label_mode)
            latents = sample_batch(mode, velocity_fn, noise.to(device), labels.to(device), num_steps, path,
                                   heun=heun, noise_source=generators)
            images = run_in_chunks(lambda z: decode_latents(vae, z, pixel_rounding), (latents,), chunk_size)
            bar.update(len(batch))
            yield batch, images.numpy()
