"""Run one function in a process of its own, under a deadline, and keep what it returned: how bench/gpu_suite.py runs
each of its parts.

    outcome = run_part(fn, args, limit_s=120, grace_s=20, result_path=".../part.json", emit=print_and_log)

The child is a fork of the caller: it starts with the caller's imports (torch, timm, diffusers: seconds per process
saved) and gets a CUDA context, a GPU memory pool and signal handlers of its own, so a sticky CUDA error, an
out-of-memory kill or a hang ends that part only. The caller must not have loaded the CUDA driver (run_part refuses
then: pass `spawn`, a command that runs the part in a fresh interpreter), nor run torch work on several threads
(OpenMP's thread pool does not survive a fork: the child's first parallel operation would hang).

The child leads a process group of its own (its DataLoader workers and subprocesses join it), writes everything it
prints into a pipe that `emit` receives line by line, and writes its result, or the error that ended it, atomically
to `result_path` as JSON, so that nothing it finished depends on how the parent ends. At `limit_s` the group gets
SIGINT (pytest then writes its JUnit XML, a training loop stops between two operations), and SIGKILL `grace_s`
later. If the caller is interrupted itself (SIGTERM, Ctrl-C: any BaseException while waiting), the child is stopped
the same way before the exception goes on, with the part's Outcome attached to it as `outcome`.

Outcome statuses: ok; failed (the function raised: the error and its traceback); interrupted (stopped by SIGINT at
its deadline, or because the caller stopped; what it returned then, if anything); killed (no result: SIGKILL after
the grace period, or killed from outside, e.g. out of memory).
"""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

from erw.files import atomic_write

POLL_S = 0.05


@dataclass
class Outcome:
    status: str                                  # ok | failed | interrupted | killed
    elapsed_s: float
    result: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    traceback: Optional[str] = None
    exit: Optional[str] = None                   # "code N" or "signal NAME"
    stopped: Optional[str] = None                # why the parent stopped it, if it did
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        out = {"status": self.status, "elapsed_s": round(self.elapsed_s, 1)}
        for key in ("result", "error", "traceback", "exit", "stopped"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _write_json(path: str, payload: Dict[str, Any]) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(payload, indent=1, default=str).encode()))


def run_and_record(fn: Callable[..., Dict[str, Any]], args: Sequence[Any], result_path: str) -> int:
    """fn(*args), its result or the error that ended it written to result_path; the exit code for the process."""
    # SIGINT is how a part is stopped at its deadline. A process started from a shell's background job inherits
    # SIGINT ignored (and Python then installs no handler), so it is set here, in every part, forked or spawned.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    try:
        try:
            payload = {"status": "ok", "result": fn(*args)}
            code = 0
        except KeyboardInterrupt:
            payload = {"status": "interrupted", "error": "KeyboardInterrupt (SIGINT)",
                       "traceback": traceback.format_exc()[-4000:]}
            code = 130
        except BaseException as e:  # SystemExit too: a part that calls sys.exit has failed, not finished
            payload = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc()[-4000:]}
            if getattr(e, "result", None) is not None:  # what a part measured before it failed (PartFailed)
                payload["result"] = e.result
            code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) and e.code else 1
            print(payload["traceback"], file=sys.stderr)
        _write_json(result_path, payload)
    except BaseException:  # even writing failed: the exit code and the output say what they can
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def _child(fn: Callable[..., Dict[str, Any]], args: Sequence[Any], result_path: str, write_fd: int) -> None:
    """The forked process: a group of its own, default signals, output into the pipe; never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        code = run_and_record(fn, args, result_path)
    finally:
        os._exit(code)


def cuda_driver_loaded() -> bool:
    """Whether this process has the CUDA driver library mapped (Linux): after cuInit a forked child cannot use CUDA,
    and torch.cuda.is_available() calls it unless PYTORCH_NVML_BASED_CUDA_CHECK=1 (a library may call it on import:
    diffusers does)."""
    try:
        with open("/proc/self/maps") as f:
            return "libcuda.so" in f.read()
    except OSError:
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # the child has not made its group yet
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _pump(read_fd: int, emit: Callable[[str], None], stop: threading.Event) -> None:
    """Pass the child's output on, line by line (a partial line when nothing follows for a while)."""
    pending = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], 0.2)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                emit(line.decode(errors="replace") + "\n")
        elif stop.is_set():
            break
    if pending:
        emit(pending.decode(errors="replace") + "\n")
    os.close(read_fd)


def run_part(fn: Callable[..., Dict[str, Any]], args: Sequence[Any], *, limit_s: float, grace_s: float,
             result_path: str, emit: Callable[[str], None], spawn: Optional[Sequence[str]] = None,
             spawn_cwd: Optional[str] = None) -> Outcome:
    """fn(*args) in a forked child under the deadline `limit_s` from now; see the module docstring. With `spawn`
    (a command line), that command runs instead of the fork, in a new session, and must write result_path the same
    way (run_and_record): for a caller that can no longer fork safely."""
    if spawn is None and cuda_driver_loaded():
        raise RuntimeError("run_part: this process has loaded the CUDA driver, so a forked part could not use CUDA; "
                           "run the part with `spawn`")
    if os.path.exists(result_path):
        os.remove(result_path)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid, pump, stop_pumping, stopped = None, None, threading.Event(), None

    def wait(until: Optional[float]) -> Optional[int]:
        while True:
            done, status_word = os.waitpid(pid, os.WNOHANG)
            if done:
                return status_word
            if until is not None and time.monotonic() >= until:
                return None
            time.sleep(POLL_S)

    def stop_child() -> int:
        """SIGINT to the group, SIGKILL after the grace period; the exit status."""
        _signal_group(pid, signal.SIGINT)
        ended = wait(time.monotonic() + grace_s)
        if ended is None:
            _signal_group(pid, signal.SIGKILL)
            ended = wait(None)
        return ended

    try:  # from the fork on: a signal to the caller at any point still stops the child
        if spawn is None:
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                _child(fn, args, result_path, write_fd)
        else:
            pid = subprocess.Popen(list(spawn), stdin=subprocess.DEVNULL, stdout=write_fd, stderr=write_fd,
                                   cwd=spawn_cwd, start_new_session=True).pid  # reaped by wait() below
        os.close(write_fd)
        pump = threading.Thread(target=_pump, args=(read_fd, emit, stop_pumping), daemon=True)
        pump.start()
        status = wait(start + limit_s)
        if status is None:
            stopped = f"deadline: {limit_s:.0f} s"
            status = stop_child()
    except BaseException as e:  # the caller was stopped: stop the part the same way, keep its result, go on
        if pid:
            e.outcome = _outcome(stop_child(), start, result_path,
                                 f"the suite was stopped ({type(e).__name__}: {e})", grace_s, force="interrupted")
            _finish(pid, pump, stop_pumping)
        raise
    _finish(pid, pump, stop_pumping)
    return _outcome(status, start, result_path, stopped, grace_s)


def _outcome(status: int, start: float, result_path: str, stopped: Optional[str], grace_s: float,
             force: Optional[str] = None) -> Outcome:
    """What the ended child left: its result file, else how it ended."""
    elapsed = time.monotonic() - start
    exit_text = (f"signal {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
                 else f"code {os.WEXITSTATUS(status)}")
    payload = None
    if os.path.exists(result_path):
        with open(result_path) as f:
            payload = json.load(f)
    if payload is None:
        why = (f"killed after the {grace_s:.0f} s grace period" if stopped and os.WIFSIGNALED(status)
               else f"ended by {exit_text}")
        return Outcome(force or "killed", elapsed, error=f"no result: {why}", exit=exit_text, stopped=stopped)
    state = payload["status"]
    if stopped and state == "failed":  # what a part raises when SIGINT stops it (pytest: exit code 2)
        state = "interrupted"
    return Outcome(force or state, elapsed, result=payload.get("result"), error=payload.get("error"),
                   traceback=payload.get("traceback"), exit=exit_text, stopped=stopped)


def _finish(pid: int, pump: Optional[threading.Thread], stop_pumping: threading.Event) -> None:
    """After the child ended: end what it left in its group (DataLoader workers), drain its output."""
    _signal_group(pid, signal.SIGKILL)
    stop_pumping.set()
    if pump is not None:
        pump.join(timeout=10)
