"""One live run per folder: a training run's experiment folder, or a sample folder that sample_ddp.py fills.

`RunLock(folder).acquire()` holds `folder/run.lock` for the run's lifetime in two ways at once:

- an advisory `flock` on the file, which the kernel (or the file system's lock manager) drops when the process dies,
  however it dies. A second run that cannot get it is refused at once, naming the holder.
- a record in the file: host, PID, start time, command and SLURM job, rewritten in place (replacing the file would
  give a second run another inode to lock). A clean exit empties it, so a record found by a run that got the lock
  is a killed run's leftover: it is named in the log and taken over.

The record is also the check where locks do not protect: on file systems that refuse `flock` (ENOLCK, EOPNOTSUPP,
...) and on those whose locks are local to one node (Lustre mounted `localflock`, BeeGFS without global file locks,
NFS mounted `nolock`), a second run gets the lock although the first holds it. So a record is trusted as dead only
if it can be shown to be: on this host its PID no longer runs; on another host its heartbeat (the holder touches the
file every HEARTBEAT_S) is older than STALE_AFTER_S. Otherwise the run is refused, and the message says how to
proceed. The one window left open is two runs on file systems without working locks that read an empty record at
the same instant (README, "File systems without working locks").
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, Optional

from operations.cli import FolderTaken
from operations.files import current_umask

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S  # a holder on another host whose file is older than this has stopped touching it
_LOCKS_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}

# Descriptors of held locks: a forked child (a DataLoader worker) closes its copies, so that only the run holds the
# lock (a flock belongs to every copy of the descriptor, and a worker outliving a killed run would keep it).
_held_fds = set()


def _close_held_fds_in_child() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)  # the parent's lock stays: it holds its own copy
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_held_fds_in_child)


class FolderInUse(FolderTaken):
    """Another live run holds the folder (or may: see the module docstring). The message names it."""


def describe_holder(record: Dict[str, object]) -> str:
    """'host H, PID P, started T (SLURM job J): COMMAND' from a lock record."""
    job = f" (SLURM job {record['slurm_job']})" if record.get("slurm_job") else ""
    return (f"host {record.get('host')}, PID {record.get('pid')}, started {record.get('started')}{job}: "
            f"{record.get('command')}")


def _pid_runs(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """Hold `folder/run.lock` until release() (or the process's end). `taken_over` is the record of a killed run
    whose stale lock this one replaced, for the caller to log; `locks_work` is False where flock is refused."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: Optional[int] = None
        self.taken_over: Optional[Dict[str, object]] = None
        self.locks_work = True
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    record = self._read(fd)
                    raise FolderInUse(f"{self.folder} is in use by another run ("
                                      f"{describe_holder(record) if record else 'its record is not written yet'}); "
                                      f"wait for it to end, or use another folder") from None
                if error.errno not in _LOCKS_UNSUPPORTED:
                    raise
                self.locks_work = False  # the record alone guards the folder
            record = self._read(fd)
            if record:
                self._refuse_unless_dead(fd, record)
                self.taken_over = record
            self._write(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv), "slurm_job": _slurm_job()})
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _held_fds.add(fd)
        self._heartbeat = threading.Thread(target=self._beat, name=f"run-lock heartbeat {self.path}", daemon=True)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        """Empty the record (a clean end), drop the lock. Idempotent."""
        if self.fd is None:
            return
        self._stop.set()
        self._heartbeat.join()
        fd, self.fd = self.fd, None
        _held_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # drops the flock

    def _refuse_unless_dead(self, fd: int, record: Dict[str, object]) -> None:
        why = "this file system's locks do not work" if not self.locks_work else (
            "this file system's locks did not stop this run, so they are not shared between processes here")
        if record.get("host") == socket.gethostname():
            if record.get("pid") != os.getpid() and _pid_runs(record.get("pid")):
                raise FolderInUse(f"{self.folder} is in use by another run ({describe_holder(record)}), and {why}; "
                                  f"wait for it to end, or use another folder. If no run uses the folder (PID "
                                  f"{record.get('pid')} is now another program), delete {self.path}")
            return
        age = time.time() - os.fstat(fd).st_mtime
        if age < STALE_AFTER_S:
            raise FolderInUse(f"{self.folder} may be in use by a run on another host ({describe_holder(record)}), "
                              f"which touched {self.path} {age:.0f} s ago, and {why} across hosts; wait for it to "
                              f"end, or use another folder. If that run is over, wait {STALE_AFTER_S - age:.0f} s "
                              f"more or delete {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.fd)
            except (OSError, TypeError):  # released meanwhile
                return

    @staticmethod
    def _read(fd: int) -> Dict[str, object]:
        text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace").strip()
        if not text:
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {"command": f"(unreadable record: {text[:80]!r})"}
        return record if isinstance(record, dict) else {"command": f"(unreadable record: {text[:80]!r})"}

    @staticmethod
    def _write(fd: int, record: Dict[str, object]) -> None:
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)


def _slurm_job() -> Optional[str]:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")
