"""models/sit.py against published parameter counts, a REPA-style second implementation and closed forms."""
import copy

import numpy as np
import pytest
import torch

from models.sit import SiT, SiT_models, create_sit, get_2d_sincos_pos_embed, RotaryEmbedding2D
from tests.reference_sit import RefSiT, np_2d_sincos_pos_embed

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=2, num_classes=10,
            encoder_depth=2, z_dims=[48, 32], projector_dim=96)


def tiny(**overrides):
    torch.manual_seed(0)
    return SiT(**{**TINY, **overrides})


def randomize_(model, seed=1):
    """Give every parameter random values: a fresh adaLN-Zero model is too degenerate to compare outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(n=3, size=8, channels=4, num_classes=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g), torch.rand(n, generator=g),
            torch.randint(0, num_classes, (n,), generator=g))


@pytest.mark.parametrize("name,expected", [
    ("SiT-S/2", 32_957_200), ("SiT-B/2", 130_500_112), ("SiT-L/2", 458_086_416), ("SiT-XL/2", 675_111_184)])
def test_parameter_count_matches_published(name, expected):
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, num_classes=1000, z_dims=[])
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("name", sorted(SiT_models))
def test_every_registry_entry_builds_and_runs_on_meta(name):
    with torch.device("meta"):
        model = create_sit(name, input_size=32, num_classes=1000, z_dims=[768], encoder_depth=4)
        x = torch.empty(2, 4, 32, 32)
        v, zs = model(x, torch.empty(2), torch.zeros(2, dtype=torch.long))
    p = model.patch_size
    assert v.shape == (2, 4, 32, 32)
    assert zs[0].shape == (2, (32 // p) ** 2, 768)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="SiT-B/3"):
        create_sit("SiT-B/3")


def test_state_dict_matches_repa_reference_and_outputs_agree():
    """Same keys and shapes as a REPA-style SiT built from timm blocks; our weights in it give the same outputs."""
    ours = randomize_(tiny()).eval()
    ref_kwargs = {k: v for k, v in TINY.items()}
    ref = RefSiT(**ref_kwargs).eval()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    ref.load_state_dict(ours_sd, strict=True)
    ref = copy.deepcopy(ref).double()  # the reference in float64: ~1e-15 from exact
    x, t, y = inputs()
    with torch.no_grad():
        v, zs = ours(x, t, y)
        v_ref, zs_ref = ref(x.double(), t.double(), y)
    # Our float32 forward against the float64 reference: 4 blocks of width 64 (sums of <= 256 products, softmax,
    # LayerNorm) leave float32 rounding of ~1e-6 on |v| <= 3.3 (measured 1.6e-6, ~4 eps32 |v|; zs 4e-7 on
    # |z| <= 0.8). rtol=atol=1e-5 is 6x that and ~1e-5 of the outputs' scale: a wrong modulation, gate or head
    # split moves them by O(0.1).
    torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-5, check_dtype=False)
    for z, z_ref in zip(zs, zs_ref):
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5, check_dtype=False)


def test_repa_key_names_are_the_documented_ones():
    keys = set(tiny(depth=2, encoder_depth=1, z_dims=[8]).state_dict())
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
                "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "final_layer.linear.bias",
                "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for i in range(2):
        for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    for j in (0, 2, 4):
        expected |= {f"projectors.0.{j}.weight", f"projectors.0.{j}.bias"}
    assert keys == expected


def test_pos_embed_matches_numpy_mae_reference():
    for dim, grid in [(64, 4), (384, 16), (1152, 16)]:
        ours = get_2d_sincos_pos_embed(dim, grid).numpy()
        # Both tables are computed in float64 (numpy's and torch's sin/cos agree to ~1e-16 on arguments <= 15);
        # ours is then stored as float32, half an ulp = 6e-8 on values in [-1, 1]. atol=1e-6 leaves room; a
        # swapped sin/cos or a wrong frequency moves entries by O(1).
        np.testing.assert_allclose(ours, np_2d_sincos_pos_embed(dim, grid), rtol=0, atol=1e-6)


def test_fresh_model_outputs_exactly_zero_velocity():
    model = tiny()
    x, t, y = inputs()
    v, zs = model(x, t, y)
    assert torch.count_nonzero(v) == 0
    assert [z.shape[-1] for z in zs] == [48, 32]


def test_fresh_blocks_are_identity_maps():
    model = tiny()
    x, t, y = inputs()
    feats = model.forward_features(x, t, y, layers=[0, 4])
    # Exact: every block adds gate * f(x) with gate exactly 0 (adaLN-Zero), and x + 0 = x in any dtype.
    torch.testing.assert_close(feats[4], feats[0], rtol=0, atol=0)


def test_truncated_model_equals_full_model_up_to_block_k():
    full = randomize_(tiny()).eval()
    trunc = SiT(**{**TINY, "built_depth": TINY["encoder_depth"]}).eval()
    assert len(trunc.blocks) == TINY["encoder_depth"] and trunc.final_layer is None
    sd = full.state_dict()
    trunc.load_state_dict({k: sd[k] for k in trunc.state_dict()}, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        v, zs_trunc = trunc(x, t, y)
        _, zs_full = full(x, t, y)
        h_full = full.forward_features(x, t, y, layers=[2])[2]
        h_trunc = trunc.forward_features(x, t, y, layers=[2])[2]
    assert v is None
    # Exact: blocks 0..1 are the same float32 computation on the same weights, inputs and shapes in both models,
    # hence the same kernels and the same bits on any one CPU.
    torch.testing.assert_close(h_trunc, h_full, rtol=0, atol=0)
    tokens = (TINY["input_size"] // TINY["patch_size"]) ** 2
    for z_t, z_f, dim in zip(zs_trunc, zs_full, TINY["z_dims"]):
        assert z_t.shape == (3, tokens, dim)
        torch.testing.assert_close(z_t, z_f, rtol=0, atol=0)


def test_forward_features_layer_l_is_the_output_of_blocks_l_minus_1():
    """CKNNA's layer numbering (README: 1-based, layer L = the output of the L-th block, blocks[L - 1]), read off the
    blocks themselves with forward hooks; the projector reads the same hidden state at encoder_depth."""
    model = randomize_(tiny()).eval()
    outputs = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: outputs.setdefault(i, out))
    x, t, y = inputs()
    with torch.no_grad():
        feats = model.forward_features(x, t, y, layers=[1, 2, 4])
    for layer in (1, 2, 4):
        torch.testing.assert_close(feats[layer], outputs[layer - 1], rtol=0, atol=0)  # the same computation
    head = model.projectors[0]
    with torch.no_grad():
        _, zs = model(x, t, y)
        torch.testing.assert_close(zs[0], head(feats[TINY["encoder_depth"]]), rtol=0, atol=0)


def test_truncated_keys_are_a_subset_and_deeper_blocks_are_never_built():
    full_keys = set(tiny().state_dict())
    trunc = SiT(**{**TINY, "built_depth": TINY["encoder_depth"]})
    trunc_keys = set(trunc.state_dict())
    assert trunc_keys < full_keys
    assert not any(k.startswith(("blocks.2.", "blocks.3.", "final_layer.")) for k in trunc_keys)


def test_forward_features_rejects_layers_out_of_range():
    with pytest.raises(ValueError, match="layers"):
        tiny().forward_features(*inputs(), layers=[5])


def test_label_dropout_only_in_training():
    model = tiny(cfg_prob=0.5)
    labels = torch.arange(10).repeat(20)
    torch.manual_seed(0)
    dropped = model.y_embedder.token_drop(labels)
    frac_null = (dropped == 10).float().mean().item()
    assert 0.35 < frac_null < 0.65                              # 200 Bernoulli(0.5) draws
    table = model.y_embedder.embedding_table.weight
    model.eval()
    torch.testing.assert_close(model.y_embedder(labels, train=False), table[labels])  # lookups: exact
    model.train()
    emb = model.y_embedder(labels, train=True)
    is_null = (emb == table[10]).all(dim=1)
    assert 0 < is_null.float().mean() < 1


def test_forced_drop_uses_the_null_class():
    model = tiny(cfg_prob=0.0).eval()
    labels = torch.tensor([1, 2, 3, 4])
    force = torch.tensor([1, 0, 1, 0])
    emb = model.y_embedder(labels, train=False, force_drop_ids=force)
    table = model.y_embedder.embedding_table.weight
    torch.testing.assert_close(emb, table[torch.tensor([10, 2, 10, 4])])  # lookups: exact
    # Passing the null index directly is the same thing (how samplers build the unconditional half).
    torch.testing.assert_close(model.y_embedder(torch.tensor([10]), train=False), table[10:11])


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_output_shapes_per_patch_size(patch):
    model = randomize_(tiny(input_size=16, patch_size=patch))
    x, t, y = inputs(n=2, size=16)
    v, zs = model(x, t, y)
    assert v.shape == x.shape
    assert all(z.shape == (2, (16 // patch) ** 2, d) for z, d in zip(zs, TINY["z_dims"]))


def test_return_projections_false_skips_projectors():
    model = randomize_(tiny())
    calls = []
    model.projectors[0].register_forward_hook(lambda *a: calls.append(1))
    v, zs = model(*inputs(), return_projections=False)
    assert zs == [] and calls == [] and v is not None


def test_unpatchify_inverts_patchify():
    model = tiny(input_size=8, patch_size=2)
    x = torch.randn(2, 4, 8, 8)
    # Patchify by hand in the (p, q, c) order the final layer emits.
    patches = x.reshape(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 16)
    torch.testing.assert_close(model.unpatchify(patches), x, rtol=0, atol=0)  # a permutation: exact


def test_rope_attention_depends_only_on_relative_position():
    rope = RotaryEmbedding2D(head_dim=8, grid_size=4)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)

    def tokens(v):
        return v.expand(1, 1, 16, 8)

    def idx(r, c):
        return r * 4 + c

    rq, rk = rope(tokens(q))[0, 0], rope(tokens(k))[0, 0]
    # Same offset (+1 row, +2 cols) from two different origins gives the same score ...
    s1 = rq[idx(0, 0)] @ rk[idx(1, 2)]
    s2 = rq[idx(2, 1)] @ rk[idx(3, 3)]
    # Equal in exact arithmetic; in float32 each score takes other cos/sin entries (rounded to float32), two
    # rotations (2 products and a sum per channel) and a dot of 8 terms: within ~14 eps32 |q| |k| of exact each.
    # |q| |k| = 6.9 here: 2 x 14 eps |q| |k| = 2.3e-5; a wrong relative rotation moves the score by O(|q| |k|).
    bound = 2 * 14 * torch.finfo(torch.float32).eps * float(q.norm() * k.norm())
    torch.testing.assert_close(s1, s2, rtol=0, atol=bound)
    # ... and position 0 is the identity rotation (cos 0 = 1, sin 0 = 0 exactly: exact).
    torch.testing.assert_close(rq[0], q)


def release_rope_tables(head_dim, grid):
    """The ERW release's RoPE tables as its LightningDiT module builds them, written out here in float32 from the
    formula (dim = head_dim / 2, pt_seq_len = grid): per-axis frequencies 1 / 10000^(2j / dim), each repeated for a
    channel pair, row angles in the first half of the channels and column angles in the second."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    t = torch.arange(grid) / grid * grid
    per_axis = torch.einsum("i,f->if", t, freqs)
    per_axis = torch.stack([per_axis, per_axis], dim=-1).reshape(grid, dim)        # f0 f0 f1 f1 ...
    table = torch.cat([per_axis[:, None, :].expand(grid, grid, dim), per_axis[None, :, :].expand(grid, grid, dim)],
                      dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def release_rope(x, cos, sin):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


@pytest.mark.parametrize("head_dim, grid", [(8, 4), (64, 16), (72, 16), (64, 32)])
def test_rope_is_the_erw_releases_adjacent_pair_rotation(head_dim, grid):
    """The release's tables and rotation, built independently above, against ours. Our tables come from float64
    angles; the release's float32 angles (up to grid - 1 rad) are off by at most ~grid eps32 before the cosine, so the
    tables agree within 4 grid eps32; a rotation mixes two table entries, so outputs agree within 2 x that x |x|max.
    The other pairing (m with m + head_dim/2) differs by O(|x|)."""
    rope = RotaryEmbedding2D(head_dim, grid)
    cos, sin = release_rope_tables(head_dim, grid)
    table_tol = 4 * grid * torch.finfo(torch.float32).eps
    torch.testing.assert_close(rope.freqs_cos, cos, rtol=0, atol=table_tol)
    torch.testing.assert_close(rope.freqs_sin, sin, rtol=0, atol=table_tol)
    x = torch.randn(2, 3, grid * grid, head_dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rope(x), release_rope(x, cos, sin), rtol=0,
                               atol=2 * table_tol * float(x.abs().max()))


def test_qk_norm_and_rope_run_and_keep_repa_keys_plus_timm_norm_keys():
    model = randomize_(tiny(qk_norm=True, use_rope=True))
    keys = set(model.state_dict())
    assert "blocks.0.attn.q_norm.weight" in keys and "blocks.0.attn.k_norm.bias" in keys
    assert not any("rope" in k for k in keys)
    v, _ = model(*inputs())
    assert torch.isfinite(v).all()
