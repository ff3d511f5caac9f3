"""One run per workdir: WORKDIR/run.lock names the run that holds it.

A second `experiments.main` (or sweep) on a workdir a live run holds is
refused at once, with the holder's host, pid and start time and what to do;
two runs writing one workdir would otherwise race on the same checkpoint
numbers or, seconds apart, both train to the end over each other's files.

The lock file is JSON: the holder's host, boot id, pid (and the pid's start
time, so a recycled pid is not taken for the holder), when it started, a run
id, the command, and `heartbeat`, the time the holder last refreshed it. A
thread of the holder refreshes it every REFRESH_SECONDS while the run lives.

When is a lock stale (taken over, with a warning naming the old holder)?
  * its holder ran on this host: when that process is gone. A SIGKILLed run's
    lock is taken over at once by the rerun.
  * its holder ran on another host (a multi-host run's process 0 that moved,
    a shared disk, gs://): when it has not been refreshed for LEASE_SECONDS.

How it is made atomic:
  * a local (or NFS) workdir: the file is also held with flock(2) while the
    run lives, which the kernel releases when the process dies however it
    dies; the JSON is only read to name the holder, and to honour a holder
    on another host whose flock this host cannot see (the heartbeat).
  * gs://: Cloud Storage's generation preconditions, through
    google-cloud-storage (installed with gcsfs): the lock is created only if
    absent (ifGenerationMatch=0), taken over and refreshed only if unchanged
    since it was read (ifGenerationMatch=G). Of two runs taking over one
    stale lock exactly one succeeds; the other is refused, naming the winner.

A holder that finds at a refresh that another run has taken its lock over
(it was stalled past the lease) records it, and `check` then stops the run
before its next checkpoint.

Multi-host: one run is all its processes. Process 0 takes the lock and
refreshes it; `experiments.checkpoints.claim_workdir` tells the others
whether it got it, so every process stops, or none.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from absl import logging

from experiments.errors import WorkdirError, WorkdirInUseError, is_out_of_space, out_of_space

LOCK_FILE = "run.lock"
# How often the holder rewrites its heartbeat, and how long a lock of another
# host may go unrefreshed before it is taken for abandoned. The lease is ten
# refreshes: a holder stalled (a slow disk, a paused VM) for less than that
# keeps its lock. Settable for tests and for clusters with slow storage.
REFRESH_SECONDS = float(os.environ.get("INQ_LOCK_REFRESH_SECONDS", "30"))
LEASE_SECONDS = float(os.environ.get("INQ_LOCK_LEASE_SECONDS", "300"))
_SIZE = 1024  # the file is padded to this many bytes: a refresh overwrites it in one write


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _start_ticks(pid: int) -> Optional[int]:
  """When process `pid` started (clock ticks since boot), or None where /proc is absent."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      # The command name (field 2) may hold spaces and parentheses: fields
      # after its closing parenthesis; starttime is field 22.
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


HOST = socket.gethostname()
BOOT_ID = _boot_id()


def _alive(pid: int, start_ticks: Optional[int]) -> bool:
  """Whether process `pid` of this host is the one that started at `start_ticks`."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: alive
    pass
  if start_ticks is not None:
    now = _start_ticks(pid)
    if now is not None and now != start_ticks:
      return False  # the pid was reused by a later process
  return True


def _now_text(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M:%S UTC")


def describe(holder: Optional[dict]) -> str:
  """'host H, pid P, started T (refreshed Ns ago): COMMAND' for messages."""
  if not holder:
    return "a run whose lock file is unreadable"
  age = time.time() - float(holder.get("heartbeat", 0))
  command = holder.get("command", "")
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
          f"{_now_text(float(holder.get('started', 0)))} (lock refreshed {age:.0f}s ago)"
          + (f": {command}" if command else ""))


def stale_reason(holder: Optional[dict]) -> Optional[str]:
  """Why `holder`'s lock is abandoned, or None while its run may be alive."""
  if holder is None:
    return "its file is empty or unreadable (a holder killed while writing it)"
  if holder.get("host") == HOST and holder.get("boot_id", "") == BOOT_ID:
    if not _alive(int(holder.get("pid", -1)), holder.get("start_ticks")):
      return f"its process {holder.get('pid')} on this host is gone"
    return None
  if holder.get("host") == HOST:
    return "this host has restarted since"
  age = time.time() - float(holder.get("heartbeat", 0))
  if age > LEASE_SECONDS:
    return (f"it has not been refreshed for {age:.0f}s (more than {LEASE_SECONDS:.0f}s: its "
            f"run on {holder.get('host')} is gone)")
  return None


def _parse(data: bytes) -> Optional[dict]:
  try:
    holder = json.loads(data.decode())
  except (UnicodeDecodeError, ValueError):
    return None
  return holder if isinstance(holder, dict) and "pid" in holder else None


# ------------------------------------------------------------------ storage


class _LocalStore:
  """The lock file on a local or NFS disk, held with flock(2) while the run lives."""

  errors = ()  # what its operations raise besides OSError

  def __init__(self, path: str):
    self.path, self.fd = path, None

  def read(self) -> tuple:
    """(holder or None, exists)."""
    try:
      with open(self.path, "rb") as f:
        return _parse(f.read()), True
    except OSError:  # none yet, or no directory there (`acquire` says what is wrong)
      return None, False

  def take(self, decide) -> bool:
    """Opens and flocks the file, then writes ours if `decide(holder)` says so.

    `decide(holder)` raises to refuse. Returns False if a live process of a
    host that shares the flock holds it (the caller reads the file and refuses).
    """
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        return False
      except OSError:  # a file system without flock: the JSON and the heartbeat decide
        pass
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:  # released (unlinked) by its holder between open and flock: again
        os.close(fd)
        continue
      try:
        data = os.pread(fd, 1 << 16, 0)
        decide(_parse(data) if data.strip() else "empty")
      except BaseException:
        os.close(fd)
        raise
      self.fd = fd
      return True
    raise WorkdirError(f"could not take {self.path}: it keeps being replaced")

  def write(self, data: bytes) -> None:
    os.pwrite(self.fd, data, 0)
    os.ftruncate(self.fd, len(data))
    os.fsync(self.fd)

  def mine(self, run_id: str) -> Optional[dict]:
    """The holder now in the file if it is not `run_id`, else None."""
    holder = _parse(os.pread(self.fd, 1 << 16, 0))
    return None if holder is not None and holder.get("run_id") == run_id else (holder or {})

  def release(self, run_id: str) -> None:
    if self.fd is None:
      return
    try:
      if self.mine(run_id) is None:
        os.unlink(self.path)  # before the flock goes: a later run creates a fresh file
    except OSError:
      pass
    finally:
      os.close(self.fd)
      self.fd = None


class _GcsStore:
  """The lock object on Cloud Storage, changed only under generation preconditions."""

  def __init__(self, path: str):
    # Imported here: google-cloud-storage comes with gcsfs, which only gs://
    # workdirs need (setup.cfg's `gcs` extra).
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    from google.cloud import storage  # pylint: disable=g-import-not-at-top
    self.exceptions = exceptions
    self.errors = (exceptions.GoogleAPIError,)
    bucket, _, key = path[len("gs://"):].partition("/")
    self.bucket = storage.Client().bucket(bucket)
    self.key, self.path, self.generation = key, path, None

  def read(self) -> tuple:
    """(holder or None, generation or None when absent)."""
    blob = self.bucket.get_blob(self.key)
    if blob is None:
      return None, None
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation)
    except (self.exceptions.NotFound, self.exceptions.PreconditionFailed):
      return self.read()  # changed while read: read the new one
    return _parse(data), blob.generation

  def take(self, decide) -> bool:
    holder, generation = self.read()
    if generation is not None:
      decide(holder if holder is not None else "empty")
    # Absent: create only if still absent; present and stale: replace only if unchanged.
    self.generation = generation or 0
    return True

  def write(self, data: bytes) -> None:
    """Writes if the object is still what was last read or written; else raises _Lost."""
    blob = self.bucket.blob(self.key)
    try:
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=self.generation)
    except self.exceptions.PreconditionFailed:
      raise _Lost() from None
    self.generation = blob.generation

  def mine(self, run_id: str) -> Optional[dict]:
    holder, generation = self.read()
    if holder is not None and holder.get("run_id") == run_id:
      self.generation = generation
      return None
    return holder or {}

  def release(self, run_id: str) -> None:
    if not self.generation:
      return
    try:
      self.bucket.blob(self.key).delete(if_generation_match=self.generation)
    except (self.exceptions.NotFound, self.exceptions.PreconditionFailed):
      pass  # taken over meanwhile: it is the new holder's now
    self.generation = None


class _Lost(Exception):
  """The lock changed hands since this process last wrote it."""


# ------------------------------------------------------------------ the lock


_HELD: dict = {}  # lock path -> WorkdirLock held by this process
_GUARD = threading.Lock()


def _lock_path(workdir: str) -> str:
  workdir = str(workdir)
  if "://" in workdir:
    return workdir.rstrip("/") + "/" + LOCK_FILE
  return os.path.join(os.path.abspath(workdir), LOCK_FILE)


def _store(path: str):
  return _GcsStore(path) if path.startswith("gs://") else _LocalStore(path)


def _what_to_do(workdir: str, holder: Optional[dict]) -> str:
  host = (holder or {}).get("host", "its host")
  pid = (holder or {}).get("pid", "PID")
  return (f"Wait for it to finish, stop it (kill {pid} on {host}), or use another "
          f"--workdir. If no run uses {workdir} any more (e.g. its host is gone), delete "
          f"{_lock_path(workdir)}; a lock of another host that stops being refreshed is "
          f"taken over after {LEASE_SECONDS:.0f}s")


def in_use_error(workdir: str, holder: Optional[dict], what: str = "run"
                 ) -> WorkdirInUseError:
  return WorkdirInUseError(f"{workdir} is in use by another {what}: {describe(holder)}. "
                           + _what_to_do(workdir, holder))


class WorkdirLock:
  """This process's hold on WORKDIR/run.lock (see the module doc)."""

  def __init__(self, workdir: str, store, holder: dict):
    self.workdir, self.store, self.holder = workdir, store, holder
    self.lost: Optional[dict] = None
    self._stop = threading.Event()

  def start(self) -> None:
    """Writes the lock (raises _Lost if another run wrote it first), then keeps it fresh."""
    self.store.write(self._data())
    threading.Thread(target=self._refresh_loop, daemon=True,
                     name=f"inq_jax lock {self.workdir}").start()

  def _data(self) -> bytes:
    return json.dumps(self.holder, sort_keys=True).encode().ljust(_SIZE - 1) + b"\n"

  def refresh(self) -> None:
    """Rewrites the heartbeat, or records that another run has taken the lock over."""
    if self.lost is not None:
      return
    other = self.store.mine(self.holder["run_id"])
    if other is not None:
      self._lose(other)
      return
    self.holder["heartbeat"] = time.time()
    try:
      self.store.write(self._data())
    except _Lost:
      self._lose(self.store.mine(self.holder["run_id"]) or {})

  def _lose(self, other: dict) -> None:
    self.lost = other
    logging.error("%s: another run has taken this run's lock over (%s); this run stops at "
                  "its next checkpoint", self.workdir, describe(other))

  def _refresh_loop(self) -> None:
    while not self._stop.wait(REFRESH_SECONDS):
      try:
        self.refresh()
      except Exception as e:  # pylint: disable=broad-except  (a network blip: next time)
        logging.warning("could not refresh %s: %s", _lock_path(self.workdir), e)

  def check(self) -> None:
    """Raises WorkdirInUseError if another run has taken this lock over."""
    if self.lost is not None:
      raise WorkdirInUseError(
          f"{self.workdir} was taken over by another run ({describe(self.lost)}) while this "
          f"one was stalled for more than {LEASE_SECONDS:.0f}s; stopping before writing "
          "more. Rerun the command once the other run has finished")

  def release(self) -> None:
    self._stop.set()
    with _GUARD:
      if _HELD.get(_lock_path(self.workdir)) is self:
        del _HELD[_lock_path(self.workdir)]
    try:
      self.store.release(self.holder["run_id"])
    except Exception as e:  # pylint: disable=broad-except  (it goes stale by itself)
      logging.warning("could not release %s: %s", _lock_path(self.workdir), e)


def _read_holder(store) -> Optional[dict]:
  """The holder a refused run names: read again briefly while its holder is still
  writing the file it has just created."""
  for _ in range(20):
    holder = store.read()[0]
    if holder is not None:
      return holder
    time.sleep(0.05)
  return None


def acquire(workdir: str, what: str = "run") -> WorkdirLock:
  """Takes WORKDIR/run.lock for this process (again, if it holds it already).

  Raises:
    WorkdirInUseError naming the live holder and what to do.
    WorkdirError if the lock file cannot be written (the message names it).
  """
  path = _lock_path(workdir)
  with _GUARD:
    if path in _HELD:
      return _HELD[path]
  store = _store(path)
  taken_over = []

  def decide(holder):
    if holder == "empty":
      return
    reason = stale_reason(holder)
    if reason is None:
      raise in_use_error(workdir, holder, what)
    taken_over.append((holder, reason))

  now = time.time()
  holder = {"host": HOST, "boot_id": BOOT_ID, "pid": os.getpid(),
            "start_ticks": _start_ticks(os.getpid()), "started": now, "heartbeat": now,
            "run_id": uuid.uuid4().hex, "what": what,
            "command": " ".join(sys.argv)[:400]}
  try:
    if not store.take(decide):
      raise in_use_error(workdir, _read_holder(store), what)
    lock = WorkdirLock(workdir, store, holder)
    try:
      lock.start()
    except _Lost:  # another run took the stale lock first
      raise in_use_error(workdir, _read_holder(store), what) from None
  except (OSError, *store.errors) as e:  # the disk or the bucket refused the write
    store.release(holder["run_id"])
    if is_out_of_space(e):
      raise out_of_space(f"the lock file {path}", e) from None
    raise WorkdirError(f"cannot write the lock file {path}: {e}") from None
  for old, reason in taken_over:
    logging.warning("%s: taking over the lock of %s: %s", workdir, describe(old), reason)
  with _GUARD:
    _HELD[path] = lock
  return lock


def probe(workdir: str, what: str = "run") -> None:
  """Refuses at once if a live run holds `workdir` (reads only; `acquire` decides).

  Raises:
    WorkdirInUseError naming the holder.
  """
  path = _lock_path(workdir)
  with _GUARD:
    if path in _HELD:
      return
  # Only read: a flock here, however brief, could make a run starting at the
  # same moment take this probe for a holder.
  holder, exists = _store(path).read()
  if exists and holder is not None and stale_reason(holder) is None:
    raise in_use_error(workdir, holder, what)


def held(workdir: str) -> Optional[WorkdirLock]:
  """The lock this process holds on `workdir`, if any."""
  with _GUARD:
    return _HELD.get(_lock_path(workdir))


@atexit.register
def _release_all() -> None:
  """An exit that unwinds (an exception, sys.exit) leaves no lock behind."""
  with _GUARD:
    locks = list(_HELD.values())
  for lock in locks:
    lock.release()
