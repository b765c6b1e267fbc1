"""FD-DINOv2: the Frechet distance between two image sets' DINOv2 ViT-L/14 features, as edm2's calculate_metrics.py
computes it (its DINOv2Detector, calculate_stats_for_iterable and calculate_metrics_from_stats): the preprocessing,
features, statistics and distance, each step in docs/evaluation.md. evaluations/evaluator.py runs it (--fd-dinov2)
and caches the reference batch's statistics.
"""
import math
import os
import sys
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.linalg
import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from operations.cli import InvalidInput, MissingInput, refusals
from operations.files import file_sha256
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
        with refusals(flag):
            state = {k: v.float() for k, v in dinov2_to_timm(read_checkpoint(path), path).items()}
            if "pos_embed" in state:
                state["pos_embed"] = dinov2_pos_embed(state["pos_embed"], FD_GRID)
            load_state(vit, state, f"FD-DINOv2 weights {path} ({flag})")
        self.model = vit.eval().requires_grad_(False).to(device)
        self.device, self.path = device, path
        self.weights_sha256 = file_sha256(path)

    def to(self, device: torch.device) -> "FdDinov2":
        self.model, self.device = self.model.to(device), device
        return self

    @torch.inference_mode()
    def features(self, images) -> np.ndarray:
        """uint8 images (N, H, W, 3), numpy or torch -> float32 (N, 1024) final-normed class tokens (TF32 off)."""
        images = torch.as_tensor(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        with fp32_precision_scope("ieee"):
            return self.model.forward_features(preprocess(images))[:, 0].float().cpu().numpy()

    def statistics_of(self, reader, batch_size: int, desc: str, progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """statistics() of the features of every image of an evaluator NpzArrayReader."""
        parts = []
        with tqdm(total=len(reader), desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
            for _, images in reader.iter_batches(batch_size):
                parts.append(self.features(images))
                bar.update(len(images))
        return statistics(np.concatenate(parts))


def check_finite(stats: Tuple[np.ndarray, np.ndarray], what: str) -> None:
    for name, array in zip(("mu", "sigma"), stats):
        if not np.isfinite(array).all():
            raise InvalidInput(f"{what}: its DINOv2 {name} holds NaN or infinite values; no FD-DINOv2 can be computed")
