"""Every path at a second resolution: the demo data at 128 px through Phase 1, Phase 2, sampling, the reference, the
evaluator, the teacher cache, packed latents, the in-training FID and CKNNA; the places that depend on the
resolution checked against their closed forms; and what cannot hold at a resolution refused, naming it."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sample_ddp
import train
import train_warmup
from erw.loop import sit_args
from evaluations import cknna, evaluator
from models.encoders import load_teachers
from models.sit import create_sit, get_2d_sincos_pos_embed
from operations.cli import InvalidInput
from operations.config import TRAIN, WARMUP, resolve_config
from preprocessing import dataset_tools
from tests import stub_inception
from tests.conftest import ROOT, tiny_args
from tests.reference_sit import np_2d_sincos_pos_embed

SIDE = 128  # the demo's 64 px doubled: 16x16 latents, 64 tokens of SiT/2, the teachers at 112 px (8x8 tokens)


@pytest.fixture(scope="module")
def data128(tmp_path_factory):
    root = tmp_path_factory.mktemp("data128")
    dataset_tools.main(["make-demo", "--dest", str(root), "--images-per-class", "2", "--vae", "random-tiny",
                        "--resolution", str(SIDE)])
    return root


def args128(data, out, *extra):
    return tiny_args(data, out, "--resolution", str(SIDE), "--batch-size", "8", *extra)


def phase2_args(data, out, *extra):
    return args128(data, out, "--vae", os.path.join(str(data), "vae"), "--sample-grid-every", "1000",
                   "--sample-num-steps", "2", *extra)


def test_the_whole_pipeline_runs_at_128_px(data128, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stub_inception.install(monkeypatch)
    # Phase 1, and Phase 2 warm-started from it, with a sample grid and an in-training FID against a 128-px reference.
    train_warmup.main(args128(data128, tmp_path, "--max-train-steps", "2"))
    phase1 = os.path.join(tmp_path, "tiny-warmup", "checkpoints", "last.pt")
    reference = str(tmp_path / "reference.npz")
    dataset_tools.main(["reference", "--data-dir", str(data128), "--out", reference])
    result = train.main(phase2_args(data128, tmp_path, "--warmup-ckpt", phase1, "--max-train-steps", "2",
                                    "--sample-grid-every", "2", "--fid-every", "2", "--fid-ref", reference,
                                    "--fid-num-samples", "4", "--fid-num-steps", "2", "--inception-weights", "random"))
    assert result["step"] == 2 and result["model"].grid_size == SIDE // 16
    grid = os.path.join(tmp_path, "tiny", "samples", "0000002.png")
    assert np.asarray(Image.open(grid)).shape[:2] == (4 * SIDE, 4 * SIDE)  # 16 images
    with open(os.path.join(tmp_path, "tiny", "metrics.jsonl")) as f:
        assert [r["step"] for r in map(json.loads, f) if "fid" in r] == [2]
    # Sampling and the evaluator at 128 px.
    npz = sample_ddp.main(["--ckpt", os.path.join(tmp_path, "tiny", "checkpoints", "last.pt"), "--sample-dir",
                           str(tmp_path / "samples"), "--num-fid-samples", "4", "--num-steps", "2", "--device", "cpu",
                           "--vae", os.path.join(str(data128), "vae")])
    with np.load(npz) as samples, np.load(reference) as ref:
        assert samples["arr_0"].shape == (4, SIDE, SIDE, 3) and ref["arr_0"].shape[1:] == (SIDE, SIDE, 3)
    metrics = evaluator.evaluate(reference, npz, inception_weights="random", device="cpu", is_split_size=4,
                                 cache_dir=str(tmp_path / "cache"), progress=False, log=None)
    assert np.isfinite(metrics["fid"]) and metrics["settings"]["image_sizes"]["samples"] == [SIDE, SIDE]
    # The teacher cache and packed latents at 128 px, and a Phase 1 that reads no image.
    cache = str(tmp_path / "teacher-cache")
    dataset_tools.main(["cache-teachers", "--data-dir", str(data128), "--enc-type", "random-vit-tiny", "--out", cache,
                        "--workers", "0", "--device", "cpu"])
    dataset_tools.main(["pack", "--data-dir", str(data128), "--workers", "0"])
    with open(os.path.join(cache, "identity.json")) as f:
        identity = json.load(f)
    assert (identity["resolution"], identity["tokens"]) == (SIDE, (SIDE // 16) ** 2)
    train_warmup.main(args128(data128, tmp_path, "--max-train-steps", "1", "--teacher-cache", cache,
                              "--exp-name", "from-cache"))
    # CKNNA of both phases at 128 px.
    table = cknna.main(["--ckpt", phase1, os.path.join(tmp_path, "tiny", "checkpoints", "last.pt"), "--labels",
                        "phase1", "phase2", "--data-dir", str(data128), "--enc-type", "random-vit-tiny", "--device",
                        "cpu", "--num-workers", "0", "--batch-size", "16", "--output-dir", str(tmp_path / "cknna")])
    assert sorted(table["results"]["phase2"]) == [1, 2, 3, 4] and sorted(table["results"]["phase1"]) == [1, 2]


@pytest.mark.parametrize("side", [256, 512])
def test_the_sits_position_tables_are_their_closed_forms_at_each_grid(side):
    """SiT/2 at `side` px: a grid of side/16, whose sin-cos table is MAE's closed form (numpy, float64) and whose
    RoPE angles are the row and column index times the frequencies theta^(-2i/d)."""
    grid = side // 16
    model = create_sit("SiT-Tiny/2", input_size=side // 8, z_dims=[], use_rope=True)
    assert model.grid_size == grid
    # float32 storage of values in [-1, 1]: half an ulp is 6e-8; a wrong grid moves entries by O(1).
    np.testing.assert_allclose(model.pos_embed[0].numpy(), np_2d_sincos_pos_embed(model.pos_embed.shape[-1], grid),
                               rtol=0, atol=1e-6)
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(model.pos_embed.shape[-1], grid).float())
    head_dim = model.feat_rope.freqs_cos.shape[-1]
    freqs = 10000.0 ** (-np.arange(0, head_dim // 2, 2) / (head_dim // 2))
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    angles = np.concatenate([np.repeat(np.outer(rows, freqs), 2, 1), np.repeat(np.outer(cols, freqs), 2, 1)], 1)
    # float32 cosines of float64 angles up to grid - 1 rad: 4 grid eps32 (tests/test_sit.py).
    np.testing.assert_allclose(model.feat_rope.freqs_cos.numpy(), np.cos(angles), rtol=0,
                               atol=4 * grid * np.finfo(np.float32).eps)


def test_the_512_px_configs_resolve_to_64x64_latents_and_1024_tokens():
    teachers = load_teachers("random-dinov2-vit-b", 512)
    assert teachers[0].num_tokens == 1024 and teachers[0].input_size == 448  # REPA's DINOv2-B at 448 px
    for name, phases in (("sit_xl2_erw_512.yaml", (WARMUP, TRAIN)), ("sit_xl2_repa_512.yaml", (TRAIN,))):
        for phase in phases:
            config = resolve_config(phase, ["--config", os.path.join(ROOT, "configs", name)])
            args = sit_args(config, teachers)
            with torch.device("meta"):
                model = create_sit(**args)
            assert (config["resolution"], args["input_size"], model.pos_embed.shape[1]) == (512, 64, 1024), name
            assert config["model"] == "SiT-XL/2" and config["data_dir"] == "data/imagenet512"


def test_a_phase1_checkpoint_at_another_resolution_is_refused_naming_both(demo_data, data128, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "1"))  # 64 px
    phase1 = os.path.join(tmp_path, "tiny-warmup", "checkpoints", "last.pt")
    with pytest.raises(InvalidInput, match=r"warmed at 64 px \(8x8 latents\); this run trains at 128 px"):
        train.main(phase2_args(data128, tmp_path, "--warmup-ckpt", phase1, "--max-train-steps", "1"))
    assert not os.path.exists(os.path.join(tmp_path, "tiny"))  # refused before the run's folder exists


def test_a_resolution_or_a_model_that_cannot_hold_is_refused_naming_it(data128, tmp_path):
    with pytest.raises(InvalidInput, match=r"--resolution 136 is not a multiple of 16: SiT-Tiny/2"):
        sit_args(resolve_config(WARMUP, args128(data128, tmp_path, "--resolution", "136")), [])
    # A patch-4 SiT has one token per 32x32 pixels, the teachers one per 16x16: they cannot be paired.
    config = resolve_config(TRAIN, phase2_args(data128, tmp_path, "--model", "SiT-B/4", "--warmup-ckpt", "none",
                                               "--encoder-depth", "4"))
    with pytest.raises(InvalidInput, match=r"random-vit-tiny gives 64 tokens per image at 128 px, SiT-B/4 16"):
        sit_args(config, load_teachers("random-vit-tiny", SIDE))
