"""The ERW authors' released checkpoints (LINs-lab/ERW, weights SempraETY/ERW), rebuilt here without their weights:
their dictionary (REPA's: model, ema, opt, steps, and args as an argparse.Namespace), REPA's keys, LightningDiT's RoPE
tables in the state dict and affine LayerNorm QK-norm. Our loaders must rebuild the model from `args` and run it as
the release's own code would: the reference forward below is written from the release's model definition, in
float64, independently of models/sit.py."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from operations.checkpoint import RELEASE_ROPE_KEYS, load_model
from operations.cli import InvalidInput
from erw.loop import warm_start
from models.sit import create_sit
from tests.test_sit import release_rope, release_rope_tables

# SiT-Tiny/2 (models/sit.py's test size): 4 blocks, width 128, 2 heads, projector 256; 64 px -> 8x8 latents, 4x4 grid.
DEPTH, HIDDEN, HEADS, PATCH, CHANNELS, CLASSES, PROJECTOR, Z = 4, 128, 2, 2, 4, 10, 256, 24
RESOLUTION, GRID = 64, 4


def release_args(**changes):
    """The flags the release's train.py pickles (a subset of its parser, with its spellings)."""
    args = dict(model="SiT-Tiny/2", num_classes=CLASSES, encoder_depth=3, fused_attn=True, qk_norm=False,
                use_rope=True, resolution=RESOLUTION, enc_type="dinov2-vit-b", proj_coeff=0.5, l2r_depth=2,
                warmup_steps=100000, max_train_steps=300000, path_type="linear", cfg_prob=0.1)
    return argparse.Namespace(**{**args, **changes})


def release_state_dict(seed, qk_norm, rope, blocks=DEPTH, final_layer=True):
    """REPA's SiT keys with shapes written from its definition, random non-zero values everywhere (adaLN and the
    final layer too, so the velocity is not trivially zero), scaled so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"pos_embed": (1, GRID * GRID, HIDDEN),
              "x_embedder.proj.weight": (HIDDEN, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": (HIDDEN,),
              "t_embedder.mlp.0.weight": (HIDDEN, 256), "t_embedder.mlp.0.bias": (HIDDEN,),
              "t_embedder.mlp.2.weight": (HIDDEN, HIDDEN), "t_embedder.mlp.2.bias": (HIDDEN,),
              "y_embedder.embedding_table.weight": (CLASSES + 1, HIDDEN)}
    for i in range(blocks):
        b = f"blocks.{i}."
        shapes.update({b + "attn.qkv.weight": (3 * HIDDEN, HIDDEN), b + "attn.qkv.bias": (3 * HIDDEN,),
                       b + "attn.proj.weight": (HIDDEN, HIDDEN), b + "attn.proj.bias": (HIDDEN,),
                       b + "mlp.fc1.weight": (4 * HIDDEN, HIDDEN), b + "mlp.fc1.bias": (4 * HIDDEN,),
                       b + "mlp.fc2.weight": (HIDDEN, 4 * HIDDEN), b + "mlp.fc2.bias": (HIDDEN,),
                       b + "adaLN_modulation.1.weight": (6 * HIDDEN, HIDDEN),
                       b + "adaLN_modulation.1.bias": (6 * HIDDEN,)})
        if qk_norm:
            for norm in ("q_norm", "k_norm"):
                shapes.update({f"{b}attn.{norm}.{p}": (HIDDEN // HEADS,) for p in ("weight", "bias")})
    for j, (n_in, n_out) in enumerate([(HIDDEN, PROJECTOR), (PROJECTOR, PROJECTOR), (PROJECTOR, Z)]):
        shapes.update({f"projectors.0.{2 * j}.weight": (n_out, n_in), f"projectors.0.{2 * j}.bias": (n_out,)})
    if final_layer:
        shapes.update({"final_layer.linear.weight": (PATCH * PATCH * CHANNELS, HIDDEN),
                       "final_layer.linear.bias": (PATCH * PATCH * CHANNELS,),
                       "final_layer.adaLN_modulation.1.weight": (2 * HIDDEN, HIDDEN),
                       "final_layer.adaLN_modulation.1.bias": (2 * HIDDEN,)})
    state = {}
    for key, shape in shapes.items():
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1) if len(shape) > 1 else 1
        scale = 0.3 if "adaLN" in key else 1.0
        state[key] = torch.randn(shape, generator=g) * scale / math.sqrt(fan_in if key.endswith("weight") else 10)
        if key.endswith("norm.weight"):
            state[key] = 1 + 0.2 * torch.randn(shape, generator=g)
    if rope:
        cos, sin = release_rope_tables(HIDDEN // HEADS, GRID)
        state.update({RELEASE_ROPE_KEYS[0]: cos, RELEASE_ROPE_KEYS[1]: sin})
    return state


def save_release(path, qk_norm, rope=True, seed=0, args=None, **state_changes):
    model = release_state_dict(seed, qk_norm, rope, **state_changes)
    ema = release_state_dict(seed + 1, qk_norm, rope, **state_changes)
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": []}, "steps": 300000,
                "args": args or release_args(qk_norm=qk_norm, use_rope=rope)}, path)
    return model, ema


def reference_forward(w, x, t, y, encoder_depth, qk_norm, rope):
    """The release's SiT forward (warmup=False) in float64 from its state dict: velocity and projected tokens."""
    w = {k: v.double() for k, v in w.items()}
    x, t = x.double(), t.double()
    n, hd = x.shape[0], HIDDEN // HEADS
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    h = h + w["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    t_freq = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])),
                     w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])
    c = t_emb + w["y_embedder.embedding_table.weight"][y]

    def modulate(v, shift, scale):
        return v * (1 + scale[:, None]) + shift[:, None]

    zs = None
    for i in range(DEPTH):
        b = f"blocks.{i}."
        mod = F.linear(F.silu(c), w[b + "adaLN_modulation.1.weight"], w[b + "adaLN_modulation.1.bias"]).chunk(6, -1)
        a = modulate(F.layer_norm(h, (HIDDEN,), eps=1e-6), mod[0], mod[1])
        q, k, v = F.linear(a, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"]).reshape(
            n, -1, 3, HEADS, hd).permute(2, 0, 3, 1, 4)
        if qk_norm:
            q = F.layer_norm(q, (hd,), w[b + "attn.q_norm.weight"], w[b + "attn.q_norm.bias"], eps=1e-5)
            k = F.layer_norm(k, (hd,), w[b + "attn.k_norm.weight"], w[b + "attn.k_norm.bias"], eps=1e-5)
        if rope:
            q = release_rope(q, w["feat_rope.freqs_cos"], w["feat_rope.freqs_sin"])
            k = release_rope(k, w["feat_rope.freqs_cos"], w["feat_rope.freqs_sin"])
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
        h = h + mod[2][:, None] * F.linear(attention.transpose(1, 2).reshape(n, -1, HIDDEN),
                                           w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        m = modulate(F.layer_norm(h, (HIDDEN,), eps=1e-6), mod[3], mod[4])
        m = F.linear(F.gelu(F.linear(m, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]), approximate="tanh"),
                     w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
        h = h + mod[5][:, None] * m
        if i + 1 == encoder_depth:
            z = h
            for j in range(3):
                z = F.linear(z, w[f"projectors.0.{2 * j}.weight"], w[f"projectors.0.{2 * j}.bias"])
                z = F.silu(z) if j < 2 else z
            zs = z
    shift, scale = F.linear(F.silu(c), w["final_layer.adaLN_modulation.1.weight"],
                            w["final_layer.adaLN_modulation.1.bias"]).chunk(2, -1)
    out = F.linear(modulate(F.layer_norm(h, (HIDDEN,), eps=1e-6), shift, scale), w["final_layer.linear.weight"],
                   w["final_layer.linear.bias"])
    out = out.reshape(n, GRID, GRID, PATCH, PATCH, CHANNELS)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, CHANNELS, GRID * PATCH, GRID * PATCH), zs


@pytest.mark.parametrize("qk_norm", [True, False], ids=["best.pt (QK-norm)", "0300000.pt (no QK-norm)"])
def test_a_release_checkpoint_is_rebuilt_from_its_args_and_runs_as_the_releases_forward(tmp_path, qk_norm):
    path = str(tmp_path / "release.pt")
    _, ema = save_release(path, qk_norm)
    model, info = load_model(path, "ema")
    assert info["format"] == "repa" and info["step"] == 300000
    assert {k: info["model_args"][k] for k in ("model", "encoder_depth", "qk_norm", "use_rope", "input_size",
                                              "num_classes", "z_dims")} == dict(
        model="SiT-Tiny/2", encoder_depth=3, qk_norm=qk_norm, use_rope=True, input_size=RESOLUTION // 8,
        num_classes=CLASSES, z_dims=[Z])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, CHANNELS, GRID * PATCH, GRID * PATCH, generator=g)
    for t_value in (0.02, 0.5, 0.97):
        t = torch.full((4,), t_value)
        y = torch.tensor([0, 3, 9, CLASSES])                                  # CLASSES: the null class
        with torch.no_grad():
            velocity, zs = model(x, t, y)
        ref_velocity, ref_z = reference_forward(ema, x, t, y, 3, qk_norm, rope=True)
        # float32 against float64: each of the ~13 sublayers adds at most a few hundred eps32 relative to its
        # output scale (dot products of <= 512 terms), and the RoPE tables differ by <= 4 grid eps32; so 2e-4 of
        # the output's scale bounds the gap, while a wrong pairing, a dropped table or a missed norm moves it O(1).
        assert float(ref_velocity.abs().max()) > 0.1
        torch.testing.assert_close(velocity.double(), ref_velocity, rtol=0, atol=2e-4 * float(ref_velocity.abs().max()))
        torch.testing.assert_close(zs[0].double(), ref_z, rtol=0, atol=2e-4 * float(ref_z.abs().max()))


def test_release_loading_is_strict_and_names_what_differs(tmp_path):
    path = str(tmp_path / "release.pt")
    save_release(path, qk_norm=True)
    with pytest.raises(InvalidInput, match=r"qk_norm: flag gives False, checkpoint args have True"):
        load_model(path, "ema", {"qk_norm": False})
    with pytest.raises(InvalidInput, match=r"encoder_depth: flag gives 8, checkpoint args have 3"):
        load_model(path, "ema", {"encoder_depth": 8})
    load_model(path, "ema", {"model": "SiT-Tiny/2", "encoder_depth": 3})          # flags that agree are fine

    def altered(change):
        ckpt = torch.load(path, weights_only=False)
        change(ckpt["ema"])
        torch.save(ckpt, tmp_path / "altered.pt")
        return str(tmp_path / "altered.pt")

    with pytest.raises(InvalidInput, match=r"missing keys \(1\): blocks.2.attn.k_norm.bias"):
        load_model(altered(lambda w: w.pop("blocks.2.attn.k_norm.bias")), "ema")
    with pytest.raises(InvalidInput, match=r"unexpected keys \(1\): blocks.0.attn.extra"):
        load_model(altered(lambda w: w.update({"blocks.0.attn.extra": torch.zeros(1)})), "ema")
    # Our former RoPE (channel m paired with m + head_dim/2) has other tables: its weights are refused, not run.
    half = HIDDEN // HEADS // 2
    with pytest.raises(InvalidInput, match=r"feat_rope.freqs_cos differs from the model's RoPE table"):
        load_model(altered(lambda w: w.update({RELEASE_ROPE_KEYS[0]: torch.cat(
            [w[RELEASE_ROPE_KEYS[0]][:, 0::2], w[RELEASE_ROPE_KEYS[0]][:, 1::2]], dim=-1)[:, :2 * half]})), "ema")
    with pytest.raises(InvalidInput, match=r"has one RoPE table but not feat_rope.freqs_sin"):
        load_model(altered(lambda w: w.pop(RELEASE_ROPE_KEYS[1])), "ema")
    # Without RoPE in args, tables in the weights are keys the model does not have.
    no_rope = str(tmp_path / "no_rope.pt")
    save_release(no_rope, qk_norm=False, rope=True, args=release_args(use_rope=False))
    with pytest.raises(InvalidInput, match=r"unexpected keys \(2\): feat_rope.freqs_cos, feat_rope.freqs_sin"):
        load_model(no_rope, "ema")
    torch.save({"ema": {}, "args": {"model": object}}, tmp_path / "odd.pt")
    with pytest.raises(InvalidInput, match="could not read checkpoint"):
        load_model(str(tmp_path / "odd.pt"), "ema")


def phase2_model(**changes):
    torch.manual_seed(3)
    return create_sit("SiT-Tiny/2", **{**dict(input_size=RESOLUTION // 8, num_classes=CLASSES, z_dims=[Z],
                                              encoder_depth=3, use_rope=True), **changes})


def test_the_releases_warmup_file_starts_phase_2_with_exactly_its_tensors(tmp_path):
    """0100000.pt: embedders, blocks 0..k-1 and the projectors, no final layer, warmed without RoPE although its
    args say use_rope (the release's Phase 1 builds no RoPE); k = 2 from the blocks and args.l2r_depth."""
    path = str(tmp_path / "0100000.pt")
    source, _ = save_release(path, qk_norm=False, rope=False, blocks=2, final_layer=False,
                             args=release_args(use_rope=True, l2r_depth=2))
    model = phase2_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = warm_start(model, path, "model", start_layer=1, expected_depth=2, add_rope=True)
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            i, rest = int(key.split(".")[1]), key.split(".", 2)[2]
            expected = source[f"blocks.{i - 1}.{rest}"] if 1 <= i <= 2 else before[key]
        else:
            expected = source.get(key, before[key])
        assert torch.equal(value, expected), key
    assert "blocks 1..2" in summary and "RoPE added over the warmed blocks" in summary
    with pytest.raises(InvalidInput, match=r"trained with use_rope = False, but this run sets --use-rope = True.*"
                                           r"--add-rope-after-warmup"):
        warm_start(phase2_model(), path, "model")
    with pytest.raises(InvalidInput, match="--add-rope-after-warmup adds RoPE"):
        warm_start(phase2_model(use_rope=False), path, "model", add_rope=True)
    save_release(path, qk_norm=False, rope=False, blocks=2, final_layer=False, args=release_args(l2r_depth=3))
    with pytest.raises(InvalidInput, match="holds 2 blocks and no final layer .* l2r_depth 3"):
        warm_start(phase2_model(), path, "model", add_rope=True)


def test_readme_gives_the_three_commands_for_the_released_files():
    """Sample best.pt with the authors' guidance, evaluate its .npz, continue from 0100000.pt with the release preset:
    each command as README types it parses, and says what the release does."""
    import shlex

    import sample_ddp
    from operations.config import TRAIN, resolve_config
    from evaluations import evaluator
    from tests.conftest import ROOT
    with open(f"{ROOT}/README.md") as f:
        section = f.read().split("## ERW's released checkpoints")[1].split("\n## ")[0]
    code = "\n".join(line[4:] for line in section.splitlines() if line.startswith("    ") and
                     not line.lstrip().startswith("#"))
    commands = [shlex.split(command) for command in code.replace("\\\n", " ").splitlines()]
    sample, evaluate, resume = commands
    args = sample_ddp.build_parser().parse_args(sample[sample.index("sample_ddp.py") + 1:])
    assert (args.ckpt, args.mode, args.num_steps, args.cfg_scale, args.guidance_high, args.per_proc_batch_size) == \
        ("ERW/best.pt", "sde", 250, 2.2, 0.95, 64)
    assert evaluate[:3] == ["python", "-m", "evaluations.evaluator"]
    evaluator.build_parser().parse_args(evaluate[3:])
    argv = [a.replace("configs/", f"{ROOT}/configs/") for a in resume[resume.index("train.py") + 1:]]
    config = resolve_config(TRAIN, argv)
    assert config["warmup_ckpt"] == "ERW/0100000.pt" and config["add_rope_after_warmup"] and config["use_rope"]
    assert (config["warmup_depth"], config["encoder_depth"], config["proj_coeff"]) == (4, 14, 6.0)


def test_cknna_reads_a_release_checkpoint_from_its_args(demo_data, tmp_path):
    from evaluations import cknna
    path = str(tmp_path / "best.pt")
    save_release(path, qk_norm=True)
    result = cknna.main(["--ckpt", path, "--labels", "erw", "--data-dir", str(demo_data), "--enc-type",
                         "random-vit-tiny", "--t", "0.3", "--layers", "1,4", "--batch-size", "64", "--num-workers",
                         "0", "--device", "cpu", "--output-dir", str(tmp_path / "cknna")])
    checkpoint = result["settings"]["checkpoints"]["erw"]
    assert checkpoint["format"] == "repa" and checkpoint["model_args"]["qk_norm"] is True
    assert checkpoint["model_args"]["use_rope"] is True and sorted(result["results"]["erw"]) == [1, 4]
