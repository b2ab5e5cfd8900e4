"""A run directory read without the trainer: its lock, committed steps, metrics records.

One training process (per host group) owns a workdir at a time.

`WorkdirLock` holds an exclusive `flock` on `WORKDIR/.lock` and writes the holder's host
and pid into it. The kernel drops the lock when its process dies, however it dies, so a
stale file left by a killed run is simply taken over. A second `lm.main` on the same
workdir refuses with one line naming the holder. `holder(workdir)` tells others (the
study layer's `status`) whether, and by whom, a run directory is in use.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket

LOCK_NAME = ".lock"
_STEP_DIR = re.compile(r"\d+$")


class WorkdirBusy(RuntimeError):
    pass


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def holder(workdir: str) -> dict | None:
    """{'host', 'pid'} of the live process holding the workdir, or None when it is free."""
    path = os.path.join(workdir, LOCK_NAME)
    if not os.path.exists(path):
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path) or {"host": "?", "pid": "?"}
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class WorkdirLock:
    """Exclusive ownership of a workdir for the life of this object (or process)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = _read(self.path)
            raise WorkdirBusy(
                f"--workdir: {os.path.dirname(self.path)} is in use by pid {who.get('pid', '?')} "
                f"on host {who.get('host', '?')} (stop that run first)") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_steps(run_dir: str) -> list[int]:
    """Committed checkpoint steps of a run directory, ascending (read-only: no orbax
    manager, which would clean up another run's in-flight saves)."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if _STEP_DIR.match(n) and os.path.isdir(os.path.join(ckpt_dir, n)))


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """metrics.jsonl records in order (a torn last line from a crash is skipped)."""
    out = []
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and "step" in record:
                    out.append(record)
    except OSError:
        pass
    return out
