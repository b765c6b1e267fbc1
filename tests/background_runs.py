"""A training run in the background, for tests that signal or race it: output to a file (a pipe nobody reads while
the run goes on would fill and stop it), and a wait for the steps it has logged."""
import os
import subprocess
import time

from tests.conftest import ROOT


def start(cmd, log_path) -> subprocess.Popen:
    """cmd in its own session (so that a test can signal its whole group), stdout and stderr to log_path."""
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def tail(log_path, chars: int = 4000) -> str:
    with open(log_path) as f:
        return f.read()[-chars:]


def wait_for_steps(proc, metrics_path, steps: int, log_path, timeout: float = 300) -> None:
    """Until metrics_path holds `steps` complete records; fails with the run's output if it ends or stalls first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isfile(metrics_path):
            with open(metrics_path) as f:
                if sum(1 for line in f if line.endswith("\n")) >= steps:
                    return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}:\n{tail(log_path)}")
