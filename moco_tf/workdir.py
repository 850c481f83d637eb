"""The workdir of a training run: writable at the start, and used by one run at a time.

`claim(workdir)` is what `train_and_evaluate` does first: create the folder, prove it can be
written (a read-only mount or a full disk fails here, with the path, instead of at the first
checkpoint an hour later), and lock it, so a second `train.py` on the same workdir is refused
instead of interleaving its checkpoints and step log with the first one's.

The lock is `fcntl.flock` on `<workdir>/.lock`: the kernel releases it when its process ends, even
by kill -9 or a crash, so a dead run never blocks the next one. The file also records the pid, host
and start time of the holder, for the error message, and for the fallback on file systems without
flock: there a lock whose pid no longer runs on this host is taken over.

Standard library only, so that it can be imported without TensorFlow.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time

from absl import logging

LOCK_FILE = ".lock"
# errno values that mean "the disk cannot take this write": full, over quota, read-only.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not writable, out of space, or in use by another run."""


def free_bytes(path: str) -> int | None:
    """Free bytes on the file system holding `path` (None if it cannot be told)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, without TensorFlow's `{{function_node …}}` prefix."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", getattr(error, "message", "") or str(error))
    return (text.strip().splitlines() or [type(error).__name__])[0][:300]


def is_disk_full(error: BaseException) -> bool:
    """True for an error of a write that the disk refused (full, over quota, read-only).

    TensorFlow reports a full disk as `ResourceExhaustedError`, like an out-of-memory, so its
    message is checked too.
    """
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return True
    text = str(error)
    return any(s in text for s in ("No space left on device", "Disk quota exceeded",
                                   "Read-only file system"))


def check_writable(workdir: str) -> None:
    """Creates `workdir` if needed and writes, syncs and removes a small probe file in it.

    Raises:
      WorkdirError: naming the path and the reason (read-only, permission, no space, a file in
        the way).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"Cannot create the workdir {workdir}: {e.strerror or e}. "
                           f"Use another --workdir.") from e
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a whole block, so a full disk fails here, not at a checkpoint
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WorkdirError(
            f"The workdir {workdir} is not writable ({e.strerror or e}; "
            f"{format_bytes(free_bytes(workdir))} free). Free some space or use another --workdir."
        ) from e
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    free = free_bytes(workdir)
    if free is not None and free < 100 * 2**20:
        logging.warning("Only %s free in the workdir %s: checkpoints may not fit.",
                        format_bytes(free), workdir)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class WorkdirLock:
    """An exclusive lock on a workdir for one training run (see the module docstring).

    Use as a context manager, or `acquire()` / `release()`.

    Raises (from `acquire`):
      WorkdirError: another live process holds the lock; the message names its pid and host.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = _read_holder(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._in_use(_read_holder(fd)) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                self._check_holder_without_flock(previous)  # no flock here: check the pid
            if previous.get("pid") and previous != _me():
                logging.warning("Taking over the lock %s of pid %s on %s (started %s), which is "
                                "no longer running.", self.path, previous.get("pid"),
                                previous.get("host"), previous.get("started"))
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_me()).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # not unlinked: another process may have it open already
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self):
        return self if self._fd is not None else self.acquire()  # claim() acquired it already

    def __exit__(self, *exc):
        self.release()

    def _in_use(self, holder: dict) -> WorkdirError:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
               if holder.get("pid") else "another process")
        return WorkdirError(
            f"The workdir {self.workdir} is in use by another training run ({who}); two runs "
            f"would overwrite each other's checkpoints. Wait for it to finish, stop it, or use "
            f"another --workdir."
        )

    def _check_holder_without_flock(self, holder: dict) -> None:
        if not holder.get("pid") or holder == _me():
            return
        if holder.get("host") != socket.gethostname():
            raise WorkdirError(
                f"{self._in_use(holder)} This file system has no flock, so whether that run is "
                f"still alive cannot be checked: delete {self.path} if it is not."
            )
        if _pid_running(int(holder["pid"])):
            raise self._in_use(holder)


_STARTED = time.strftime("%Y-%m-%d %H:%M:%S")  # when this process imported the module


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _STARTED}


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def claim(workdir: str) -> WorkdirLock:
    """`check_writable(workdir)`, then an acquired `WorkdirLock` on it (release it when done).

    Raises:
      WorkdirError: unwritable workdir, or one in use by another run.
    """
    check_writable(workdir)
    return WorkdirLock(workdir).acquire()
