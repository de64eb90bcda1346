"""Run-directory safety: check `--out` before any work, lock it while a run writes into it, and
clear what a killed run left half-written.

    check_out_dir(cfg.out)            at config time: a bad --out fails before data is loaded
    with RunLock(out):                one crl process per run directory (fcntl.flock)
        clean_stale_tmp(out)          remove `.*.tmp` files a killed process left behind
        ... write config.yaml, train, report ...

The lock is advisory and lives in OUT/.crl-lock (holding the holder's pid); the kernel drops it
when the process dies, so a killed run never leaves the directory locked.
"""
from __future__ import annotations

import fcntl
import fnmatch
import os
import tempfile
from pathlib import Path

from crl.errors import CRLError

LOCK_NAME = ".crl-lock"

_HELD: set[Path] = set()   # run directories this process holds a RunLock on


def check_out_dir(out: str | os.PathLike) -> Path:
    """`out` as a Path if a run can create or write it: not an existing file, not under a file,
    and its nearest existing ancestor (or itself) writable; else a CRLError naming the path."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CRLError(f"--out {path}: is an existing file; expected a directory")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise CRLError(f"--out {path}: lies under the file {existing}; expected a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CRLError(f"--out {path}: {existing} is not writable")
    try:   # a real write too: os.access says yes to root, even on /proc or /sys
        os.rmdir(tempfile.mkdtemp(prefix=".crl-write-test-", dir=existing))
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise CRLError(f"--out {path}: {existing} is not writable ({why}); expected a "
                       "writable directory") from None
    return path


class RunLock:
    """Exclusive, non-blocking lock on a run directory (created if missing). A second holder,
    in another process or this one, fails at once with a CRLError naming the holder's pid."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if self._fd is not None:
            raise RuntimeError(f"RunLock on {self.out} entered twice")
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise CRLError(f"run directory {self.out} is in use by another crl process "
                               f"(pid {holder}); wait for it or choose another --out") from None
            raise CRLError(f"cannot lock run directory {self.out}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(self.out.resolve())
        return self

    def __exit__(self, *exc: object) -> None:
        _HELD.discard(self.out.resolve())
        fd, self._fd = self._fd, None
        if fd is not None:
            os.ftruncate(fd, 0)      # no stale pid for the next reader
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _open(self) -> int:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise CRLError(f"--out {self.out}: cannot create the run directory's lock file "
                           f"({e.strerror})") from None


def _read_pid(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def clean_stale_tmp(out: str | os.PathLike) -> list[Path]:
    """Remove the `.*.tmp` files (crl.utils.atomic_path's temporaries) anywhere under `out`,
    without following symlinks; returns them. Only while this process holds RunLock(out): any
    other time they may be another process's writes in flight."""
    root = Path(out)
    if root.resolve() not in _HELD:
        raise RuntimeError(f"clean_stale_tmp({root}) needs this process to hold RunLock({root})")
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            if fnmatch.fnmatchcase(name, ".*.tmp"):
                path = Path(folder) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
