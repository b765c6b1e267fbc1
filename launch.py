"""Run a launcher so that a preempted training run ends with exit status 75, whatever the launcher does.

    python launch.py torchrun --nproc-per-node 8 train.py --config configs/table1_2_sit_xl2_erw.yaml ...
    python launch.py accelerate launch --multi_gpu --num_processes 8 train.py --config ...

On SIGTERM or SIGUSR1 every training process finishes its step, saves and exits 75 (erw/preemption.py). The
launchers do not pass that on: torchrun and accelerate launch end with 1 and a traceback, so a requeue script keyed
on 75 would not requeue. This wrapper:
- installs its signal handlers before it starts anything;
- forwards SIGTERM and SIGUSR1 to the training processes (the launcher's children) itself: torchrun would SIGKILL
  its workers 30 s after its own SIGTERM, possibly mid-save, and dies of SIGUSR1. Ctrl-C (SIGINT) is the
  launcher's to handle, as without the wrapper; the wrapper waits for the processes to end;
- for schedulers that signal every process of the job step (SLURM), asks torchrun to forward SIGUSR1 too and to
  wait longer for its workers (PET_SIGNALS_TO_HANDLE, PET_SHUTDOWN_TIMEOUT, TORCH_ELASTIC_SHUTDOWN_TIMEOUT; set
  them to override);
- adopts the training processes if the launcher dies first (Linux child subreaper) and waits for every one;
- exits with what the training processes reported: 75 if they were preempted (or the signal came before any of
  them could report), 74 if a checkpoint could not be written, else the launcher's own status.
"""
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Set

from erw.preemption import EXIT_IO_ERROR, EXIT_PREEMPTED, EXIT_STATUS_DIR_ENV, PREEMPTION_SIGNALS, read_exit_statuses

LAUNCHERS = ("torchrun", "accelerate")  # as commands; as modules of `python -m`:
LAUNCHER_MODULES = ("torch.distributed.run", "accelerate.commands.launch")
# A process younger than this may not have installed its handler yet (the entry points do it on their first line);
# it gets the signal on a later round instead of dying of it.
MIN_AGE_S = 1.0
POLL_S = 0.2
WORKER_SHUTDOWN_S = 600  # how long torchrun waits for signalled workers before SIGKILL (its default is 30 s)
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
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


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


def main(argv: Optional[List[str]] = None) -> int:
    received: List[int] = []
    for sig in PREEMPTION_SIGNALS:  # first of all
        signal.signal(sig, lambda signum, frame: received.append(signum))
    # Not SIG_IGN, which the launcher would inherit: a terminal's Ctrl-C reaches it directly, as without the wrapper.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if shutil.which(argv[0]) is None and not os.path.isfile(argv[0]):
        print(f"error: launch.py: {argv[0]!r} is not a program here (give the launcher command, e.g. torchrun ...)",
              file=sys.stderr)
        return 2
    _become_subreaper()
    status_dir = tempfile.mkdtemp(prefix="erw-launch-")
    env = {**os.environ, EXIT_STATUS_DIR_ENV: status_dir}
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    env.setdefault("PET_SHUTDOWN_TIMEOUT", str(WORKER_SHUTDOWN_S))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(WORKER_SHUTDOWN_S))
    launcher = is_launcher(argv)
    try:
        if received:  # before anything started: nothing to stop, nothing to save
            print(f"launch.py: received {signal.Signals(received[0]).name} before starting {argv[0]}; exit "
                  f"{EXIT_PREEMPTED} (try again later)", file=sys.stderr)
            return EXIT_PREEMPTED
        child = subprocess.Popen(argv, env=env)
        launcher_status = _wait_for_all(child, launcher, received)
        return _final_status(launcher_status, read_exit_statuses(status_dir), received)
    finally:
        shutil.rmtree(status_dir, ignore_errors=True)


def _wait_for_all(child: subprocess.Popen, launcher: bool, received: List[int]) -> int:
    """Forward signals as they come, reap every process until none is left; the launcher's exit status."""
    signalled: Set[tuple] = set()  # (signal, pid, start time) already sent
    launcher_status: Optional[int] = None
    while True:
        for sig in list(dict.fromkeys(received)):
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
                return launcher_status if launcher_status is not None else 1
            if pid == 0:
                break
            if pid == child.pid:
                launcher_status = os.waitstatus_to_exitcode(status)
                child.returncode = launcher_status
        time.sleep(POLL_S)


def _final_status(launcher_status: int, reported: List[int], received: List[int]) -> int:
    if launcher_status < 0:  # killed by a signal: the shell's convention
        launcher_status = 128 - launcher_status
    name = signal.Signals(received[0]).name if received else None
    if EXIT_IO_ERROR in reported:
        print(f"launch.py: a checkpoint could not be written (the log says which and why); exit {EXIT_IO_ERROR}",
              file=sys.stderr)
        return EXIT_IO_ERROR
    failed = [code for code in reported if code not in (0, EXIT_PREEMPTED)]
    if failed:
        return launcher_status or failed[0]
    if EXIT_PREEMPTED in reported or (name and launcher_status != 0):
        print(f"launch.py: preempted ({name or 'a signal to the training processes'}); the run stopped at a "
              f"checkpoint: exit {EXIT_PREEMPTED}, rerun the same command with --resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return launcher_status


if __name__ == "__main__":
    sys.exit(main())
