"""The decoded-data cache: every dataset is decoded once, then read from
`cache_dir()/datasets/<stem>-<key>.pt`.

Keys. The key is a hash over a description of the source, chosen so that changed data is
never served from a stale entry:

* an archive (`imagefolder:x.tar.gz`) is keyed on the sha256 of its own bytes. Size, mtime and
  inode do not identify content: a file overwritten in place keeps its inode, and `touch -d` or
  `os.utime` puts the old mtime back, so a stat-based key can serve the old images for new
  ones. Hashing reads the archive once per load (about 1 GB/s), which is cheap next to
  decompressing and decoding it.
* a folder is keyed on every file's path, size, mtime_ns, ctime_ns and inode. Reading every
  image on every load would cost as much as the dataset itself; ctime cannot be set back by
  `utime` (the kernel stamps it on every content or metadata change), so an in-place edit with
  a restored mtime still changes the key.
* torchvision datasets the same way, over their files; digits on scikit-learn's version.

An entry is written only when the source's stat signature (size, mtime_ns, ctime_ns, inode of
every file) is unchanged after the data was read, so a file replaced while it was decoded is
not stored under the key of its old content.

Verification. Each entry stores the data's content hash (crl.data.types.content_digest,
computed once when the data was decoded) and a hash of that with the normalisation
statistics and the source's own train/test boundary (ImageData.train_size); every load
recomputes both from the stored values and rebuilds the entry on a mismatch, so a damaged
cache file is never used. An entry written before content hashes existed gets one computed and
is rewritten with it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from crl.core.utils import cache_dir, torch_save_atomic
from crl.data.types import ImageData, content_digest

CACHE_FORMAT = 2   # 2: entries record the source's train/test boundary
_CHUNK = 1 << 20


def cache_path(stem: str, info: object) -> Path:
    """The entry for a source named `stem` described by `info` (any JSON-able value)."""
    blob = json.dumps([CACHE_FORMAT, info], sort_keys=True, default=str).encode()
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "data"
    return cache_dir() / "datasets" / f"{safe[:60]}-{hashlib.sha256(blob).hexdigest()[:16]}.pt"


def file_signature(path: str | os.PathLike) -> list[int]:
    """[size, mtime_ns, ctime_ns, inode] of one file."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cached(name: str, path: Path, build: Callable[[], dict],
           unchanged: Callable[[], bool] = lambda: True) -> ImageData:
    """The dataset stored at `path` if that entry verifies, else `build()`'s, stored atomically
    when `unchanged()` says the source did not change while it was read.

    `build` returns {"x": uint8 [N,C,H,W], "y": int64 [N], "classes", "mean", "std"} and,
    for a source with its own train/test split, "train_size" (ImageData.train_size).
    """
    entry = _load(path)
    if entry is None:
        entry = _entry(build())
        if unchanged():
            _save(entry, path)
        else:
            warnings.warn(f"{name} changed while it was read; not caching it", stacklevel=2)
    return ImageData(name=name, x=entry["x"], y=entry["y"], num_classes=len(entry["classes"]),
                     mean=tuple(entry["mean"]), std=tuple(entry["std"]),
                     classes=list(entry["classes"]), content_hash=entry["content_hash"],
                     train_size=entry["train_size"])


def _entry(d: dict) -> dict:
    classes = [str(c) for c in d["classes"]]
    entry = {"x": d["x"], "y": d["y"], "classes": classes,
             "mean": [float(v) for v in d["mean"]], "std": [float(v) for v in d["std"]],
             "content_hash": content_digest(d["x"], d["y"], classes, len(classes)),
             "train_size": d.get("train_size")}
    entry["check"] = _check(entry)
    return entry


def _check(entry: dict) -> str:
    """sha256 over the content hash, the normalisation statistics and the train/test boundary
    (the rest of an entry)."""
    blob = json.dumps([entry["content_hash"], entry["mean"], entry["std"], entry["train_size"]])
    return hashlib.sha256(blob.encode()).hexdigest()


def _save(entry: dict, path: Path) -> None:
    try:
        torch_save_atomic(entry, path)
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path} ({e}); continuing without it",
                      stacklevel=2)


def _well_formed(d: object) -> bool:
    if not isinstance(d, dict):
        return False
    x, y, c = d.get("x"), d.get("y"), None
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        c = x.shape[1]
    return (c is not None and x.dtype == torch.uint8
            and isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == x.shape[:1]
            and isinstance(d.get("classes"), list)
            and all(isinstance(k, str) for k in d["classes"])
            and len(d.get("mean", ())) == c and len(d.get("std", ())) == c
            and all(isinstance(d.get(k, ""), str) for k in ("content_hash", "check"))
            and (d.get("train_size") is None or type(d["train_size"]) is int))


def _load(path: Path) -> dict | None:
    """A verified entry, or None (with a warning when a file was there but unusable)."""
    if not path.exists():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"ignoring unreadable dataset cache {path} ({e}); rebuilding", stacklevel=2)
        return None
    if not _well_formed(d):
        warnings.warn(f"ignoring malformed dataset cache {path}; rebuilding", stacklevel=2)
        return None
    stored = d.get("content_hash")
    entry = _entry(d)
    if stored is None:  # written before content hashes: add one
        _save(entry, path)
    elif stored != entry["content_hash"] or d.get("check") != entry["check"]:
        warnings.warn(f"ignoring dataset cache {path}: its data does not match its content "
                      "hash (damaged file); rebuilding", stacklevel=2)
        return None
    return entry
