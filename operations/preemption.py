"""Preemption as a scheduler sees it: the signals that stop a run, the exit statuses a requeue script reads
(docs/operations.md, "Exit codes"), and how a training process tells launch.py how it ended. No torch here: launch.py
and the entry points' first lines use it before anything heavy is imported."""
import os
import signal
import socket
from typing import List, Optional

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL, "try again later": a requeue script can tell preemption from failure
EXIT_IO_ERROR = 74  # sysexits.h EX_IOERR: "could not write", told apart from success and from preemption
# launch.py sets it; each training process writes its exit status into that folder (report_exit_status).
EXIT_STATUS_DIR_ENV = "ERW_LAUNCH_STATUS_DIR"

_early_signal: Optional[str] = None


def _record_early(signum, frame) -> None:
    global _early_signal
    _early_signal = signal.Signals(signum).name


def catch_early_preemption() -> None:
    """From now on a preemption signal is recorded (`early_preemption`) rather than fatal (status 143): entry points
    call it first, and the trainer stops before its first step."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _record_early)


def early_preemption() -> Optional[str]:
    return _early_signal


# What a training process reports when its loop starts: from then on a preemption signal means a save. A report
# still saying so at the end is a process that died without a word (SIGKILL, a segfault, the OOM killer).
TRAINING = "training"


def report_exit_status(code) -> None:
    """Under launch.py, leave this process's exit status (or TRAINING) where the wrapper reads it (atomically, one
    file per process). The launchers themselves pass on only 0 or 1."""
    directory = os.environ.get(EXIT_STATUS_DIR_ENV)
    if not directory or not os.path.isdir(directory):
        return
    name = f"{socket.gethostname()}-{os.getpid()}"
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{code}\n")
    os.replace(tmp, os.path.join(directory, name))


def read_exit_statuses(directory: str) -> List[Optional[int]]:
    """The exit statuses that training processes reported into `directory` (report_exit_status); None for one that
    reported TRAINING and nothing after it."""
    codes = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("."):
            continue
        with open(os.path.join(directory, name)) as f:
            text = f.read().strip()
        if text == TRAINING:
            codes.append(None)
        elif text.lstrip("-").isdigit():
            codes.append(int(text))
    return codes
