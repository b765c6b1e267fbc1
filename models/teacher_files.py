"""The teachers' published weight files, read as their authors wrote them; CONVERTERS[family] takes the weights out
of the file's container and renames them to timm's keys. Keys the teacher does not use are dropped by name, here;
every other key is passed on, so that models/weights.py check_state_dict names whatever does not fit.
"""
import os
import re
import warnings
import zipfile
from typing import Any, Callable, Dict

import torch

StateDict = Dict[str, torch.Tensor]


def read_checkpoint(path: str) -> Any:
    """The object saved in `path`: torch.load (weights only) for .pth/.pth.tar/.pt, safetensors, or the state dict
    of a TorchScript archive (OpenAI's CLIP files, which torch.load refuses with weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher weight file not found: {path} (given with --enc-weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            with warnings.catch_warnings():  # torch.jit is deprecated, and the only reader of these archives
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(path, map_location="cpu").state_dict())
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read teacher weights {path}: {e}") from e


def _entry(checkpoint: Any, key: str, path: str, what: str) -> StateDict:
    """checkpoint[key], which must be a dict: the container of `what`'s published file."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(key), dict):
        keys = ", ".join(sorted(map(str, checkpoint))[:8]) if isinstance(checkpoint, dict) else type(checkpoint)
        raise ValueError(f"{path} is not {what}: it has no '{key}' dict of weights (top-level keys: {keys})")
    return checkpoint[key]


def _flat(checkpoint: Any, path: str, what: str) -> StateDict:
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} is not {what}: expected a flat state dict of tensors")
    return checkpoint


# RCG's MoCo v3 ViT-L checkpoint (the one REPA uses) misnames four modules of blocks 13 and 14; REPA's
# fix_mocov3_state_dict renames them back.
MOCOV3_KEY_SLIPS = {"blocks.13.norm13.": "blocks.13.norm1.", "blocks.13.mlp.fc13.": "blocks.13.mlp.fc1.",
                    "blocks.14.norm14.": "blocks.14.norm2.", "blocks.14.mlp.fc14.": "blocks.14.mlp.fc2."}


def mocov3_to_timm(checkpoint: Any, path: str) -> StateDict:
    """MoCo v3's training checkpoint: {'state_dict': {'module.base_encoder.<timm ViT key>', ...}}. Kept: the base
    encoder without `head.` (the projection MLP that replaced its classifier); dropped: the momentum encoder and the
    predictor. Key slips repaired as REPA does."""
    prefix = "module.base_encoder."
    out = {}
    for key, value in _entry(checkpoint, "state_dict", path, "a MoCo v3 checkpoint").items():
        if key.startswith(("module.momentum_encoder.", "module.predictor.")):
            continue
        key = key[len(prefix):] if key.startswith(prefix) else key
        if key.startswith("head."):
            continue
        for slip, fixed in MOCOV3_KEY_SLIPS.items():
            if key.startswith(slip):
                key = fixed + key[len(slip):]
        out[key] = value
    return out


CLIP_RESBLOCK_KEYS = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.qkv.weight",
                      "attn.in_proj_bias": "attn.qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.fc1",
                      "mlp.c_proj": "mlp.fc2"}


def clip_to_timm(checkpoint: Any, path: str) -> StateDict:
    """OpenAI CLIP's state dict (ViT-L-14.pt): the image tower under `visual.`, renamed to timm's CLIP ViT. Dropped:
    everything outside `visual.` (the text tower, logit scale, the archive's size entries), and `visual.ln_post` /
    `visual.proj`, which act on the pooled token only: REPA's CLIP tokens are the last block's output before them
    (models/clip_vit.py UpdatedVisionTransformer)."""
    out = {}
    for key, value in _flat(checkpoint, path, "OpenAI CLIP's state dict").items():
        if not key.startswith("visual.") or key == "visual.proj" or key.startswith("visual.ln_post."):
            continue
        key = key[len("visual."):]
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)  # (D,) -> (1, 1, D)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)  # (1 + T, D) -> (1, 1 + T, D)
        else:
            block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
            if block:
                name = block.group(2)
                for theirs, ours in CLIP_RESBLOCK_KEYS.items():
                    if name == theirs or name.startswith(theirs + "."):
                        name = ours + name[len(theirs):]
                        break
                key = f"blocks.{block.group(1)}.{name}"
            elif key.startswith("conv1."):
                key = "patch_embed.proj." + key[len("conv1."):]
            elif key.startswith("ln_pre."):
                key = "norm_pre." + key[len("ln_pre."):]
            out[key] = value
    return out


def dinov1_to_timm(checkpoint: Any, path: str) -> StateDict:
    """DINO's backbone file (dino_vitbase16_pretrain.pth): a flat state dict in timm's ViT names."""
    return dict(_flat(checkpoint, path, "DINO's backbone state dict"))


def mae_to_timm(checkpoint: Any, path: str) -> StateDict:
    """MAE's encoder file (mae_pretrain_vit_large.pth): timm ViT keys under 'model'. Dropped: the final `norm.`,
    which REPA's MAE forward (models/mae_vit.py forward_features) does not apply."""
    return {k: v for k, v in _entry(checkpoint, "model", path, "an MAE checkpoint").items()
            if not k.startswith("norm.")}


def jepa_to_timm(checkpoint: Any, path: str) -> StateDict:
    """I-JEPA's training checkpoint (IN1K-vit.h.14-300e.pth.tar): the context encoder under 'encoder', its keys
    behind DDP's `module.` (REPA strips the first 7 characters); the predictor, target encoder and optimizer
    entries are not read."""
    encoder = _entry(checkpoint, "encoder", path, "an I-JEPA checkpoint")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in encoder.items()}


def dinov2_to_timm(checkpoint: Any, path: str) -> StateDict:
    """An official DINOv2 state dict (facebookresearch/dinov2, as torch.hub loads it) in timm's keys; a timm-layout
    dict (timm's model.safetensors, the demo teacher's file) passes through. Dropped: `mask_token` (masked training
    only). ViT-g's SwiGLU `mlp.w12` / `mlp.w3` are timm's packed `mlp.fc1` / `mlp.fc2` (same [x1 | x2] split, SiLU on
    x1); chunked blocks `blocks.<chunk>.<i>` are flattened to `blocks.<i>`."""
    out = {}
    for key, value in _flat(checkpoint, path, "a DINOv2 state dict").items():
        if key == "mask_token":
            continue
        chunked = re.match(r"blocks\.\d+\.(\d+)\.(.*)$", key)
        if chunked:
            key = f"blocks.{chunked.group(1)}.{chunked.group(2)}"
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)
        out[key] = value
    return out


DINOV3_KEYS = {"storage_tokens": "reg_token", "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2", "mlp.w1.": "mlp.fc1_g.",
               "mlp.w2.": "mlp.fc1_x.", "mlp.w3.": "mlp.fc2."}


def dinov3_to_timm(checkpoint: Any, path: str) -> StateDict:
    """An official DINOv3 state dict (dinov3_vit*16*_pretrain_lvd1689m-*.pth) in the keys of timm's Eva DINOv3;
    timm's own files (`reg_token`) pass through. The qkv bias is split into timm's q and v biases: its k third is
    zeroed by the file's `bias_mask` in DINOv3 and a fixed zero buffer in timm. Dropped: `mask_token` (masked
    training only), `qkv.bias_mask`, `rope_embed.periods` (timm recomputes them from the same base, 100),
    `local_cls_norm` (7B's norm for training crops)."""
    state = _flat(checkpoint, path, "a DINOv3 state dict")
    if "storage_tokens" not in state:
        return dict(state)
    out = {}
    for key, value in state.items():
        if key in ("mask_token", "rope_embed.periods") or key.endswith(".qkv.bias_mask") or \
                key.startswith("local_cls_norm."):
            continue
        if key.endswith(".attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace(".qkv.bias", ".q_bias")], out[key.replace(".qkv.bias", ".v_bias")] = q, v
            continue
        for theirs, ours in DINOV3_KEYS.items():
            key = key.replace(theirs, ours)
        out[key] = value
    return out


def siglip2_to_timm(checkpoint: Any, path: str) -> StateDict:
    """timm's SigLIP 2 file (timm/vit_base_patch16_siglip_256.v2_webli model.safetensors). Dropped: `attn_pool.`, the
    attention-pooling head that makes the pooled embedding; the patch tokens are the final-normed tokens before
    it."""
    return {k: v for k, v in _flat(checkpoint, path, "timm's SigLIP 2 state dict").items()
            if not k.startswith("attn_pool.")}


CONVERTERS: Dict[str, Callable[[Any, str], StateDict]] = {
    "mocov3": mocov3_to_timm, "clip": clip_to_timm, "dinov1": dinov1_to_timm, "mae": mae_to_timm,
    "jepa": jepa_to_timm, "dinov2": dinov2_to_timm, "dinov3": dinov3_to_timm, "siglip2": siglip2_to_timm,
}
