"""Frozen teacher encoders by REPA's names, built on timm's DINOv2 ViT definitions.

`load_teachers("dinov2-vit-b", resolution=256)` -> [Teacher]; a Teacher maps uint8 images (N, 3, H, W) to the
final-normed patch tokens (N, T, D) that REPA aligns to (CLS and register tokens dropped), doing REPA's
preprocessing itself: x / 255, ImageNet mean/std, bicubic resize to `teacher_input_size(resolution)`.

Weights, in this order: an explicit file (`--enc-weights`: the official `dinov2_vitb14_pretrain.pth` or timm's
`model.safetensors`), the torch hub checkpoint folder, the Hugging Face cache of timm's `*.lvd142m` model, else an
error that names the file to get and the flag that takes it. Nothing is ever downloaded.
"""
import functools
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed

from models.weights import check_state_dict

logger = logging.getLogger(__name__)

DINOV2_PATCH_SIZE = 14
# REPA's size letter -> (timm architecture, official checkpoint stem). The official files are
# https://dl.fbaipublicfiles.com/dinov2/<stem>/<stem>_pretrain.pth.
DINOV2_MODELS = {
    "s": ("vit_small_patch14_dinov2", "dinov2_vits14"),
    "b": ("vit_base_patch14_dinov2", "dinov2_vitb14"),
    "l": ("vit_large_patch14_dinov2", "dinov2_vitl14"),
    "g": ("vit_giant_patch14_dinov2", "dinov2_vitg14"),
}
DINOV2_TIMM_PRETRAINED_TAG = "lvd142m"

RANDOM_TEACHER = "random-vit-tiny"
RANDOM_TEACHER_SEED = 0
# LayerScale starts at 1 instead of DINOv2's 1e-5: with 1e-5 the random blocks would be near-identity maps.
RANDOM_TEACHER_ARCH = dict(embed_dim=64, depth=2, num_heads=2, init_values=1.0)
# The demo's teacher: a small DINOv2-style ViT trained (supervised) on the demo images by
# preprocessing/train_demo_components.py; its weights ship with the repository.
DEMO_TEACHER = "demo-vit-tiny"
DEMO_TEACHER_ARCH = dict(embed_dim=96, depth=4, num_heads=3, init_values=1.0)
DEMO_TEACHER_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo",
                                    "teacher.safetensors")
# "random-dinov2-vit-b" etc.: the real DINOv2 architecture, random weights, nothing loaded (GPU tests, benchmarks).
# The name starts with "random" so that the training code warns about it like about random-vit-tiny.
RANDOM_DINOV2_PATTERN = r"random-dinov2-vit-([sblg])"


def teacher_input_size(resolution: int) -> int:
    """Side of the teacher's input for `resolution`-px images: REPA's 224 for 256 (448 for 512), i.e. 7/8 of it.

    This keeps one teacher token per 16x16 image pixels, so the token grid equals SiT/2's on 8x-downsampled latents.
    """
    side = resolution * 224 // 256
    if resolution * 224 % 256 or side % DINOV2_PATCH_SIZE:
        raise ValueError(f"resolution {resolution} is not supported by the patch-14 teachers: it must be a multiple "
                         f"of 16 (teacher input side = resolution * 224 / 256 must be a multiple of 14)")
    return side


@functools.lru_cache(maxsize=None)
def _imagenet_mean_std(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as float32 (1, 3, 1, 1) tensors on `device`, made once per device: building them from
    Python lists at every step would be a host-to-device copy that synchronizes the GPU with the host."""
    with torch.inference_mode(False):  # plain tensors even if first asked for under inference mode
        return (torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1),
                torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1))


# What preprocess_for_teacher does, recorded in a teacher-token cache's identity (erw/teacher_cache.py): a cache made
# with other preprocessing is refused. Change this text whenever the function changes.
TEACHER_PREPROCESSING = "uint8 / 255, ImageNet mean/std, then bicubic resize to 224/256 of the side (REPA's order)"


def preprocess_for_teacher(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, input_size, input_size): /255, ImageNet normalisation, bicubic resize.

    Normalise-then-resize and no clamping, in REPA's order (train.py `preprocess_raw_image`).
    """
    x = images.float() / 255.0
    mean, std = _imagenet_mean_std(x.device)
    x = (x - mean) / std
    return F.interpolate(x, size=(input_size, input_size), mode="bicubic")


class Teacher(nn.Module):
    """A frozen ViT teacher. forward: uint8 images (N, 3, R, R) -> patch tokens (N, T, embed_dim), T = (R/16)^2.

    Always in eval mode without gradients; it computes in its parameters' dtype, or the autocast dtype around it.
    """

    def __init__(self, name: str, vit: nn.Module, resolution: int):
        super().__init__()
        self.name = name
        self.vit = vit
        self.resolution = resolution
        self.input_size = teacher_input_size(resolution)
        self.embed_dim = vit.embed_dim
        self.num_tokens = (self.input_size // DINOV2_PATCH_SIZE) ** 2
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # A frozen teacher never switches to train mode (no dropout/drop-path), whatever its parent asks.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.resolution,) * 2:
            raise ValueError(f"teacher {self.name} expects images (N, 3, {self.resolution}, {self.resolution}), "
                             f"got {tuple(images.shape)}")
        x = preprocess_for_teacher(images, self.input_size).to(self.vit.patch_embed.proj.weight.dtype)
        tokens = self.vit.forward_features(x)  # (N, prefix + T, D) after the final norm
        return tokens[:, self.vit.num_prefix_tokens:]

    def extra_repr(self) -> str:
        return f"name={self.name}, resolution={self.resolution}, input_size={self.input_size}"


def official_dinov2_to_timm(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename an official DINOv2 state dict (facebookresearch/dinov2, as torch.hub loads it) to timm's keys.

    Official and timm ViTs share most names; the differences are mapped one by one:
    - `mask_token` exists only for DINOv2's masked-image training and is unused at inference: dropped.
    - ViT-g's SwiGLU `mlp.w12` / `mlp.w3` are timm's packed `mlp.fc1` / `mlp.fc2` (same [x1 | x2] split, SiLU on x1).
    - Training checkpoints with block chunking name blocks `blocks.<chunk>.<i>`: flattened to `blocks.<i>`.
    A timm-layout dict passes through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        chunked = re.match(r"blocks\.\d+\.(\d+)\.(.*)$", key)
        if chunked:
            key = f"blocks.{chunked.group(1)}.{chunked.group(2)}"
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key)
        out[key] = value
    return out


def read_weight_file(path: str) -> Dict[str, torch.Tensor]:
    """A flat state dict from a .pth/.pt (torch.load, weights_only) or .safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"teacher weight file not found: {path} (given with --enc-weights)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read teacher weights {path}: {e}") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"teacher weights {path} are not a flat state dict of tensors (expected the official "
                         f"dinov2_vit*14_pretrain.pth or timm's model.safetensors)")
    return state_dict


def load_dinov2_weights(vit: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """Load an official- or timm-layout DINOv2 state dict into a timm ViT (possibly built on the meta device), strictly.

    The position embedding (37x37 + CLS for 518 px) is resampled to the model's grid with timm's bicubic
    antialiased resampling, exactly as REPA resamples the torch.hub model's pos_embed before use. Tensors are
    stored as float32; the training loop's autocast (or .to(dtype)) sets the compute precision.
    """
    state_dict = {k: v.float() for k, v in official_dinov2_to_timm(state_dict).items()}
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"], list(vit.patch_embed.grid_size), num_prefix_tokens=vit.num_prefix_tokens)
    check_state_dict(vit.state_dict(), state_dict, what)
    vit.load_state_dict(state_dict, strict=True, assign=True)  # assign: replaces meta-device placeholders
    leftover = [name for name, t in list(vit.named_parameters()) + list(vit.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{what}: tensors without values after loading: {', '.join(leftover)}")


def _cached_dinov2_weights(size: str) -> Optional[str]:
    """Path of locally cached weights for DINOv2 `size`: the torch hub checkpoint, else timm's HF file; or None."""
    timm_arch, stem = DINOV2_MODELS[size]
    hub_file = os.path.join(torch.hub.get_dir(), "checkpoints", f"{stem}_pretrain.pth")
    if os.path.isfile(hub_file):
        return hub_file
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return hf_hub_download(f"timm/{timm_arch}.{DINOV2_TIMM_PRETRAINED_TAG}", "model.safetensors",
                               local_files_only=True)
    except LocalEntryNotFoundError:  # not cached: the caller raises the error that says what to get
        return None


def _missing_weights_error(name: str, size: str) -> FileNotFoundError:
    timm_arch, stem = DINOV2_MODELS[size]
    hub_file = os.path.join(torch.hub.get_dir(), "checkpoints", f"{stem}_pretrain.pth")
    return FileNotFoundError(
        f"teacher '{name}' needs pretrained DINOv2 weights and none were found locally (nothing is downloaded). "
        f"Get {stem}_pretrain.pth (https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth) and pass it "
        f"with --enc-weights PATH, or place it at {hub_file}, or put timm's "
        f"timm/{timm_arch}.{DINOV2_TIMM_PRETRAINED_TAG} in the Hugging Face cache.")


def build_random_teacher(resolution: int) -> Teacher:
    """Random-init tiny DINOv2-style ViT (patch 14, 64 wide, 2 blocks) from a fixed seed; for tests and the demo."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        vit = timm.create_model(DINOV2_MODELS["s"][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(resolution), **RANDOM_TEACHER_ARCH)
    return Teacher(RANDOM_TEACHER, vit, resolution)


@functools.lru_cache(maxsize=1)
def _random_dinov2_weights(size: str, resolution: int) -> Dict[str, torch.Tensor]:
    """The random weights of build_random_dinov2, drawn once per process: timm's initialisation of ViT-B takes
    seconds, and GPU tests and benchmarks build the teacher once per run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        vit = timm.create_model(DINOV2_MODELS[size][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(resolution), init_values=1.0)
    return vit.state_dict()


def build_random_dinov2(size: str, resolution: int) -> Teacher:
    """DINOv2 ViT-{s,b,l,g}/14 built by timm exactly as `dinov2-vit-<size>` builds it (same modules, shapes and
    FLOPs), randomly initialised from a fixed seed and never loaded: for GPU tests and benchmarks, offline.

    LayerScale starts at 1 instead of DINOv2's 1e-5 (as in random-vit-tiny), so that the random blocks are not
    near-identity maps; this changes initial values only, not the architecture.
    """
    name = f"random-dinov2-vit-{size}"
    with torch.device("meta"):
        vit = timm.create_model(DINOV2_MODELS[size][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(resolution), init_values=1.0)
    weights = {k: v.clone() for k, v in _random_dinov2_weights(size, resolution).items()}  # never shared
    vit.load_state_dict(weights, strict=True, assign=True)
    return Teacher(name, vit, resolution)


def build_demo_vit(resolution: int, weights: Optional[str] = None) -> Teacher:
    """The demo teacher (DEMO_TEACHER_ARCH) for `resolution`-px images; random init when weights is "random"
    (what preprocessing/train_demo_components.py starts from), else the trained file, loaded strictly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        vit = timm.create_model(DINOV2_MODELS["s"][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(resolution), **DEMO_TEACHER_ARCH)
    if weights != "random":
        path = weights or DEMO_TEACHER_WEIGHTS
        if not os.path.isfile(path):
            raise FileNotFoundError(f"demo teacher weights not found: {path} (they ship with the repository; "
                                    "rebuild them with `python -m preprocessing.train_demo_components`)")
        state_dict = read_weight_file(path)
        check_state_dict(vit.state_dict(), state_dict, f"demo teacher {path}")
        vit.load_state_dict(state_dict, strict=True)
    return Teacher(DEMO_TEACHER, vit, resolution)


def build_teacher(name: str, resolution: int, weights: Optional[str] = None) -> Teacher:
    """One teacher by REPA name ("dinov2-vit-b", ...), "random-vit-tiny" or "random-dinov2-vit-b" (the real
    architecture with random weights), with weights as in the module doc."""
    if name == DEMO_TEACHER:
        return build_demo_vit(resolution, weights)
    random_dinov2 = re.fullmatch(RANDOM_DINOV2_PATTERN, name)
    if name == RANDOM_TEACHER or random_dinov2:
        if weights:
            raise ValueError(f"teacher {name} is random by definition; it takes no --enc-weights (got {weights})")
        return build_random_dinov2(random_dinov2.group(1), resolution) if random_dinov2 else \
            build_random_teacher(resolution)
    match = re.fullmatch(r"dinov2-vit-([sblg])", name)
    if match is None:
        known = ", ".join([f"dinov2-vit-{s}" for s in DINOV2_MODELS] + [DEMO_TEACHER, RANDOM_TEACHER] +
                          [f"random-dinov2-vit-{s}" for s in DINOV2_MODELS])
        raise ValueError(f"unknown teacher '{name}' in --enc-type; known: {known}")
    size = match.group(1)
    path = weights or _cached_dinov2_weights(size)
    if path is None:
        raise _missing_weights_error(name, size)
    state_dict = read_weight_file(path)
    with torch.device("meta"):  # no random init of up to 1.1B parameters that the weights replace anyway
        vit = timm.create_model(DINOV2_MODELS[size][0], pretrained=False, num_classes=0,
                                img_size=teacher_input_size(resolution))
    load_dinov2_weights(vit, state_dict, what=f"teacher weights {path} for {name}")
    logger.info("teacher %s loaded from %s", name, path)
    return Teacher(name, vit, resolution)


def teacher_weights_file(name: str, weights: Optional[str] = None) -> Optional[str]:
    """The file build_teacher(name, ..., weights) reads its weights from; None for a random teacher, whose weights
    follow from its name and seed."""
    if name == DEMO_TEACHER:
        return None if weights == "random" else (weights or DEMO_TEACHER_WEIGHTS)
    if name == RANDOM_TEACHER or re.fullmatch(RANDOM_DINOV2_PATTERN, name):
        return None
    match = re.fullmatch(r"dinov2-vit-([sblg])", name)
    if match is None:
        return None  # build_teacher names the unknown teacher
    path = weights or _cached_dinov2_weights(match.group(1))
    if path is None:
        raise _missing_weights_error(name, match.group(1))
    return path


def teacher_names(enc_type: str) -> List[str]:
    """The teachers a comma-separated --enc-type names, in order."""
    names = [n.strip() for n in enc_type.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--enc-type is empty ({enc_type!r}); name at least one teacher, e.g. dinov2-vit-b")
    return names


def split_weights(enc_weights: Union[None, str, Sequence[Optional[str]]], names: List[str]) -> List[Optional[str]]:
    if enc_weights is None:
        return [None] * len(names)
    parts = enc_weights.split(",") if isinstance(enc_weights, str) else list(enc_weights)
    if len(parts) != len(names):
        raise ValueError(f"--enc-weights lists {len(parts)} file(s) ({enc_weights}) but --enc-type names "
                         f"{len(names)} teacher(s) ({','.join(names)}); give one path per teacher "
                         f"(an empty entry means: look in the local cache)")
    return [(p.strip() or None) if p else None for p in parts]


def load_teachers(enc_type: str, resolution: int, enc_weights=None) -> List[Teacher]:
    """Frozen teachers for a comma-separated `enc_type`; `enc_weights`: None, a path, or comma-separated paths."""
    names = teacher_names(enc_type)
    weights_per_name = split_weights(enc_weights, names)
    return [build_teacher(name, resolution, weights) for name, weights in zip(names, weights_per_name)]
