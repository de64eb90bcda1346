"""A run directory's manifest: OUT/manifest.json names the command and the config that wrote
the run and checksums every file in it.

    {"format": "crl-manifest-1", "state": "running" | "complete", "command": "audit",
     "config": {...}, "config_sha256": "...", "derived": [...],
     "code": crl.core.utils.code_version(),
     "files": {"scores/ce_seed0.npz": {"sha256": "...", "size": 1234}, ...}}

A command marks the directory "running" (no files) before it writes anything else, and writes
the complete manifest last, atomically: a killed run is never taken for a finished one.
`config` is the command's config without the options that do not change what the run computes
(OPERATIONAL: where it runs, whether it resumes, progress bars); `derived` names config keys the
run fills in itself (the caller's model class, for crl.audit_training). Untracked: the lock
(.crl-lock), the manifest itself and `.*.tmp` temporaries (crl.core.utils.atomic_path).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from crl.core.errors import CRLError
from crl.core.integrity import file_digest
from crl.core.utils import code_version, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "crl-manifest-1"
LOCK = ".crl-lock"          # crl.rundir.LOCK_NAME
#: options that change where or how a run proceeds, never what it computes
OPERATIONAL = ("out", "resume", "overwrite", "progress", "cache", "data_root", "download",
               "ray_address")


def config_identity(config: dict[str, Any]) -> dict[str, Any]:
    """`config` as its YAML round trip (what config.yaml holds), without the OPERATIONAL keys."""
    plain = yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=True))
    return {k: v for k, v in plain.items() if k not in OPERATIONAL}


def config_sha256(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_files(out: str | os.PathLike) -> list[str]:
    """Every file under `out` as a relative POSIX path, sorted, without following symbolic
    links to folders; the lock, the manifest and `.*.tmp` temporaries left out."""
    root = Path(out)
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            rel = (Path(folder) / name).relative_to(root).as_posix()
            if rel not in (LOCK, MANIFEST) and not fnmatch.fnmatchcase(name, ".*.tmp"):
                found.append(rel)
    return sorted(found)


def new_manifest(command: str, identity: dict[str, Any], derived: Iterable[str] = (),
                 state: str = "complete") -> dict[str, Any]:
    return {"format": FORMAT, "state": state, "command": command, "config": identity,
            "config_sha256": config_sha256(identity), "derived": sorted(derived),
            "code": code_version(), "files": {}}


def write_manifest(out: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under `out` into `manifest` and write it as OUT/manifest.json
    (atomically; the last write of a run). Returns it."""
    manifest = {**manifest, "files": {rel: file_digest(Path(out) / rel)
                                      for rel in run_files(out)}}
    write_json_atomic(Path(out) / MANIFEST, manifest)
    return manifest


def read_manifest(out: str | os.PathLike) -> dict[str, Any] | None:
    """OUT/manifest.json, or None when the run has none; a CRLError when it is unreadable or
    not a crl manifest."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CRLError(f"{path} is unreadable ({type(e).__name__}); expected the manifest a "
                       "crl command writes") from None
    keys = ("state", "command", "config", "config_sha256", "files")
    if not isinstance(m, dict) or m.get("format") != FORMAT or any(k not in m for k in keys) \
            or not isinstance(m["files"], dict) or not isinstance(m["config"], dict):
        raise CRLError(f"{path} is not a crl manifest (expected format {FORMAT})")
    return m


def under(rel: str, paths: Iterable[str]) -> bool:
    """Whether the relative path `rel` is one of `paths` (a file, or a folder ending in '/')."""
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in paths)


def file_problems(out: str | os.PathLike, manifest: dict[str, Any],
                  closed: Iterable[str] = ("scores/",), skip: Iterable[str] = ()) -> list[str]:
    """One line per file that does not match `manifest`: missing, changed, or (under a folder
    of `closed`) present but not listed; the paths under `skip` (about to be rewritten) aside."""
    root, files, skip = Path(out), manifest["files"], tuple(skip)
    problems = []
    for rel, entry in files.items():
        if under(rel, skip):
            continue
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif file_digest(path) != {"sha256": entry.get("sha256"), "size": entry.get("size")}:
            problems.append(f"{rel} changed after the run wrote it (its sha256 differs)")
    closed = tuple(closed)
    problems += [f"{rel} is not a file of this run (manifest.json does not list it)"
                 for rel in run_files(root) if rel.startswith(closed) and rel not in files]
    return problems


def refresh_manifest(out: str | os.PathLike, manifest: dict[str, Any],
                     rewritten: Iterable[str]) -> dict[str, Any]:
    """`manifest` with the files under the paths `rewritten` (a file, or a folder ending in
    '/') checksummed again as they are now; written atomically. Returns it."""
    paths = tuple(rewritten)
    files = {rel: e for rel, e in manifest["files"].items() if not under(rel, paths)}
    files.update({rel: file_digest(Path(out) / rel) for rel in run_files(out)
                  if under(rel, paths)})
    manifest = {**manifest, "files": dict(sorted(files.items()))}
    write_json_atomic(Path(out) / MANIFEST, manifest)
    return manifest
