"""models/encoders.py: token shapes, REPA preprocessing, official DINOv2 weights against a plain reference ViT."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from models import encoders
from models.encoders import load_teachers, teacher_input_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _images(n, side, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _reference_preprocess(images, side):
    """REPA's train.py preprocessing, written out: /255, ImageNet mean/std per channel, bicubic resize."""
    x = images.double() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return F.interpolate(x.float(), size=(side, side), mode="bicubic", align_corners=False)


class OfficialDinoV2(nn.Module):
    """A plain ViT with facebookresearch/dinov2's parameter names (DinoVisionTransformer, block_chunks=0)."""

    def __init__(self, dim, depth, heads, swiglu_hidden=None, img_size=518, patch=14):
        super().__init__()
        self.heads, self.patch = heads, patch
        grid = img_size // patch
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.5)
        self.mask_token = nn.Parameter(torch.randn(1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            block.attn = nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            block.ls1, block.ls2 = nn.Module(), nn.Module()
            # Random LayerScales (the real ones are trained, not 1e-5) so every block matters in the comparison.
            block.ls1.gamma = nn.Parameter(torch.rand(dim) + 0.5)
            block.ls2.gamma = nn.Parameter(torch.rand(dim) + 0.5)
            block.mlp = nn.Module()
            if swiglu_hidden:
                block.mlp.w12, block.mlp.w3 = nn.Linear(dim, 2 * swiglu_hidden), nn.Linear(swiglu_hidden, dim)
            else:
                block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        with torch.no_grad():  # non-trivial norms too
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)

    def _mlp(self, mlp, x):
        if hasattr(mlp, "w12"):
            x1, x2 = mlp.w12(x).chunk(2, dim=-1)
            return mlp.w3(F.silu(x1) * x2)
        return mlp.fc2(F.gelu(mlp.fc1(x)))

    def _attn(self, attn, x):
        n, t, d = x.shape
        q, k, v = attn.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return attn.proj((weights @ v).transpose(1, 2).reshape(n, t, d))

    def patch_tokens(self, x, grid):
        """x (N, 3, 14g, 14g) -> final-normed patch tokens (N, g*g, D), pos_embed resampled as REPA does."""
        old = int(math.sqrt(self.pos_embed.shape[1] - 1))
        patch_pos = self.pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True)
        pos = torch.cat([self.pos_embed[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + pos
        for block in self.blocks:
            x = x + block.ls1.gamma * self._attn(block.attn, block.norm1(x))
            x = x + block.ls2.gamma * self._mlp(block.mlp, block.norm2(x))
        return self.norm(x)[:, 1:]


@pytest.fixture(scope="module")
def official_vits(tmp_path_factory):
    """A random DINOv2 ViT-S/14 in the official layout, saved as torch hub names the file."""
    torch.manual_seed(0)
    model = OfficialDinoV2(dim=384, depth=12, heads=6).eval()
    path = tmp_path_factory.mktemp("hub") / "checkpoints" / "dinov2_vits14_pretrain.pth"
    path.parent.mkdir()
    torch.save(model.state_dict(), path)
    return model, path


def test_teacher_input_size_generalises_repa():
    assert [teacher_input_size(r) for r in (256, 512, 64, 32)] == [224, 448, 56, 28]
    with pytest.raises(ValueError, match="resolution 100"):
        teacher_input_size(100)


def test_random_teacher_tokens_from_256px():
    (teacher,) = load_teachers("random-vit-tiny", 256)
    assert "random" in teacher.name
    tokens = teacher(_images(2, 256))
    assert tokens.shape == (2, 256, teacher.embed_dim) and teacher.num_tokens == 256
    assert not tokens.requires_grad and not any(p.requires_grad for p in teacher.parameters())


def test_random_teacher_is_deterministic_frozen_and_preprocesses_like_repa():
    first, second = load_teachers("random-vit-tiny,random-vit-tiny", 64)
    images = _images(3, 64, seed=1)
    tokens = first(images)
    assert tokens.shape == (3, 16, first.embed_dim)  # 4x4 tokens = SiT/2 on 8x8 latents
    # Exact: two teachers built alike, the same inputs and shapes, so the same kernels and bits on one CPU.
    torch.testing.assert_close(second(images), tokens, rtol=0, atol=0)
    first.train()
    assert not first.training and not first.vit.training
    with torch.no_grad():
        reference = first.vit.forward_features(_reference_preprocess(images, 56))[:, 1:]
    # The same ViT with the same batch shape (same kernels) on inputs that differ only by the float32 rounding of
    # the normalisation (<= 2 ulps, ~2e-7 on |x| <= 2.6): measured 1.4e-6 on tokens |t| <= 3.9. rtol=atol=1e-5 is
    # >= 7x that; a wrong mean/std, resize mode or /256 moves tokens by >= 1e-2.
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects images"):
        first(_images(1, 32))


def test_official_dinov2_weights_give_the_source_models_tokens(official_vits):
    model, path = official_vits
    (teacher,) = load_teachers("dinov2-vit-s", 64, enc_weights=str(path))
    assert teacher.embed_dim == 384
    images = _images(2, 64, seed=2)
    with torch.no_grad():
        reference = model.patch_tokens(_reference_preprocess(images, 56), grid=4)
    # Two float32 implementations (timm's fused attention and GELU here, plain ones in the reference) of a 12-block,
    # 384-wide ViT: against a float64 forward each is off by up to 2.3e-5 on tokens |t| <= 5.4 (~35 eps32 |t|:
    # sums of up to 1536 products per layer), and they differ from each other by 3.3e-6 here. rtol=atol=1e-4 is
    # >= 4x the full float32 error; a misplaced weight or a wrong LayerScale/pos-embed moves tokens by O(0.1).
    torch.testing.assert_close(teacher(images), reference, rtol=1e-4, atol=1e-4)


def test_weights_found_in_torch_hub_cache(official_vits, monkeypatch):
    model, path = official_vits
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(path.parent.parent))
    (teacher,) = load_teachers("dinov2-vit-s", 64)
    images = _images(1, 64, seed=3)
    with torch.no_grad():
        reference = model.patch_tokens(_reference_preprocess(images, 56), grid=4)
    torch.testing.assert_close(teacher(images), reference, rtol=1e-4, atol=1e-4)  # as in the test above


def test_swiglu_official_keys_map_to_timm_giant_layout():
    """ViT-g's `mlp.w12`/`mlp.w3` on a 2-block, 48-wide giant-style model (timm's SwiGLUPacked MLP)."""
    import timm
    torch.manual_seed(1)
    model = OfficialDinoV2(dim=48, depth=2, heads=2, swiglu_hidden=128).eval()
    vit = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, img_size=56,
                            embed_dim=48, depth=2, num_heads=2).eval()
    encoders.load_published(vit, "dinov2", model.state_dict(), "giant.pth", what="test giant")
    x = _reference_preprocess(_images(2, 64, seed=4), 56)
    with torch.no_grad():
        # As above for a 2-block, 48-wide model: each float32 forward within 3.3e-6 of a float64 one (|t| <= 3.7).
        torch.testing.assert_close(vit.forward_features(x)[:, 1:], model.patch_tokens(x, grid=4),
                                   rtol=1e-4, atol=1e-4)


def test_timm_safetensors_layout_loads(tmp_path):
    import timm
    with torch.device("meta"):
        source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # 518 px, 37x37
    generator = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (teacher,) = load_teachers("dinov2-vit-s", 64, enc_weights=str(tmp_path / "model.safetensors"))
    loaded = teacher.vit.state_dict()
    for key, value in state.items():
        if key != "pos_embed":
            assert torch.equal(loaded[key], value), key  # copied weights: exact
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True).flatten(2).transpose(1, 2)
    # float32 defaults (rtol 1.3e-6, atol 1e-5): the same bicubic resampling call on the same float32 input
    torch.testing.assert_close(loaded["pos_embed"], torch.cat([state["pos_embed"][:, :1], resampled], dim=1))


def test_missing_weights_error_names_file_and_flag(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match=r"dinov2_vitb14_pretrain\.pth.*--enc-weights"):
        load_teachers("dinov2-vit-b", 256)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_teachers("dinov2-vit-b", 256, enc_weights=str(tmp_path / "nope.pth"))


def test_bad_teacher_arguments():
    with pytest.raises(ValueError, match="unknown teacher 'dinov9-vit-b'"):
        load_teachers("dinov9-vit-b", 256)
    with pytest.raises(ValueError, match="2 teacher"):
        load_teachers("random-vit-tiny,random-vit-tiny", 64, enc_weights="a.pth")
    with pytest.raises(ValueError, match="takes no --enc-weights"):
        load_teachers("random-vit-tiny", 64, enc_weights="a.pth")


def test_mismatched_weights_are_refused(official_vits, tmp_path):
    model, _ = official_vits
    state = model.state_dict()
    del state["blocks.11.norm2.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"broken\.pth[\s\S]*missing keys.*blocks\.11\.norm2\.weight"):
        load_teachers("dinov2-vit-s", 64, enc_weights=str(tmp_path / "broken.pth"))


def test_random_dinov2_is_the_real_architecture_with_random_weights():
    """random-dinov2-vit-b: timm's DINOv2-B/14 exactly as dinov2-vit-b builds it (same tensors and shapes), random
    weights, a name starting with "random" (the trainer warns about those), never any weights file."""
    import timm
    (teacher,) = load_teachers("random-dinov2-vit-b", 256)
    assert teacher.name == "random-dinov2-vit-b" and teacher.embed_dim == 768 and teacher.num_tokens == 256
    with torch.device("meta"):
        real = timm.create_model(encoders.DINOV2_MODELS["b"][0], pretrained=False, num_classes=0, img_size=224)
    shapes = lambda module: {k: v.shape for k, v in module.state_dict().items()}  # noqa: E731
    assert shapes(teacher.vit) == shapes(real)
    tokens = teacher(_images(1, 256))
    assert tokens.shape == (1, 256, 768) and torch.isfinite(tokens).all()
    with pytest.raises(ValueError, match="takes no --enc-weights"):
        load_teachers("random-dinov2-vit-b", 256, enc_weights="a.pth")


def test_random_dinov2_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    encoders._random_weights.cache_clear()
    (first,) = load_teachers("random-dinov2-vit-s", 64)
    encoders._random_weights.cache_clear()  # a second draw, as another process makes it
    second, third = load_teachers("random-dinov2-vit-s,random-dinov2-vit-s", 64)  # third: from the cache
    assert torch.equal(torch.random.get_rng_state(), state)
    images = _images(2, 64, seed=3)
    # Same weights, same inputs and shapes on one CPU: the same kernels and bits.
    torch.testing.assert_close(first(images), second(images), rtol=0, atol=0)
    torch.testing.assert_close(third(images), second(images), rtol=0, atol=0)
    assert not any(p.is_meta for p in third.parameters())
    assert third.vit.cls_token.data_ptr() != second.vit.cls_token.data_ptr()  # equal weights, never shared


def test_normalisation_constants_are_made_once_per_device():
    # A per-call torch.tensor(..., device=cuda) would be a synchronizing host-to-device copy at every training step.
    mean, std = encoders._mean_std(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))
    assert encoders._mean_std(IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"))[0] is mean
    torch.testing.assert_close(mean.flatten(), torch.tensor(IMAGENET_MEAN), rtol=0, atol=0)
    torch.testing.assert_close(std.flatten(), torch.tensor(IMAGENET_STD), rtol=0, atol=0)
