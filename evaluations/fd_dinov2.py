"""FD-DINOv2: the Frechet distance between two image sets' DINOv2 ViT-L/14 features, as edm2's calculate_metrics.py
computes it (its DINOv2Detector, calculate_stats_for_iterable and calculate_metrics_from_stats).

    python -m evaluations.evaluator REF.npz SAMPLES.npz --fd-dinov2 --dinov2-weights dinov2_vitl14_pretrain.pth

- Images: uint8 -> float32 0..255, resized to 224 x 224 by torch's bicubic interpolate with antialiasing (edm2's
  'torch' resize mode), / 255, ImageNet mean and std.
- Features: torch.hub's dinov2_vitl14 forward, i.e. the final-normed class token (1024 wide). Its 37 x 37 position
  embedding reaches the 16 x 16 grid through DINOv2's interpolate_pos_encoding: bicubic, scale factor (16 + 0.1) / 37,
  no antialiasing (not timm's resampling, which antialiases): done once here, at load.
- Statistics: float64, mu = sum / n, sigma = (sum x x^T - n mu mu^T) / (n - 1). Distance: |mu1 - mu2|^2 +
  tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), the real part; sigma1 is the samples', sqrtm is scipy's.
The reference batch's statistics are computed once and cached beside the evaluator's Inception activations, keyed by
the file's sha256, the weights' sha256 and the device type, with a record of what they were computed from.
"""
import hashlib
import json
import math
import os
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np
import scipy.linalg
import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from operations.cli import InvalidInput, MissingInput
from operations.files import atomic_write, file_sha256
from erw.precision import fp32_precision_scope
from models.encoders import DINOV2_MODELS, load_state, local_weights, read_checkpoint
from models.teacher_files import dinov2_to_timm

FD_SIDE = 224
FD_GRID = FD_SIDE // 14
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINOV2_POS_OFFSET = 0.1  # DINOv2's interpolate_offset (its hub models' default), "to avoid floating point error"
TEST_SIZE: Dict[str, int] = {}  # tests only: embed_dim/depth/num_heads of a test-size ViT; empty = the real ViT-L
CACHE_VERSION = 1
PREPROCESSING = ("uint8 -> float32, bicubic antialiased resize to 224x224, / 255, ImageNet mean/std; DINOv2 ViT-L/14 "
                 "final-normed class token, pos_embed by DINOv2's interpolate_pos_encoding (edm2 calculate_metrics)")


def dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's interpolate_pos_encoding for a grid x grid image: (1, 1 + M*M, D) -> (1, 1 + grid*grid, D)."""
    patches = pos_embed[:, 1:].float()
    m = math.isqrt(patches.shape[1])
    scale = (grid + DINOV2_POS_OFFSET) / m
    patches = F.interpolate(patches.reshape(1, m, m, -1).permute(0, 3, 1, 2), scale_factor=(scale, scale),
                            mode="bicubic", antialias=False)
    return torch.cat([pos_embed[:, :1].float(), patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, 224, 224), edm2's DINOv2Detector before the network."""
    x = F.interpolate(images.to(torch.float32), size=(FD_SIDE, FD_SIDE), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor(MEAN, device=x.device).reshape(1, -1, 1, 1)
    return x / torch.tensor(STD, device=x.device).reshape(1, -1, 1, 1)


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (mu (D,), sigma (D, D)), float64, as edm2's calculate_stats_for_iterable accumulates them."""
    x = features.astype(np.float64)
    n = len(x)
    if n < 2:
        raise InvalidInput(f"FD-DINOv2 needs at least 2 images, got {n}")
    mu = x.sum(0) / n
    return mu, (x.T @ x - np.outer(mu, mu) * n) / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """edm2's calculate_metrics_from_stats: (mu1, sigma1) the samples', (mu2, sigma2) the reference's. (edm2 passes
    disp=False, which returns the same root and an error estimate; scipy deprecates it.)"""
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


class FdDinov2:
    """The DINOv2 ViT-L/14 feature network of FD-DINOv2 on `device`, from `weights` (the official
    dinov2_vitl14_pretrain.pth or timm's model.safetensors; None: the torch hub or HF cache). `flag` is what the
    user passes the weights with, for the error when they are missing."""

    def __init__(self, weights: Optional[str], device: torch.device, flag: str):
        path = weights or local_weights("dinov2-vit-l")
        if path is None or not os.path.isfile(path):
            stem = DINOV2_MODELS["l"][1]
            found = f"{flag} {path}: file not found" if path else "no DINOv2 ViT-L/14 weights found locally"
            raise MissingInput(f"FD-DINOv2: {found} (nothing is downloaded); get {stem}_pretrain.pth "
                               f"(https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth) and pass it with "
                               f"{flag} PATH")
        with torch.device("meta"):
            vit = timm.create_model(DINOV2_MODELS["l"][0], pretrained=False, num_classes=0, img_size=FD_SIDE,
                                    **TEST_SIZE)
        try:
            state = {k: v.float() for k, v in dinov2_to_timm(read_checkpoint(path), path).items()}
            if "pos_embed" in state:
                state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], FD_GRID)
            load_state(vit, state, f"FD-DINOv2 weights {path} ({flag})")
        except ValueError as e:
            raise InvalidInput(str(e)) from e
        self.model = vit.eval().requires_grad_(False).to(device)
        self.device, self.path = device, path
        self.weights_sha256 = file_sha256(path)

    def to(self, device: torch.device) -> "FdDinov2":
        self.model, self.device = self.model.to(device), device
        return self

    @torch.inference_mode()
    def features(self, images) -> np.ndarray:
        """uint8 images (N, H, W, 3), numpy or torch -> float32 (N, 1024): the final-normed class tokens (TF32
        off)."""
        images = torch.as_tensor(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        with fp32_precision_scope("ieee"):
            return self.model.forward_features(preprocess(images))[:, 0].float().cpu().numpy()

    def statistics_of(self, reader, batch_size: int, desc: str, progress: bool = True
                      ) -> Tuple[np.ndarray, np.ndarray]:
        """statistics() of the features of every image of an evaluator NpzArrayReader."""
        parts = []
        bar = tqdm(total=len(reader), desc=desc, unit="img", disable=not progress, file=sys.stderr)
        for _, images in reader.iter_batches(batch_size):
            parts.append(self.features(images))
            bar.update(len(images))
        bar.close()
        return statistics(np.concatenate(parts))

    def reference_statistics(self, ref_batch: str, reader, batch_size: int, cache_dir: Optional[str],
                             progress: bool = True) -> Tuple[Tuple[np.ndarray, np.ndarray], Dict[str, Any]]:
        """(mu, sigma) of the reference batch and the record of what they were computed from, with "cache": hit |
        miss | off. Read from cache_dir when an earlier run left them there, else computed and written there."""
        source = {"ref_batch": os.path.abspath(ref_batch), "ref_sha256": file_sha256(ref_batch),
                  "num_images": len(reader), "dinov2_weights": os.path.abspath(self.path),
                  "dinov2_weights_sha256": self.weights_sha256, "preprocessing": PREPROCESSING,
                  "device": self.device.type, "version": CACHE_VERSION}
        cache_path = None
        if cache_dir is not None:
            key = json.dumps({k: source[k] for k in ("ref_sha256", "dinov2_weights_sha256", "device", "version")})
            cache_path = os.path.join(cache_dir, "fd-dinov2-" + hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")
            if os.path.isfile(cache_path):
                with np.load(cache_path) as cached:
                    if cached["sigma"].shape == (self.model.embed_dim,) * 2:
                        return (cached["mu"], cached["sigma"]), {**json.loads(str(cached["source"])), "cache": "hit"}
        mu, sigma = self.statistics_of(reader, batch_size, "reference batch (DINOv2)", progress)
        if cache_path is not None:
            os.makedirs(cache_dir, exist_ok=True)
            atomic_write(cache_path, lambda f: np.savez(f, mu=mu, sigma=sigma, source=json.dumps(source)))
        return (mu, sigma), {**source, "cache": "off" if cache_path is None else "miss"}


def check_finite(stats: Tuple[np.ndarray, np.ndarray], what: str) -> None:
    for name, array in zip(("mu", "sigma"), stats):
        if not np.isfinite(array).all():
            raise InvalidInput(f"{what}: its DINOv2 {name} holds NaN or infinite values; no FD-DINOv2 can be computed")


def fd_dinov2_of(fd: FdDinov2, ref_batch: str, ref_reader, sample_reader, batch_size: int,
                 cache_dir: Optional[str], progress: bool = True) -> Tuple[float, Dict[str, Any]]:
    """FD-DINOv2 of an evaluator's sample batch against its reference batch, and the settings to record: what the
    reference statistics were computed from (and whether they came from the cache)."""
    reference, source = fd.reference_statistics(ref_batch, ref_reader, batch_size, cache_dir, progress)
    check_finite(reference, ref_batch)
    samples = fd.statistics_of(sample_reader, batch_size, "sample batch (DINOv2)", progress)
    check_finite(samples, "the sample batch")
    return frechet_distance(*samples, *reference), {"reference_statistics": source, "preprocessing": PREPROCESSING}
