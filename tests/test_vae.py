"""models/vae.py: the tiny random VAE, pixel <-> latent conversions against plain recomputations, loading."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.vae import (SD_VAE_SCALE, build_random_vae, decode_latents, encode_moments, load_vae)


@pytest.fixture(scope="module")
def vae():
    return load_vae("random-tiny")


def test_random_tiny_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = build_random_vae("random-tiny").state_dict(), build_random_vae("random-tiny").state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_load_vae_is_frozen_eval(vae):
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())


def test_encode_moments_matches_plain_posterior(vae):
    images = torch.randint(0, 256, (3, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    moments = encode_moments(vae, images)
    assert moments.shape == (3, 8, 4, 6) and moments.dtype == torch.float32
    # The Gaussian posterior by hand: encoder -> quant_conv -> [mean | logvar], std = exp(logvar / 2).
    with torch.no_grad():
        x = images.double().div(255).mul(2).sub(1).float()
        h = vae.quant_conv(vae.encoder(x))
    mean, logvar = h[:, :4], h[:, 4:].clamp(-30.0, 20.0)
    # The same float32 encoder on inputs that differ only by the rounding of the two pixel scalings (<= 2 ulps).
    # The means reach |m| ~ 17 and the encoder's own float32 error against a float64 forward is ~1.4e-5 (~7 eps32
    # |m|); measured difference 1.7e-5. rtol=atol=1e-4 is >= 5x that; a wrong scaling (/255 for /127.5, no -1)
    # moves the means by O(1). std = exp(logvar / 2) ~ 0.05: a few roundings, ~1e-8; atol=1e-6.
    torch.testing.assert_close(moments[:, :4], mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(moments[:, 4:], torch.exp(0.5 * logvar), rtol=1e-4, atol=1e-6)


def test_decode_latents_matches_plain_decoder(vae):
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    pixels = decode_latents(vae, z)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == torch.uint8
    with torch.no_grad():
        x = vae.decoder(vae.post_quant_conv(z / SD_VAE_SCALE)).numpy()
    reference = np.clip(np.floor((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    # The decoder here and inside diffusers' decode() may round differently in float32 (~1e-6 of a level), which
    # moves a pixel by one level only where 127.5 (x + 1) falls that close to an integer: almost nowhere.
    difference = np.abs(pixels.numpy().astype(int) - reference.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


class FixedDecoder(torch.nn.Module):
    """Stands in for an AutoencoderKL whose decoder outputs the given x, whatever the latents."""

    def __init__(self, x):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # decode_latents reads the device and dtype from here
        self.x = x

    def decode(self, z):
        return SimpleNamespace(sample=self.x)


def boundary_values():
    """float32 decoder outputs at and one ulp around every x where REPA's or DiT's pixel value crosses a level
    (255 (x + 1) / 2 = k, 127.5 x + 128 = k), plus the ends of the range and values outside it."""
    k = np.arange(0, 257, dtype=np.float64)
    centres = np.concatenate([2 * k / 255 - 1, (k - 128) / 127.5, [-1.5, -1.0, 0.0, 1.0, 1.5]]).astype(np.float32)
    values = np.concatenate([np.nextafter(centres, np.float32(-np.inf)), centres,
                             np.nextafter(centres, np.float32(np.inf))])
    return np.sort(values).astype(np.float32)


def test_pixels_follow_repa_and_dit_exactly_at_the_rounding_boundaries():
    # REPA's generate.py: samples = (samples + 1) / 2.; clamp(255. * samples, 0, 255) -> uint8 (truncation); DiT's
    # sample_ddp.py: clamp(127.5 * samples + 128.0, 0, 255) -> uint8. numpy repeats each in float32, op for op
    # (IEEE float32 + - * / are correctly rounded in both libraries), so the pixels must agree exactly, including
    # the values one ulp from a level where any other formula or rounding order would land on the other side.
    x = boundary_values()
    one, two, f255, f127_5, f128 = (np.float32(v) for v in (1, 2, 255, 127.5, 128))
    repa = np.clip(f255 * ((x + one) / two), 0, 255).astype(np.uint8)
    dit = np.clip(f127_5 * x + f128, 0, 255).astype(np.uint8)
    image = torch.from_numpy(x).view(1, 1, 1, -1).expand(1, 3, 1, -1)  # (N, C, H, W) decoder output
    z = torch.zeros(1, 4, 1, 1)
    for rounding, expected in (("repa", repa), ("dit", dit)):
        pixels = decode_latents(FixedDecoder(image), z, *([] if rounding == "repa" else [rounding]))
        assert pixels.dtype == torch.uint8 and pixels.shape == (1, 1, len(x), 3)
        np.testing.assert_array_equal(pixels[0, 0, :, 0].numpy(), expected, err_msg=rounding)
    # The two conventions: x = 0 is 127 for REPA and 128 for DiT; DiT is REPA or REPA + 1 everywhere.
    assert repa[x == 0][0] == 127 and dit[x == 0][0] == 128
    assert set(np.unique(dit.astype(int) - repa.astype(int))) == {0, 1}
    with pytest.raises(ValueError, match="--pixel-rounding must be one of repa, dit, got 'round'"):
        decode_latents(FixedDecoder(image), z, "round")


def test_saved_vae_reloads_identically(vae, tmp_path):
    vae.save_pretrained(tmp_path / "vae")
    reloaded = load_vae(str(tmp_path / "vae"))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    # Exact: the same weights, inputs and shapes, so the same kernels and bits on any one CPU.
    torch.testing.assert_close(encode_moments(reloaded, images), encode_moments(vae, images), rtol=0, atol=0)


def test_missing_vae_names_it(tmp_path):
    # The hint names a command the pinned huggingface_hub installs (`hf`, not `huggingface-cli`) and the flag.
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-vae.*`hf download no-such-org/no-such-vae`.*"
                                                "sample_ddp.py --allow-download"):
        load_vae("no-such-org/no-such-vae")
    assert shutil.which("hf"), "the hint's command is not installed"
    weight_file = tmp_path / "vae.safetensors"
    weight_file.write_bytes(b"")
    with pytest.raises(ValueError, match="vae.safetensors"):
        load_vae(str(weight_file))


def test_random_sd_vae_has_sd_vae_architecture_and_shapes():
    """random-sd-vae: SD-VAE's AutoencoderKL (sd-vae-ft-mse config, 83.65M parameters), random weights from a fixed
    seed that leaves the global RNG alone; 8x downsampling to 4 latent channels."""
    state = torch.random.get_rng_state()
    vae = load_vae("random-sd-vae")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert tuple(vae.config.block_out_channels) == (128, 256, 512, 512) and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == SD_VAE_SCALE and not vae.training
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert encode_moments(vae, images).shape == (1, 8, 8, 8)  # [mean | std] of (1, 4, 8, 8) latents
    pixels = decode_latents(vae, torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert pixels.shape == (1, 32, 32, 3) and pixels.dtype == torch.uint8
    again = build_random_vae("random-sd-vae").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in vae.state_dict().items())
