"""The paths users take at scale, run on the CPU: autocast and fp16 loss scaling, torch.compile through a whole
lifecycle, several processes, and no PNG decoding for a run without a teacher."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
import train_warmup
from erw import data as data_module
from erw import loop
from operations.checkpoint import load_checkpoint
from models.sit import SiTBlock
from tests.conftest import ROOT, tiny_args
from tests.dist_utils import free_port
from tests.observers import observe_fit
from tests.test_train_warmup import _state_equal
from tests.test_trainer import _ckpt, _log_text, _objective_with_infinite_gradient


# ------------------------------------------------------------------ mixed precision

def _record_compute_dtypes(monkeypatch):
    """Hooks on the first qkv projection of the SiT and of the teacher: the dtype each computes in and the
    autocast state inside the forward pass."""
    seen = {"sit": set(), "teacher": set()}

    def hook(name):
        def record(module, inputs, output):
            seen[name].add((output.dtype, torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu")))
        return record

    real_create, real_teachers = train_warmup.create_sit, loop.load_teachers

    def create_sit_with_hook(**kwargs):
        model = real_create(**kwargs)
        model.blocks[0].attn.qkv.register_forward_hook(hook("sit"))
        return model

    def teachers_with_hook(*args, **kwargs):
        teachers = real_teachers(*args, **kwargs)
        teachers[0].vit.blocks[0].attn.qkv.register_forward_hook(hook("teacher"))
        return teachers

    monkeypatch.setattr(train_warmup, "create_sit", create_sit_with_hook)
    monkeypatch.setattr(loop, "load_teachers", teachers_with_hook)
    return seen


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("no", torch.float32)])
def test_autocast_is_in_effect_for_the_sit_and_the_teacher(demo_data, tmp_path, monkeypatch, precision, dtype):
    seen = _record_compute_dtypes(monkeypatch)
    result = train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2", "--log-every", "1",
                                         "--mixed-precision", precision))
    enabled = precision != "no"
    for name in ("sit", "teacher"):
        assert {(out, enabled) for out, _, enabled in seen[name]} == {(dtype, enabled)}, name
        if enabled:
            assert {autocast for _, autocast, _ in seen[name]} == {dtype}, name
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result["history"])
    described = {"bf16": "bf16 autocast on cpu", "fp16": "fp16 autocast on cpu (SiT and teacher forward, GradScaler",
                 "no": "float32 on cpu (no autocast)"}[precision]
    assert f"Precision: {described}" in _log_text(tmp_path)
    ckpt = load_checkpoint(_ckpt(tmp_path, "last.pt"))
    assert all(group["fused"] for group in ckpt["opt"]["param_groups"])  # one kernel, device-side skips
    assert (ckpt["scaler"] is not None) == (precision == "fp16")


def test_fp16_overflow_is_skipped_by_the_grad_scaler_and_its_scale_resumes(demo_data, tmp_path, monkeypatch):
    """An infinite gradient at update 3: GradScaler skips it and halves its scale (2^16 -> 2^15); the scale, like
    everything else, survives a resume, and the resumed run equals the straight one bit for bit."""
    monkeypatch.setattr(train_warmup, "Objective", _objective_with_infinite_gradient({2}))
    common = ["--mixed-precision", "fp16", "--log-every", "1", "--checkpointing-steps", "1"]
    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "straight", "--max-train-steps", "5", *common))
    before, skipped = (load_checkpoint(_ckpt(tmp_path, f"{s:07d}.pt", "straight")) for s in (2, 3))
    assert before["scaler"]["scale"] == 2.0 ** 16 and skipped["scaler"]["scale"] == 2.0 ** 15
    _state_equal(before["model"], skipped["model"], "weights after the skipped update")
    assert skipped["skipped_steps"] == 1 and "fp16 loss scale now 32768" in _log_text(tmp_path, "straight")

    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "halves", "--max-train-steps", "3", *common))
    train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "halves", "--max-train-steps", "5", "--resume",
                                *common))
    straight, resumed = (load_checkpoint(_ckpt(tmp_path, "last.pt", e)) for e in ("straight", "halves"))
    for key in ("model", "ema", "opt", "scaler"):
        _state_equal(straight[key], resumed[key], key)


# ------------------------------------------------------------------ torch.compile

def compiled_frames(module_class) -> int:
    """How many frames of module_class.forward torch.compile has compiled (dynamo's cache entries of its code)."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(module_class.forward.__code__))


def test_compiled_phase1_phase2_and_resume_keep_plain_keys(demo_data, tmp_path, monkeypatch):
    """--compile through a whole lifecycle (compiles in place: no "_orig_mod." keys), and the warm start and
    resume read what it wrote. The first compilation takes tens of seconds on the CPU."""
    calls = observe_fit(monkeypatch)
    torch._dynamo.reset()  # no compiled frame left by another test
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2", "--compile"))
    # What torch compiled, counted by dynamo itself: the SiT's blocks and the teacher's, and the 2 identical SiT
    # blocks share one compiled frame (compile time does not grow with depth).
    teacher_block = type(calls[0].teachers[0].vit.blocks[0])
    assert len(calls[0].model.blocks) == 2 and compiled_frames(SiTBlock) == 1 and compiled_frames(teacher_block) >= 1
    assert torch._dynamo.utils.counters["frames"]["ok"] >= 2
    phase1 = _ckpt(tmp_path, "last.pt")
    phase2 = tiny_args(demo_data, tmp_path, "--warmup-ckpt", phase1, "--vae", os.path.join(str(demo_data), "vae"),
                       "--sample-grid-every", "1000", "--sample-num-steps", "2", "--compile")
    train.main([*phase2, "--max-train-steps", "2"])
    result = train.main([*phase2, "--max-train-steps", "3", "--resume"])
    assert result["step"] == 3 and "torch.compile" in _log_text(tmp_path, "tiny")
    for path in (phase1, _ckpt(tmp_path, "last.pt", "tiny")):
        ckpt = load_checkpoint(path)
        for weights in ("model", "ema"):
            assert not any(k.startswith("_orig_mod.") for k in ckpt[weights]), (path, weights)  # a wrapper's


# ------------------------------------------------------------------ data

def test_a_run_without_teacher_never_decodes_an_image(demo_data, tmp_path, monkeypatch):
    real_load_image, calls = data_module.load_image, []
    monkeypatch.setattr(data_module, "load_image", lambda path: calls.append(path) or real_load_image(path))
    train.main(tiny_args(demo_data, tmp_path, "--enc-type", "none", "--warmup-ckpt", "none", "--max-train-steps", "2",
                         "--vae", os.path.join(str(demo_data), "vae"), "--sample-grid-every", "1000",
                         "--sample-num-steps", "2"))
    # 2 steps x 32 items were loaded; only the first image was read, once, to learn the resolution.
    assert len(calls) == 1
    image, moments, _ = data_module.ImageLatentDataset(str(demo_data), load_images=False)[17]
    assert len(calls) == 2 and image.numel() == 0 and moments.shape == (8, 8, 8)


# ------------------------------------------------------------------ several processes

def test_two_processes_train_what_one_process_trains(demo_data, tmp_path):
    """Same global batch on 1 and on 2 processes (torchrun + gloo): the same weights up to float32 summation order,
    because every random draw belongs to an image, not to a process (erw/batch_random.py). The 2-process run is
    interrupted after 2 steps and resumed on both processes."""
    common = ["--max-train-steps", "4", "--log-every", "1", "--checkpointing-steps", "2", "--batch-size", "16"]
    single = train_warmup.main(tiny_args(demo_data, tmp_path, "--exp-name", "one", *common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(ROOT, "train_warmup.py"), *tiny_args(demo_data, tmp_path, "--exp-name", "two", *common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--max-train-steps", "2"], ["--resume"]):
        proc = subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = _log_text(tmp_path, "two")
    assert "2 processes x 8" in log and "Resuming from" in log
    assert log.count("Saved checkpoint") == 2  # one line per save, from rank 0: the logger is silent elsewhere
    assert sorted(os.listdir(os.path.dirname(_ckpt(tmp_path, "x", "two")))) == ["0000002.pt", "0000004.pt", "last.pt"]
    one, two = (load_checkpoint(_ckpt(tmp_path, "last.pt", e)) for e in ("one", "two"))
    losses_one = [r["loss"] for r in single["history"]]
    with open(os.path.join(tmp_path, "two", "metrics.jsonl")) as f:
        losses_two = [json.loads(line)["loss"] for line in f]
    # The losses agree to float32 summation order: a mean over 16 images of O(1) NT-Xent terms summed in another
    # grouping (two halves, averaged by DDP) differs by a few eps32 (1.2e-7) relative; after 3 updates the weights
    # differ by as little, which moves the loss by ~lr x that. rel 1e-5 allows 80 eps and still fails for one
    # changed noise draw, which moves it by ~1e-2.
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    for key in ("model", "ema"):
        for name, value in one[key].items():
            # AdamW's first update is lr * sign(g) per weight: for a weight whose gradient is at rounding level the
            # sign may differ between the two summation orders, which moves that weight by up to 2 lr (= 2e-3) per
            # step. The bound is 1e-4 absolute on weights of O(0.1-1): a hundredfold above typical rounding, and far
            # below what a different noise draw or image order changes (~lr per step on every weight).
            torch.testing.assert_close(two[key][name], value, rtol=0, atol=1e-4, msg=f"{key}.{name}")
