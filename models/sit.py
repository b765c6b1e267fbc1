"""SiT backbone with REPA-style projector heads.

State-dict keys and shapes are identical to REPA's models/sit.py (pos_embed, x_embedder.proj,
t_embedder.mlp.{0,2}, y_embedder.embedding_table, blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
adaLN_modulation.1}, projectors.{j}.{0,2,4}, final_layer.{linear, adaLN_modulation.1}), so REPA
checkpoints load with strict=True. Optional qk-norm adds blocks.{i}.attn.{q,k}_norm as timm does;
RoPE tables are non-persistent buffers and never appear in a state dict.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN modulation. x: (N, T, D); shift, scale: (N, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA's 3-layer SiLU MLP, applied token-wise: (..., hidden_size) -> (..., z_dim)."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


#################################################################################
#               Embedding Layers for Patches, Timesteps and Class Labels       #
#################################################################################

class PatchEmbed(nn.Module):
    """(N, C, H, W) latents -> (N, T, D) tokens, T = (H / p) * (W / p), row-major patch order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> (N, D) through sinusoidal features and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000.0):
        """(N,) -> (N, dim) [cos | sin] features, as in DiT/SiT."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> (N, D). Row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, cfg_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.cfg_prob = cfg_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class: at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.cfg_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.cfg_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                Core SiT Model                                 #
#################################################################################

class RotaryEmbedding2D(nn.Module):
    """Axial 2D RoPE for a (grid x grid) token layout, in the ERW release's convention (LightningDiT's
    VisionRotaryEmbeddingFast built with dim = head_dim / 2), so that the release's weights run as they were trained.

    For token (row r, column c) and j = 0 .. head_dim/4 - 1, with f_j = theta^(-2j / (head_dim/2)):
        channels 0 .. head_dim/2 - 1 rotate with the row:     pair (2j, 2j+1) by angle r * f_j
        channels head_dim/2 .. head_dim - 1 with the column:  pair (head_dim/2 + 2j, head_dim/2 + 2j + 1) by c * f_j
    i.e. x * cos + rotate_pairs(x) * sin, where rotate_pairs maps each adjacent pair (a, b) to (-b, a). Pairing
    adjacent channels (not m with m + head_dim/2) matters: the two conventions are different functions of the same
    weights. The tables freqs_cos / freqs_sin (T, head_dim) are computed in float64 and kept out of state dicts (the
    release stores them; its loader checks them against these: operations/checkpoint.py).
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)       # (hd/4,) f_j
        per_channel = torch.outer(torch.arange(grid_size, dtype=torch.float64), freqs).repeat_interleave(2, dim=-1)
        rows = per_channel[:, None, :].expand(grid_size, grid_size, half)                # (G, G, hd/2): row angle
        cols = per_channel[None, :, :].expand(grid_size, grid_size, half)                # column angle
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)  # (T, hd), row-major
        self.register_buffer("freqs_cos", angles.cos().float(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin().float(), persistent=False)

    def forward(self, x):
        """x: (N, heads, T, head_dim) -> same shape, rotated."""
        x32 = x.float()
        a, b = x32.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-b, a], dim=-1).flatten(-2)
        return (x32 * self.freqs_cos + rotated * self.freqs_sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (timm's key names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope: Optional[RotaryEmbedding2D] = None):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                      # each (N, heads, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)                  # (N, heads, T, head_dim)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    """Token-wise MLP with tanh-approximated GELU (DiT/SiT), timm's key names fc1/fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, rope=None):
        """x: (N, T, D) tokens, c: (N, D) conditioning -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and linear map from tokens (N, T, D) to patches (N, T, p*p*C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """Scalable Interpolant Transformer with projector heads on the hidden state after block
    `encoder_depth` (1-based, REPA's convention).

    `built_depth=k` builds only blocks 0..k-1 and the projectors (no final layer): the Phase-1 (warmup)
    model, which never pays for blocks it does not train (its projectors sit after its last block:
    encoder_depth = k). Its state-dict keys are a subset of the full model's, so Phase 2 can load them by
    name. `built_depth=None` (the default) builds all `depth` blocks and the final layer.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        cfg_prob: float = 0.1,
        num_classes: int = 1000,
        encoder_depth: int = 8,
        z_dims: Sequence[int] = (768,),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        use_rope: bool = False,
        built_depth: Optional[int] = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in 1..{depth} (the model depth), got {encoder_depth}")
        if built_depth is not None:
            if not z_dims:
                raise ValueError("a truncated SiT exists to train projectors: z_dims must not be empty")
            if built_depth != encoder_depth:
                raise ValueError(f"a truncated SiT ends with its projectors: built_depth ({built_depth}) must equal "
                                 f"encoder_depth ({encoder_depth})")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.depth = depth
        self.encoder_depth = encoder_depth
        self.built_depth = built_depth
        self.truncated = built_depth is not None  # the Phase-1 model: no final layer
        self.z_dims = list(z_dims)
        self.qk_norm, self.use_rope = qk_norm, use_rope

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, cfg_prob)
        self.grid_size = input_size // patch_size
        num_patches = self.grid_size ** 2
        # Fixed sin-cos embedding; a Parameter (not a buffer) only so that DiT/REPA keys and counts match.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.feat_rope = RotaryEmbedding2D(hidden_size // num_heads, self.grid_size) if use_rope else None

        num_built = depth if built_depth is None else built_depth
        self.blocks = nn.ModuleList(
            [SiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(num_built)]
        )
        self.projectors = nn.ModuleList([build_projector(hidden_size, projector_dim, z) for z in self.z_dims])
        self.final_layer = None if self.truncated else FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Every Linear (blocks, embedders, projectors): Xavier-uniform weights, zero bias.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(pos_embed.unsqueeze(0))

        # Patch embedding like an nn.Linear over the flattened patch (DiT).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        # Label and timestep embeddings: N(0, 0.02) as in DiT.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity map ...
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        # ... and the output is exactly zero at initialization.
        if self.final_layer is not None:
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(self.final_layer.linear.weight, 0)
            nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p, g = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def embed(self, x, t, y, force_drop_ids=None):
        """Latents (N, C, H, W), t (N,), y (N,) -> tokens (N, T, D) and conditioning (N, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return tokens, c

    def project(self, h) -> List[torch.Tensor]:
        """Hidden state (N, T, D) -> [(N, T, z_dim) per projector]."""
        return [projector(h) for projector in self.projectors]

    def forward(self, x, t, y, force_drop_ids=None, return_projections: bool = True
                ) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """
        x: (N, C, H, W) latents, t: (N,) times, y: (N,) labels (num_classes = null class).
        Returns (velocity (N, C, H, W), [projected tokens (N, T, z_dim) per teacher]). A truncated model
        returns velocity None; `return_projections=False` skips the projectors (sampling).
        """
        h, c = self.embed(x, t, y, force_drop_ids)                  # (N, T, D), (N, D)
        zs = []
        for i, block in enumerate(self.blocks):
            h = block(h, c, self.feat_rope)                               # (N, T, D)
            if return_projections and i + 1 == self.encoder_depth:
                zs = self.project(h)
        if self.final_layer is None:
            return None, zs
        out = self.final_layer(h, c)                                 # (N, T, p*p*C)
        return self.unpatchify(out), zs                              # (N, C, H, W)

    def forward_features(self, x, t, y, layers: Sequence[int]) -> Dict[int, torch.Tensor]:
        """Hidden states (N, T, D) after the given blocks (1-based; 0 = the embedded input tokens).
        Runs only as many blocks as the deepest requested layer needs."""
        layers = sorted(set(int(layer) for layer in layers))
        if layers and (layers[0] < 0 or layers[-1] > len(self.blocks)):
            raise ValueError(f"layers must be in 0..{len(self.blocks)}, got {layers}")
        h, c = self.embed(x, t, y)
        feats = {0: h} if 0 in layers else {}
        for i, block in enumerate(self.blocks[: layers[-1] if layers else 0]):
            h = block(h, c, self.feat_rope)
            if i + 1 in layers:
                feats[i + 1] = h
        return feats


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py (in torch, float64)

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, embed_dim) table, row-major over (h, w); the first half encodes w, the second h (MAE)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, grid_w.reshape(-1))
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, grid_h.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1).float()


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) [sin | cos] features."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))
    out = torch.outer(pos.double(), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


#################################################################################
#                                   SiT Configs                                 #
#################################################################################

def SiT_XL_2(**kwargs): return SiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def SiT_XL_4(**kwargs): return SiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def SiT_XL_8(**kwargs): return SiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def SiT_L_2(**kwargs): return SiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def SiT_L_4(**kwargs): return SiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def SiT_L_8(**kwargs): return SiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def SiT_B_2(**kwargs): return SiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def SiT_B_4(**kwargs): return SiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def SiT_B_8(**kwargs): return SiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def SiT_S_2(**kwargs): return SiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def SiT_S_4(**kwargs): return SiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def SiT_S_8(**kwargs): return SiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)
# Not a paper size: a few-block SiT for tests, the demo and quick checks on a CPU.
def SiT_Tiny_2(**kwargs): return SiT(depth=4, hidden_size=128, patch_size=2, num_heads=2, projector_dim=256, **kwargs)


SiT_models = {
    "SiT-XL/2": SiT_XL_2, "SiT-XL/4": SiT_XL_4, "SiT-XL/8": SiT_XL_8,
    "SiT-L/2": SiT_L_2, "SiT-L/4": SiT_L_4, "SiT-L/8": SiT_L_8,
    "SiT-B/2": SiT_B_2, "SiT-B/4": SiT_B_4, "SiT-B/8": SiT_B_8,
    "SiT-S/2": SiT_S_2, "SiT-S/4": SiT_S_4, "SiT-S/8": SiT_S_8,
    "SiT-Tiny/2": SiT_Tiny_2,
}


def create_sit(model: str, **kwargs) -> SiT:
    """Build a registry model by name, e.g. create_sit("SiT-B/2", input_size=32, z_dims=[768])."""
    if model not in SiT_models:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(SiT_models)}")
    return SiT_models[model](**kwargs)
