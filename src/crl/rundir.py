"""Run-directory safety: check `--out` before any work, lock it while a run writes into it,
clear what a killed run left half-written, and keep one run per directory.

    check_out_dir(cfg.out)            at config time: a bad --out fails before data is loaded
    run = RunDir(out, "audit", cfg.to_dict(), resume=..., overwrite=...)
    run.check()                       read-only: OUT holds no other run (else a one-line error)
    with run.claim():                 RunLock, the check again, --overwrite, clean_stale_tmp
        ... write config.yaml, train, report ...
        run.finish()                  manifest.json (crl.core.manifest), written last

A directory holds one run: one command, one config. Another config is refused unless
--overwrite, which moves the old run aside in one rename and then deletes it.

The lock is advisory and lives in OUT/.crl-lock (holding the holder's pid); the kernel drops it
when the process dies, so a killed run never leaves the directory locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crl.core.errors import CRLError
from crl.core.manifest import (
    MANIFEST,
    config_identity,
    new_manifest,
    read_manifest,
    run_files,
    write_manifest,
)
from crl.core.utils import write_json_atomic

LOCK_NAME = ".crl-lock"

_HELD: dict[Path, int] = {}   # run directories this process holds a RunLock on (how many)


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

    def __enter__(self) -> RunLock:
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
        self._key = self.out.resolve()
        _HELD[self._key] = _HELD.get(self._key, 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            _HELD[self._key] -= 1
            if not _HELD[self._key]:
                del _HELD[self._key]
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
    """Remove the `.*.tmp` files (crl.core.utils.atomic_path's temporaries) anywhere under `out`,
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


#: how each command's runs are named in messages, and how the same config continues one
WRITERS = {"audit": "crl audit", "train": "crl train", "tune": "crl tune",
           "audit_training": "crl.audit_training"}
CONTINUE = {"audit": "--resume with its config", "train": "--resume with its config",
            "tune": "the same setup to continue its study",
            "audit_training": "the same arguments"}
Differ = Callable[[dict[str, Any], dict[str, Any]], "str | None"]


@dataclass
class Found:
    """What a run directory holds: its run's command and config (None where a run written
    before manifests does not say) and its state: running, complete, legacy (no manifest),
    unreadable, or foreign (files that are no crl run; `example` names one)."""

    command: str | None
    config: dict[str, Any] | None
    state: str
    derived: list[str] = field(default_factory=list)
    example: str = ""


def found_run(out: str | os.PathLike) -> Found | None:
    """What `out` holds, or None when it holds no file (a lock and temporaries aside)."""
    out = Path(out)
    if not out.is_dir():
        return None
    try:
        m = read_manifest(out)
    except CRLError:
        return Found(None, None, "unreadable", example=MANIFEST)
    if m is not None:
        return Found(m["command"], m["config"], m["state"], list(m.get("derived", [])))
    files = run_files(out)
    if "config.yaml" in files:
        try:
            return Found(None, config_identity(yaml.safe_load((out / "config.yaml").read_text())),
                         "legacy")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, ValueError):
            return Found(None, None, "unreadable", example="config.yaml")
    if "study.db" in files:
        return Found("tune", None, "legacy")
    return Found(None, None, "foreign", example=files[0]) if files else None


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b": value}: the keys that `first_difference` compares."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_field_at_default(key: str, value: Any) -> bool:
    from crl.config import FIELD_SPECS

    return key in FIELD_SPECS and value == FIELD_SPECS[key].default


def first_difference(old: dict[str, Any], new: dict[str, Any],
                     at_default: Callable[[str, Any], bool] = _config_field_at_default
                     ) -> str | None:
    """The first (flattened, sorted) key whose value differs between two configs; a key only
    one side has (a field added to crl after the other was written) counts only when
    `at_default(key, value)` is false (default: an AuditConfig field at its default)."""
    a, b = flatten_config(old), flatten_config(new)
    for k in sorted(set(a) | set(b)):
        if k in a and k in b:
            if a[k] != b[k]:
                return k
        elif not at_default(k, a.get(k, b.get(k))):
            return k
    return None


class RunDir:
    """One command's claim on its run directory: OUT holds one run, written by one command
    with one config (crl.core.manifest.config_identity). The same config continues or redoes it;
    another config, or another command's run, is refused in one line unless `overwrite`."""

    def __init__(self, out: str | os.PathLike, command: str, config: dict[str, Any], *,
                 resume: bool = False, overwrite: bool = False, derived: Iterable[str] = (),
                 differ: Differ | None = None) -> None:
        self.out, self.command = Path(out), command
        self.identity = config_identity(config)
        self.resume, self.overwrite = bool(resume), bool(overwrite)
        self.derived = tuple(derived)
        self.differ = differ or first_difference

    def check(self) -> bool:
        """Read-only. True when OUT holds a run that --overwrite will replace; False when OUT
        is new, empty or holds this config's run; else a CRLError naming the way out."""
        check_out_dir(self.out)
        found = found_run(self.out)
        if found is None:
            return False
        if self.overwrite:
            if found.state == "foreign":
                raise CRLError(f"--out {self.out} holds files that are not a crl run (e.g. "
                               f"{found.example}); expected a new --out (--overwrite replaces "
                               "only a crl run directory)")
            if self.out.is_symlink():
                raise CRLError(f"--out {self.out} is a symbolic link; expected a real "
                               "directory to --overwrite, or a new --out")
            return True
        self._refuse_another(found)
        return False

    def _refuse_another(self, found: Found) -> None:
        out, writer = self.out, WRITERS[self.command]
        way = "a new --out, or --overwrite to replace it"
        if found.state == "foreign":
            raise CRLError(f"--out {out} holds files that are not a crl run (e.g. "
                           f"{found.example}); expected a new --out")
        if found.state == "unreadable":
            raise CRLError(f"--out {out}: its {found.example} is unreadable; expected {way}")
        if found.command is not None and found.command != self.command:
            raise CRLError(f"--out {out} holds a {WRITERS.get(found.command, found.command)} "
                           f"run; {writer} writes its own run directory: expected {way}")
        if found.config is None:
            return
        drop = set(self.derived) | set(found.derived)
        old = {k: v for k, v in found.config.items() if k not in drop}
        new = {k: v for k, v in self.identity.items() if k not in drop}
        key = self.differ(old, new)
        if key is None:
            return
        was, now = flatten_config(old).get(key), flatten_config(new).get(key)
        if self.command == "tune":      # the words of crl.tune.study.open_study's check
            raise CRLError(f"{key} = {now!r}: the study in {out / 'study.db'} was run with "
                           f"{was!r}; expected {CONTINUE['tune']}, {way}")
        cannot = "cannot resume: " if self.resume else ""
        raise CRLError(f"{cannot}--out {out} holds a {writer} run of another config ({key} = "
                       f"{now!r} here, {was!r} there); expected {CONTINUE[self.command]}, {way}")

    @contextlib.contextmanager
    def claim(self) -> Iterator[RunDir]:
        """Lock OUT, check it again under the lock, replace the old run (--overwrite), clean
        stale temporaries and mark OUT as running (a killed run is never taken for a finished
        one); the caller writes the run and calls `finish` last."""
        self.check()
        lock = RunLock(self.out).__enter__()
        try:
            if self.check():
                lock = _replace_run(self.out.absolute(), lock)
            _remove_trash(self.out.absolute())
            clean_stale_tmp(self.out)
            write_json_atomic(self.out / MANIFEST, new_manifest(
                self.command, self.identity, self.derived, state="running"))
            yield self
        finally:
            lock.__exit__(None, None, None)

    def finish(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
        """The complete manifest (every file checksummed, with `config`'s identity when the
        run filled in its derived keys), written last; returns it."""
        identity = self.identity if config is None else config_identity(config)
        return write_manifest(self.out, new_manifest(self.command, identity, self.derived))


def _trash_glob(out: Path) -> str:
    return f".{glob.escape(out.name)}.crl-old-*"


def _replace_run(out: Path, held: RunLock) -> RunLock:
    """Move the run in `out` aside in one rename (a sibling `.NAME.crl-old-*`), lock the new,
    empty `out`, then delete the old run; returns the new lock (the old one is released)."""
    trash = out.parent / f".{out.name}.crl-old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(out, trash)
    except OSError as e:
        raise CRLError(f"--overwrite: cannot move the old run in {out} aside "
                       f"({e.strerror})") from None
    lock = RunLock(out).__enter__()
    held.__exit__(None, None, None)
    shutil.rmtree(trash, ignore_errors=True)
    return lock


def _remove_trash(out: Path) -> None:
    """Delete old runs that an --overwrite killed while deleting them left beside `out`."""
    for old in out.parent.glob(_trash_glob(out)):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
