"""Every teacher family against its authors: a test-size random copy in the published file's key layout and
container, written here from the authors' code (MoCo v3's timm-0.4.9 ViT inside MoCo's training checkpoint, OpenAI
CLIP's model.py as a TorchScript archive, DINO's and I-JEPA's vision_transformer.py, MAE's encoder, DINOv3's
DinoVisionTransformer, timm's SigLIP 2 file), loaded strictly and compared with a forward written from the same code
after REPA's train.py `preprocess_raw_image`, written out here too; the real architectures' token grids and widths;
one Phase-1 and one Phase-2 step per family through the entry points. (DINOv2: tests/test_encoders.py.)"""
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import train
import train_warmup
from models import encoders
from models.encoders import FAMILIES, TEACHERS, Teacher, build_teacher, build_vit, load_teachers
from tests.conftest import tiny_args

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # REPA's train.py constants


def _images(n, side, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalize(x, mean_std):
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std  # torchvision's Normalize


def repa_preprocess_raw_image(x, enc_type):
    """REPA's train.py preprocess_raw_image (x: the uint8 batch), branch by branch."""
    resolution = x.shape[-1]
    if "clip" in enc_type:
        x = x / 255.
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
        x = _normalize(x, CLIP)
    elif "mocov3" in enc_type or "mae" in enc_type:
        x = _normalize(x / 255., IMAGENET)
    elif "dinov2" in enc_type:
        x = _normalize(x / 255., IMAGENET)
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    elif "dinov1" in enc_type:
        x = _normalize(x / 255., IMAGENET)
    elif "jepa" in enc_type:
        x = _normalize(x / 255., IMAGENET)
        x = F.interpolate(x, 224 * (resolution // 256), mode="bicubic")
    return x


def authors_preprocess(x, enc_type):
    """REPA's where it has the teacher; DINOv3's make_transform (ToDtype(scale=True), ImageNet Normalize; its resize
    to the image's own side is the identity) and SigLIP 2's value_range(-1, 1) otherwise."""
    if "dinov3" in enc_type:
        return _normalize(x / 255., IMAGENET)
    if "siglip2" in enc_type:
        return x / 255. * 2 - 1
    return repa_preprocess_raw_image(x, enc_type)


#################################################################################
#            Published layouts at test size, and forwards from their code        #
#################################################################################

def _random_state(shapes, seed):
    """Random tensors for {key: shape}: weights ~ N(0, 1/fan_in) so activations stay O(1), norm scales and
    LayerScales around 1, biases and embeddings O(0.1-0.5): every block moves the tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln_1.weight", "ln_2.weight",
                         "ln_pre.weight", "ln_post.weight", "ln_final.weight", ".gamma")):
            out[key] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and not key.endswith(("pos_embed", "positional_embedding", "_token", "storage_tokens")):
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            out[key] = 0.3 * torch.randn(shape, generator=g)
    return out


def timm049_vit_shapes(dim, depth, grid, patch, cls=True, mlp=4):
    """The keys of timm 0.4.9's VisionTransformer (MoCo v3's vits.py builds on it; DINO's, MAE's and I-JEPA's own
    ViTs name their modules the same way), without a classifier."""
    shapes = {"patch_embed.proj.weight": (dim, 3, patch, patch), "patch_embed.proj.bias": (dim,),
              "pos_embed": (1, grid * grid + (1 if cls else 0), dim)}
    if cls:
        shapes["cls_token"] = (1, 1, dim)
    for i in range(depth):
        shapes.update({f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
                       f"blocks.{i}.attn.qkv.weight": (3 * dim, dim), f"blocks.{i}.attn.qkv.bias": (3 * dim,),
                       f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
                       f"blocks.{i}.norm2.weight": (dim,), f"blocks.{i}.norm2.bias": (dim,),
                       f"blocks.{i}.mlp.fc1.weight": (mlp * dim, dim), f"blocks.{i}.mlp.fc1.bias": (mlp * dim,),
                       f"blocks.{i}.mlp.fc2.weight": (dim, mlp * dim), f"blocks.{i}.mlp.fc2.bias": (dim,)})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def _attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, rope=None, prefix=0):
    n, t, d = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = (torch.cat([y[:, :, :prefix], rope(y[:, :, prefix:])], dim=2) for y in (q, k))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(n, t, d), proj_weight, proj_bias)


def vit_tokens(sd, x, heads, patch, cls=True, final_norm=True, eps=1e-6):
    """The forward of those ViTs: patches + class token + position embedding (the published one resampled to the
    token grid with timm's resample_abs_pos_embed, as REPA's load_encoders does), pre-norm blocks with GELU, the
    final norm (REPA's MAE forward stops before it), patch tokens."""
    dim = sd["patch_embed.proj.weight"].shape[0]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    grid = tokens.shape[-1]
    tokens = tokens.flatten(2).transpose(1, 2)
    if cls:
        tokens = torch.cat([sd["cls_token"].expand(len(x), -1, -1), tokens], dim=1)
    tokens = tokens + resample_abs_pos_embed(sd["pos_embed"], [grid, grid], num_prefix_tokens=1 if cls else 0)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(tokens, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        tokens = tokens + _attention(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"],
                                     sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"], heads)
        h = F.layer_norm(tokens, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
        tokens = tokens + h
    if final_norm:
        tokens = F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], eps)
    return tokens[:, 1 if cls else 0:]


MOCO_SLIPS = {"blocks.13.norm1.": "blocks.13.norm13.", "blocks.13.mlp.fc1.": "blocks.13.mlp.fc13.",
              "blocks.14.norm2.": "blocks.14.norm14.", "blocks.14.mlp.fc2.": "blocks.14.mlp.fc14."}


def mocov3_file(tmp_path, dim, depth, heads):
    """MoCo v3's main_moco.py checkpoint of its DDP-wrapped MoCo_ViT: base and momentum encoders (the classifier
    replaced by builder.py's 3-layer projection MLP), the 2-layer predictor, as RCG's ViT-L with its misnamed
    blocks 13 and 14."""
    vit = _random_state(timm049_vit_shapes(dim, depth, grid=14, patch=16), seed=1)
    mlp, out = 64, 16
    head = {"head.0.weight": (mlp, dim), "head.1.weight": (mlp,), "head.1.bias": (mlp,), "head.3.weight": (mlp, mlp),
            "head.4.weight": (mlp,), "head.4.bias": (mlp,), "head.6.weight": (out, mlp)}
    head = _random_state(head, seed=2)
    for bn in ("head.1", "head.4", "head.7"):
        width = out if bn == "head.7" else mlp
        head.update({f"{bn}.running_mean": torch.zeros(width), f"{bn}.running_var": torch.ones(width),
                     f"{bn}.num_batches_tracked": torch.tensor(5)})
    predictor = _random_state({"0.weight": (mlp, out), "1.weight": (mlp,), "1.bias": (mlp,), "3.weight": (out, mlp)},
                              seed=3)
    state = {}
    for encoder in ("base_encoder", "momentum_encoder"):
        for key, value in {**vit, **head}.items():
            for right, slip in MOCO_SLIPS.items():
                key = key.replace(right, slip)
            state[f"module.{encoder}.{key}"] = value
    state.update({f"module.predictor.{k}": v for k, v in predictor.items()})
    checkpoint = {"epoch": 300, "arch": "vit_large", "state_dict": state,
                  "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]},
                  "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                             "_growth_tracker": 0}}
    path = tmp_path / "vitl.pth.tar"
    torch.save(checkpoint, path)
    return path, lambda x: vit_tokens(vit, x, heads, 16)


def openai_clip_state(width, layers, grid, patch, embed=16, text_width=16, context=8, vocab=50):
    """OpenAI CLIP's CLIP.state_dict(), from its model.py: the VisionTransformer under `visual.` (conv1 without bias,
    class and positional embeddings, ln_pre, resblocks of nn.MultiheadAttention + c_fc/c_proj MLP, ln_post, proj),
    one text block, the text embeddings and projection, and the three size entries of the JIT archive."""
    shapes = {"visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
              "visual.conv1.weight": (width, 3, patch, patch), "visual.ln_pre.weight": (width,),
              "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,),
              "visual.proj": (width, embed), "positional_embedding": (context, text_width),
              "text_projection": (text_width, embed), "token_embedding.weight": (vocab, text_width),
              "ln_final.weight": (text_width,), "ln_final.bias": (text_width,)}
    for prefix, w, n in (("visual.transformer", width, layers), ("transformer", text_width, 1)):
        for i in range(n):
            p = f"{prefix}.resblocks.{i}."
            shapes.update({p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                           p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,), p + "ln_1.weight": (w,),
                           p + "ln_1.bias": (w,), p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                           p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,), p + "ln_2.weight": (w,),
                           p + "ln_2.bias": (w,)})
    state = _random_state(shapes, seed=4)
    state.update({"logit_scale": torch.tensor(4.6052), "input_resolution": torch.tensor(grid * patch),
                  "context_length": torch.tensor(context), "vocab_size": torch.tensor(vocab)})
    return state


def clip_tokens(sd, x, heads):
    """REPA's models/clip_vit.py UpdatedVisionTransformer over CLIP's visual tower: the last resblock's patch tokens,
    before ln_post and proj; CLIP's LayerNorm (eps 1e-5), QuickGELU, nn.MultiheadAttention."""
    v = {k[len("visual."):]: t for k, t in sd.items() if k.startswith("visual.")}
    width = v["conv1.weight"].shape[0]
    tokens = F.conv2d(x, v["conv1.weight"], stride=v["conv1.weight"].shape[-1]).flatten(2).permute(0, 2, 1)
    tokens = torch.cat([v["class_embedding"] + torch.zeros(len(x), 1, width), tokens], dim=1)
    tokens = F.layer_norm(tokens + v["positional_embedding"], (width,), v["ln_pre.weight"], v["ln_pre.bias"], 1e-5)
    tokens = tokens.permute(1, 0, 2)  # NLD -> LND
    for i in range(len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(tokens, (width,), v[p + "ln_1.weight"], v[p + "ln_1.bias"], 1e-5)
        tokens = tokens + F.multi_head_attention_forward(
            h, h, h, width, heads, v[p + "attn.in_proj_weight"], v[p + "attn.in_proj_bias"], None, None, False, 0.0,
            v[p + "attn.out_proj.weight"], v[p + "attn.out_proj.bias"], training=False, need_weights=False)[0]
        h = F.layer_norm(tokens, (width,), v[p + "ln_2.weight"], v[p + "ln_2.bias"], 1e-5)
        h = F.linear(h, v[p + "mlp.c_fc.weight"], v[p + "mlp.c_fc.bias"])
        tokens = tokens + F.linear(h * torch.sigmoid(1.702 * h), v[p + "mlp.c_proj.weight"], v[p + "mlp.c_proj.bias"])
    return tokens.permute(1, 0, 2)[:, 1:]


class _Holder(nn.Module):
    def forward(self, x):
        return x * self.logit_scale


def save_torchscript(state, path):
    """A TorchScript archive holding `state` under its names, as OpenAI publishes CLIP (torch.jit.save)."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(root, torch.ones(2)), str(path))


def clip_file(tmp_path, dim, depth, heads):
    state = openai_clip_state(dim, depth, grid=16, patch=14)
    path = tmp_path / "ViT-L-14.pt"
    save_torchscript(state, path)
    return path, lambda x: clip_tokens(state, x, heads)


def dinov1_file(tmp_path, dim, depth, heads):
    """DINO's dino_vitbase16_pretrain.pth: the backbone's state dict (vision_transformer.py, 224 px, no head)."""
    state = _random_state(timm049_vit_shapes(dim, depth, grid=14, patch=16), seed=5)
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(state, path)
    return path, lambda x: vit_tokens(state, x, heads, 16)


def mae_file(tmp_path, dim, depth, heads):
    """MAE's mae_pretrain_vit_large.pth: {'model': the encoder's state dict} (224 px, fixed sin-cos pos_embed)."""
    state = _random_state(timm049_vit_shapes(dim, depth, grid=14, patch=16), seed=6)
    path = tmp_path / "mae_pretrain_vit_large.pth"
    torch.save({"model": state}, path)
    return path, lambda x: vit_tokens(state, x, heads, 16, final_norm=False)


def jepa_file(tmp_path, dim, depth, heads):
    """I-JEPA's src/train.py save_checkpoint: encoder, predictor and target encoder of the DDP-wrapped models
    (`module.`), optimizer and run entries. The encoder: vision_transformer.py, no class token, 224 px, patch 14."""
    state = _random_state(timm049_vit_shapes(dim, depth, grid=16, patch=14, cls=False), seed=7)
    target = {f"module.{k}": v + 1 for k, v in state.items()}
    predictor = {f"module.{k}": v for k, v in _random_state({"predictor_embed.weight": (8, dim),
                                                             "mask_token": (1, 1, 8)}, seed=8).items()}
    checkpoint = {"encoder": {f"module.{k}": v for k, v in state.items()}, "predictor": predictor,
                  "target_encoder": target, "opt": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                  "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 2048, "world_size": 16, "lr": 1e-3}
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save(checkpoint, path)
    return path, lambda x: vit_tokens(state, x, heads, 14, cls=False)


def dinov3_shapes(dim, depth, heads, ffn, qkv_bias=True, local_cls_norm=False):
    """DINOv3's DinoVisionTransformer state dict (models/vision_transformer.py, layers/*.py): class, storage and mask
    tokens, the RoPE periods buffer, blocks with LinearKMaskedBias qkv (bias and bias_mask), LayerScale gammas and an
    Mlp or SwiGLUFFN (w1, w2, w3); 7B adds the local-crop class norm."""
    shapes = {"cls_token": (1, 1, dim), "storage_tokens": (1, 4, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if local_cls_norm:
        shapes.update({"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)})
    kind, ratio, align = ffn
    hidden = int(dim * ratio)
    if kind == "swiglu":
        hidden = int(hidden * 2 / 3)
        hidden += -hidden % align
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "attn.qkv.weight": (3 * dim, dim),
                       p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,), p + "ls1.gamma": (dim,),
                       p + "norm2.weight": (dim,), p + "norm2.bias": (dim,), p + "ls2.gamma": (dim,)})
        if qkv_bias:
            shapes[p + "attn.qkv.bias"] = (3 * dim,)
        if kind == "mlp":
            shapes.update({p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,),
                           p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,)})
        else:
            shapes.update({p + "mlp.w1.weight": (hidden, dim), p + "mlp.w1.bias": (hidden,),
                           p + "mlp.w2.weight": (hidden, dim), p + "mlp.w2.bias": (hidden,),
                           p + "mlp.w3.weight": (dim, hidden), p + "mlp.w3.bias": (dim,)})
    return shapes


def dinov3_periods(dim, heads, base=100.0):
    """RopePositionEmbedding._init_weights with `base`: base^(2i / (D_head / 2)), i < D_head / 4."""
    head = dim // heads
    return base ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))


def dinov3_tokens(sd, x, heads, eps=1e-5):
    """DinoVisionTransformer.forward_features' x_norm_patchtokens: patches after [cls (+ 0 * mask token), 4 storage
    tokens]; each block x + ls1 * attn(norm1(x), rope) and x + ls2 * ffn(norm2(x)); RoPE (coords in [-1, 1] per
    axis, normalize_coords "separate", angles 2 pi coords / periods, tiled) on the patch tokens of q and k only; the
    qkv bias times its mask (k's third zeroed); LayerNorm eps 1e-5 ("layernormbf16")."""
    dim = sd["cls_token"].shape[-1]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    h_grid, w_grid = tokens.shape[-2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([(sd["cls_token"] + 0 * sd["mask_token"]).expand(len(x), -1, -1),
                        sd["storage_tokens"].expand(len(x), -1, -1), tokens], dim=1)
    coords = torch.stack(torch.meshgrid(torch.arange(0.5, h_grid) / h_grid, torch.arange(0.5, w_grid) / w_grid,
                                        indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
    angles = (2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"][None, None, :]).flatten(1, 2).tile(2)
    sin, cos = torch.sin(angles), torch.cos(angles)

    def rope(y):
        first, second = y.chunk(2, dim=-1)
        return y * cos + torch.cat([-second, first], dim=-1) * sin

    prefix = tokens.shape[1] - h_grid * w_grid
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        h = F.layer_norm(tokens, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        bias = sd[p + "attn.qkv.bias"] * sd[p + "attn.qkv.bias_mask"] if p + "attn.qkv.bias" in sd else None
        tokens = tokens + sd[p + "ls1.gamma"] * _attention(h, sd[p + "attn.qkv.weight"], bias,
                                                           sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"],
                                                           heads, rope, prefix)
        h = F.layer_norm(tokens, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        if p + "mlp.w1.weight" in sd:
            h = F.linear(F.silu(F.linear(h, sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"]))
                         * F.linear(h, sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"]),
                         sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        tokens = tokens + sd[p + "ls2.gamma"] * h
    return F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], eps)[:, prefix:]


def _dinov3_file(tmp_path, dim, depth, heads, ffn, qkv_bias=True, local_cls_norm=False):
    state = _random_state(dinov3_shapes(dim, depth, heads, ffn, qkv_bias, local_cls_norm), seed=9)
    state["rope_embed.periods"] = dinov3_periods(dim, heads)
    if qkv_bias:
        for i in range(depth):
            state[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    path = tmp_path / "dinov3_pretrain.pth"
    torch.save(state, path)
    return path, lambda x: dinov3_tokens(state, x, heads)


def siglip2_file(tmp_path, dim, depth, heads):
    """timm's SigLIP 2 file: the state dict of timm's vit_base_patch16_siglip_256 as published (with its attention-
    pooling head), written with safetensors."""
    import timm
    with torch.device("meta"):
        published = timm.create_model("vit_base_patch16_siglip_256", pretrained=False, num_classes=0,
                                      embed_dim=dim, depth=depth, num_heads=heads)
    state = _random_state({k: tuple(v.shape) for k, v in published.state_dict().items()}, seed=10)
    assert any(k.startswith("attn_pool.") for k in state) and "cls_token" not in state
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path, lambda x: vit_tokens(state, x, heads, 16, cls=False)


# name -> (file writer, (published key of block 1's fc2 weight, of block 0's norm1 bias), container path)
CASES = {
    "mocov3-vit-l": (mocov3_file, ("blocks.1.mlp.fc2.weight", "blocks.0.norm1.bias"), ("state_dict",),
                     "module.base_encoder."),
    "clip-vit-L": (clip_file, ("transformer.resblocks.1.mlp.c_proj.weight", "transformer.resblocks.0.ln_1.bias"), (),
                   "visual."),
    "dinov1-vit-b": (dinov1_file, ("blocks.1.mlp.fc2.weight", "blocks.0.norm1.bias"), (), ""),
    "mae-vit-l": (mae_file, ("blocks.1.mlp.fc2.weight", "blocks.0.norm1.bias"), ("model",), ""),
    "jepa-vit-h": (jepa_file, ("blocks.1.mlp.fc2.weight", "blocks.0.norm1.bias"), ("encoder",), "module."),
    "dinov3-vit-b": (lambda p, d, n, h: _dinov3_file(p, d, n, h, ("mlp", 4, 0)),
                     ("blocks.1.mlp.fc2.weight", "blocks.0.norm1.bias"), (), ""),
    "dinov3-vit-h+": (lambda p, d, n, h: _dinov3_file(p, d, n, h, ("swiglu", 6, 8)),
                      ("blocks.1.mlp.w3.weight", "blocks.0.norm1.bias"), (), ""),
    "dinov3-vit-7b": (lambda p, d, n, h: _dinov3_file(p, d, n, h, ("swiglu", 3, 64), qkv_bias=False,
                                                      local_cls_norm=True),
                      ("blocks.1.mlp.w3.weight", "blocks.0.norm1.bias"), (), ""),
    "siglip2-vit-b": (siglip2_file, ("blocks.1.mlp.fc2.weight", "blocks.0.norm1.bias"), (), ""),
}


def _published(name, tmp_path):
    tiny = FAMILIES[TEACHERS[name].family].tiny
    return CASES[name][0](tmp_path, tiny["embed_dim"], tiny["depth"], tiny["num_heads"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_published_file_at_test_size_gives_its_authors_tokens(name, tmp_path):
    """At 256 px, REPA's resolution: the grid of the published pos_embed (MoCo v3, DINO, MAE: 14x14 at 224 px) is
    resampled to 16x16, the native ones (CLIP, I-JEPA: 224 px at patch 14; SigLIP 2) are not."""
    path, reference = _published(name, tmp_path)
    teacher = build_teacher(name, 256, weights=str(path), tiny=True)
    images = _images(2, 256, seed=1)
    with torch.no_grad():
        expected = reference(authors_preprocess(images, name))
    tokens = teacher(images)
    assert tokens.shape == (2, 256, FAMILIES[TEACHERS[name].family].tiny["embed_dim"]) == expected.shape
    # Two float32 implementations (timm's fused attention against the plain softmax here) of 2-15 blocks at most 56
    # wide on tokens |t| <= ~10: they differ by a few 1e-6 (sums of <= 224 products per layer); 1e-4 leaves room,
    # while a misplaced weight, a wrong normalisation, a skipped resize or a kept class token moves tokens by O(0.1)
    # or changes the shape.
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mocov3-vit-l", "dinov1-vit-b", "mae-vit-l"])
def test_the_published_pos_embed_is_resampled_to_the_token_grid_as_repa_resamples_it(name, tmp_path):
    path, _ = _published(name, tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    for key in CASES[name][2]:
        checkpoint = checkpoint[key]
    published = checkpoint[CASES[name][3] + "pos_embed"]
    for resolution, grid in ((256, 16), (512, 32)):
        teacher = build_teacher(name, resolution, weights=str(path), tiny=True)
        # The same function on the same float32 tensor: exact.
        assert torch.equal(teacher.vit.pos_embed, resample_abs_pos_embed(published, [grid, grid]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_renamed_or_missing_key_of_a_published_file_is_refused_naming_it(name, tmp_path):
    path, _ = _published(name, tmp_path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        checkpoint = load_file(str(path))
    elif name.startswith("clip"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            checkpoint = dict(torch.jit.load(str(path)).state_dict())
    else:
        checkpoint = torch.load(path, weights_only=True)
    inner = checkpoint
    for key in CASES[name][2]:
        inner = inner[key]
    prefix = CASES[name][3]
    renamed, deleted = (prefix + key for key in CASES[name][1])
    inner[renamed.replace(".weight", ".kernel")] = inner.pop(renamed)
    del inner[deleted]
    broken = tmp_path / ("broken" + "".join(path.suffixes))
    save_file(checkpoint, str(broken)) if path.suffix == ".safetensors" else torch.save(checkpoint, broken)
    # Named in the model's keys: block 1's second MLP layer (DINOv3's SwiGLU w3 included) and block 0's first norm.
    with pytest.raises(ValueError, match=r"broken[\s\S]*missing keys \(2\): blocks\.0\.norm1\.bias, "
                                         r"blocks\.1\.mlp\.fc2\.weight[\s\S]*unexpected keys \(1\): "
                                         r"blocks\.1\.mlp\.fc2\.kernel"):
        build_teacher(name, 256, weights=str(broken), tiny=True)


#################################################################################
#                   Preprocessing, tokens and the real architectures             #
#################################################################################

ONE_PER_FAMILY = ["mocov3-vit-b", "clip-vit-L", "dinov1-vit-b", "mae-vit-l", "jepa-vit-h", "dinov2-vit-b",
                  "dinov3-vit-b", "siglip2-vit-b"]


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
@pytest.mark.parametrize("resolution", [256, 512])
def test_preprocessing_is_repas_formula_or_the_authors(name, resolution):
    teacher = build_teacher(f"random-tiny-{name}", resolution)
    images = _images(2, resolution, seed=2)
    expected = authors_preprocess(images, name)
    # The same operations in float32 (torch's bicubic interpolate, the normalisation by 3 constants): equal within
    # 2 ulps of |x| <= 2.7; a wrong constant moves values by >= 1e-2, a skipped or extra resize changes the shape.
    torch.testing.assert_close(teacher.preprocess(images), expected, rtol=0, atol=1e-6)
    assert teacher.input_size == expected.shape[-1] and teacher.num_tokens == (resolution // 16) ** 2


# Written from the papers and the authors' model definitions: (width, blocks, heads, patch, input side at 256 px).
REAL = {
    "mocov3-vit-s": (384, 12, 12, 16, 256), "mocov3-vit-b": (768, 12, 12, 16, 256),
    "mocov3-vit-l": (1024, 24, 16, 16, 256), "clip-vit-L": (1024, 24, 16, 14, 224),
    "dinov1-vit-b": (768, 12, 12, 16, 256), "mae-vit-l": (1024, 24, 16, 16, 256),
    "jepa-vit-h": (1280, 32, 16, 14, 224), "dinov2-vit-s": (384, 12, 6, 14, 224),
    "dinov2-vit-b": (768, 12, 12, 14, 224), "dinov2-vit-l": (1024, 24, 16, 14, 224),
    "dinov2-vit-g": (1536, 40, 24, 14, 224), "dinov3-vit-s": (384, 12, 6, 16, 256),
    "dinov3-vit-s+": (384, 12, 6, 16, 256), "dinov3-vit-b": (768, 12, 12, 16, 256),
    "dinov3-vit-l": (1024, 24, 16, 16, 256), "dinov3-vit-h+": (1280, 32, 20, 16, 256),
    "dinov3-vit-7b": (4096, 40, 32, 16, 256), "siglip2-vit-b": (768, 12, 12, 16, 256),
}


def test_every_teacher_is_listed_with_its_real_architecture():
    assert set(REAL) == set(TEACHERS)


@pytest.mark.parametrize("name", sorted(REAL))
def test_the_real_architecture_gives_sit2s_grid_of_its_width_at_256px(name):
    """Built on the meta device (no weights, no FLOPs): 256 tokens of the published width from 256-px images."""
    width, depth, heads, patch, side = REAL[name]
    with torch.device("meta"):
        teacher = Teacher(name, build_vit(name, 256), 256, TEACHERS[name].family)
        tokens = teacher(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))
    assert tokens.shape == (1, 256, width) and teacher.embed_dim == width and teacher.input_size == side
    assert len(teacher.vit.blocks) == depth and teacher.vit.blocks[0].attn.num_heads == heads
    assert teacher.vit.patch_embed.patch_size == (patch, patch)


def test_resolutions_off_the_16px_grid_are_refused_naming_the_teacher():
    with pytest.raises(ValueError, match=r"teacher clip-vit-L does not take 200-px images.*multiples of 16"):
        load_teachers("random-tiny-clip-vit-L", 200)
    with pytest.raises(ValueError, match=r"teacher mocov3-vit-b does not take 250-px images"):
        build_teacher("mocov3-vit-b", 250, weights="unused.pth")


def test_every_published_teacher_without_weights_names_its_file_url_and_flag(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(encoders, "CLIP_CACHE", str(tmp_path / "clip"))
    for name, spec in TEACHERS.items():
        with pytest.raises(FileNotFoundError, match=rf"'{re.escape(name)}'.*{re.escape(spec.file)} "
                                                    rf"\({re.escape(spec.url)}\).*--enc-weights"):
            load_teachers(name, 256)


def test_a_published_file_in_the_torch_hub_folder_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    tiny = FAMILIES["mae"].tiny
    path, _ = mae_file(tmp_path / "hub" / "checkpoints", tiny["embed_dim"], tiny["depth"], tiny["num_heads"])
    assert encoders.teacher_weights_file("mae-vit-l") == str(path)


def test_random_names_build_the_family_and_take_no_weights():
    (tiny,) = load_teachers("random-tiny-jepa-vit-h", 64)
    assert tiny.name == "random-tiny-jepa-vit-h" and tiny.embed_dim == FAMILIES["jepa"].tiny["embed_dim"]
    assert tiny(_images(1, 64)).shape == (1, 16, tiny.embed_dim)
    with pytest.raises(ValueError, match="takes no --enc-weights"):
        load_teachers("random-tiny-clip-vit-L", 64, enc_weights="a.pth")
    assert encoders.teacher_weights_file("random-tiny-clip-vit-L") is None


#################################################################################
#                       Both phases, one teacher per family                      #
#################################################################################

@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_each_family_trains_one_phase1_and_one_phase2_step(name, demo_data, tmp_path):
    teacher = f"random-tiny-{name}"
    width = FAMILIES[TEACHERS[name].family].tiny["embed_dim"]
    common = ["--enc-type", teacher, "--max-train-steps", "1", "--batch-size", "8"]
    phase1 = train_warmup.main(tiny_args(demo_data, tmp_path, *common))
    checkpoint = tmp_path / "tiny-warmup" / "checkpoints" / "last.pt"
    assert torch.load(checkpoint, weights_only=True)["model_args"]["z_dims"] == [width]
    assert math.isfinite(phase1["history"][-1]["align_loss"])
    phase2 = train.main(tiny_args(demo_data, tmp_path, *common, "--warmup-ckpt", str(checkpoint), "--vae",
                                  "random-tiny", "--sample-grid-every", "1000"))
    record = phase2["history"][-1]
    assert math.isfinite(record["align_loss"]) and math.isfinite(record["velocity_loss"])
    assert phase2["model"].projectors[0][-1].out_features == width
    with open(tmp_path / "tiny" / "log.txt") as f:
        assert f"WARNING: teacher {teacher} has RANDOM weights" in f.read()
