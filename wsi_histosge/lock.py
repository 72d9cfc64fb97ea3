"""Output locks: one ``O_EXCL`` lock file per output, so two runs never write the same output.

The lock file holds the holder's pid, host and start time. A lock whose process is gone (same host) is
stale and reclaimed; a lock held from another host is respected (we cannot see its process).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .errors import OutputLockedError


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An ``O_EXCL`` lock file at ``path``; use :meth:`acquire`/:meth:`release` or ``with lock.held():``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def holder(self) -> dict[str, Any]:
        """Who holds the lock (pid, host, since), or {} when unreadable or free."""
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> bool:
        """True when taken; False when a live process (or one on another host) holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                try:
                    pid = int(holder.get("pid", -1))
                except (TypeError, ValueError):
                    pid = -1
                if holder.get("host") == socket.gethostname() and not _pid_alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if not holder and time.time() - self.path.stat().st_mtime > 60:
                    self.path.unlink(missing_ok=True)  # empty or garbled and old: a crash while writing it
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return True
        return False

    def describe_holder(self) -> str:
        h = self.holder()
        if not h:
            return f"{self.path} exists"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("since", 0))))
        return f"pid {h.get('pid')} on {h.get('host')} since {since} ({self.path})"

    def acquire_or_raise(self, what: str) -> None:
        if not self.acquire():
            raise OutputLockedError(
                f"{what}: another run is writing it ({self.describe_holder()}); wait for it to finish, or stop it "
                "and rerun (a lock left by a process that is gone is reclaimed automatically)"
            )

    def release(self, *, force: bool = False) -> None:
        """Remove the lock if this process holds it (``force``: whoever holds it, e.g. a crashed child)."""
        holder = self.holder()
        mine = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
        if force or mine or not holder:
            self.path.unlink(missing_ok=True)
