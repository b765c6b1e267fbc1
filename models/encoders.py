"""Frozen teacher encoders by REPA's names, on timm's architecture definitions.

`load_teachers("mocov3-vit-b,dinov2-vit-b", resolution=256)` -> [Teacher]: uint8 images (N, 3, R, R) to the patch
tokens (N, (R/16)^2, D) that REPA aligns to, prepared by the family's Recipe. Weights: an explicit file
(`--enc-weights`), else the published file in the torch hub checkpoint folder (CLIP: also the clip package's cache),
else timm's copy in the Hugging Face cache; nothing is ever downloaded (docs/data.md lists the files).
"""
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import reinit_non_persistent_buffers

from models.teacher_files import CONVERTERS, read_checkpoint
from models.weights import check_state_dict

logger = logging.getLogger(__name__)

TOKEN_PIXELS = 16  # one teacher token per 16x16 image pixels: the token grid of SiT/2 on 8x-downsampled latents


@dataclass(frozen=True)
class Recipe:
    """How a family prepares uint8 images: x / 255, normalisation by `mean`/`std` (called `norm`), and a bicubic
    resize to 224/256 of the side before normalising ("first", REPA's CLIP order), after it ("last", its DINOv2 and
    I-JEPA order) or none ("none": the patch-16 teachers see the image at its own size)."""
    norm: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: str

    def text(self) -> str:
        """The recipe in words: what a teacher-token cache records as its preprocessing."""
        if self.resize == "last":
            return f"uint8 / 255, {self.norm} mean/std, then bicubic resize to 224/256 of the side (REPA's order)"
        if self.resize == "first":
            return f"uint8 / 255, bicubic resize to 224/256 of the side, then {self.norm} mean/std (REPA's order)"
        return f"uint8 / 255, {self.norm} mean/std, no resize"


@dataclass(frozen=True)
class Family:
    """What the teachers of one published model family share."""
    recipe: Recipe
    final_norm: bool = True          # False: the last block's tokens, before the final LayerNorm
    layer_scale: bool = False        # random weights start its LayerScale at 1 (1e-5 would make blocks near-identity)
    tiny: Dict[str, int] = field(default_factory=dict)  # tests only: the family's definition at test size


FAMILIES = {
    # REPA's preprocess_raw_image branch by branch; REPA's token choice (train.py and models/*.py) for each.
    "mocov3": Family(Recipe("ImageNet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "none"),
                     tiny=dict(embed_dim=48, depth=15, num_heads=2)),  # 15 blocks: ViT-L's key slips are in 13, 14
    "clip": Family(Recipe("CLIP", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "first"), final_norm=False,
                   tiny=dict(embed_dim=32, depth=2, num_heads=2)),
    # REPA's dinov1 path imports a models/dinov1.py that REPA does not ship: its preprocessing and pos-embed
    # resampling are REPA's, the tokens DINO's own (vision_transformer.py get_intermediate_layers: the final norm).
    "dinov1": Family(Recipe("ImageNet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "none"),
                     tiny=dict(embed_dim=56, depth=2, num_heads=2)),
    "mae": Family(Recipe("ImageNet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "none"), final_norm=False,
                  tiny=dict(embed_dim=40, depth=2, num_heads=2)),
    "jepa": Family(Recipe("ImageNet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "last"),
                   tiny=dict(embed_dim=24, depth=2, num_heads=2)),
    "dinov2": Family(Recipe("ImageNet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "last"), layer_scale=True,
                     tiny=dict(embed_dim=48, depth=2, num_heads=2)),  # 48: ViT-g's SwiGLU width 8/3 x 48 is whole
    # The authors' own: DINOv3's make_transform (its resize to 256 is the identity at 256 px; patch 16 gives
    # SiT/2's grid) and SigLIP 2's value range [-1, 1]; both final-normed patch tokens.
    "dinov3": Family(Recipe("ImageNet", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "none"), layer_scale=True,
                     tiny=dict(embed_dim=32, depth=2, num_heads=2)),
    "siglip2": Family(Recipe("SigLIP", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "none"),
                      tiny=dict(embed_dim=48, depth=2, num_heads=2)),
}


@dataclass(frozen=True)
class Spec:
    family: str
    arch: str                        # timm's definition
    file: str                        # the published file users have
    url: str                         # where to get it
    kwargs: Dict[str, Any] = field(default_factory=dict)  # changes to timm's definition
    hf_repo: Optional[str] = None    # timm's copy on the Hugging Face hub (read from the local HF cache only)


# REPA's size letter -> (timm architecture, official checkpoint stem); https://dl.fbaipublicfiles.com/dinov2/<stem>/
DINOV2_MODELS = {
    "s": ("vit_small_patch14_dinov2", "dinov2_vits14"),
    "b": ("vit_base_patch14_dinov2", "dinov2_vitb14"),
    "l": ("vit_large_patch14_dinov2", "dinov2_vitl14"),
    "g": ("vit_giant_patch14_dinov2", "dinov2_vitg14"),
}
# Size -> (timm architecture, the official LVD-1689M file, named as dinov3/hub/backbones.py names it). The `_qkvb`
# variants keep the qkv bias the official files carry; 7B has none.
DINOV3_MODELS = {
    "s": ("vit_small_patch16_dinov3_qkvb", "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"),
    "s+": ("vit_small_plus_patch16_dinov3_qkvb", "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"),
    "b": ("vit_base_patch16_dinov3_qkvb", "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"),
    "l": ("vit_large_patch16_dinov3_qkvb", "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"),
    "h+": ("vit_huge_plus_patch16_dinov3_qkvb", "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth"),
    "7b": ("vit_7b_patch16_dinov3", "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"),
}
DINOV3_DOWNLOADS = ("https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/ (its form e-mails the "
                    "download URLs)")
MOCOV3_URL = "https://dl.fbaipublicfiles.com/moco-v3/{0}/{0}.pth.tar"
CLIP_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "clip")  # where the clip package keeps its downloads
TEACHERS: Dict[str, Spec] = {
    "mocov3-vit-s": Spec("mocov3", "vit_small_patch16_224", "vit-s-300ep.pth.tar", MOCOV3_URL.format("vit-s-300ep"),
                         dict(num_heads=12)),  # MoCo v3's vits.py: ViT-S with 12 heads of 32
    "mocov3-vit-b": Spec("mocov3", "vit_base_patch16_224", "vit-b-300ep.pth.tar", MOCOV3_URL.format("vit-b-300ep")),
    # MoCo v3 released no ViT-L; RCG's is the one REPA uses (REPA's README).
    "mocov3-vit-l": Spec("mocov3", "vit_large_patch16_224", "vitl.pth.tar",
                         "https://drive.google.com/file/d/1Foa2-FqhwIFYjcAAbY9sXyO-1Vwwx-_9 (RCG's README)"),
    "clip-vit-L": Spec("clip", "vit_large_patch14_clip_quickgelu_224", "ViT-L-14.pt",
                       "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7"
                       "c2e0eca1737a03836/ViT-L-14.pt"),
    "dinov1-vit-b": Spec("dinov1", "vit_base_patch16_224", "dino_vitbase16_pretrain.pth",
                         "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                         hf_repo="timm/vit_base_patch16_224.dino"),
    "mae-vit-l": Spec("mae", "vit_large_patch16_224", "mae_pretrain_vit_large.pth",
                      "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth"),
    "jepa-vit-h": Spec("jepa", "vit_huge_patch14_gap_224", "IN1K-vit.h.14-300e.pth.tar",
                       "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"),
    **{f"dinov2-vit-{size}": Spec("dinov2", arch, f"{stem}_pretrain.pth",
                                  f"https://dl.fbaipublicfiles.com/dinov2/{stem}/{stem}_pretrain.pth",
                                  hf_repo=f"timm/{arch}.lvd142m")
       for size, (arch, stem) in DINOV2_MODELS.items()},
    **{f"dinov3-vit-{size}": Spec("dinov3", arch, file, DINOV3_DOWNLOADS, hf_repo=f"timm/{arch}.lvd1689m")
       for size, (arch, file) in DINOV3_MODELS.items()},
    "siglip2-vit-b": Spec("siglip2", "vit_base_patch16_siglip_256", "model.safetensors",
                          "https://huggingface.co/timm/vit_base_patch16_siglip_256.v2_webli", dict(global_pool=""),
                          hf_repo="timm/vit_base_patch16_siglip_256.v2_webli"),
}

RANDOM_TEACHER, DEMO_TEACHER = "random-vit-tiny", "demo-vit-tiny"
# This repository's own teachers: dinov2-vit-s's definition at a small size. random-vit-tiny has random weights
# (tests, the rehearsal); demo-vit-tiny is trained on the demo images by preprocessing/train_demo_components.py.
SMALL_TEACHERS = {RANDOM_TEACHER: dict(embed_dim=64, depth=2, num_heads=2),
                  DEMO_TEACHER: dict(embed_dim=96, depth=4, num_heads=3)}
DEMO_TEACHER_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo",
                                    "teacher.safetensors")
RANDOM_TEACHER_SEED = 0


def teacher_input_size(resolution: int) -> int:
    """Side of a resizing teacher's input for `resolution`-px images: REPA's 224 for 256 (448 for 512), i.e. 7/8,
    one patch-14 token per 16x16 image pixels."""
    side = resolution * 224 // 256
    if resolution * 224 % 256 or side % 14:
        raise ValueError(f"resolution {resolution} is not supported by the patch-14 teachers: it must be a multiple "
                         f"of 16 (teacher input side = resolution * 224 / 256 must be a multiple of 14)")
    return side


@functools.lru_cache(maxsize=None)
def _mean_std(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 (1, 3, 1, 1) tensors on `device`, made once per device: building them from Python
    lists at every step would be a host-to-device copy that synchronizes the GPU with the host."""
    with torch.inference_mode(False):  # plain tensors even if first asked for under inference mode
        return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
                torch.tensor(std, device=device).view(1, 3, 1, 1))


def preprocess_for_teacher(images: torch.Tensor, input_size: int,
                           recipe: Recipe = FAMILIES["dinov2"].recipe) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, input_size, input_size) by `recipe`, no clamping (REPA's
    `preprocess_raw_image`: interpolate(x, size, mode='bicubic') and torchvision's Normalize)."""
    x = images.float() / 255.0
    mean, std = _mean_std(recipe.mean, recipe.std, x.device)
    if recipe.resize == "first":
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic")
    x = (x - mean) / std
    if recipe.resize == "last":
        x = F.interpolate(x, size=(input_size, input_size), mode="bicubic")
    return x


def check_resolution(name: str, resolution: int) -> None:
    if resolution <= 0 or resolution % TOKEN_PIXELS:
        raise ValueError(f"teacher {name} does not take {resolution}-px images: it works at multiples of 16 px "
                         f"(e.g. 256 and 512), where its token grid is SiT/2's (resolution / 16 per side)")


def input_side(recipe: Recipe, resolution: int) -> int:
    """The side of the images a teacher of `recipe` sees: resized (patch 14) or `resolution` itself (patch 16)."""
    return teacher_input_size(resolution) if recipe.resize != "none" else resolution


class Teacher(nn.Module):
    """A frozen ViT teacher. forward: uint8 images (N, 3, R, R) -> patch tokens (N, T, embed_dim), T = (R/16)^2.

    Always in eval mode without gradients; it computes in its parameters' dtype, or the autocast dtype around it.
    `preprocessing` is its recipe in words (a teacher-token cache records it).
    """

    def __init__(self, name: str, vit: nn.Module, resolution: int, family: str):
        super().__init__()
        check_resolution(name, resolution)
        self.name, self.vit, self.resolution, self.family = name, vit, resolution, family
        self.recipe = FAMILIES[family].recipe
        self.preprocessing = self.recipe.text()
        self.input_size = input_side(self.recipe, resolution)
        self.embed_dim = vit.embed_dim
        grid = self.input_size // vit.patch_embed.patch_size[0]
        if grid * vit.patch_embed.patch_size[0] != self.input_size or grid * TOKEN_PIXELS != resolution:
            raise ValueError(f"teacher {name}: {self.input_size}-px inputs in patches of "
                             f"{vit.patch_embed.patch_size[0]} do not make SiT/2's {resolution // 16}-wide grid")
        self.num_tokens = grid * grid
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # A frozen teacher never switches to train mode (no dropout/drop-path), whatever its parent asks.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return preprocess_for_teacher(images, self.input_size, self.recipe)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.resolution,) * 2:
            raise ValueError(f"teacher {self.name} expects images (N, 3, {self.resolution}, {self.resolution}), "
                             f"got {tuple(images.shape)}")
        x = self.preprocess(images).to(self.vit.patch_embed.proj.weight.dtype)
        tokens = self.vit.forward_features(x)  # (N, prefix + T, D): class and register tokens first
        return tokens[:, self.vit.num_prefix_tokens:]

    def extra_repr(self) -> str:
        return f"name={self.name}, resolution={self.resolution}, input_size={self.input_size}"


def parse_teacher_name(name: str) -> Tuple[str, str, Dict[str, Any]]:
    """(the published teacher whose timm definition `name` builds, kind, changes to that definition): kind
    "published", "demo" or "random" (random-<name>, random-tiny-<name> at its family's test size, random-vit-tiny)."""
    if name in TEACHERS:
        return name, "published", {}
    if name in SMALL_TEACHERS:
        return "dinov2-vit-s", "demo" if name == DEMO_TEACHER else "random", SMALL_TEACHERS[name]
    for prefix in ("random-tiny-", "random-"):
        base = name[len(prefix):]
        if name.startswith(prefix) and base in TEACHERS:
            return base, "random", FAMILIES[TEACHERS[base].family].tiny if prefix == "random-tiny-" else {}
    known = ", ".join(list(TEACHERS) + list(SMALL_TEACHERS))
    raise ValueError(f"unknown teacher '{name}' in --enc-type; known: {known}; and random-<name> (random weights) "
                     "or random-tiny-<name> (random weights at test size) of each")


def teacher_family(name: str) -> str:
    return TEACHERS[parse_teacher_name(name)[0]].family


def build_vit(name: str, resolution: int, tiny: bool = False) -> nn.Module:
    """timm's definition of teacher `name` for `resolution`-px images, randomly initialised (build it under
    torch.device("meta") to skip that); `tiny`, for tests only: a published teacher's family at test size. A family
    that aligns to the tokens before the final norm gets nn.Identity for it."""
    base, _, changes = parse_teacher_name(name)
    spec = TEACHERS[base]
    family = FAMILIES[spec.family]
    check_resolution(name if name in SMALL_TEACHERS else base, resolution)
    kwargs = {**spec.kwargs, **(family.tiny if tiny else changes)}
    if family.layer_scale:
        kwargs["init_values"] = 1.0
    vit = timm.create_model(spec.arch, pretrained=False, num_classes=0,
                            img_size=input_side(family.recipe, resolution), **kwargs)
    if not family.final_norm:
        vit.norm = nn.Identity()
    return vit


def load_state(vit: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """Load a timm-layout state dict into `vit` (possibly built on the meta device) strictly, then compute the
    non-persistent buffers (RoPE periods) that a meta-device build left without values."""
    check_state_dict(vit.state_dict(), state_dict, what)
    vit.load_state_dict(state_dict, strict=True, assign=True)  # assign: replaces meta-device placeholders
    for module in vit.modules():
        for key, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                module.register_buffer(key, torch.empty_like(buffer, device="cpu"), persistent=False)
    reinit_non_persistent_buffers(vit)
    leftover = [name for name, t in list(vit.named_parameters()) + list(vit.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{what}: tensors without values after loading: {', '.join(leftover)}")


def load_published(vit: nn.Module, family: str, checkpoint: Any, path: str, what: str) -> None:
    """A published file's weights (read_checkpoint) into `vit`, strictly, as float32, renamed by the family's
    converter; the position embedding resampled to the model's token grid (unless equal) as REPA's load_encoders
    resamples it, with timm's resample_abs_pos_embed (bicubic, antialiased), at every resolution."""
    state = {k: v.float() for k, v in CONVERTERS[family](checkpoint, path).items()}
    if "pos_embed" in state and getattr(vit, "pos_embed", None) is not None:
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        try:
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(vit.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)
        except RuntimeError as e:
            raise ValueError(f"{what}: pos_embed {tuple(state['pos_embed'].shape)} is not {prefix} prefix "
                             f"token(s) and a square grid ({e})") from e
    load_state(vit, state, what)


def local_weights(name: str) -> Optional[str]:
    """Path of published teacher `name`'s weights found locally (the module doc's order), or None."""
    spec = TEACHERS[name]
    folders = [os.path.join(torch.hub.get_dir(), "checkpoints")] + ([CLIP_CACHE] if spec.family == "clip" else [])
    for folder in folders if spec.file != "model.safetensors" else []:
        if os.path.isfile(os.path.join(folder, spec.file)):
            return os.path.join(folder, spec.file)
    if spec.hf_repo is None:
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return hf_hub_download(spec.hf_repo, "model.safetensors", local_files_only=True)
    except LocalEntryNotFoundError:  # not cached: the caller raises the error that says what to get
        return None


def missing_weights_error(name: str) -> FileNotFoundError:
    spec = TEACHERS[name]
    places = ["pass it with --enc-weights PATH"]
    if spec.file != "model.safetensors":
        places.append(f"or place it at {os.path.join(torch.hub.get_dir(), 'checkpoints', spec.file)}")
    if spec.family == "clip":
        places.append(f"or at {os.path.join(CLIP_CACHE, spec.file)}")
    if spec.hf_repo:
        places.append(f"or put timm's {spec.hf_repo} in the Hugging Face cache")
    return FileNotFoundError(f"teacher '{name}' needs its pretrained weights and none were found locally (nothing is "
                             f"downloaded). Get {spec.file} ({spec.url}) and {', '.join(places)}.")


def teacher_weights_file(name: str, weights: Optional[str] = None) -> Optional[str]:
    """The file build_teacher(name, ..., weights) reads; None for random weights, which follow from the name and the
    seed (the demo teacher's with weights "random": where its training starts)."""
    kind = parse_teacher_name(name)[1]
    if kind == "random" and weights:
        raise ValueError(f"teacher {name} is random by definition; it takes no --enc-weights (got {weights})")
    if kind == "random" or (kind == "demo" and weights == "random"):
        return None
    if kind == "demo":
        path = weights or DEMO_TEACHER_WEIGHTS
        if not os.path.isfile(path):
            raise FileNotFoundError(f"demo teacher weights not found: {path} (they ship with the repository; "
                                    "rebuild them with `python -m preprocessing.train_demo_components`)")
        return path
    path = weights or local_weights(name)
    if path is None:
        raise missing_weights_error(name)
    return path


@functools.lru_cache(maxsize=1)
def _random_weights(name: str, resolution: int) -> Dict[str, torch.Tensor]:
    """Random teacher `name`'s weights from a fixed seed, without touching the caller's RNG, drawn once per process:
    timm's initialisation of a large ViT takes seconds, and GPU tests and benchmarks build the teacher once per run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        return build_vit(name, resolution).state_dict()


def build_teacher(name: str, resolution: int, weights: Optional[str] = None, tiny: bool = False) -> Teacher:
    """One teacher by name (TEACHERS, SMALL_TEACHERS, random-<name>, random-tiny-<name>), weights as in the module
    doc. `tiny` (tests only) builds a published teacher's family at test size, to load a test-size file in the
    published layout."""
    with torch.device("meta"):  # no random init of up to 6.7B parameters that the weights replace anyway
        vit = build_vit(name, resolution, tiny)
    family = teacher_family(name)
    path = teacher_weights_file(name, weights)
    if path is None:
        state = {k: v.clone() for k, v in _random_weights(name, resolution).items()}  # equal, never shared
        load_state(vit, state, f"random weights of {name}")
    else:
        load_published(vit, family, read_checkpoint(path), path, what=f"teacher weights {path} for {name}")
        logger.info("teacher %s loaded from %s", name, path)
    return Teacher(name, vit, resolution, family)


def build_demo_vit(resolution: int, weights: Optional[str] = None) -> Teacher:
    """The demo teacher: its trained file, another file, or "random" (where its training starts)."""
    return build_teacher(DEMO_TEACHER, resolution, weights)


def preprocessing_text(names: Sequence[str]) -> str:
    """What a teacher-token cache records as the preprocessing of teachers `names`: their Teacher.preprocessing,
    joined by " | "."""
    return " | ".join(FAMILIES[teacher_family(name)].recipe.text() for name in names)


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
    return [build_teacher(name, resolution, weights) for name, weights in zip(names, split_weights(enc_weights, names))]
