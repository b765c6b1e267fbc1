"""One live run per folder (operations/lock.py): real training processes on one experiment folder, a killed run's lock,
and the record that guards the folder where the file system's locks do not."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import operations.lock
from operations.lock import LOCK_FILE, STALE_AFTER_S, FolderInUse, RunLock
from tests.background_runs import start, tail, wait_for_steps
from tests.conftest import ROOT, tiny_args


def _warmup_cmd(demo_data, out, *extra):
    return [sys.executable, os.path.join(ROOT, "train_warmup.py"),
            *tiny_args(demo_data, out, "--exp-name", "dup", "--max-train-steps", "40", "--checkpointing-steps", "1000",
                       "--log-every", "1", "--num-workers", "0", *extra)]


def _metrics_steps(exp_dir):
    with open(os.path.join(exp_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_a_second_run_and_a_second_resume_on_a_live_runs_folder_are_refused(demo_data, tmp_path):
    """The job-array accident: a run with another seed, then a --resume, started on the folder of a run in progress.
    Both exit 2 at once naming the holder's PID, delete none of its files, and the first run's folder stays its own:
    one seed in config.yaml, every step once in metrics.jsonl. The first then stops as preempted, releasing it."""
    exp_dir = os.path.join(tmp_path, "dup")
    log_path = os.path.join(tmp_path, "first.out")
    first = start(_warmup_cmd(demo_data, tmp_path, "--max-train-steps", "100000"), log_path)
    try:
        wait_for_steps(first, os.path.join(exp_dir, "metrics.jsonl"), 2, log_path)
        planted = os.path.join(exp_dir, "checkpoints", ".last.pt.abcd1234.tmp")  # could be the live run's save
        open(planted, "w").close()
        seconds = [subprocess.Popen(_warmup_cmd(demo_data, tmp_path, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True) for extra in (["--seed", "1"], ["--resume"])]
        for second in seconds:
            stderr = second.communicate(timeout=300)[1]
            assert second.returncode == 2, stderr[-3000:]
            assert f"{exp_dir} is in use by another run (host {socket.gethostname()}, PID {first.pid}," in stderr, \
                stderr[-3000:]
        assert os.path.exists(planted), "a refused run removed a file of the live one"
        os.remove(planted)
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=300) == 75, tail(log_path)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    with open(os.path.join(exp_dir, "config.yaml")) as f:
        assert "seed: 0\n" in f.read()
    steps = _metrics_steps(exp_dir)
    assert steps == list(range(1, len(steps) + 1))
    with open(os.path.join(exp_dir, LOCK_FILE)) as f:
        assert f.read() == ""  # released at the end


def test_a_killed_runs_lock_is_named_and_taken_over(demo_data, tmp_path):
    """SIGKILL leaves the lock's record (no handler runs) but not the lock: the next run takes the folder, and its
    log names the run that was killed."""
    exp_dir = os.path.join(tmp_path, "dup")
    log_path = os.path.join(tmp_path, "first.out")
    first = start(_warmup_cmd(demo_data, tmp_path, "--checkpointing-steps", "2"), log_path)
    wait_for_steps(first, os.path.join(exp_dir, "metrics.jsonl"), 3, log_path)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    resumed = subprocess.run(_warmup_cmd(demo_data, tmp_path, "--resume"), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(os.path.join(exp_dir, "log.txt")) as f:
        log = f.read()
    assert f"took over {os.path.join(exp_dir, LOCK_FILE)} from a run that ended without releasing it (killed): " \
           f"host {socket.gethostname()}, PID {first.pid}," in log


def _record(path, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
              "command": "train.py", "slurm_job": None, **fields}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f)


@pytest.fixture
def locks_do_nothing(monkeypatch):
    """A file system whose locks do not stop a second holder (node-local locks seen from another node; FUSE file
    systems that accept flock and ignore it)."""
    monkeypatch.setattr(operations.lock.fcntl, "flock", lambda fd, op: None)


@pytest.fixture
def locks_refused(monkeypatch):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(operations.lock.fcntl, "flock", refuse)


def test_a_lock_held_by_another_process_refuses_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from operations.lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderInUse, match=f"PID {holder.pid},"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(tmp_path)).acquire()  # the kernel dropped the killed holder's lock
    assert lock.taken_over["pid"] == holder.pid
    lock.release()


def test_where_locks_do_nothing_a_live_holder_on_this_host_is_still_refused(tmp_path, locks_do_nothing):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _record(os.path.join(tmp_path, LOCK_FILE), pid=sleeper.pid)
        with pytest.raises(FolderInUse, match=f"PID {sleeper.pid},.*locks did not stop this run"):
            RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(str(tmp_path)).acquire()  # its PID is gone now: stale
    assert lock.taken_over["pid"] == sleeper.pid
    lock.release()


def test_where_locks_do_nothing_a_holder_on_another_host_counts_as_live_while_it_beats(tmp_path, locks_do_nothing):
    path = os.path.join(tmp_path, LOCK_FILE)
    _record(path, host="node-17", pid=1234)
    with pytest.raises(FolderInUse, match="another host .*node-17, PID 1234.*touched .* s ago"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - STALE_AFTER_S - 1
    os.utime(path, (old, old))  # no heartbeat for longer than STALE_AFTER_S
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.taken_over["host"] == "node-17"
    lock.release()


def test_the_holder_beats_so_that_other_hosts_see_it_live(tmp_path, monkeypatch):
    monkeypatch.setattr(operations.lock, "HEARTBEAT_S", 0.05)
    lock = RunLock(str(tmp_path)).acquire()
    try:
        old = time.time() - 1000
        os.utime(lock.path, (old, old))
        time.sleep(0.5)
        assert time.time() - os.stat(lock.path).st_mtime < 5
    finally:
        lock.release()


def test_where_locks_are_refused_the_record_alone_guards_the_folder(tmp_path, locks_refused):
    lock = RunLock(str(tmp_path)).acquire()
    assert not lock.locks_work
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _record(lock.path, pid=sleeper.pid)  # as if another process on this host held it
        with pytest.raises(FolderInUse, match="this file system's locks do not work"):
            RunLock(str(tmp_path)).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
        lock.release()


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """A DataLoader worker is a fork of the run: its copy of the descriptor is closed, so the lock is the run's alone
    and goes when the run goes."""
    lock = RunLock(str(tmp_path)).acquire()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it still has the lock's descriptor open
        try:
            os.fstat(lock.fd)
            os.write(write, b"open")
        except OSError:
            os.write(write, b"closed")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"closed"
    fd = os.open(lock.path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the parent still holds it
    finally:
        os.close(fd)
        lock.release()
