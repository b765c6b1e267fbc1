"""sample_ddp.py end to end on the CPU with a tiny SiT and the tiny random VAE: the .npz does not depend on the
batch size or the number of processes (byte for byte), an interrupted run resumes to the same file, and
checkpoints of both layouts load strictly."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import erw.sampling
import sample_ddp
from erw.checkpoint import save_checkpoint
from erw.sampling import all_labels, load_sampling_model
from models.sit import create_sit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ARGS = dict(model="SiT-Tiny/2", input_size=8, num_classes=10, encoder_depth=1, z_dims=[32], qk_norm=False,
                  use_rope=False, truncated=False, class_dropout_prob=0.1, in_channels=4)
NUM_SAMPLES = 7
# SDE with the CFG interval active for part of the steps, so both model batch shapes occur.
RUN_FLAGS = ["--num-fid-samples", str(NUM_SAMPLES), "--num-steps", "6", "--cfg-scale", "1.5", "--guidance-high", "0.7",
             "--vae", "random-tiny", "--device", "cpu"]


@pytest.fixture(scope="module", autouse=True)
def restore_tf32_switches():
    """--precision sets torch's global TF32 switches; put them back for the tests that follow."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _random_state_dict(model, seed):
    # A fresh SiT outputs exactly zero (adaLN-Zero); perturb every weight so the samples depend on the model.
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = create_sit(**MODEL_ARGS)
    weights = {"model": _random_state_dict(model, 1), "ema": _random_state_dict(model, 2)}
    ours = str(root / "0000010.pt")
    save_checkpoint({**weights, "opt": {}, "step": 10, "config": {"path_type": "linear", "vae": "random-tiny"},
                     "model_args": MODEL_ARGS}, ours)
    repa = str(root / "repa.pt")
    # REPA's train.py layout, including its pickled argparse.Namespace.
    torch.save({**weights, "opt": {}, "args": argparse.Namespace(model="SiT-Tiny/2", encoder_depth=1)}, repa)
    warmup = str(root / "warmup.pt")
    truncated = create_sit(**{**MODEL_ARGS, "truncated": True})
    save_checkpoint({"model": truncated.state_dict(), "ema": truncated.state_dict(),
                     "model_args": {**MODEL_ARGS, "truncated": True}}, warmup)
    return {"ours": ours, "repa": repa, "warmup": warmup, "weights": weights}


def _run(ckpt, sample_dir, *flags):
    return sample_ddp.main(["--ckpt", ckpt, "--sample-dir", str(sample_dir), *RUN_FLAGS, *flags])


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    """One uninterrupted single-process run at batch size 3: (npz path, its bytes)."""
    npz = _run(checkpoints["ours"], tmp_path_factory.mktemp("reference"), "--per-proc-batch-size", "3")
    with open(npz, "rb") as f:
        return npz, f.read()


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_npz_layout_labels_and_settings(reference):
    npz, _ = reference
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 64, 64, 3)
    assert images.std() > 1.0  # real decoded content, not a constant image
    np.testing.assert_array_equal(labels, all_labels(0, NUM_SAMPLES, 10, "random"))
    folder = npz[: -len(".npz")]
    for i in (0, NUM_SAMPLES - 1):
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))), images[i])
    assert os.path.isfile(folder + ".json")


def test_batch_size_does_not_change_the_npz(checkpoints, reference, tmp_path):
    npz = _run(checkpoints["ours"], tmp_path, "--per-proc-batch-size", "5")
    assert _read(npz) == reference[1]


def test_two_processes_give_the_same_npz(checkpoints, reference, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "sample_ddp.py"), "--ckpt", checkpoints["ours"], "--sample-dir", str(tmp_path),
               *RUN_FLAGS, "--per-proc-batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    npz = os.path.join(tmp_path, os.path.basename(reference[0]))
    assert _read(npz) == reference[1]


def test_interrupted_run_resumes_to_the_same_npz(checkpoints, reference, tmp_path, monkeypatch):
    real_save = erw.sampling.save_png
    saved = []

    def crash_after_four(image, path):
        if len(saved) == 4:
            raise KeyboardInterrupt("simulated interruption")
        real_save(image, path)
        saved.append(path)

    monkeypatch.setattr(erw.sampling, "save_png", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoints["ours"], tmp_path, "--per-proc-batch-size", "3")
    npz = os.path.join(tmp_path, os.path.basename(reference[0]))
    assert not os.path.exists(npz)
    folder = npz[: -len(".npz")]
    with open(os.path.join(folder, ".tmp-left-by-a-crash.png"), "wb") as f:
        f.write(b"partial")

    made = []
    monkeypatch.setattr(erw.sampling, "save_png", lambda image, path: (made.append(path), real_save(image, path)))
    _run(checkpoints["ours"], tmp_path, "--per-proc-batch-size", "3")
    assert sorted(os.path.basename(p) for p in made) == [f"{i:06d}.png" for i in range(4, NUM_SAMPLES)]
    assert _read(npz) == reference[1]
    assert not any(name.startswith(".tmp-") for name in os.listdir(folder))


def test_resume_with_other_settings_is_refused(checkpoints, reference, tmp_path):
    _run(checkpoints["ours"], tmp_path, "--num-fid-samples", "1")
    with pytest.raises(RuntimeError,
                       match="was sampled with other settings.*label_mode: .random. before, .balanced. now"):
        _run(checkpoints["ours"], tmp_path, "--num-fid-samples", "1", "--label-mode", "balanced")


def test_ode_heun_bf16_balanced_run(checkpoints, tmp_path):
    npz = sample_ddp.main(["--ckpt", checkpoints["ours"], "--sample-dir", str(tmp_path), "--vae", "random-tiny",
                           "--device", "cpu",
                           "--mode", "ode", "--heun", "--num-steps", "3", "--precision", "bf16", "--label-mode",
                           "balanced", "--num-fid-samples", "3", "--weights", "model"])
    with np.load(npz) as data:
        assert data["arr_0"].shape == (3, 64, 64, 3)
        np.testing.assert_array_equal(data["arr_1"], [0, 1, 2])


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_our_checkpoint_loads_the_chosen_weights(checkpoints, weights):
    model, info = load_sampling_model(checkpoints["ours"], weights)
    assert info["format"] == "erw" and info["path_type"] == "linear" and info["vae"] == "random-tiny"
    for key, value in checkpoints["weights"][weights].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_repa_checkpoint_loads_strictly_from_repa_flags(checkpoints):
    flags = {"model": "SiT-Tiny/2", "resolution": 64, "num_classes": 10, "encoder_depth": 1,
             "projector_embed_dims": "32", "qk_norm": False}
    model, info = load_sampling_model(checkpoints["repa"], "ema", flags)
    assert info["format"] == "repa" and info["model_args"]["input_size"] == 8
    for key, value in checkpoints["weights"]["ema"].items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"shape mismatches.*projectors\.0\.4\.weight"):
        load_sampling_model(checkpoints["repa"], "ema", {**flags, "projector_embed_dims": "48"})


def test_bad_checkpoints_and_flags_are_named(checkpoints):
    with pytest.raises(ValueError, match="model flags disagree.*model: flag gives 'SiT-S/2'"):
        load_sampling_model(checkpoints["ours"], "ema", {"model": "SiT-S/2"})
    with pytest.raises(ValueError, match="Phase-1 \\(warmup\\) checkpoint"):
        load_sampling_model(checkpoints["warmup"], "ema")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_sampling_model(checkpoints["ours"] + ".missing", "ema")
