"""One trainer per stage folder: an exclusive lock file, and trainers that end when their launcher dies.

The lock is a JSON file (pid, host, start time) created with ``O_EXCL``, so it also works where ``flock`` does not
(NFS). A lock whose holder pid is dead on this host is stale (the holder was SIGKILLed) and is taken over with a
warning; a live holder, or one on another host, is an error that names it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# Set in the trainer's environment by `accelerate launch` (every launcher) and by torchrun.
_LAUNCHER_ENV = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
_PR_SET_PDEATHSIG = 1


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


def _describe(holder: dict) -> str:
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

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._is_stale(holder, me):
                    logger.warning("%s: taking over a stale lock (%s is not running)", self.path,
                                   _describe(holder or {}))
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunLockedError(
                    f"{self.path.parent} is in use by {_describe(holder)} (lock file {self.path}); stop that run "
                    "first, or pick another run.run_root"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"{self.path}: another process took the lock while a stale one was being removed")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # empty or half-written: its writer died between create and write
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    @staticmethod
    def _is_stale(holder: dict, me: dict) -> bool:
        if holder.get("host") != me["host"]:
            return False  # cannot see another host's processes: never steal its lock
        return holder["pid"] == me["pid"] or not pid_alive(holder["pid"])

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
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
