"""Stable Diffusion VAE (diffusers AutoencoderKL): loading, pixels -> posterior moments, latents -> pixels.

Latent spaces: the VAE's own latents z_vae; the diffusion model works on z = z_vae * SD_VAE_SCALE + SD_VAE_SHIFT
(REPA's `latents_scale` / `latents_bias`). Datasets store the posterior moments [mean | std] of z_vae.
"""
import os

import torch

SD_VAE_SCALE = 0.18215
SD_VAE_SHIFT = 0.0

RANDOM_TINY_VAE, RANDOM_SD_VAE = "random-tiny", "random-sd-vae"
RANDOM_VAE_SEED = 0
# A random encoder's log-variance head is as large as its mean head (posterior std ~1 against a mean of ~0.2),
# so sampled latents would be mostly noise. Trained SD-VAEs have a sharp posterior and latents whose scaled
# values have about unit spread; the tiny VAE is given the same two properties so the demo data is learnable.
RANDOM_TINY_MEAN_GAIN = 25.0
RANDOM_TINY_POSTERIOR_STD = 0.05


def autoencoder_config(block_out_channels, layers_per_block: int, norm_num_groups: int, sample_size: int) -> dict:
    """An AutoencoderKL config laid out as SD-VAE's: 4 levels (8x downsampling), 4 latent channels, SiLU."""
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(block_out_channels),
                layers_per_block=layers_per_block, act_fn="silu", latent_channels=4, norm_num_groups=norm_num_groups,
                sample_size=sample_size, scaling_factor=SD_VAE_SCALE)


# Random weights, nothing downloaded: random-sd-vae has SD-VAE's exact architecture (stabilityai/sd-vae-ft-mse's
# config.json, 83,653,863 parameters) and costs what it costs, for GPU tests and benchmarks; random-tiny is for tests.
RANDOM_VAE_CONFIGS = {
    RANDOM_SD_VAE: autoencoder_config(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                                      sample_size=256),
    RANDOM_TINY_VAE: autoencoder_config(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                        sample_size=32)}
# The demo's VAE: a small AutoencoderKL with SD-VAE's 8x downsampling and 4 latent channels, trained on the demo
# images by preprocessing/train_demo_components.py and shipped with the repository (a diffusers folder).
DEMO_VAE = "demo"
DEMO_VAE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo", "vae")
# 8 groups of 1 channel at the first level take CPU convolutions onto a path ~20x slower: 4 groups.
DEMO_VAE_CONFIG = autoencoder_config(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4,
                                     sample_size=64)


def _autoencoder_kl_class():
    # diffusers takes seconds to import; code that only needs the constants above (the dataset) should not pay it.
    from diffusers.models import AutoencoderKL
    return AutoencoderKL


def build_random_vae(name: str):
    """AutoencoderKL RANDOM_VAE_CONFIGS[name] with random weights from a fixed seed, without touching the caller's
    RNG: every process gets identical weights. random-tiny's posterior is made sharp (RANDOM_TINY_*)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_VAE_SEED)
        vae = _autoencoder_kl_class()(**RANDOM_VAE_CONFIGS[name])
    if name == RANDOM_TINY_VAE:
        latent_channels = vae.config.latent_channels
        with torch.no_grad():
            moments_conv = vae.quant_conv  # the last layer of encode(): output channels [mean (4) | logvar (4)]
            moments_conv.weight[:latent_channels] *= RANDOM_TINY_MEAN_GAIN
            moments_conv.bias[:latent_channels] *= RANDOM_TINY_MEAN_GAIN
            moments_conv.weight[latent_channels:] = 0.0
            moments_conv.bias[latent_channels:] = 2.0 * torch.log(torch.tensor(RANDOM_TINY_POSTERIOR_STD))
    return vae


def load_vae(name_or_path: str, allow_download: bool = False):
    """A frozen AutoencoderKL in eval mode (float32, CPU): a local diffusers folder, a hub id, "demo", or a name of
    RANDOM_VAE_CONFIGS.

    A hub id is read from the local Hugging Face cache; it is fetched from the hub only with allow_download=True.
    """
    AutoencoderKL = _autoencoder_kl_class()
    if name_or_path == DEMO_VAE:
        if not os.path.isdir(DEMO_VAE_DIR):
            raise FileNotFoundError(f"the demo VAE {DEMO_VAE_DIR} is missing (it ships with the repository; rebuild it "
                                    "with `python -m preprocessing.train_demo_components`)")
        name_or_path = DEMO_VAE_DIR
    if name_or_path in RANDOM_VAE_CONFIGS:
        vae = build_random_vae(name_or_path)
    elif os.path.isdir(name_or_path):
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path)
        except Exception as e:
            raise ValueError(f"could not load a diffusers AutoencoderKL from the folder {name_or_path}: {e}") from e
    elif os.path.exists(name_or_path):
        raise ValueError(f"VAE path {name_or_path} is a file; pass a diffusers folder (config.json + weights), "
                         f"a hub id such as stabilityai/sd-vae-ft-ema, or '{RANDOM_TINY_VAE}'")
    else:
        try:
            vae = AutoencoderKL.from_pretrained(name_or_path, local_files_only=not allow_download)
        except Exception as e:
            hint = ("it is neither a local folder nor in the local Hugging Face cache. Download it once with "
                    f"`hf download {name_or_path}` (the CLI huggingface_hub installs), or pass a local folder, or "
                    "let the tool download it: sample_ddp.py --allow-download, preprocessing.dataset_tools encode "
                    "--allow-download" if not allow_download else "the download failed (offline? HF_HUB_OFFLINE set?)")
            raise FileNotFoundError(f"cannot load VAE '{name_or_path}': {hint}. Cause: {e}") from e
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) in [0, 255] -> float32 (N, 8, H/8, W/8) = [posterior mean | posterior std]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_moments expects uint8 images (N, 3, H, W), got shape {tuple(images.shape)}")
    param = next(vae.parameters())
    x = images.to(device=param.device, dtype=torch.float32) / 127.5 - 1.0
    posterior = vae.encode(x.to(param.dtype)).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float()


def vae_to_model_latents(z_vae: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the diffusion model's latent space."""
    return z_vae * SD_VAE_SCALE + SD_VAE_SHIFT


def model_to_vae_latents(z: torch.Tensor) -> torch.Tensor:
    """The diffusion model's latent space -> VAE latents (inverse of vae_to_model_latents)."""
    return (z - SD_VAE_SHIFT) / SD_VAE_SCALE


# How decoder outputs x (about [-1, 1]) become uint8 pixels, both truncated by the uint8 cast (docs/evaluation.md):
# "repa", clamp(255 * ((x + 1) / 2)) as REPA's generate.py writes the samples the paper's FIDs come from, the
# default; "dit", clamp(127.5 * x + 128) as DiT's sample_ddp.py, one level higher on about half of the pixels.
PIXEL_ROUNDINGS = ("repa", "dit")


def check_pixel_rounding(pixel_rounding: str) -> None:
    if pixel_rounding not in PIXEL_ROUNDINGS:
        raise ValueError(f"--pixel-rounding must be one of {', '.join(PIXEL_ROUNDINGS)}, got {pixel_rounding!r}")


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, pixel_rounding: str = "repa") -> torch.Tensor:
    """Model-space latents (N, 4, h, w) -> uint8 images (N, 8h, 8w, 3) on the CPU, channels last (the .npz layout),
    pixels by PIXEL_ROUNDINGS, computed in float32."""
    check_pixel_rounding(pixel_rounding)
    param = next(vae.parameters())
    x = vae.decode(model_to_vae_latents(z.to(device=param.device, dtype=torch.float32)).to(param.dtype)).sample.float()
    if pixel_rounding == "repa":
        pixels = torch.clamp(255.0 * ((x + 1.0) / 2.0), 0, 255).to(torch.uint8)
    else:
        pixels = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()
