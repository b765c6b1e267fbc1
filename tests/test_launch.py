"""Preemption as a requeue script sees it: real launchers (torchrun, accelerate launch) under launch.py, real signals,
and the exit status they end with (75: preempted and saved, rerun with --resume)."""
import os
import signal
import subprocess
import sys
import time

import pytest

import launch
from operations.checkpoint import load_checkpoint
from operations.preemption import EXIT_IO_ERROR, EXIT_PREEMPTED
from tests.background_runs import start, tail, wait_for_steps
from tests.conftest import ROOT, tiny_args
from tests.dist_utils import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _warmup_args(demo_data, out, *extra):
    return [os.path.join(ROOT, "train_warmup.py"),
            *tiny_args(demo_data, out, "--exp-name", "run", "--max-train-steps", "100000",
                       "--checkpointing-steps", "100000", "--log-every", "1", "--num-workers", "1", *extra)]


def _descendants(pid):
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except OSError:
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _preempt(cmd, tmp_path, signum, everyone):
    """Start cmd, wait for step 2, send signum to the wrapper (and, if `everyone`, to every process below it, as
    SLURM signals a whole job step); the exit status, the output and the checkpoint it left."""
    log_path = os.path.join(tmp_path, "launch.out")
    proc = start(cmd, log_path)
    try:
        wait_for_steps(proc, os.path.join(tmp_path, "run", "metrics.jsonl"), 2, log_path)
        targets = [proc.pid] + (_descendants(proc.pid) if everyone else [])
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return code, tail(log_path), load_checkpoint(os.path.join(tmp_path, "run", "checkpoints", "last.pt"))


@pytest.mark.parametrize("signum, everyone", [(signal.SIGTERM, False), (signal.SIGUSR1, True)],
                         ids=["sigterm-to-the-wrapper", "sigusr1-to-every-process"])
def test_a_preempted_torchrun_run_ends_75_with_a_checkpoint(demo_data, tmp_path, signum, everyone):
    """Without the wrapper torchrun ends 1 (SIGTERM: SignalException; SIGUSR1: it dies and orphans its workers)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *TORCHRUN, str(free_port()),
           *_warmup_args(demo_data, tmp_path)]
    code, output, last = _preempt(cmd, tmp_path, signum, everyone)
    assert code == EXIT_PREEMPTED, output
    assert last["step"] >= 2 and last["data_position"]["world_size"] == 2
    assert f"launch.py: preempted ({signum.name})" in output
    with open(os.path.join(tmp_path, "run", "log.txt")) as f:
        assert f"Received {signum.name}: stopped after step {last['step']}" in f.read()


def test_a_preempted_accelerate_launch_run_ends_75_with_a_checkpoint(demo_data, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *ACCELERATE, *_warmup_args(demo_data, tmp_path)]
    code, output, last = _preempt(cmd, tmp_path, signal.SIGTERM, everyone=True)
    assert code == EXIT_PREEMPTED, output
    assert last["step"] >= 2


def _handles(pid, signum):
    """Whether process pid has a handler installed for signum (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def test_sigterm_while_starting_ends_75_with_a_message(demo_data, tmp_path):
    """The signal arrives during the imports, right after the entry point's first line installed its handler:
    the run starts no step, saves nothing and says so (before: status 143, no message)."""
    log_path = os.path.join(tmp_path, "start.out")
    proc = start([sys.executable, *_warmup_args(demo_data, tmp_path)], log_path)
    try:
        deadline = time.monotonic() + 60
        while not _handles(proc.pid, signal.SIGTERM):
            assert time.monotonic() < deadline and proc.poll() is None, tail(log_path)
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=300) == EXIT_PREEMPTED, tail(log_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Received SIGTERM while starting: stopped before step 1 (nothing new to save)" in tail(log_path)
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints", "last.pt"))


@pytest.mark.parametrize("launcher_status, reported, received, ended, expected", [
    (1, [75, 75], [signal.SIGTERM], False, EXIT_PREEMPTED),   # every process saved and stopped
    (1, [75, 74], [signal.SIGTERM], False, EXIT_IO_ERROR),    # the save failed: not a state to resume from blindly
    (1, [75, 1], [signal.SIGTERM], False, 1),                 # a crash is a crash, signal or not
    (-9, [], [signal.SIGTERM], False, EXIT_PREEMPTED),        # killed before any process could report: try again
    (1, [75, None], [signal.SIGTERM], False, EXIT_IO_ERROR),  # one died while training, before its save
    (-9, [], [signal.SIGTERM], True, EXIT_IO_ERROR),          # launch.py ended them after the grace period
    (1, [None], [], False, 1),                                # died without a signal: the launcher's failure
    (1, [], [], False, 1),                                    # no signal: the launcher's own failure
    (0, [0, 0], [signal.SIGTERM], False, 0),                  # the signal came after the run finished
    (-2, [], [], False, 130),                                 # Ctrl-C is not preemption
])
def test_the_wrappers_exit_status(launcher_status, reported, received, ended, expected):
    assert launch._final_status(launcher_status, reported, received, ended) == expected


def _pending(pid, signum):
    """Whether signum is pending for process pid (SigPnd / ShdPnd in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (signum - 1) & 1 for mask in masks)


def test_a_training_process_killed_after_the_signal_before_its_save_ends_74(demo_data, tmp_path):
    """SIGKILL (the OOM killer, a segfault) between the preemption signal and the save: the newest checkpoint is
    older than the step reached, which 75 ("stopped at a checkpoint") would hide. The process is stopped first, so
    that the forwarded SIGTERM is still pending, unhandled, when it dies."""
    log_path = os.path.join(tmp_path, "launch.out")
    proc = start([sys.executable, os.path.join(ROOT, "launch.py"), sys.executable,
                  *_warmup_args(demo_data, tmp_path, "--num-workers", "0")], log_path)
    try:
        wait_for_steps(proc, os.path.join(tmp_path, "run", "metrics.jsonl"), 2, log_path)
        [trainer] = _descendants(proc.pid)
        os.kill(trainer, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not _pending(trainer, signal.SIGTERM):  # launch.py forwarded it
            assert time.monotonic() < deadline, tail(log_path)
            time.sleep(0.01)
        os.kill(trainer, signal.SIGKILL)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == EXIT_IO_ERROR, tail(log_path)
    assert "a training process ended after SIGTERM without writing its checkpoint" in tail(log_path)
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints", "last.pt"))


# A child that ignores SIGTERM, and one that leaves such a process behind when it ends (launch.py adopts it).
_IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
                   "time.sleep(3600)"
_LEAVES_AN_ORPHAN = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {_IGNORES_SIGTERM!r}]); " \
                    "time.sleep(3600)"


@pytest.mark.parametrize("program, stop", [(_IGNORES_SIGTERM, "grace"), (_LEAVES_AN_ORPHAN, "grace"),
                                           (_IGNORES_SIGTERM, "sigint")],
                         ids=["child-ignores-sigterm", "orphan-ignores-sigterm", "sigint-after-sigterm"])
def test_processes_that_ignore_the_signal_are_ended_after_a_bounded_wait(tmp_path, program, stop):
    """Before: launch.py waited for them forever, whatever it was sent. Now they get PET_SHUTDOWN_TIMEOUT (as torchrun
    gives its workers), or end at once with a SIGINT after the preemption signal; then every process below launch.py
    is killed, it says so and ends 74: the preemption save is lost."""
    log_path = os.path.join(tmp_path, "launch.out")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), sys.executable, "-c", program],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                                env={**os.environ, "PET_SHUTDOWN_TIMEOUT": "1" if stop == "grace" else "3600"})
    try:
        assert proc.stdout.readline() == "ready\n"
        time.sleep(launch.MIN_AGE_S)  # old enough for launch.py to forward the signal to it
        below = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        if stop == "sigint":
            time.sleep(1)
            os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = tail(log_path)
    assert code == EXIT_IO_ERROR, output
    assert f"did not end within {'SIGINT' if stop == 'sigint' else '1 s'} after SIGTERM" in output
    assert "their preemption save is lost" in output
    assert not any(os.path.exists(f"/proc/{pid}") for pid in below), output


@pytest.mark.parametrize("program, says", [("no-such-launcher", "'no-such-launcher' is not a program here"),
                                           ("train.py", "'train.py' is a file, not a program"),
                                           ("./README.md", "'./README.md' is a file, not a program")],
                         ids=["unknown", "program-forgotten", "a-non-executable-file"])
def test_the_wrapper_refuses_what_is_not_a_program_in_one_line(program, says):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), program, "--config", "x.yaml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def test_an_entry_point_reports_its_exit_status_to_the_wrapper(tmp_path, monkeypatch):
    """What launch.py reads: one file per process with its status (74 here: the launcher alone would say 1)."""
    from operations.checkpoint import CheckpointWriteError
    from operations.cli import run_main
    from operations.preemption import EXIT_STATUS_DIR_ENV, read_exit_statuses

    def fails_to_save(argv):
        raise CheckpointWriteError("could not write checkpoint x.pt: No space left on device (ENOSPC)")

    monkeypatch.setenv(EXIT_STATUS_DIR_ENV, str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run_main(fails_to_save, [])
    assert exit_.value.code == EXIT_IO_ERROR
    assert read_exit_statuses(str(tmp_path)) == [EXIT_IO_ERROR]
