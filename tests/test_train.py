"""Phase 2 (train.py): warm start, baselines, learning, sample grids, resume, NaN stop, two processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import train
import train_warmup
from operations.checkpoint import load_checkpoint, save_checkpoint
from erw.data import ImageLatentDataset, sample_latents
from erw.losses import Objective
from erw.loop import warm_start
from models.sit import SiT
from tests.conftest import ROOT, tiny_args
from tests.dist_utils import free_port
from tests.test_train_warmup import _state_equal

ARCH = dict(input_size=8, patch_size=2, hidden_size=64, depth=5, num_heads=2, num_classes=10, projector_dim=32)


def phase1_checkpoint(path, k=2, z_dims=(24,), hidden_size=64, seed=0):
    """A Phase-1 checkpoint with random (not init) weights, in train_warmup.py's format."""
    torch.manual_seed(seed)
    arch = {**ARCH, "hidden_size": hidden_size, "depth": max(ARCH["depth"], k)}
    model = SiT(**arch, encoder_depth=k, z_dims=list(z_dims), built_depth=k)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_()
    ema = {k_: v + 1 for k_, v in model.state_dict().items()}
    model_args = {"model": "custom", **arch, "encoder_depth": k, "z_dims": list(z_dims), "built_depth": k}
    save_checkpoint({"model": model.state_dict(), "ema": ema, "model_args": model_args, "step": 7}, str(path))
    return model.state_dict(), ema


def fresh_full(z_dims=(24,)):
    torch.manual_seed(1)
    return SiT(**ARCH, encoder_depth=3, z_dims=list(z_dims))


@pytest.mark.parametrize("weights,start", [("model", 0), ("ema", 2)])
def test_warm_start_transfers_exactly_what_it_should(tmp_path, weights, start):
    src_model, src_ema = phase1_checkpoint(tmp_path / "p1.pt")
    source = src_model if weights == "model" else src_ema
    model = fresh_full()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = warm_start(model, str(tmp_path / "p1.pt"), weights=weights, start_layer=start, expected_depth=2)
    after = model.state_dict()
    expected_from_ckpt = {f"blocks.{start + int(k.split('.')[1])}.{k.split('.', 2)[2]}" if k.startswith("blocks.")
                          else k: k for k in source}
    for key, value in after.items():
        if key in expected_from_ckpt:
            assert torch.equal(value, source[expected_from_ckpt[key]]), key
        else:
            assert torch.equal(value, before[key]), key
    assert {k.split(".")[1] for k in expected_from_ckpt if k.startswith("blocks.")} == {str(start), str(start + 1)}
    assert f"blocks {start}..{start + 1}" in summary and weights in summary


def test_warm_start_errors(tmp_path):
    phase1_checkpoint(tmp_path / "p1.pt", k=2)
    with pytest.raises(ValueError, match="do not fit a 5-block model"):
        warm_start(fresh_full(), str(tmp_path / "p1.pt"), start_layer=4)
    with pytest.raises(ValueError, match="--warmup-depth is 3"):
        warm_start(fresh_full(), str(tmp_path / "p1.pt"), expected_depth=3)
    with pytest.raises(ValueError, match="teacher widths \\[24\\]"):
        warm_start(fresh_full(z_dims=(16,)), str(tmp_path / "p1.pt"))
    phase1_checkpoint(tmp_path / "wide.pt", hidden_size=96)
    with pytest.raises(ValueError, match="96-wide"):
        warm_start(fresh_full(), str(tmp_path / "wide.pt"))
    phase1_checkpoint(tmp_path / "deep.pt", k=6)
    with pytest.raises(ValueError, match="6 warmed blocks"):
        warm_start(fresh_full(), str(tmp_path / "deep.pt"))
    torch.save({"model": fresh_full().state_dict(), "model_args": {"truncated": False}}, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="not a Phase-1 checkpoint"):
        warm_start(fresh_full(), str(tmp_path / "full.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        warm_start(fresh_full(), str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize("name,flag", [("qk_norm", "--qk-norm"), ("use_rope", "--use-rope")])
def test_warm_start_refuses_other_attention_options(tmp_path, name, flag):
    """Neither option changes a shape the key check would catch, but the warmed blocks were trained without it."""
    phase1_checkpoint(tmp_path / "p1.pt")                       # trained without qk-norm and RoPE
    torch.manual_seed(1)
    model = SiT(**ARCH, encoder_depth=3, z_dims=[24], **{name: True})
    with pytest.raises(ValueError, match=f"trained with {name} = False, but this run sets {flag} = True"):
        warm_start(model, str(tmp_path / "p1.pt"))


@pytest.fixture(scope="module")
def phase1(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("phase1")
    train_warmup.main(tiny_args(demo_data, out, "--max-train-steps", "10"))
    return os.path.join(out, "tiny-warmup", "checkpoints", "last.pt")


def phase2_args(demo_data, out, phase1_ckpt, *extra):
    return tiny_args(demo_data, out, "--warmup-ckpt", phase1_ckpt, "--vae", os.path.join(str(demo_data), "vae"),
                     *extra)


def test_phase1_then_phase2_learns_and_writes_sample_grids(demo_data, phase1, tmp_path):
    result = train.main(phase2_args(demo_data, tmp_path, phase1, "--max-train-steps", "60", "--log-every", "5",
                                    "--sample-grid-every", "30", "--sample-num-steps", "4"))
    velocity = [r["velocity_loss"] for r in result["history"]]
    lambdas = {r["step"]: r["lambda_used"] for r in result["history"]}
    first, last = sum(velocity[:2]) / 2, sum(velocity[-2:]) / 2
    # The fresh final layer predicts v = 0, so the loss starts near E|eps - x|^2 ~ 2; 60 steps took the
    # average of the first two logs 1.81 -> 1.53 (-15%) for the last two here.
    assert velocity[0] > 1.8
    assert last < 0.9 * first, velocity
    # What it learned is the velocity d/dt x_t = eps - x of the linear path, and not its negative (which a loss fall
    # alone would not tell): on fresh draws from the data, written out here, the prediction is closer to eps - x.
    model = result["model"].eval()
    g = torch.Generator().manual_seed(123)
    dataset = ImageLatentDataset(str(demo_data), load_images=False)
    items = [dataset[i] for i in range(0, len(dataset), 5)]
    x = sample_latents(torch.stack([m for _, m, _ in items]), generator=g)
    labels = torch.stack([y for _, _, y in items])
    eps, t = torch.randn(x.shape, generator=g), torch.rand(len(x), generator=g)
    with torch.no_grad():
        pred, _ = model((1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps, t, labels,
                        return_projections=False)
    toward, away = ((pred - (eps - x)) ** 2).mean(), ((pred + (eps - x)) ** 2).mean()
    assert toward < 0.9 * away, (toward, away)
    # The record at step n (after n updates) holds the weight of the update that produced it, the n-th, whose
    # schedule argument is the n - 1 steps completed before it: lambda(0) = proj_coeff weights the first update.
    # Rel 1e-6: a float32 tensor round trip of a float64 value (eps 1.2e-7), no accumulation.
    assert "lambda" not in result["history"][0]
    for n in (5, 60):
        assert lambdas[n] == pytest.approx(0.5 * 2 ** (-(n - 1) / 100), rel=1e-6)
    samples = sorted(os.listdir(os.path.join(tmp_path, "tiny", "samples")))
    assert samples == ["0000000.png", "0000030.png", "0000060.png"]
    ckpt = load_checkpoint(os.path.join(tmp_path, "tiny", "checkpoints", "last.pt"))
    assert ckpt["model_args"]["built_depth"] is None and ckpt["model_args"]["encoder_depth"] == 3


def test_encoder_depth_auto_puts_the_head_after_the_last_warmed_block(demo_data, phase1, tmp_path):
    # Table 4's "Depth X-Y": Phase 1's k = 2 blocks placed at 1..2 (0-based); the head reads the output of block 2,
    # which is block 3 in REPA's 1-based count.
    train.main(phase2_args(demo_data, tmp_path, phase1, "--warmup-layers", "1", "--warmup-depth", "2",
                           "--encoder-depth", "auto", "--max-train-steps", "1", "--sample-grid-every", "1000",
                           "--sample-num-steps", "2"))
    ckpt = load_checkpoint(os.path.join(tmp_path, "tiny", "checkpoints", "last.pt"))
    assert ckpt["model_args"]["encoder_depth"] == 3 and ckpt["config"]["encoder_depth"] == 3
    assert ckpt["config"]["encoder_depth_source"] == "auto: warmup_layers 1 + warmup_depth 2"


def test_the_release_preset_runs_both_phases_at_tiny_size(demo_data, tmp_path):
    """configs/table1_2_sit_xl2_erw_release.yaml with only size and data overridden (SiT-Tiny/2 has 4 blocks: the
    preset's warmup depth 4 fits, its projection depth 14 does not): Phase 1 without RoPE, Phase 2 adds it over the
    warmed blocks on purpose, says so in the log and records it in config.yaml."""
    preset = os.path.join(ROOT, "configs", "table1_2_sit_xl2_erw_release.yaml")
    tiny = ["--config", preset, "--data-dir", str(demo_data), "--output-dir", str(tmp_path), "--model", "SiT-Tiny/2",
            "--resolution", "64", "--num-classes", "10", "--batch-size", "8", "--max-train-steps", "2",
            "--mixed-precision", "no", "--num-workers", "0", "--report-to", "none", "--enc-type", "random-vit-tiny"]
    train_warmup.main(tiny)
    phase1 = os.path.join(tmp_path, "sit-xl2-erw-release-warmup", "checkpoints", "last.pt")
    args = torch.load(phase1, weights_only=True)["model_args"]
    assert args["built_depth"] == 4 and args["use_rope"] is False
    result = train.main([*tiny, "--warmup-ckpt", phase1, "--encoder-depth", "3", "--vae",
                         os.path.join(str(demo_data), "vae"), "--sample-grid-every", "1000", "--sample-num-steps", "2"])
    assert result["model"].feat_rope is not None and result["history"][-1]["lambda_used"] > 0
    run = os.path.join(tmp_path, "sit-xl2-erw-release")
    with open(os.path.join(run, "config.yaml")) as f:
        recorded = yaml.safe_load(f)
    assert recorded["add_rope_after_warmup"] is True and recorded["use_rope"] is True
    with open(os.path.join(run, "log.txt")) as f:
        assert "RoPE added over the warmed blocks, which were trained without it" in f.read()


@pytest.mark.parametrize("config,extra", [
    ("table4_sit_b2_repa.yaml", []),
    ("sit_b2_sit.yaml", []),
    ("table1_2_sit_xl2_erw.yaml", ["--warmup-ckpt", "none", "--encoder-depth", "3"]),
])
def test_paper_configs_run_at_tiny_size(demo_data, tmp_path, config, extra):
    """Each paper config with only the size/data keys overridden: the baseline logic itself is exercised."""
    overrides = ["--config", os.path.join(ROOT, "configs", config), "--data-dir", str(demo_data),
                 "--output-dir", str(tmp_path), "--model", "SiT-Tiny/2", "--resolution", "64", "--num-classes", "10",
                 "--batch-size", "8", "--max-train-steps", "2", "--mixed-precision", "no", "--num-workers", "0",
                 "--report-to", "none", "--vae", os.path.join(str(demo_data), "vae"), "--sample-grid-every", "1000",
                 "--sample-num-steps", "2", "--encoder-depth", "2",
                 "--enc-type", "none" if "sit.yaml" in config else "random-vit-tiny", *extra]
    result = train.main(overrides)
    model = result["model"]
    if config == "sit_b2_sit.yaml":
        assert len(model.projectors) == 0 and "align_loss" not in result["history"][-1]
    else:
        assert len(model.projectors) == 1 and "align_loss" in result["history"][-1]
    if config == "table4_sit_b2_repa.yaml":
        assert all(r["lambda_used"] == 0.5 for r in result["history"])


def test_phase2_resume_continues_exactly(demo_data, phase1, tmp_path):
    common = ["--log-every", "1", "--checkpointing-steps", "3", "--sample-grid-every", "1000",
              "--sample-num-steps", "2"]
    train.main(phase2_args(demo_data, tmp_path, phase1, "--exp-name", "straight", "--max-train-steps", "6", *common))
    train.main(phase2_args(demo_data, tmp_path, phase1, "--exp-name", "halves", "--max-train-steps", "3", *common))
    train.main(phase2_args(demo_data, tmp_path, phase1, "--exp-name", "halves", "--max-train-steps", "6", "--resume",
                           *common))
    straight = load_checkpoint(os.path.join(tmp_path, "straight", "checkpoints", "last.pt"))
    resumed = load_checkpoint(os.path.join(tmp_path, "halves", "checkpoints", "last.pt"))
    for key in ("model", "ema", "opt"):
        _state_equal(straight[key], resumed[key], key)


def test_a_resume_with_a_vae_it_cannot_load_is_refused_before_it_trains(demo_data, tmp_path):
    """The sample grid's VAE is loaded when the run starts, not at the first grid after the resume (hours later
    with --sample-grid-every 10000): the run is refused with --vae named, before a step or a checkpoint."""
    args = tiny_args(demo_data, tmp_path, "--warmup-ckpt", "none", "--vae", os.path.join(str(demo_data), "vae"),
                     "--checkpointing-steps", "1", "--sample-grid-every", "1000", "--sample-num-steps", "2")
    train.main([*args, "--max-train-steps", "2"])
    with pytest.raises(FileNotFoundError, match="--vae: cannot load VAE 'no-such/vae'"):
        train.main([*args, "--max-train-steps", "4", "--resume", "--vae", "no-such/vae"])
    assert sorted(os.listdir(os.path.join(tmp_path, "tiny", "checkpoints"))) == ["0000001.pt", "0000002.pt", "last.pt"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(demo_data, phase1, tmp_path, monkeypatch):
    class NaNAtStep4(Objective):
        def __call__(self, model, latents, labels, teacher_tokens, step, rng=None):
            loss, logs = super().__call__(model, latents, labels, teacher_tokens, step, rng)
            return (loss * float("nan") if step == 4 else loss), logs

    monkeypatch.setattr(train, "Objective", NaNAtStep4)
    # Objective's step 4 is the 5th update: the log calls it step 5 (its record would be at step 5). The loss is
    # checked on the device and read before the next checkpoint (step 6), which is then not written.
    last_good = os.path.join(tmp_path, "tiny", "checkpoints", "0000004.pt")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 5 \(found at step 6") as error:
        train.main(phase2_args(demo_data, tmp_path, phase1, "--max-train-steps", "10", "--checkpointing-steps", "2",
                               "--sample-grid-every", "1000", "--sample-num-steps", "2"))
    assert str(error.value).endswith(f"The last good checkpoint is {last_good}")
    with open(os.path.join(tmp_path, "tiny", "log.txt")) as f:
        assert f"ERROR: non-finite loss at step 5 (found at step 6; its update was skipped); the step's 32 items " \
               "(listed in the log) hold finite values: the training diverged, not the data; stopping. The last " \
               f"good checkpoint is {last_good}" in f.read()
    last = load_checkpoint(os.path.join(tmp_path, "tiny", "checkpoints", "last.pt"))
    assert last["step"] == 4 and all(torch.isfinite(v).all() for v in last["model"].values())


def torchrun_train(*args):
    # accelerate's own launcher needs MPI for several CPU processes; torchrun + gloo is what runs here.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_phase2_on_two_processes_and_resumed_across_process_counts_trains_what_one_process_trains(
        demo_data, phase1, tmp_path):
    """Warm-started Phase 2 (velocity + NT-Xent with negatives gathered over processes) at global batch 16: one
    process for 4 steps; two processes for 2 steps resumed on one; one process for 2 steps resumed on two. All three
    see the same data stream and the same draws, so they train the same weights up to float32 summation order."""
    common = ["--batch-size", "16", "--log-every", "1", "--checkpointing-steps", "2", "--sample-grid-every", "1000",
              "--sample-num-steps", "2"]
    runs = {name: phase2_args(demo_data, tmp_path, phase1, "--exp-name", name, *common)
            for name in ("one", "two-then-one", "one-then-two")}
    single = train.main([*runs["one"], "--max-train-steps", "4"])
    torchrun_train(*runs["two-then-one"], "--max-train-steps", "2")
    shutil.copytree(os.path.join(tmp_path, "two-then-one"), os.path.join(tmp_path, "two-then-one-by-8"))
    train.main([*runs["two-then-one"], "--max-train-steps", "4", "--resume"])
    train.main([*runs["one-then-two"], "--max-train-steps", "2"])
    torchrun_train(*runs["one-then-two"], "--max-train-steps", "4", "--resume")

    reference = load_checkpoint(os.path.join(tmp_path, "one", "checkpoints", "last.pt"))
    losses = [r["loss"] for r in single["history"]]
    for name in ("two-then-one", "one-then-two"):
        with open(os.path.join(tmp_path, name, "log.txt")) as f:
            log = f.read()
        assert "2 processes x 8" in log and "1 processes x 16" in log, name
        ckpt = load_checkpoint(os.path.join(tmp_path, name, "checkpoints", "last.pt"))
        assert ckpt["step"] == 4
        position = ckpt["data_position"]
        assert position["micro_batch"] * position["world_size"] * position["local_batch_size"] == 64, name
        with open(os.path.join(tmp_path, name, "metrics.jsonl")) as f:
            logged = [json.loads(line)["loss"] for line in f]
        # As in the Phase-1 test (tests/test_training_paths.py): the losses agree to float32 summation order (rel
        # 1e-5, ~80 eps; another draw or another image moves them by ~1e-2), and the weights after 3 updates to 1e-4
        # absolute (AdamW's first update ~lr x sign(g) for rounding-level gradients; another draw moves every weight
        # by ~lr = 1e-3 per step).
        assert logged == pytest.approx(losses, rel=1e-5), name
        for key in ("model", "ema"):
            for weight, value in reference[key].items():
                torch.testing.assert_close(ckpt[key][weight], value, rtol=0, atol=1e-4, msg=f"{name} {key}.{weight}")
    # Another process count and another global batch at once: the stream goes on after the 2 x 16 = 32 items the
    # two processes consumed, in micro-batches of 8 from then on.
    train.main([*phase2_args(demo_data, tmp_path, phase1, "--exp-name", "two-then-one-by-8", *common),
                "--batch-size", "8", "--resume-override", "batch_size", "--max-train-steps", "3", "--resume"])
    position = load_checkpoint(os.path.join(tmp_path, "two-then-one-by-8", "checkpoints", "last.pt"))["data_position"]
    assert (position["micro_batch"], position["world_size"], position["local_batch_size"]) == (32 // 8 + 1, 1, 8)
