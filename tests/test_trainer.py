"""The shared training loop (erw/loop.py) and the run's operations (operations/run.py) around the formulas:
non-finite updates, checkpoints that are always good, resume with changed settings, metrics.jsonl, temp files and file
modes, preemption by a real signal."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

import train_warmup
from operations import run as run_dir_module
from erw import loop as loop_module
from erw import step as step_module
from erw.batch_random import derive_seed
from operations.checkpoint import load_checkpoint
from operations.files import atomic_write
from erw.losses import Objective
from tests.conftest import ROOT, tiny_args
from tests.test_train_warmup import _state_equal

EXP = "tiny-warmup"  # configs/tiny.yaml's Phase-1 experiment name


def _exp(tmp_path, name=EXP):
    return os.path.join(tmp_path, name)


def _ckpt(tmp_path, name, exp=EXP):
    return os.path.join(tmp_path, exp, "checkpoints", name)


def _log_text(tmp_path, exp=EXP):
    with open(os.path.join(tmp_path, exp, "log.txt")) as f:
        return f.read()


def _metric_steps(tmp_path, exp=EXP):
    with open(os.path.join(tmp_path, exp, run_dir_module.METRICS_FILE)) as f:
        return [json.loads(line)["step"] for line in f]


def _all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), infinite backward: every gradient becomes inf or NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _objective_with_infinite_gradient(at_steps):
    class InfiniteGradientObjective(Objective):
        def __call__(self, model, latents, labels, teacher_tokens, step, rng=None):
            loss, logs = super().__call__(model, latents, labels, teacher_tokens, step, rng)
            return (_InfiniteGradient.apply(loss) if step in at_steps else loss), logs
    return InfiniteGradientObjective


# ------------------------------------------------------------------ non-finite gradients and weights (item 3)

def test_infinite_gradient_with_finite_loss_skips_the_update_and_counts_it(demo_data, tmp_path, monkeypatch):
    # Step index 4 is the 5th update, logged as step 5.
    monkeypatch.setattr(train_warmup, "Objective", _objective_with_infinite_gradient({4}))
    result = train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "7", "--log-every", "1",
                                         "--checkpointing-steps", "1"))
    before, skipped, after = (load_checkpoint(_ckpt(tmp_path, f"{s:07d}.pt")) for s in (4, 5, 7))
    for ckpt in (before, skipped, after):
        assert _all_finite(ckpt["model"]) and _all_finite(ckpt["ema"])
    _state_equal(before["model"], skipped["model"], "model after the skipped update")
    assert not all(torch.equal(skipped["model"][k], after["model"][k]) for k in after["model"])  # training went on
    assert (before["skipped_steps"], skipped["skipped_steps"], after["skipped_steps"]) == (0, 1, 1)
    records = {r["step"]: r for r in result["history"]}
    assert records[5]["skipped_steps"] == 1 and records[4]["skipped_steps"] == 0
    assert not torch.isfinite(torch.tensor(records[5]["grad_norm"]))
    assert "steps 5..5: 1 update(s) skipped for a non-finite gradient (last at step 5); 1 skipped so far" \
        in _log_text(tmp_path)


def test_non_finite_gradients_in_a_row_stop_naming_the_last_good_checkpoint(demo_data, tmp_path, monkeypatch):
    assert loop_module.MAX_CONSECUTIVE_SKIPS == 50  # README's number; the test lowers it to stay short
    monkeypatch.setattr(loop_module, "MAX_CONSECUTIVE_SKIPS", 3)
    monkeypatch.setattr(train_warmup, "Objective", _objective_with_infinite_gradient(set(range(2, 100))))
    # Updates 3, 4, 5, ... are skipped. The device-side count is read before each checkpoint: 2 in a row at step 4
    # (0000004.pt holds step 2's weights, finite), 4 in a row at step 6: stop, and 0000006.pt is not written.
    with pytest.raises(FloatingPointError, match=r"4 steps in a row \(last: step 6\)") as error:
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "20", "--checkpointing-steps", "2"))
    assert str(error.value).endswith(f"The last good checkpoint is {_ckpt(tmp_path, '0000004.pt')}")
    assert "ERROR: gradients were non-finite in 4 steps in a row" in _log_text(tmp_path)
    assert not os.path.exists(_ckpt(tmp_path, "0000006.pt"))
    assert _all_finite(load_checkpoint(_ckpt(tmp_path, "last.pt"))["model"])


def test_nan_weights_are_never_saved(demo_data, tmp_path, monkeypatch):
    real_update = step_module.update_ema

    def update_then_poison_at_step_3(ema, model, decay):  # the EMA update of the 3rd optimizer step
        real_update(ema, model, decay)
        update_then_poison_at_step_3.calls += 1
        if update_then_poison_at_step_3.calls == 3:
            with torch.no_grad():
                next(ema.parameters()).view(-1)[0] = float("nan")
    update_then_poison_at_step_3.calls = 0

    monkeypatch.setattr(step_module, "update_ema", update_then_poison_at_step_3)
    with pytest.raises(FloatingPointError, match="non-finite weights after step 3") as error:
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "6", "--checkpointing-steps", "1"))
    assert "not saved" in str(error.value) and _ckpt(tmp_path, "0000002.pt") in str(error.value)
    assert not os.path.exists(_ckpt(tmp_path, "0000003.pt"))
    assert load_checkpoint(_ckpt(tmp_path, "last.pt"))["step"] == 2


def test_a_non_finite_latent_is_named_with_the_batch_of_the_first_non_finite_loss(demo_data, tmp_path):
    """The data order is recomputed here from its definition (epoch 0: a permutation seeded by (seed, 0), cut into
    micro-batches of 32): item perm[40] falls in step 2's batch. The error names its file as the one that holds a
    NaN; the log lists the whole batch."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    latents = sorted(str(p.relative_to(data / "vae-sd")) for p in (data / "vae-sd").rglob("*.npy"))
    perm = torch.randperm(len(latents), generator=torch.Generator().manual_seed(derive_seed(0, 0))).tolist()
    poisoned = latents[perm[40]]
    moments = np.load(data / "vae-sd" / poisoned)
    moments[2, 3, 4] = np.nan
    np.save(data / "vae-sd" / poisoned, moments)
    with pytest.raises(FloatingPointError) as error:
        train_warmup.main(tiny_args(data, tmp_path, "--max-train-steps", "4", "--log-every", "1"))
    assert (f"non-finite loss at step 2 (found at step 2; its update was skipped); 1 of the step's 32 items (listed "
            f"in the log) hold a NaN or an infinity: {poisoned} (item {perm[40]}) in {data}") in str(error.value)
    batch = ", ".join(f"{latents[i]} (item {i})" for i in perm[32:64])
    assert f"step 2's batch, from {data}: {batch}\n" in _log_text(tmp_path)


# ------------------------------------------------------------------ resume with changed settings (item 5)

def test_resume_refuses_changed_training_settings_and_keeps_config_yaml(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2"))
    config_path = os.path.join(_exp(tmp_path), "config.yaml")
    with open(config_path) as f:
        before = f.read()
    changed = ["--learning-rate", "1e6", "--batch-size", "16", "--seed", "3"]
    with pytest.raises(ValueError, match="was trained with other settings") as error:
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "4", "--resume", *changed))
    message = str(error.value)
    for line in ("learning_rate: 0.001 in the checkpoint, 1000000.0 now", "batch_size: 32 in the checkpoint, 16 now",
                 "seed: 0 in the checkpoint, 3 now", "--resume-override seed,batch_size,learning_rate"):
        assert line in message
    with open(config_path) as f:
        assert f.read() == before  # config.yaml still states what the run uses
    assert load_checkpoint(_ckpt(tmp_path, "last.pt"))["step"] == 2  # nothing trained


def test_resume_override_applies_and_records_the_change(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2"))
    result = train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "4", "--log-every", "1", "--resume",
                                         "--learning-rate", "0.02", "--resume-override", "learning-rate"))
    assert [r["lr"] for r in result["history"]] == [0.02, 0.02]  # the new rate is the one used
    ckpt = load_checkpoint(_ckpt(tmp_path, "last.pt"))
    assert all(group["lr"] == 0.02 for group in ckpt["opt"]["param_groups"]) and ckpt["config"]["learning_rate"] == 0.02
    with open(os.path.join(_exp(tmp_path), "config.yaml")) as f:
        assert yaml.safe_load(f)["learning_rate"] == 0.02
    with open(os.path.join(_exp(tmp_path), run_dir_module.CONFIG_HISTORY_FILE)) as f:
        history = yaml.safe_load(f)
    assert history == ckpt["config_history"]
    assert history[-1]["step"] == 2 and history[-1]["overridden"] == ["learning_rate"]
    assert history[-1]["changed"]["learning_rate"] == [0.001, 0.02]
    assert history[-1]["changed"]["max_train_steps"] == [2, 4] and "log_every" in history[-1]["changed"]
    log = _log_text(tmp_path)
    assert "OVERRIDDEN training setting learning_rate: 0.001 -> 0.02" in log
    assert "run-control setting max_train_steps: 2 -> 4" in log


def test_resume_past_the_target_step_is_refused_and_config_yaml_stays_true(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "2"))
    config_yaml = os.path.join(_exp(tmp_path), "config.yaml")
    with open(config_yaml) as f:
        before = f.read()
    with pytest.raises(ValueError, match=r"0000004.pt is at step 4, past --max-train-steps 2: there is nothing to "
                                         r"train. Pass --max-train-steps above 4"):
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2", "--resume"))
    with open(config_yaml) as f:
        assert f.read() == before and yaml.safe_load(before)["max_train_steps"] == 4
    assert load_checkpoint(_ckpt(tmp_path, "last.pt"))["step"] == 4


def test_resume_override_without_resume_is_refused(demo_data, tmp_path):
    with pytest.raises(ValueError, match="--resume-override applies only together with --resume"):
        train_warmup.main(tiny_args(demo_data, tmp_path, "--resume-override", "seed"))


def test_resume_with_another_batch_size_continues_after_the_same_items(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2"))
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "3", "--resume", "--batch-size", "16",
                                "--resume-override", "batch_size"))
    ckpt = load_checkpoint(_ckpt(tmp_path, "last.pt"))
    # 2 steps x 32 items, then 1 x 16: the stream position is 80 items = 5 micro-batches of 16.
    position = {k: ckpt["data_position"][k] for k in ("micro_batch", "world_size", "local_batch_size", "dataset_len")}
    assert position == {"micro_batch": 5, "world_size": 1, "local_batch_size": 16, "dataset_len": 160}
    assert "continues after item 64 of the stream" in _log_text(tmp_path)


def test_resume_refuses_a_data_folder_whose_contents_changed(tmp_path):
    from preprocessing import dataset_tools
    data = tmp_path / "data"
    dataset_tools.main(["make-demo", "--dest", str(data), "--images-per-class", "4", "--vae", "random-tiny"])
    train_warmup.main(tiny_args(data, tmp_path, "--max-train-steps", "1", "--batch-size", "8"))
    shutil.rmtree(data)
    dataset_tools.main(["make-demo", "--dest", str(data), "--images-per-class", "2", "--vae", "random-tiny"])
    with pytest.raises(ValueError, match=f"trained on other data than {data} holds .*dataset_len 40 then, 20 now"):
        train_warmup.main(tiny_args(data, tmp_path, "--max-train-steps", "2", "--batch-size", "8", "--resume"))


def test_resume_refuses_a_data_folder_of_the_same_size_with_other_images(tmp_path):
    """make-demo names files by index: another seed gives the same names, labels and count, other pixels and
    latents. The dataset identity encode records tells them apart."""
    from preprocessing import dataset_tools
    data = tmp_path / "data"
    dataset_tools.main(["make-demo", "--dest", str(data), "--images-per-class", "2", "--vae", "random-tiny"])
    train_warmup.main(tiny_args(data, tmp_path, "--max-train-steps", "1", "--batch-size", "8"))
    shutil.rmtree(data)
    dataset_tools.main(["make-demo", "--dest", str(data), "--images-per-class", "2", "--vae", "random-tiny", "--seed",
                        "1"])
    with pytest.raises(ValueError, match=f"trained on other data than {data} holds .*dataset_sha256 '"):
        train_warmup.main(tiny_args(data, tmp_path, "--max-train-steps", "2", "--batch-size", "8", "--resume"))
    train_warmup.main(tiny_args(data, tmp_path, "--max-train-steps", "2", "--batch-size", "8", "--resume",
                                "--resume-override", "data_dir"))  # deliberately


# ------------------------------------------------------------------ old checkpoints, metrics.jsonl (items 6, 9)

def test_numbered_checkpoints_without_last_pt_are_not_overwritten(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "3", "--checkpointing-steps", "1",
                                "--log-every", "1"))
    os.remove(_ckpt(tmp_path, "last.pt"))
    newest = load_checkpoint(_ckpt(tmp_path, "0000003.pt"))
    with pytest.raises(FileExistsError, match="0000003.pt"):
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "3"))
    _state_equal(load_checkpoint(_ckpt(tmp_path, "0000003.pt"))["model"], newest["model"], "untouched")
    assert _metric_steps(tmp_path) == [1, 2, 3]

    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "1",
                                "--log-every", "1", "--resume"))
    assert f"Resuming from {_ckpt(tmp_path, '0000003.pt')} (step 3)" in _log_text(tmp_path)
    assert _metric_steps(tmp_path) == [1, 2, 3, 4]


def test_resume_skips_an_unreadable_newest_checkpoint_and_keeps_it(demo_data, tmp_path):
    """The run trains step 3 again; the file it could not read is kept beside, not overwritten (it may be a
    transient read error of a good checkpoint)."""
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "3", "--checkpointing-steps", "1"))
    with open(_ckpt(tmp_path, "0000003.pt"), "wb") as f:  # last.pt is a hard link to it: both are broken
        f.write(b"not a checkpoint")
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "1",
                                "--resume"))
    log = _log_text(tmp_path)
    assert f"skipping unreadable checkpoint {_ckpt(tmp_path, '0000003.pt')}" in log
    assert f"Resuming from {_ckpt(tmp_path, '0000002.pt')} (step 2)" in log
    assert load_checkpoint(_ckpt(tmp_path, "last.pt"))["step"] == 4
    assert load_checkpoint(_ckpt(tmp_path, "0000003.pt"))["step"] == 3
    with open(_ckpt(tmp_path, "0000003.pt.unreadable"), "rb") as f:
        assert f.read() == b"not a checkpoint"


@pytest.mark.parametrize("damage", ["newest-numbered-deleted", "last-pt-a-stale-copy"])
def test_resume_takes_the_newest_state_whichever_file_holds_it(demo_data, tmp_path, damage):
    """Users delete numbered checkpoints to save disk: last.pt then holds the newest state alone. Where last.pt is a
    copy of an older one (no hard links), the newer numbered file wins. Nothing newer is dropped or overwritten."""
    args = ("--max-train-steps", "6", "--checkpointing-steps", "2", "--log-every", "1")
    train_warmup.main(tiny_args(demo_data, tmp_path, *args))
    if damage == "newest-numbered-deleted":
        os.remove(_ckpt(tmp_path, "0000006.pt"))
        newest = _ckpt(tmp_path, "last.pt")
    else:
        os.remove(_ckpt(tmp_path, "last.pt"))
        shutil.copyfile(_ckpt(tmp_path, "0000004.pt"), _ckpt(tmp_path, "last.pt"))
        newest = _ckpt(tmp_path, "0000006.pt")
    with open(os.path.join(_exp(tmp_path), run_dir_module.METRICS_FILE)) as f:
        logged = f.read()
    train_warmup.main(tiny_args(demo_data, tmp_path, *args, "--resume", "--max-train-steps", "8"))
    assert f"Resuming from {newest} (step 6)" in _log_text(tmp_path)
    assert "Dropped" not in _log_text(tmp_path)
    with open(os.path.join(_exp(tmp_path), run_dir_module.METRICS_FILE)) as f:
        assert f.read().startswith(logged)
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    resumed = load_checkpoint(_ckpt(tmp_path, "0000008.pt"))
    assert resumed["step"] == 8 and resumed["data_position"]["micro_batch"] == 8
    assert [entry["resumed_from"] for entry in resumed["config_history"]] == [newest]


def test_a_checkpoint_from_a_machine_with_more_gpus_resumes_here(demo_data, tmp_path, monkeypatch):
    """A checkpoint saved on an 8-GPU node (older checkpoints hold one CUDA generator state per GPU) resumes on a
    machine with fewer GPUs, and new checkpoints hold no per-device state at all. Here "fewer GPUs" is one visible
    device whose set_rng_state_all refuses 8 states as torch's does, seen from the resume code only (the rest of the
    run stays on the CPU)."""
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2", "--checkpointing-steps", "2"))
    saved = load_checkpoint(_ckpt(tmp_path, "last.pt"))
    assert set(saved["rng"]) == {"torch"}
    saved["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    atomic_write(_ckpt(tmp_path, "0000002.pt"), lambda f: torch.save(saved, f))
    os.remove(_ckpt(tmp_path, "last.pt"))
    real_is_available = torch.cuda.is_available

    def one_gpu_while_resuming():  # the caller named by reference: a rename fails here instead of testing nothing
        resuming = sys._getframe(1).f_code is run_dir_module.Run.resume.__code__
        return True if resuming else real_is_available()

    def set_rng_state_all(states):
        if len(states) > 1:
            raise IndexError(f"{len(states)} CUDA generator states for 1 device")

    monkeypatch.setattr(torch.cuda, "is_available", one_gpu_while_resuming)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_rng_state_all)
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "3", "--resume"))
    assert load_checkpoint(_ckpt(tmp_path, "last.pt"))["step"] == 3


def test_metrics_past_the_resumed_step_are_dropped(demo_data, tmp_path):
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "6", "--checkpointing-steps", "4",
                                "--log-every", "1"))
    # As if killed after logging step 6 but before its checkpoint, in the middle of writing a record.
    os.remove(_ckpt(tmp_path, "0000006.pt"))
    os.remove(_ckpt(tmp_path, "last.pt"))
    with open(os.path.join(_exp(tmp_path), run_dir_module.METRICS_FILE), "a") as f:
        f.write('{"loss": 1.0, "st')
    train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "6", "--checkpointing-steps", "4",
                                "--log-every", "1", "--resume"))
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert "Dropped 3 record(s) past step 4" in _log_text(tmp_path)


def test_stale_temp_files_are_removed_and_files_honour_the_umask(demo_data, tmp_path):
    previous = os.umask(0o022)
    try:
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "1"))
        ckpt_dir = os.path.dirname(_ckpt(tmp_path, "x"))
        stale = [os.path.join(ckpt_dir, ".0000002.pt.k3x9_q2a.tmp"), os.path.join(ckpt_dir, ".last.pt.0a1b2c3d.tmp"),
                 os.path.join(_exp(tmp_path), ".config.yaml.zz00yy11.tmp")]
        kept = [os.path.join(ckpt_dir, "notes.tmp"), os.path.join(_exp(tmp_path), ".hidden.tmp")]
        for path in stale + kept:
            with open(path, "wb") as f:
                f.write(b"left behind")
        train_warmup.main(tiny_args(demo_data, tmp_path, "--max-train-steps", "2", "--resume"))
        assert not any(os.path.exists(p) for p in stale) and all(os.path.exists(p) for p in kept)
        assert f"Removed 3 stale temp file(s) that an interrupted run left in {_exp(tmp_path)}" in _log_text(tmp_path)
        for path in (_ckpt(tmp_path, "0000002.pt"), os.path.join(_exp(tmp_path), "config.yaml")):
            assert os.stat(path).st_mode & 0o777 == 0o644, path
        os.umask(0o027)
        atomic_write(str(tmp_path / "group.txt"), lambda f: f.write(b"x"))
        assert os.stat(tmp_path / "group.txt").st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


# ------------------------------------------------------------------ preemption by a real signal (item 10)

def _train_warmup_cmd(demo_data, tmp_path, exp_name, *extra):
    return [sys.executable, os.path.join(ROOT, "train_warmup.py"),
            *tiny_args(demo_data, tmp_path, "--exp-name", exp_name, "--max-train-steps", "30",
                       "--checkpointing-steps", "1000", "--log-every", "1", "--num-workers", "1", *extra)]


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same kernels in every process: bit-for-bit comparable
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _start_and_signal(cmd, metrics_path, signum, to_group, preexec_fn=None):
    """Start cmd in its own session, wait until it has logged step 2, send signum, wait for the exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                if sum(1 for line in f if line.endswith("\n")) >= 2:
                    break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output


def test_a_full_disk_names_the_checkpoint_the_reason_and_the_last_good_one(demo_data, tmp_path, monkeypatch,
                                                                             capsys):
    """The second save meets a full disk, as torch's writer reports it (a RuntimeError whose cause is the OSError):
    one line says which file, why, and which checkpoint is the last good one, which stays intact; exit status 74."""
    from operations.checkpoint import EXIT_IO_ERROR
    from operations.cli import run_main
    real_save, saves = torch.save, []

    def save(obj, f, *args, **kwargs):
        saves.append(obj.get("step") if isinstance(obj, dict) else None)
        if saves[-1] == 4:
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as full:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from full
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as exited:
        run_main(train_warmup.main, tiny_args(demo_data, tmp_path, "--max-train-steps", "6",
                                              "--checkpointing-steps", "2"))
    assert exited.value.code == EXIT_IO_ERROR == 74
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: could not write checkpoint {_ckpt(tmp_path, '0000004.pt')}: No space left on device "
                     f"(ENOSPC). The last good checkpoint is {_ckpt(tmp_path, '0000002.pt')}; it is intact"]
    assert load_checkpoint(_ckpt(tmp_path, "last.pt"))["step"] == 2
    assert sorted(os.listdir(_ckpt(tmp_path, ""))) == ["0000002.pt", "last.pt"]  # no temp file left
    assert "ERROR: could not write checkpoint" in _log_text(tmp_path)


def test_a_preemption_save_that_cannot_be_written_does_not_exit_75(demo_data, tmp_path):
    """SIGTERM, and the file system refuses the checkpoint (a file-size limit here, EFBIG; ENOSPC or EROFS on a
    cluster): the run exits 74, not 75 (a requeue script would resume from nothing) nor 0."""
    import resource

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))  # logs fit, a checkpoint does not

    cmd = _train_warmup_cmd(demo_data, tmp_path, "preempted")
    code, output = _start_and_signal(cmd, os.path.join(tmp_path, "preempted", run_dir_module.METRICS_FILE),
                                     signal.SIGTERM, to_group=False, preexec_fn=limit_file_size)
    assert code == 74, output[-3000:]
    assert "error: could not write checkpoint" in output and "File too large (EFBIG)" in output
    assert "No checkpoint of this run was written before" in output


def test_sigterm_checkpoints_exits_and_resume_continues_bit_for_bit(demo_data, tmp_path):
    straight = _run(_train_warmup_cmd(demo_data, tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cmd = _train_warmup_cmd(demo_data, tmp_path, "preempted")
    # The whole process group, as SLURM signals it: the DataLoader worker gets SIGTERM too.
    code, output = _start_and_signal(cmd, os.path.join(tmp_path, "preempted", run_dir_module.METRICS_FILE),
                                     signal.SIGTERM, to_group=True)
    assert code == run_dir_module.EXIT_PREEMPTED == 75, output[-3000:]  # EX_TEMPFAIL, what README promises
    stopped = load_checkpoint(_ckpt(tmp_path, "last.pt", "preempted"))
    assert 2 <= stopped["step"] < 30
    assert f"Received SIGTERM: stopped after step {stopped['step']}" in _log_text(tmp_path, "preempted")
    resumed = _run([*cmd, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, reference = (load_checkpoint(_ckpt(tmp_path, "last.pt", e)) for e in ("preempted", "straight"))
    assert final["step"] == reference["step"] == 30
    for key in ("model", "ema", "opt", "data_position"):
        _state_equal(reference[key], final[key], key)


def test_sigusr1_also_checkpoints_and_exits(demo_data, tmp_path):
    cmd = _train_warmup_cmd(demo_data, tmp_path, "usr1", "--num-workers", "0")
    code, output = _start_and_signal(cmd, os.path.join(tmp_path, "usr1", run_dir_module.METRICS_FILE),
                                     signal.SIGUSR1, to_group=False)
    assert code == run_dir_module.EXIT_PREEMPTED, output[-3000:]
    step = load_checkpoint(_ckpt(tmp_path, "last.pt", "usr1"))["step"]
    assert f"Received SIGUSR1: stopped after step {step}" in _log_text(tmp_path, "usr1")
