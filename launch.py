"""Run a launcher so that a preempted training run ends with exit status 75, whatever the launcher does.

    python launch.py torchrun --nproc-per-node 8 train.py --config configs/table1_2_sit_xl2_erw.yaml ...
    python launch.py accelerate launch --multi_gpu --num_processes 8 train.py --config ...

The launchers end a preempted run with 1. This wrapper forwards SIGTERM and SIGUSR1 to the training processes, waits
for every one (PET_SHUTDOWN_TIMEOUT at most, then SIGKILL) and exits with what they reported: 75 preempted, 74 a
checkpoint not written or a preempted process that died before its save, else the launcher's status
(docs/operations.md, "Preemption" and "Exit codes").
"""
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Set, Tuple

from operations.preemption import (EXIT_IO_ERROR, EXIT_PREEMPTED, EXIT_STATUS_DIR_ENV, PREEMPTION_SIGNALS,
                                   read_exit_statuses)

LAUNCHERS = ("torchrun", "accelerate")  # as commands; as modules of `python -m`:
LAUNCHER_MODULES = ("torch.distributed.run", "accelerate.commands.launch")
# A process younger than this may not have installed its handler yet (the entry points do it on their first line);
# it gets the signal on a later round instead of dying of it.
MIN_AGE_S = 1.0
POLL_S = 0.2
WORKER_SHUTDOWN_S = 600  # how long torchrun waits for signalled workers before SIGKILL (its default is 30 s)
KILL_WAIT_S = 10.0  # how long processes ended with SIGKILL get to be gone (one in uninterruptible I/O may not be)
_PR_SET_CHILD_SUBREAPER = 36

USAGE = __doc__.split("\n\n")[1]


def _become_subreaper() -> None:
    """Orphans below us (workers of a launcher that died) become our children, so we can wait for them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's own wait has to do
        pass


def _process_table() -> Dict[int, tuple]:
    """pid -> (parent pid, start time in clock ticks since boot), from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        table[int(entry)] = (int(fields[1]), int(fields[19]))
    return table


def _age_s(start_ticks: int) -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")  # /proc's clock


def training_processes(child: int, launcher: bool) -> Dict[int, int]:
    """The processes a forwarded signal is for, with their start times: the launcher's children (and orphans we
    adopted) when `child` is a launcher, else the child itself."""
    table = _process_table()
    if not launcher:
        return {child: table[child][1]} if child in table else {}
    me = os.getpid()
    return {pid: start for pid, (parent, start) in table.items()
            if (parent == child) or (parent == me and pid != child)}


def is_launcher(argv: List[str]) -> bool:
    """Whether the command starts the training processes as its children (else it is one itself)."""
    return os.path.basename(argv[0]) in LAUNCHERS or (len(argv) > 2 and argv[1] == "-m" and argv[2] in LAUNCHER_MODULES)


def _descendants() -> List[int]:
    """Every process below this one (launcher, training processes, their workers, adopted orphans)."""
    children: Dict[int, List[int]] = {}
    for pid, (parent, _) in _process_table().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [os.getpid()]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def main(argv: Optional[List[str]] = None) -> int:
    received: List[int] = []
    interrupted: List[int] = []
    for sig in PREEMPTION_SIGNALS:  # first of all
        signal.signal(sig, lambda signum, frame: received.append(signum))
    # Not SIG_IGN, which the launcher would inherit: a terminal's Ctrl-C reaches it directly, as without the wrapper.
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if shutil.which(argv[0]) is None:  # as Popen looks for it: on PATH, or a path to an executable file
        why = ("is a file, not a program on PATH or an executable path: name the launcher first, e.g. python "
               f"launch.py torchrun --nproc-per-node 8 {argv[0]} ..." if os.path.isfile(argv[0]) else
               "is not a program here (give the launcher command, e.g. torchrun ...)")
        print(f"error: launch.py: {argv[0]!r} {why}", file=sys.stderr)
        return 2
    env = {**os.environ}
    # SLURM signals every process of the step: torchrun is to forward SIGUSR1 (which kills it otherwise) and to wait
    # for the save longer than the 30 s after which it SIGKILLs its workers.
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    env.setdefault("PET_SHUTDOWN_TIMEOUT", str(WORKER_SHUTDOWN_S))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(WORKER_SHUTDOWN_S))
    try:
        grace_s = float(env["PET_SHUTDOWN_TIMEOUT"])
    except ValueError:
        print(f"error: launch.py: PET_SHUTDOWN_TIMEOUT={env['PET_SHUTDOWN_TIMEOUT']!r} is not a number of seconds",
              file=sys.stderr)
        return 2
    _become_subreaper()
    status_dir = tempfile.mkdtemp(prefix="erw-launch-")
    env[EXIT_STATUS_DIR_ENV] = status_dir
    try:
        if received:  # before anything started: nothing to stop, nothing to save
            print(f"launch.py: received {signal.Signals(received[0]).name} before starting {argv[0]}; exit "
                  f"{EXIT_PREEMPTED} (try again later)", file=sys.stderr)
            return EXIT_PREEMPTED
        try:
            child = subprocess.Popen(argv, env=env)
        except OSError as error:
            print(f"error: launch.py: cannot start {argv[0]!r}: {error.strerror or error}", file=sys.stderr)
            return 2
        launcher_status, ended = _wait_for_all(child, is_launcher(argv), received, interrupted, grace_s)
        return _final_status(launcher_status, read_exit_statuses(status_dir), received, ended)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _wait_for_all(child: subprocess.Popen, launcher: bool, received: List[int], interrupted: List[int],
                  grace_s: float) -> Tuple[int, bool]:
    """Forward signals as they come to the training processes themselves, reap every process until none is left;
    (the launcher's exit status, whether launch.py ended the processes itself). From the first preemption signal the
    processes have grace_s to save and end; a SIGINT after it ends them at once."""
    signalled: Set[tuple] = set()  # (signal, pid, start time) already sent
    launcher_status: Optional[int] = None
    deadline: Optional[float] = None  # for the processes to end, once a preemption signal came
    ended_at: Optional[float] = None  # when launch.py sent SIGKILL
    repeats_seen = 1
    while True:
        now = time.monotonic()
        if received and deadline is None:
            deadline, interrupted[:] = now + grace_s, []
        name = signal.Signals(received[0]).name if received else None
        if deadline is not None and ended_at is None and (now >= deadline or interrupted):
            why = "SIGINT" if interrupted else f"{grace_s:g} s"
            print(f"launch.py: the training processes did not end within {why} after {name}: ending every process "
                  "below launch.py (SIGKILL); their preemption save is lost", file=sys.stderr)
            for pid in _descendants():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ended_at = now
        if ended_at is not None and now >= ended_at + KILL_WAIT_S:
            print(f"launch.py: processes {_descendants()} are still there {KILL_WAIT_S:g} s after SIGKILL "
                  "(uninterruptible I/O?); not waiting for them", file=sys.stderr)
            return (launcher_status if launcher_status is not None else -signal.SIGKILL), True
        if len(received) > repeats_seen and ended_at is None:
            repeats_seen = len(received)
            print(f"launch.py: still waiting up to {deadline - now:.0f} s for the training processes to save; "
                  "SIGINT ends them now", file=sys.stderr)
        for sig in list(dict.fromkeys(received)) if ended_at is None else []:
            for pid, start in training_processes(child.pid, launcher).items():
                if (sig, pid, start) not in signalled and _age_s(start) >= MIN_AGE_S:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        continue
                    signalled.add((sig, pid, start))
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # nobody left
                return (launcher_status if launcher_status is not None else 1), ended_at is not None
            if pid == 0:
                break
            if pid == child.pid:
                launcher_status = os.waitstatus_to_exitcode(status)
                child.returncode = launcher_status
        time.sleep(POLL_S)


def _final_status(launcher_status: int, reported: List[Optional[int]], received: List[int],
                  ended: bool = False) -> int:
    """reported: the training processes' statuses, None for one that died while training without reporting one;
    ended: whether launch.py ended them itself."""
    if launcher_status < 0:  # killed by a signal: the shell's convention
        launcher_status = 128 - launcher_status
    name = signal.Signals(received[0]).name if received else None
    if EXIT_IO_ERROR in reported:
        print(f"launch.py: a checkpoint could not be written (the log says which and why); exit {EXIT_IO_ERROR}",
              file=sys.stderr)
        return EXIT_IO_ERROR
    failed = [code for code in reported if code not in (0, EXIT_PREEMPTED, None)]
    if failed:
        return launcher_status or failed[0]
    if name and (ended or None in reported):
        print(f"launch.py: a training process ended after {name} without writing its checkpoint ("
              f"{'ended by launch.py' if ended else 'killed, a segfault or the OOM killer'}): the newest checkpoint "
              f"is older than the step it reached; exit {EXIT_IO_ERROR}", file=sys.stderr)
        return EXIT_IO_ERROR
    if EXIT_PREEMPTED in reported or (name and launcher_status != 0):
        print(f"launch.py: preempted ({name or 'a signal to the training processes'}); the run stopped at a "
              f"checkpoint: exit {EXIT_PREEMPTED}, rerun the same command with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return launcher_status


if __name__ == "__main__":
    sys.exit(main())
