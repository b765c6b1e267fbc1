"""In-training FID (train.py --fid-every): records at the right steps, equal to sample_ddp.py + the evaluator on the
checkpoint of that step, with one process and with two.

The Inception network is the evaluator's stub (tests/stub_inception.py: 6 live feature dimensions, so scipy's sqrtm
takes no time); --inception-weights random still goes through the flags. What is compared is everything around the
network: the generation (seeds, sharding over processes, sampler, VAE, pixels), the gathering and ordering of the
outputs, the reference statistics and their cache, and the metric functions.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample_ddp
import train
from erw.data import ImageLatentDataset
from erw.precision import cpu_threads
from erw.samplers import GuidedVelocity
from evaluations import evaluator
from evaluations.evaluator import default_cache_dir, evaluate
from tests import stub_inception
from tests.test_evaluator import (EPS32, STUB_DIMS, StubInception, fid_reference, fid_tolerance,
                                  inception_score_reference)
from tests.conftest import ROOT, tiny_args
from tests.dist_utils import free_port

NUM_SAMPLES, NUM_STEPS = 6, 4
# The CFG interval covers part of the SDE steps, so both model batch shapes occur.
FID_FLAGS = ["--fid-num-samples", str(NUM_SAMPLES), "--fid-num-steps", str(NUM_STEPS), "--inception-weights",
             "random", "--cfg-scale", "1.5", "--guidance-high", "0.7", "--fid-bitwise"]


@pytest.fixture
def fid_setup(demo_data, tmp_path, monkeypatch):
    """A 16-image reference batch from the demo data, the evaluator's cache in tmp_path, the stub network."""
    dataset = ImageLatentDataset(str(demo_data))
    images = np.stack([dataset[i][0].permute(1, 2, 0).numpy() for i in range(0, len(dataset), 10)])
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, images)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stub_inception.install(monkeypatch)
    return ref


def train_args(demo_data, out, ref, *extra):
    # No warm start: the FID does not care where the weights came from, and Phase 1 would only cost time.
    return tiny_args(demo_data, out, "--warmup-ckpt", "none", "--vae", os.path.join(str(demo_data), "vae"),
                     "--sample-grid-every", "1000", "--sample-num-steps", "2", "--fid-ref", ref, *FID_FLAGS, *extra)


def fid_records(exp_dir):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "fid" in r]


def standalone(ckpt, demo_data, ref, sample_dir, seed=0, guidance=("--cfg-scale", "1.5", "--guidance-high", "0.7"),
               **evaluate_kwargs):
    """sample_ddp.py on the checkpoint with the settings the run's FID used, then the evaluator on its .npz."""
    npz = sample_ddp.main(["--ckpt", ckpt, "--sample-dir", str(sample_dir), "--global-seed", str(seed),
                           "--num-fid-samples", str(NUM_SAMPLES), "--num-steps", str(NUM_STEPS), "--mode", "sde",
                           *guidance, "--vae", os.path.join(str(demo_data), "vae"), "--device", "cpu", "--bitwise"])
    with cpu_threads(1):  # as the in-training FID runs on the CPU
        return evaluate(ref, npz, inception_weights="random", device="cpu", batch_size=1,
                        is_split_size=NUM_SAMPLES, cache_dir=default_cache_dir(), progress=False, log=None,
                        **evaluate_kwargs)


def assert_same_metrics(record, results):
    # Exact: the same images (bitwise mode, one sample per network call on one thread: independent of batch and
    # process count, erw/generation.py), the same network outputs in the same sample order, the same numpy calls.
    assert (record["fid"], record["sfid"], record["inception_score"]) == \
        (results["fid"], results["sfid"], results["inception_score"])
    assert results["settings"]["activation_cache"] == "hit"  # the reference statistics the run computed and cached


def record_sample_features(monkeypatch):
    """The Inception outputs the in-training FID computes for its samples (the calls that ask for probabilities)."""
    seen = []
    real = evaluator.inception_features

    def recording(model, images, device, with_probs):
        out = real(model, images, device, with_probs)
        if with_probs:
            seen.append(out)
        return out

    monkeypatch.setattr(evaluator, "inception_features", recording)
    return seen


def assert_metrics_recomputed(record, samples, reference):
    """FID, sFID and IS of a record against numpy/scipy formulas of tests/test_evaluator.py (eigendecompositions, a
    plain KL loop) on the features themselves, mean and covariance in float64."""
    assert record["inception_score"] == pytest.approx(inception_score_reference(samples["probs"], NUM_SAMPLES),
                                                      rel=1e-5)  # float32 IS, as test_evaluator's bound
    for key, name in (("fid", "pool"), ("sfid", "spatial")):
        a, b = (np.asarray(f[name][:, :STUB_DIMS], np.float64) for f in (samples, reference))
        mu1, mu2 = a.mean(0), b.mean(0)
        expected = fid_reference(mu1, np.cov(a, rowvar=False), mu2, np.cov(b, rowvar=False))
        # ADM's float32 means are each within n eps32 max|x| of these (any summation order); through |mu1 - mu2|^2
        # that moves the FID by <= 2 |mu1 - mu2| sqrt(d) of it; plus the float32 difference (fid_tolerance).
        mean_error = (len(a) + len(b)) * EPS32 * max(np.abs(a).max(), np.abs(b).max())
        tol = fid_tolerance(mu1, mu2, expected) + 2 * np.linalg.norm(mu1 - mu2) * np.sqrt(STUB_DIMS) * mean_error
        assert record[key] == pytest.approx(expected, rel=0, abs=tol), key


def test_fid_records_at_every_nth_step_and_the_end_equal_the_standalone_pipeline(demo_data, fid_setup, tmp_path,
                                                                                    capsys, monkeypatch):
    features = record_sample_features(monkeypatch)
    train.main(train_args(demo_data, tmp_path, fid_setup, "--max-train-steps", "5", "--fid-every", "2",
                          "--checkpointing-steps", "2", "--batch-size", "8"))
    exp_dir = os.path.join(tmp_path, "tiny")
    records = fid_records(exp_dir)
    # The numbers from the features the run computed, by formulas of their own: the records' samples in step order.
    samples = {name: np.concatenate([f[name] for f in features]) for name in ("pool", "spatial", "probs")}
    assert len(samples["probs"]) == NUM_SAMPLES * len(records)
    with np.load(fid_setup) as ref:
        reference_images = torch.from_numpy(ref["arr_0"]).permute(0, 3, 1, 2)
    reference = {name: getattr(StubInception()(reference_images), name).numpy() for name in ("pool", "spatial")}
    for i, record in enumerate(records):
        assert_metrics_recomputed(record, {k: v[i * NUM_SAMPLES:(i + 1) * NUM_SAMPLES] for k, v in samples.items()},
                                  reference)
    print("\n".join(json.dumps(r) for r in records), file=sys.__stdout__)  # the FID-vs-step records, as logged
    assert [r["step"] for r in records] == [2, 4, 5]  # every 2nd step and the last; never step 0
    assert all(r["fid_num_samples"] == NUM_SAMPLES and r["fid_num_steps"] == NUM_STEPS for r in records)
    assert len({r["fid"] for r in records}) == 3 and all(r["fid"] > 0 for r in records)  # each step's own weights
    for record in records:
        ckpt = os.path.join(exp_dir, "checkpoints", f"{record['step']:07d}.pt")
        assert_same_metrics(record, standalone(ckpt, demo_data, fid_setup, tmp_path / f"samples-{record['step']}"))
    with open(os.path.join(exp_dir, "log.txt")) as f:
        log = f.read()
    assert "In-training FID every 2 steps and at step 5" in log and "step 4: FID " in log
    assert "RANDOM Inception weights: meaningless" in log


def test_the_runs_seed_no_guidance_by_default_and_the_reference_files_own_statistics(demo_data, fid_setup, tmp_path,
                                                                                        monkeypatch):
    """ADM's reference batches carry mu/sigma/mu_s/sigma_s: those are the reference, not its images' statistics
    (here scaled by 1.5 so that the two differ). The samples use the run's --seed, and no guidance unless asked."""
    with np.load(fid_setup) as ref:
        images = ref["arr_0"]
    feats = StubInception()(torch.from_numpy(images).permute(0, 3, 1, 2))
    stats = {}
    for (mu_key, sigma_key), name in ((("mu", "sigma"), "pool"), (("mu_s", "sigma_s"), "spatial")):
        f = getattr(feats, name).numpy().astype(np.float64)
        stats[mu_key], stats[sigma_key] = (1.5 * f.mean(0)).astype(np.float32), 1.5 * np.cov(f, rowvar=False)
    with_stats = str(tmp_path / "ref-with-stats.npz")
    np.savez(with_stats, images, **stats)
    features = record_sample_features(monkeypatch)
    # After one step the zero-initialised adaLN and final layers barely separate the classes, so guided and unguided
    # samples round to the same pixels: whether the FID's sampler guides is seen in the labels the model is given.
    model_labels = []
    real_velocity = GuidedVelocity._model_velocity

    def recording(self, x, t, y):
        model_labels.append((y.clone(), self.model.num_classes))
        return real_velocity(self, x, t, y)

    monkeypatch.setattr(GuidedVelocity, "_model_velocity", recording)
    flags = ["--fid-num-samples", str(NUM_SAMPLES), "--fid-num-steps", str(NUM_STEPS), "--inception-weights", "random",
             "--fid-bitwise"]
    train.main(tiny_args(demo_data, tmp_path, "--warmup-ckpt", "none", "--vae", os.path.join(str(demo_data), "vae"),
                         "--sample-grid-every", "1000", "--sample-num-steps", "2", "--fid-ref", with_stats, *flags,
                         "--max-train-steps", "1", "--fid-every", "1", "--batch-size", "8", "--seed", "3"))
    (record,) = fid_records(os.path.join(tmp_path, "tiny"))
    # The sample grids (2 ODE steps) call the model too; the FID's SDE makes NUM_STEPS calls per batch.
    assert len(model_labels) >= NUM_STEPS and all(bool((y < n).all()) for y, n in model_labels), \
        "the in-training FID asked the model for the null class (guided) although --cfg-scale is 1"
    samples = {name: np.concatenate([f[name] for f in features]) for name in ("pool", "spatial", "probs")}
    for key, name, mu_key, sigma_key in (("fid", "pool", "mu", "sigma"), ("sfid", "spatial", "mu_s", "sigma_s")):
        a = samples[name][:, :STUB_DIMS].astype(np.float64)
        mu1, mu2 = a.mean(0), stats[mu_key][:STUB_DIMS].astype(np.float64)
        expected = fid_reference(mu1, np.cov(a, rowvar=False), mu2, stats[sigma_key][:STUB_DIMS, :STUB_DIMS])
        tol = fid_tolerance(mu1, mu2, expected) + 2 * np.linalg.norm(mu1 - mu2) * np.sqrt(STUB_DIMS) * (
            len(a) * EPS32 * np.abs(a).max())
        assert record[key] == pytest.approx(expected, rel=0, abs=tol), key
    ckpt = os.path.join(tmp_path, "tiny", "checkpoints", "0000001.pt")
    results = standalone(ckpt, demo_data, with_stats, tmp_path / "samples", seed=3, guidance=())
    assert (record["fid"], record["sfid"], record["inception_score"]) == \
        (results["fid"], results["sfid"], results["inception_score"])


def test_two_processes_log_what_one_process_computes(demo_data, fid_setup, tmp_path):
    # Each process samples every 2nd index; the main process gathers and orders the network outputs.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "tests.stub_inception", "train.py",
               *train_args(demo_data, tmp_path, fid_setup, "--max-train-steps", "2", "--fid-every", "2",
                           "--batch-size", "16", "--checkpointing-steps", "2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp_dir = os.path.join(tmp_path, "tiny")
    records = fid_records(exp_dir)
    assert [r["step"] for r in records] == [2]
    ckpt = os.path.join(exp_dir, "checkpoints", "0000002.pt")
    assert_same_metrics(records[0], standalone(ckpt, demo_data, fid_setup, tmp_path / "samples"))


def test_bad_fid_settings_are_named_before_training(demo_data, fid_setup, tmp_path):
    with pytest.raises(ValueError, match="--fid-every 2: give the reference batch with --fid-ref"):
        train.main(tiny_args(demo_data, tmp_path, "--warmup-ckpt", "none", "--fid-every", "2",
                             "--exp-name", "a"))
    with pytest.raises(FileNotFoundError, match="--fid-ref .*missing.npz: file not found"):
        train.main(train_args(demo_data, tmp_path, str(tmp_path / "missing.npz"), "--fid-every", "2",
                              "--exp-name", "b"))
    with pytest.raises(ValueError, match="--guidance-low <= --guidance-high"):
        train.main(train_args(demo_data, tmp_path, fid_setup, "--fid-every", "2", "--guidance-low", "0.8",
                              "--exp-name", "c"))
    with np.load(fid_setup) as ref:  # the demo's 64-px images at 32 px: a reference of another resolution
        np.savez(tmp_path / "ref32.npz", ref["arr_0"][:, ::2, ::2])
    with pytest.raises(ValueError, match=r"--fid-ref .*ref32.npz holds 32x32 images, but this run samples 64x64"):
        train.main(train_args(demo_data, tmp_path, str(tmp_path / "ref32.npz"), "--fid-every", "2",
                              "--exp-name", "d"))
    for name in ("a", "b", "c", "d"):  # refused before the run's folder exists
        assert not os.path.exists(os.path.join(tmp_path, name))


def test_fd_dinov2_in_training_equals_the_evaluators(demo_data, fid_setup, tmp_path, test_size_dinov2):
    """--fd-dinov2 WEIGHTS (a test-size DINOv2 in the published layout): the record's FD-DINOv2 is the evaluator's
    --fd-dinov2 on sample_ddp.py's samples of the same checkpoint, exactly (one image per network call on one thread
    in both), from the reference statistics the run cached."""
    _, weights = test_size_dinov2
    train.main(train_args(demo_data, tmp_path, fid_setup, "--max-train-steps", "2", "--fid-every", "2",
                          "--batch-size", "8", "--fd-dinov2", weights))
    (record,) = fid_records(os.path.join(tmp_path, "tiny"))
    results = standalone(os.path.join(tmp_path, "tiny", "checkpoints", "last.pt"), demo_data, fid_setup,
                         tmp_path / "standalone", fd_dinov2=True, dinov2_weights=weights)
    assert record["fd_dinov2"] == results["fd_dinov2"] and record["fid"] == results["fid"]
    assert results["settings"]["fd_dinov2"]["reference_statistics"]["cache"] == "hit"
