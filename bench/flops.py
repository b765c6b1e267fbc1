"""Analytic FLOPs of the networks the benchmarks time, and the GPU peaks that turn throughput into MFU.

A multiply-add counts as 2 FLOPs; only matrix products and convolutions are counted (norms, activations, softmax,
adaLN modulation, the EMA and the optimizer are elementwise and left out), as torch's FlopCounterMode counts them:
tests/test_flops.py checks every formula here against it on tiny models.

SiT forward, per image (T = (latent side / p)^2 tokens, D width, H = MLP width, C latent channels, P projector
width, Z teacher width, F = 256 timestep frequencies):

    patch embedding          2 T (C p^2) D
    timestep MLP             2 (F D + D^2)                      (per image, not per token)
    each block               adaLN 2 D (6D)                     (per image)
                             qkv 2 T D (3D) + proj 2 T D^2 + MLP 2 T (2 D H)
                             attention scores 2 T^2 D + attention x values 2 T^2 D
    final layer              adaLN 2 D (2D) + linear 2 T D (p^2 C)
    each projector           2 T (D P + P^2 + P Z)              (training only; sampling skips it)

Teacher (timm ViT, frozen, forward only): T' = patches + prefix tokens, patch embedding 2 patches (3 * 14^2) D,
and per block 2 T' D (3D) + 4 T'^2 D + 2 T' D^2 + 2 T' (D H_in + H_out D).

Inception-v3 (the evaluator): counted by FlopCounterMode on the meta device (inception_forward_flops).

A training step = 3 x the SiT forward (the backward costs ~2 forwards) + 1 x the teacher forward. The backward of the
two layers whose inputs need no gradient (patch embedding, first timestep linear) costs 1x, not 2x: 3x overstates
a SiT-XL/2 step by < 0.01 % (test_flops.py measures it). The NT-Xent logits (forward 4 B T Z per image for a
batch of B: 25 MFLOP at B = 32) are left out: < 0.05 % of a SiT-B/2 step.
"""
import functools
from typing import Dict, Optional

import torch

# Dense (no 2:4 sparsity) peaks in TFLOP/s from NVIDIA's data sheets: bf16/fp16 tensor cores, and plain fp32 (no
# TF32), which is what the evaluator's Inception network runs in. First match of the substrings wins.
PEAK_TFLOPS = [
    # (name substrings, bf16, fp32)
    (("H100", "PCIE"), 756.0, 51.0),
    (("H800", "PCIE"), 756.0, 51.0),
    (("H100", "NVL"), None, None),   # a different part: not tabulated here, give --peak-tflops
    (("H200", "NVL"), None, None),
    (("H100",), 989.0, 67.0),        # SXM ("NVIDIA H100 80GB HBM3")
    (("H800",), 989.0, 67.0),
    (("H200",), 989.0, 67.0),        # GH200 too
    (("A100",), 312.0, 19.5),
]


def peak_tflops(gpu_name: str) -> Dict[str, Optional[float]]:
    """{'bf16': ..., 'fp32': ...} dense peaks for a CUDA device name, None where the name is not tabulated."""
    upper = gpu_name.upper()
    for keys, bf16, fp32 in PEAK_TFLOPS:
        if all(k in upper for k in keys):
            return {"bf16": bf16, "fp32": fp32}
    return {"bf16": None, "fp32": None}


def sit_forward_flops(model, with_projectors: bool = True) -> Dict[str, int]:
    """FLOPs of one image through `model` (a models.sit.SiT, real or on the meta device), by part, and 'total'.

    A truncated (Phase-1) model has only its built blocks and no final layer; `with_projectors=False` is the
    sampling forward (return_projections=False).
    """
    D = model.pos_embed.shape[-1]
    T = model.pos_embed.shape[1]
    p, C = model.patch_size, model.in_channels
    F = model.t_embedder.frequency_embedding_size
    block = model.blocks[0]
    H = block.mlp.fc1.out_features
    parts = {
        "patch_embedding": 2 * T * (C * p * p) * D,
        "timestep_mlp": 2 * (F * D + D * D),
        "blocks_adaLN": len(model.blocks) * 2 * D * 6 * D,
        "blocks_linear": len(model.blocks) * (2 * T * D * 3 * D + 2 * T * D * D + 2 * T * 2 * D * H),
        "blocks_attention": len(model.blocks) * 4 * T * T * D,
        "final_layer": 0 if model.final_layer is None else 2 * D * 2 * D + 2 * T * D * (p * p * model.out_channels),
        "projectors": 0,
    }
    if with_projectors:
        for projector in model.projectors:
            parts["projectors"] += 2 * T * sum(layer.in_features * layer.out_features
                                               for layer in projector if hasattr(layer, "in_features"))
    parts["total"] = sum(parts.values())
    return parts


def vit_forward_flops(vit) -> Dict[str, int]:
    """FLOPs of one image through a timm VisionTransformer's forward_features (a teacher's `vit`), by part."""
    patches = vit.patch_embed.num_patches
    T = patches + vit.num_prefix_tokens
    D = vit.embed_dim
    proj = vit.patch_embed.proj
    parts = {"patch_embedding": 2 * patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * D,
             "blocks_linear": 0, "blocks_attention": 0}
    for block in vit.blocks:
        parts["blocks_linear"] += 2 * T * (D * block.attn.qkv.out_features + D * D
                                           + D * block.mlp.fc1.out_features + block.mlp.fc2.in_features * D)
        parts["blocks_attention"] += 4 * T * T * D
    parts["total"] = sum(parts.values())
    return parts


@functools.lru_cache(maxsize=None)
def inception_forward_flops(image_size: int = 256) -> int:
    """FLOPs of one uint8 image through the evaluator's Inception-v3 (resized to 299 inside), as FlopCounterMode
    counts them on the meta device: its 94 convolutions have no short formula, and nothing is allocated."""
    from torch.utils.flop_counter import FlopCounterMode
    from evaluations.inception import TFInceptionV3
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        TFInceptionV3()(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    return counter.get_total_flops()


def training_step_flops(sit_forward: int, teacher_forward: int = 0) -> int:
    """FLOPs per image of a training step: 3 x the SiT forward (forward + ~2x backward) + the frozen teacher."""
    return 3 * sit_forward + teacher_forward


def mfu(images_per_s: float, flops_per_image: float, peak: Optional[float]) -> Optional[float]:
    """Achieved FLOP/s over the peak (TFLOP/s), or None without a peak."""
    if not peak:
        return None
    return images_per_s * flops_per_image / (peak * 1e12)
