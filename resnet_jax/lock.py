"""One writer per workdir: an advisory lock that a run holds for as long as it writes there.

The lock is `flock` on the workdir itself (a directory opened read-only), so that removing or
replacing any file in it lets no second writer in, and on `<workdir>/lock`, a file that names its
holder (host, PID, start time) so that a refused second writer can say who holds it. Where the
filesystem cannot lock a directory (NFS, which emulates flock with locks that need a file open
for writing) the file's lock alone holds, as long as the file is not removed. The kernel drops
both locks when their process dies however it dies, so a run killed with -9 never blocks its
own resume: no stale-lock heuristics are needed. The file is removed on release; a process that
locked a file someone removed meanwhile notices (its inode is no longer the path's) and tries
again.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import time

LOCK_FILE = "lock"


class WorkdirError(Exception):
  """The workdir cannot be used: held by another writer, not a directory, or not writable."""


class WorkdirLock:
  """The lock on one workdir; `acquire()` creates the workdir if needed.

  Use as a context manager, or call acquire() and release(). Not re-entrant: a second
  WorkdirLock on the same workdir in the same process is refused like any other writer.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None
    self._dir_fd: int | None = None
    self._created_workdir = False

  def acquire(self, *, timeout_s: float = 0.0) -> None:
    """Takes the lock, waiting up to `timeout_s` for another holder to let go.

    Raises:
      WorkdirError: the workdir is a file, cannot be created or written, or another process
        holds it past the timeout (the message names that process).
    """
    self._make_workdir()
    deadline = time.monotonic() + timeout_s
    while True:
      dir_fd = fd = None
      try:
        dir_fd = self._lock_directory()
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        _close(fd, dir_fd)
        if time.monotonic() >= deadline:
          raise WorkdirError(f"workdir {self.workdir} is in use by {_read_holder(self.path)}; "
                             "stop that run first, or choose another --workdir") from None
        time.sleep(0.5)
        continue
      except BaseException:
        _close(fd, dir_fd)
        raise
      if _same_file(fd, self.path):
        break
      _close(fd, dir_fd)  # Its holder removed the file between our open and our lock.
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "host": socket.gethostname(), "pid": os.getpid(),
        "since": datetime.datetime.now().isoformat(timespec="seconds")}).encode() + b"\n")
    self._fd, self._dir_fd = fd, dir_fd

  def release(self, *, remove_new_workdir: bool = False) -> None:
    """Lets go of the lock; with `remove_new_workdir`, also removes a workdir that acquire()
    created and that nothing else was written into (a run refused before it began)."""
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)  # Before unlocking: the next holder then locks a fresh file.
    _close(self._fd, self._dir_fd)
    self._fd = self._dir_fd = None
    if remove_new_workdir and self._created_workdir:
      with contextlib.suppress(OSError):
        os.rmdir(self.workdir)  # Only if empty.

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _make_workdir(self) -> None:
    if os.path.exists(self.workdir) and not os.path.isdir(self.workdir):
      raise WorkdirError(f"workdir {self.workdir} is a file, not a directory; "
                         "choose another --workdir")
    try:
      os.makedirs(self.workdir)
      self._created_workdir = True
    except FileExistsError:
      pass
    except OSError as e:
      raise WorkdirError(f"workdir {self.workdir} cannot be created: "
                         f"{e.strerror}") from None

  def _lock_directory(self) -> int | None:
    """Locks the workdir directory: its descriptor, or None where it cannot be locked (then the
    file's lock alone holds). Raises BlockingIOError while another process holds it."""
    try:
      fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # Not readable: the lock file still works.
      return None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise
    except OSError:  # EBADF on NFS, ENOLCK, EOPNOTSUPP: a filesystem that cannot.
      os.close(fd)
      return None
    return fd

  def _open(self) -> int:
    try:
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"workdir {self.workdir} is not writable: "
                         f"{e.strerror}") from None


def _read_holder(path: str) -> str:
  """`pid 123 on host h since 2026-11-27T10:00:00`, or a placeholder while it writes itself (or
  if its file was removed)."""
  try:
    with open(path, "rb") as f:
      holder = json.loads(f.read(4096))
    return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


def _close(*fds: int | None) -> None:
  for fd in fds:
    if fd is not None:
      os.close(fd)


def _same_file(fd: int, path: str) -> bool:
  try:
    return os.path.samestat(os.fstat(fd), os.stat(path))
  except FileNotFoundError:
    return False
