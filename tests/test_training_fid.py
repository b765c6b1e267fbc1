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

import sample_ddp
import train
from erw.data import ImageLatentDataset
from erw.generation import cpu_threads
from evaluations.evaluator import default_cache_dir, evaluate
from tests import stub_inception
from tests.conftest import ROOT, tiny_args
from tests.dist_utils import free_port

NUM_SAMPLES, NUM_STEPS = 6, 4
# The CFG interval covers part of the SDE steps, so both model batch shapes occur.
FID_FLAGS = ["--fid-num-samples", str(NUM_SAMPLES), "--fid-num-steps", str(NUM_STEPS), "--inception-weights",
             "random", "--cfg-scale", "1.5", "--guidance-high", "0.7"]


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
                     "--sampling-steps", "1000", "--sample-num-steps", "2", "--fid-ref", ref, *FID_FLAGS, *extra)


def fid_records(exp_dir):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "fid" in r]


def standalone(ckpt, demo_data, ref, sample_dir):
    """sample_ddp.py on the checkpoint with the settings the run's FID used, then the evaluator on its .npz."""
    npz = sample_ddp.main(["--ckpt", ckpt, "--sample-dir", str(sample_dir), "--global-seed", "0",
                           "--num-fid-samples", str(NUM_SAMPLES), "--num-steps", str(NUM_STEPS), "--mode", "sde",
                           "--cfg-scale", "1.5", "--guidance-high", "0.7", "--vae", os.path.join(str(demo_data), "vae"),
                           "--device", "cpu"])
    with cpu_threads(1):  # as the in-training FID runs on the CPU
        return evaluate(ref, npz, inception_weights="random", device="cpu", batch_size=1,
                        is_split_size=NUM_SAMPLES, cache_dir=default_cache_dir(), progress=False, log=None)


def assert_same_metrics(record, results):
    # Exact: the same images (one sample per network call on one thread: bitwise independent of batch and process
    # count, erw/generation.py), the same network outputs in the same sample order, the same numpy calls on them.
    assert (record["fid"], record["sfid"], record["inception_score"]) == \
        (results["fid"], results["sfid"], results["inception_score"])
    assert results["settings"]["activation_cache"] == "hit"  # the reference statistics the run computed and cached


def test_fid_records_at_every_nth_step_and_the_end_equal_the_standalone_pipeline(demo_data, fid_setup, tmp_path,
                                                                                    capsys):
    train.main(train_args(demo_data, tmp_path, fid_setup, "--max-train-steps", "5", "--fid-every", "2",
                          "--checkpointing-steps", "2", "--batch-size", "8"))
    exp_dir = os.path.join(tmp_path, "tiny")
    records = fid_records(exp_dir)
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
    for name in ("a", "b", "c"):  # refused before any step
        assert not os.listdir(os.path.join(tmp_path, name, "checkpoints"))
