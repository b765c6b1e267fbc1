"""sample_ddp.py end to end on the CPU with a tiny SiT and the tiny random VAE: with --bitwise the .npz does not depend
on the batch size or the number of processes (byte for byte), an interrupted run resumes to the same file, a sample
folder belongs to the weights that made it (never to a checkpoint path), and checkpoints of both layouts load
strictly."""
import argparse
import json
import os
import re
import subprocess
import sys
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import sample_ddp
from models.weights import weights_sha256
from operations.checkpoint import load_model, save_checkpoint
from operations.cli import InvalidInput
from erw.generation import all_labels
from models.sit import create_sit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ARGS = dict(model="SiT-Tiny/2", input_size=8, num_classes=10, encoder_depth=1, z_dims=[32], qk_norm=False,
                  use_rope=False, built_depth=None, cfg_prob=0.1, in_channels=4)
NUM_SAMPLES = 7
# SDE with the CFG interval active for part of the steps, so both model batch shapes occur.
RUN_FLAGS = ["--num-fid-samples", str(NUM_SAMPLES), "--num-steps", "6", "--cfg-scale", "1.5", "--guidance-high", "0.7",
             "--vae", "random-tiny", "--device", "cpu", "--bitwise"]
REPA_FLAGS = {"model": "SiT-Tiny/2", "resolution": 64, "num_classes": 10, "encoder_depth": 1,
              "projector_embed_dims": "32", "qk_norm": False}


@pytest.fixture(scope="module", autouse=True)
def restore_tf32_switches():
    """--precision sets torch's global TF32 switches; put them back for the tests that follow."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def _random_state_dict(model, seed):
    # A fresh SiT outputs exactly zero (adaLN-Zero); perturb every weight so the samples depend on the model.
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}


def _save_ours(path, weights, step):
    """Our checkpoint layout."""
    ckpt = {**weights, "opt": {}, "step": step, "config": {"path_type": "linear", "vae": "random-tiny"},
            "model_args": MODEL_ARGS}
    save_checkpoint(ckpt, str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = create_sit(**MODEL_ARGS)
    weights = {"model": _random_state_dict(model, 1), "ema": _random_state_dict(model, 2)}
    ours = _save_ours(root / "0000010.pt", weights, 10)
    repa = str(root / "repa.pt")
    # REPA's train.py layout, including its pickled argparse.Namespace.
    torch.save({**weights, "opt": {}, "args": argparse.Namespace(model="SiT-Tiny/2", encoder_depth=1)}, repa)
    warmup = str(root / "warmup.pt")
    truncated = create_sit(**{**MODEL_ARGS, "built_depth": 1})
    save_checkpoint({"model": truncated.state_dict(), "ema": truncated.state_dict(),
                     "model_args": {**MODEL_ARGS, "built_depth": 1}}, warmup)
    other_weights = {"model": _random_state_dict(model, 3), "ema": _random_state_dict(model, 4)}
    return {"ours": ours, "repa": repa, "warmup": warmup, "weights": weights, "other_weights": other_weights}


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


def _interrupted_run(monkeypatch, ckpt, sample_dir, after, *flags):
    """Run until `after` PNGs are saved, then stop as Ctrl-C would. Returns the saved PNGs' paths."""
    real_save = sample_ddp.save_png
    saved = []

    def crash(image, path):
        if len(saved) == after:
            raise KeyboardInterrupt("simulated interruption")
        real_save(image, path)
        saved.append(path)

    with monkeypatch.context() as m:
        m.setattr(sample_ddp, "save_png", crash)
        with pytest.raises(KeyboardInterrupt):
            _run(ckpt, sample_dir, *flags)
    return saved


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
    # Byte equality is sound on any one CPU: --bitwise runs the model and the VAE one sample at a time on one
    # thread, so every float32 kernel sees the same shapes whatever the batch size or
    # process count; the float64 sampler state only goes through elementwise + - * / (correctly rounded in any
    # vector width) and per-sample generators. A float32 op on batch-shaped tensors would break this.
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


def test_interrupted_run_resumes_to_the_same_npz(checkpoints, reference, tmp_path, monkeypatch, capsys):
    _interrupted_run(monkeypatch, checkpoints["ours"], tmp_path, 4, "--per-proc-batch-size", "3")
    npz = os.path.join(tmp_path, os.path.basename(reference[0]))
    assert not os.path.exists(npz)
    folder = npz[: -len(".npz")]
    run = os.path.basename(folder)
    # What atomic_write leaves when a run dies mid-write (`.<final name>.<8 random characters>.tmp`): a PNG, the
    # .npz being assembled, the settings .json. Another job's .npz temp in the shared --sample-dir may be in use.
    stale = [os.path.join(folder, ".000005.png.k3x9q2ab.tmp"), os.path.join(tmp_path, f".{run}.npz.0a1b2c3d.tmp"),
             os.path.join(tmp_path, f".{run}.json.x_y1z2w3.tmp")]
    other_job = os.path.join(tmp_path, ".another-run.npz.0a1b2c3d.tmp")
    for path in stale + [other_job]:
        with open(path, "wb") as f:
            f.write(b"partial")

    real_save = sample_ddp.save_png
    made = []
    monkeypatch.setattr(sample_ddp, "save_png", lambda image, path: (made.append(path), real_save(image, path)))
    capsys.readouterr()
    _run(checkpoints["ours"], tmp_path, "--per-proc-batch-size", "3")
    assert sorted(os.path.basename(p) for p in made) == [f"{i:06d}.png" for i in range(4, NUM_SAMPLES)]
    assert _read(npz) == reference[1]
    assert [p for p in stale if os.path.exists(p)] == [] and os.path.exists(other_job)
    assert "removed 3 temp files" in capsys.readouterr().out


def test_rerun_after_last_pt_moved_on_never_mixes_two_models(checkpoints, tmp_path, monkeypatch):
    # Issue 12: an interrupted run from last.pt is rerun after training replaced last.pt with a newer checkpoint.
    last = os.path.join(tmp_path, "checkpoints", "last.pt")
    _save_ours(last, checkpoints["weights"], 4)
    saved = _interrupted_run(monkeypatch, last, tmp_path / "samples", 4, "--per-proc-batch-size", "3")
    old_folder = os.path.dirname(saved[0])
    _save_ours(last, checkpoints["other_weights"], 8)
    npz = _run(last, tmp_path / "samples", "--per-proc-batch-size", "3")

    fresh = _run(_save_ours(tmp_path / "elsewhere" / "0000008.pt", checkpoints["other_weights"], 8),
                 tmp_path / "fresh")
    assert _read(npz) == _read(fresh)  # every row from the new weights
    new_hash = sha256_of(checkpoints["other_weights"]["ema"])
    assert npz[: -len(".npz")] != old_folder and f"-step0000008-{new_hash[:8]}-ema-" in os.path.basename(npz)
    # The old run is left as it was (its released lock file aside).
    assert sorted(set(os.listdir(old_folder)) - {"run.lock"}) == [f"{i:06d}.png" for i in range(4)]


def test_the_same_weights_under_another_name_resume_the_same_folder(checkpoints, reference, tmp_path,
                                                                     monkeypatch):
    # last.pt is a hard link to the newest numbered checkpoint: sampling either one samples the same weights.
    _interrupted_run(monkeypatch, checkpoints["ours"], tmp_path, 4, "--per-proc-batch-size", "3")
    last = os.path.join(tmp_path, "checkpoints", "last.pt")
    os.makedirs(os.path.dirname(last))
    os.link(checkpoints["ours"], last)
    real_save = sample_ddp.save_png
    made = []
    monkeypatch.setattr(sample_ddp, "save_png", lambda image, path: (made.append(path), real_save(image, path)))
    npz = _run(last, tmp_path, "--per-proc-batch-size", "3")
    assert sorted(os.path.basename(p) for p in made) == [f"{i:06d}.png" for i in range(4, NUM_SAMPLES)]
    assert os.path.basename(npz) == os.path.basename(reference[0]) and _read(npz) == reference[1]


def test_a_checkpoint_without_id_is_known_by_its_weights(checkpoints, tmp_path):
    # Overwriting a checkpoint in place (same path, same step) with other weights must not extend the folder of the
    # old weights.
    ckpt = _save_ours(tmp_path / "old.pt", checkpoints["weights"], 10)
    first = _run(ckpt, tmp_path / "samples", "--num-fid-samples", "2")
    _save_ours(ckpt, checkpoints["other_weights"], 10)
    npz = _run(ckpt, tmp_path / "samples", "--num-fid-samples", "3")
    fresh = _run(_save_ours(tmp_path / "copy.pt", checkpoints["other_weights"], 10), tmp_path / "fresh",
                 "--num-fid-samples", "3")
    assert npz != first
    assert os.path.basename(npz) == os.path.basename(fresh) and _read(npz) == _read(fresh)


def sha256_of(state_dict):
    """The weights' identity, written from its definition: every tensor in sorted key order, its name, dtype, shape
    and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_the_weights_hash_is_of_the_weights_alone(checkpoints, tmp_path):
    ema, model = checkpoints["weights"]["ema"], checkpoints["weights"]["model"]
    assert weights_sha256(ema) == sha256_of(ema) != weights_sha256(model)
    # Only the weights count: the same EMA weights loaded from REPA's layout (no step there) hash alike.
    loaded, _ = load_model(checkpoints["repa"], "ema", REPA_FLAGS)
    assert weights_sha256(loaded.state_dict()) == sha256_of(ema)
    changed = {k: v.clone() for k, v in ema.items()}
    key = sorted(changed)[0]
    changed[key].view(-1)[-1] = torch.nextafter(changed[key].view(-1)[-1], torch.tensor(float("inf")))  # one bit
    assert weights_sha256(changed) != sha256_of(ema)


def test_a_folder_is_never_extended_with_other_weights(checkpoints, tmp_path):
    # Two hashes alike in the 8 characters a folder name shows: the full hash in the settings decides.
    ckpt = _save_ours(tmp_path / "last.pt", checkpoints["weights"], 10)
    npz = _run(ckpt, tmp_path / "samples", "--num-fid-samples", "1")
    settings_path = npz[: -len(".npz")] + ".json"
    with open(settings_path) as f:
        settings = json.load(f)
    recorded = settings["weights_sha256"][:8] + "f" * 56
    with open(settings_path, "w") as f:
        json.dump({**settings, "weights_sha256": recorded}, f)
    now = sha256_of(checkpoints["weights"]["ema"])
    with pytest.raises(InvalidInput, match=f"weights_sha256: '{recorded}' before, '{now}' now"):
        _run(ckpt, tmp_path / "samples", "--num-fid-samples", "2")


def test_ranks_holding_different_weights_are_refused(checkpoints, tmp_path, monkeypatch):
    # last.pt can be replaced between two ranks' loads: stand in a second rank that read the newer file.
    monkeypatch.setattr(sample_ddp, "gather", lambda obj: [obj, "c" * 64])
    with pytest.raises(InvalidInput, match="processes loaded different weights.*numbered checkpoint"):
        _run(checkpoints["ours"], tmp_path / "samples")
    assert not os.path.exists(tmp_path / "samples")  # refused before anything was written


def test_resume_with_other_settings_is_refused(checkpoints, reference, tmp_path):
    _run(checkpoints["ours"], tmp_path, "--num-fid-samples", "1")
    with pytest.raises(InvalidInput,
                       match="was sampled with other weights or settings.*label_mode: .random. before, .balanced. now"):
        _run(checkpoints["ours"], tmp_path, "--num-fid-samples", "1", "--label-mode", "balanced")


def test_pixel_rounding_is_recorded_and_part_of_a_folders_identity(checkpoints, reference, tmp_path):
    # The default is REPA's truncation (the reference run); --pixel-rounding dit samples the same latents into
    # another folder, one level higher where DiT's rounding goes up: dit - repa is 0 or 1 on every pixel
    # (floor(127.5 (x + 1) + 0.5) against floor(127.5 (x + 1)), up to float32 rounding of either expression).
    npz = _run(checkpoints["ours"], tmp_path, "--pixel-rounding", "dit")
    assert os.path.basename(npz) != os.path.basename(reference[0]) and "-dit-pixels" in os.path.basename(npz)
    with np.load(npz) as dit, np.load(reference[0]) as repa:
        difference = dit["arr_0"].astype(int) - repa["arr_0"].astype(int)
    assert set(np.unique(difference)) == {0, 1} and 0.2 < difference.mean() < 0.8
    with open(reference[0][: -len(".npz")] + ".json") as f:
        assert json.load(f)["pixel_rounding"] == "repa"
    with open(npz[: -len(".npz")] + ".json") as f:
        assert json.load(f)["pixel_rounding"] == "dit"


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
    model, info = load_model(checkpoints["ours"], weights)
    assert info["format"] == "erw" and info["config"] == {"path_type": "linear", "vae": "random-tiny"}
    for key, value in checkpoints["weights"][weights].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_repa_checkpoint_loads_strictly_from_repa_flags(checkpoints):
    flags = REPA_FLAGS
    model, info = load_model(checkpoints["repa"], "ema", flags)
    assert info["format"] == "repa" and info["model_args"]["input_size"] == 8
    for key, value in checkpoints["weights"]["ema"].items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"shape mismatches.*projectors\.0\.4\.weight"):
        load_model(checkpoints["repa"], "ema", {**flags, "projector_embed_dims": "48"})


def test_bad_checkpoints_and_flags_are_named(checkpoints, tmp_path):
    with pytest.raises(InvalidInput, match="Phase-1 \\(warmup\\) checkpoint"):
        _run(checkpoints["warmup"], tmp_path / "samples")
    with pytest.raises(ValueError, match="model flags disagree.*model: flag gives 'SiT-S/2'"):
        load_model(checkpoints["ours"], "ema", {"model": "SiT-S/2"})
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(checkpoints["ours"] + ".missing", "ema")
    with pytest.raises(InvalidInput, match=r"is a folder; give a checkpoint file in it, e\.g\. .*last\.pt"):
        load_model(os.path.dirname(checkpoints["ours"]), "ema")


@pytest.mark.parametrize("flags, message", [
    (["--cfg-scale", "0.5"], r"argument --cfg-scale: 'cfg_scale' must be in \[1, inf\), got 0.5"),  # argparse's
    (["--cfg-scale", "2", "--guidance-low", "0.8", "--guidance-high", "0.2"], "--guidance-low <= --guidance-high"),
    (["--chunk-size", "-1"], r"argument --chunk-size: must be in \[0, inf\), got -1"),
    (["--global-seed", "-1"], r"argument --global-seed: must be in \[0, inf\), got -1"),
    (["--vae", "/no/such/vae"], "--vae: cannot load VAE '/no/such/vae'"),
])
def test_refused_settings_leave_nothing_behind(checkpoints, tmp_path, capsys, flags, message):
    """Checked before a folder is made (by argparse, before anything is read, or while loading, before the lock):
    no empty sample folder, no settings .json."""
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as refused:
        _run(checkpoints["ours"], tmp_path / "samples", *flags)
    out, err = capsys.readouterr()
    assert re.search(message, err if isinstance(refused.value, SystemExit) else str(refused.value))
    assert not os.path.exists(tmp_path / "samples")
    assert "already in" not in out


def test_a_second_sampler_into_a_live_runs_folder_is_refused_naming_it(checkpoints, reference, tmp_path,
                                                                        monkeypatch):
    """While one run fills a sample folder, a second process asked for the same folder exits 2 at once, naming the
    first (host and PID); it removes none of the first's files; the first then finishes the same .npz as ever."""
    real_save, second = sample_ddp.save_png, []

    def save_then_start_a_second_run(image, path):
        real_save(image, path)
        if not second:  # the first run holds the folder now
            planted = os.path.join(os.path.dirname(path), ".000099.png.abcd1234.tmp")
            open(planted, "w").close()  # looks like a killed run's temp; here it could be the live run's
            second.append(subprocess.run(
                [sys.executable, os.path.join(ROOT, "sample_ddp.py"), "--ckpt", checkpoints["ours"],
                 "--sample-dir", str(tmp_path), *RUN_FLAGS, "--per-proc-batch-size", "3"],
                cwd=ROOT, capture_output=True, text=True, timeout=300))
            second.append(os.path.exists(planted))
            os.remove(planted)

    monkeypatch.setattr(sample_ddp, "save_png", save_then_start_a_second_run)
    npz = _run(checkpoints["ours"], tmp_path, "--per-proc-batch-size", "3")
    result, temp_kept = second
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is in use by another run" in result.stderr and f"PID {os.getpid()}," in result.stderr
    assert temp_kept
    assert _read(npz) == reference[1]
    with open(os.path.join(npz[:-len(".npz")], "run.lock")) as f:
        assert f.read() == ""  # released: the next run finds no holder
