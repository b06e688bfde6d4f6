"""One trainer per stage folder: an exclusive lock file, and trainers that end when their launcher dies.

The lock is a JSON record of its holder (host, machine-id, boot id, pid namespace, pid and that pid's start time, a
random token), so it also works where ``flock`` does not (NFS):

- *create*: the record is written and fsynced to a private temp file, then hard-linked to ``run.lock``. ``link``
  fails when the name exists, so the lock appears complete or not at all.
- *stale*: a holder is provably dead only when it ran on this machine: in this boot and pid namespace with its pid
  gone or reused (another start time), or in an earlier boot (same machine-id, another boot id, started before this
  boot). A holder on another machine, under the same hostname or not, or in another pid namespace of this one, is
  never stale.
- *takeover*: a stale lock is removed under a breaker, ``run.lock.<key>.break``, created the same way and named after
  the stale lock's inode and content, so one taker at a time acts on it; the taker checks that the lock still is that
  stale one before removing it, so a lock taken over meanwhile is never removed. A breaker left by a dead taker is
  stale in turn and is broken the same way.
- *unreadable*: an empty or half-written lock comes from an older writer (create, then write) that may still be
  writing: it is stale once ``UNREADABLE_GRACE_S`` old on the filesystem's clock, never before.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
UNREADABLE_GRACE_S = 60.0
# Set in the trainer's environment by `accelerate launch` (every launcher) and by torchrun.
_LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
_PR_SET_PDEATHSIG = 1
# A takeover holds its breaker for a few file operations: waiting this long for one means something is wrong.
_ATTEMPTS, _RETRY_S = 200, 0.02
# Breakers of breakers exist only after crashes during takeovers; more levels than this are not plausible.
_MAX_DEPTH = 8


class RunLockedError(RuntimeError):
    """Another live process holds the stage folder."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces, the state follows the last ")".
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def pid_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks after boot (field 22 of ``/proc/<pid>/stat``), None if unknown.

    A pid reused by a later process has another start time."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _first_line(*paths: str) -> str | None:
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def _boot_time() -> float | None:
    """When this boot began (seconds since the epoch: ``btime`` of ``/proc/stat``), None if unknown."""
    try:
        return float(next(line.split()[1] for line in Path("/proc/stat").read_text().splitlines()
                          if line.startswith("btime ")))
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def machine_identity() -> dict[str, str | None]:
    """What tells this machine, boot and pid namespace apart from others sharing the filesystem and hostname."""
    try:
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {
        "host": socket.gethostname(),
        "machine_id": _first_line("/etc/machine-id", "/var/lib/dbus/machine-id"),
        "boot_id": _first_line("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
    }


def holder_is_dead(holder: dict[str, Any], here: dict[str, str | None]) -> bool:
    """Whether the process that wrote the lock record ``holder`` provably no longer runs.

    Args:
        holder: a lock record (see the module docstring).
        here: :func:`machine_identity` of this process.
    """
    if holder.get("host") != here["host"]:
        return False
    if "boot_id" not in holder:  # written before boot ids were recorded: judged by its pid, as it was then
        return not pid_alive(holder["pid"])
    if holder["boot_id"] != here["boot_id"]:
        # The same machine (machine-id) before this boot began, or another machine sharing the hostname and
        # filesystem, whose processes cannot be seen from here (a cloned image may share the machine-id too).
        booted = _boot_time()
        return (holder.get("machine_id") is not None and holder.get("machine_id") == here["machine_id"]
                and booted is not None and holder.get("started", booted) < booted)
    if holder.get("pid_ns") != here["pid_ns"]:
        return False  # another container of this machine: its pids mean nothing here
    if not pid_alive(holder["pid"]):
        return True
    # A live pid with another start time was reused by a later process (an unreadable start time proves nothing).
    start, now = holder.get("pid_start"), pid_start_time(holder["pid"])
    return start is not None and now is not None and now != start


@dataclass(frozen=True)
class _Seen:
    """A lock-like file as read once: its bytes and inode tell a later reading whether it is still the same file."""

    raw: bytes
    inode: int
    mtime: float

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.inode}:".encode() + self.raw).hexdigest()[:16]

    def record(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.raw)
        except ValueError:
            return None  # empty or half-written
        return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _look(path: Path) -> _Seen | None:
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            return _Seen(f.read(), stat.st_ino, stat.st_mtime)
    except FileNotFoundError:
        return None


def _describe(seen: _Seen, age: float) -> str:
    holder = seen.record()
    if holder is None:
        return (f"a writer of an unreadable (empty or half-written) lock file, {age:.0f} s old; such a lock counts "
                f"as abandoned once {UNREADABLE_GRACE_S:.0f} s old")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} (started {started})"


class RunLock:
    """Exclusive lock on ``directory`` held by this process until :meth:`release` (or its death).

    Re-acquiring a lock this very process already holds (a stage run twice in one process, e.g. in tests) is
    allowed: the holder is the same run of the same process.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.held = False
        self._token = uuid.uuid4().hex
        # Each lock-like file this process creates is a hard link to this complete, private file.
        self._tmp = self.path.with_name(f"{LOCK_NAME}.{self._token}.tmp")
        self._record: dict[str, Any] = {}
        self._fs_now = 0.0

    def acquire(self) -> RunLock:
        """Takes the lock, taking over a stale one (with a warning).

        Raises:
            RunLockedError: a live process holds it (named), or an unreadable lock is too young to be abandoned.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        here = machine_identity()
        self._record = {**here, "pid": os.getpid(), "pid_start": pid_start_time(os.getpid()), "started": time.time(),
                        "token": self._token}
        self._write_tmp()
        try:
            blocker = self._claim(self.path, here, 0)
        finally:
            self._tmp.unlink(missing_ok=True)
        if blocker is not None:
            raise RunLockedError(
                f"{self.path.parent} is in use by {_describe(blocker, self._age(blocker))} (lock file {self.path}); "
                "stop that run first, or pick another run.run_root (delete the lock file only if that run is known "
                "to be gone, e.g. its machine is down)")
        self.held = True
        self._sweep(here)
        return self

    def _write_tmp(self) -> None:
        with open(self._tmp, "w") as f:
            json.dump(self._record, f)
            f.flush()
            os.fsync(f.fileno())
        # The filesystem's own clock: ages of files written by other machines are measured against it.
        self._fs_now = self._tmp.stat().st_mtime

    def _link(self, path: Path) -> bool:
        """Creates ``path`` holding this process's complete record; False when ``path`` exists."""
        try:
            os.link(self._tmp, path)
        except FileNotFoundError:  # our temp file was removed (a holder clearing the folder): write it again
            self._write_tmp()
            return self._link(path)
        except FileExistsError:
            # NFS may report a link that did succeed as failed (a retried request): the name then is our file.
            try:
                return os.path.samefile(self._tmp, path)
            except FileNotFoundError:
                return False
        return True

    def _age(self, seen: _Seen) -> float:
        return self._fs_now - seen.mtime

    def _stale(self, seen: _Seen, here: dict[str, str | None]) -> bool:
        holder = seen.record()
        if holder is None:
            return self._age(seen) >= UNREADABLE_GRACE_S
        return holder_is_dead(holder, here)

    def _is_mine(self, seen: _Seen) -> bool:
        holder = seen.record()
        return holder is not None and all(holder.get(k) == self._record[k]
                                          for k in ("host", "boot_id", "pid_ns", "pid", "pid_start"))

    def _claim(self, path: Path, here: dict[str, str | None], depth: int) -> _Seen | None:
        """Makes ``path`` hold this process's record, taking over a stale one.

        Returns:
            None once ``path`` holds our record, else what holds it: a live holder, or an unreadable young file.
        """
        if depth > _MAX_DEPTH:
            raise RunLockedError(f"{path}: more than {_MAX_DEPTH} levels of abandoned lock breakers; remove the "
                                 f"{LOCK_NAME}.* files of {path.parent} once no run uses it")
        for _ in range(_ATTEMPTS):
            if self._link(path):
                return None
            seen = _look(path)
            if seen is None:
                continue  # released since the link failed
            if not (self._stale(seen, here) or self._is_mine(seen)):
                return seen
            breaker = path.with_name(f"{LOCK_NAME}.{seen.key}.break")
            if self._claim(breaker, here, depth + 1) is not None:
                time.sleep(_RETRY_S)  # a live process is taking this one over: see what it leaves
                continue
            try:
                # Only the holder of this breaker may remove this very file, and nothing new can appear under its
                # name before it is gone: if it still is the file judged stale, nobody has taken it over since.
                if _look(path) == seen:
                    if not self._is_mine(seen):
                        logger.warning("%s: taking over a stale lock (%s is not running)", path,
                                       _describe(seen, self._age(seen)))
                    path.unlink(missing_ok=True)
            finally:
                breaker.unlink(missing_ok=True)
        raise RunLockedError(f"{path} kept changing while it was being taken over ({_ATTEMPTS} tries); try again")

    def _sweep(self, here: dict[str, str | None]) -> None:
        """Removes temp files and breakers that crashed processes left beside the lock we now hold."""
        for path in self.path.parent.glob(f"{LOCK_NAME}.*"):
            seen = _look(path)
            if seen is not None and self._stale(seen, here):
                path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            seen = _look(self.path)
            holder = seen.record() if seen is not None else None
            if holder is not None and holder.get("token") == self._token:
                self.path.unlink(missing_ok=True)
            self.held = False


def exit_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Asks Linux to send ``sig`` to this process when its parent (the launcher) dies.

    Only done under a launcher (``accelerate launch``/torchrun): a script started from a shell must survive that
    shell (``nohup``). Returns whether the signal was armed.
    """
    if not any(name in os.environ for name in _LAUNCHER_ENV) or not hasattr(os, "getppid"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if os.getppid() == 1:  # the launcher died before the signal was armed
        os.kill(os.getpid(), sig)
    return True
