"""One live run per folder (an experiment folder, or a sample folder): `folder/run.lock`, held with an `flock` and a
record of the holder, which a clean end empties. Where locks do not work, the record alone decides whether its holder
lives (docs/operations.md, "One live run per folder" and "File systems without working locks")."""
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
    """Another live run holds the folder (or may, where locks do not work). The message names it."""


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
            job = os.environ.get("SLURM_JOB_ID")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):  # as squeue names an array's task
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
            mine = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "command": " ".join(sys.argv), "slurm_job": job}
            os.ftruncate(fd, 0)  # in place: replacing the file would give a second run another inode to lock
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
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
        """A record's holder counts as live unless shown dead: its PID gone (this host), or its file untouched for
        STALE_AFTER_S (another host)."""
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
            record = None
        return record if isinstance(record, dict) else {"command": f"(unreadable record: {text[:80]!r})"}
