"""`imagefolder:PATH`: a folder or tar archive laid out as `train/<class>/*` and
`test/<class>/*` (optionally inside one top-level folder), decoded into one ImageData. With
`train/` alone the data has no split of its own (train_size None): the audit pools it anyway,
`crl train` splits it (`--test-fraction`, crl.data.splits.own_split).

Untrusted input: archives are read through crl.data.archive (validated members, the whole
stream checksummed, members streamed one at a time); every image file is capped at
CRL_MAX_MEMBER_BYTES and the decoded array at CRL_MAX_DECODED_BYTES and the memory budget
CRL_MEMORY_BUDGET (crl.data.limits), checked before the memory is allocated. At
least two classes are required (membership inference audits a classifier). The decoded data
is cached by crl.data.cache, keyed on the archive's bytes or the folder's file signatures.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from crl.core.errors import CRLError
from crl.data.archive import ARCHIVE_SUFFIXES, is_archive, open_archive
from crl.data.cache import cache_path, cached, file_sha256, file_signature
from crl.data.limits import check_decoded_size, check_member_size, max_member_bytes
from crl.data.types import ImageData, channel_stats

IMAGEFOLDER_PREFIX = "imagefolder:"
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


# --------------------------------------------------------------------------- layout

def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _find_prefix(files: list[str], dirs: set[str], source: str) -> str:
    """'' or 'top/': where train/ (and test/, if there is one) live."""
    top_dirs = sorted({d.split("/")[0] for d in dirs})

    def has_splits(prefix: str) -> bool:
        return f"{prefix}train" in dirs

    if has_splits(""):
        return ""
    if len(top_dirs) == 1 and has_splits(f"{top_dirs[0]}/"):
        return f"{top_dirs[0]}/"
    tops = {f.split("/")[0] for f in files} | set(top_dirs)
    found = ", ".join(sorted(tops)[:10]) or "nothing"
    if len(top_dirs) == 1:
        inner = sorted({d.split("/")[1] for d in dirs if d.startswith(top_dirs[0] + "/")})
        found += f" (inside it: {', '.join(inner[:10]) or 'nothing'})"
    raise CRLError(f"imagefolder {source}: expected a train/ folder, and optionally test/ "
                   f"(both optionally inside one top-level folder); found: {found}")


def _split_classes(files: list[str], dirs: set[str], base: str, source: str
                   ) -> dict[str, list[str]]:
    """class name -> image paths under `base` ('train/' or 'top/test/')."""
    split = base.rstrip("/").rsplit("/", 1)[-1]
    classes: dict[str, list[str]] = {}
    for d in dirs:
        if d.startswith(base) and "/" not in d[len(base):]:
            classes.setdefault(d[len(base):], [])
    for f in files:
        if not f.startswith(base):
            continue
        rest = f[len(base):]
        if "/" not in rest:
            raise CRLError(f"imagefolder {source}: file '{f}' is not inside a class folder; "
                           f"expected {split}/<class>/<image>")
        classes.setdefault(rest.split("/")[0], []).append(f)
    if not classes:
        raise CRLError(f"imagefolder {source}: '{base}' holds no class folders; "
                       f"expected {split}/<class>/<image>")
    for cls, items in sorted(classes.items()):
        if not items:
            raise CRLError(f"imagefolder {source}: class folder '{base}{cls}' holds no images")
    return classes


def _check_classes(train: set[str], test: set[str], source: str) -> list[str]:
    if test != train:
        raise CRLError(f"imagefolder {source}: test classes differ from train classes "
                       f"(only in train: {sorted(train - test)}, only in test: "
                       f"{sorted(test - train)}); expected the same class folders")
    if len(train) < 2:
        raise CRLError(f"imagefolder {source}: found {len(train)} class ({min(train)!r}); "
                       "expected at least 2 class folders (membership inference audits a "
                       "classifier)")
    return sorted(train)


def split_layout(files: list[str], dirs: set[str], source: str
                 ) -> tuple[list[str], list[tuple[str, int]], int | None]:
    """From relative posix paths, find train/ and test/: (classes, [(path, label)], the number
    of train/ items). Items are ordered train first, then test; within a split by class, then
    path. The count is the boundary; None when there is no test/ folder (no split of its own)."""
    files = [f for f in files if not _hidden(f.split("/"))]
    dirs = {d for d in dirs if not _hidden(d.split("/"))}
    prefix = _find_prefix(files, dirs, source)
    splits = ("train", "test") if f"{prefix}test" in dirs else ("train",)
    per_split = {s: _split_classes(files, dirs, f"{prefix}{s}/", source) for s in splits}
    classes = _check_classes(set(per_split["train"]), set(per_split[splits[-1]]), source)
    index = {c: i for i, c in enumerate(classes)}
    items = [(f, index[c]) for s in splits for c in classes for f in sorted(per_split[s][c])]
    n_train = sum(len(v) for v in per_split["train"].values())
    return classes, items, n_train if len(splits) == 2 else None


# --------------------------------------------------------------------------- decoding

def _progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False, disable=None,
                mininterval=0.5)


@contextlib.contextmanager
def _image(blob: bytes, path: str, source: str) -> Iterator:
    """An open PIL image; any decoding failure is a CRLError naming the file."""
    from PIL import Image, UnidentifiedImageError

    bad = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    try:
        with Image.open(io.BytesIO(blob)) as im:
            yield im
    except CRLError:
        raise
    except bad as e:
        raise CRLError(f"cannot read image '{path}' in {source}: {e}") from e


Blobs = Callable[[], Iterable[tuple[str, bytes]]]


def _scan(paths: list[str], blobs: Blobs, source: str) -> tuple[tuple[int, int], bool]:
    """The most common (width, height) and whether every image is grayscale; each image's
    decoded size is checked against the cap from its header, before it is decoded."""
    sizes: Counter = Counter()
    gray = True
    for p, blob in _progress(blobs(), len(paths), "scanning images"):
        with _image(blob, p, source) as im:
            w, h = im.size
            check_decoded_size(f"image '{p}' in {source} ({w}x{h}, {len(im.getbands())} "
                               "bands) decoded", w * h * len(im.getbands()))
            sizes[im.size] += 1
            gray = gray and im.mode in _GRAY_MODES
    if sum(sizes.values()) != len(paths):
        raise CRLError(f"imagefolder {source}: read {sum(sizes.values())} images; expected "
                       f"the {len(paths)} it lists")
    return sizes.most_common(1)[0][0], gray


def decode_images(paths: list[str], blobs: Blobs, source: str) -> np.ndarray:
    """Decode images into uint8 [N, C, H, W], in the order of `paths`.

    `blobs()` yields (path, bytes) for every path once, in any order; it is called twice
    (scan, then decode), and one image's bytes are held at a time. 1 channel if every image
    is grayscale, else RGB; images whose size differs from the most common size are resized to
    it (bilinear). Unreadable image -> CRLError naming the file; a result larger than
    CRL_MAX_DECODED_BYTES or the memory budget -> CRLError before it is allocated.
    """
    from PIL import Image

    (w, h), gray = _scan(paths, blobs, source)
    mode, c = ("L", 1) if gray else ("RGB", 3)
    check_decoded_size(f"imagefolder {source}: {len(paths)} images of {c}x{h}x{w}",
                       len(paths) * c * h * w)
    position = {p: i for i, p in enumerate(paths)}
    out = np.empty((len(paths), h, w, c), dtype=np.uint8)
    view = out[..., 0] if c == 1 else out
    for p, blob in _progress(blobs(), len(paths), f"decoding {source}"):
        with _image(blob, p, source) as im:
            im = im.convert(mode)
            if im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)
            view[position[p]] = np.asarray(im)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _finish(x: np.ndarray, items: list[tuple[str, int]], classes: list[str], source: str,
            train_size: int | None) -> dict:
    if x.shape[0] != len(items):
        raise CRLError(f"imagefolder {source}: decoded {x.shape[0]} images; expected the "
                       f"{len(items)} the listing holds")
    xt = torch.from_numpy(x)
    mean, std = channel_stats(xt)
    y = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return {"x": xt, "y": y, "classes": classes, "mean": mean, "std": std,
            "train_size": None if train_size is None else int(train_size)}


# --------------------------------------------------------------------------- sources

def _folder_listing(root: Path) -> tuple[list[str], set[str], dict[str, list[int]]]:
    """(files, dirs, path -> file_signature) under `root`; hidden folders are skipped."""
    files: list[str] = []
    dirs: set[str] = set()
    sigs: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not _hidden([d]))
        dirs.update(rel_dir + d for d in dirnames)
        for f in sorted(filenames):
            files.append(rel_dir + f)
            sigs[rel_dir + f] = file_signature(Path(dirpath) / f)
    return files, dirs, sigs


def _read_capped(path: Path, label: str) -> bytes:
    """A file's bytes, never more than CRL_MAX_MEMBER_BYTES of them."""
    cap = max_member_bytes()
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    check_member_size(label, len(data) if len(data) <= cap else os.path.getsize(path))
    return data


def _load_folder(root: Path, source: str, name: str, stem: str) -> ImageData:
    files, dirs, sigs = _folder_listing(root)

    def build() -> dict:
        classes, items, n_train = split_layout(files, dirs, source)
        paths = [f for f, _ in items]
        for p in paths:  # early, from the listing
            check_member_size(f"imagefolder {source}: file '{p}'", sigs[p][0])
        x = decode_images(paths, lambda: ((p, _read_capped(root / p, f"imagefolder {source}: "
                                                             f"file '{p}'")) for p in paths),
                          source)
        return _finish(x, items, classes, source, n_train)

    info = ["imagefolder-dir", str(root), sorted(sigs.items())]
    return cached(name, cache_path(stem, info), build,
                  unchanged=lambda: _folder_listing(root)[2] == sigs)


def _load_archive(path: Path, source: str, name: str, stem: str) -> ImageData:
    before = file_signature(path)

    def build() -> dict:
        with open_archive(path) as arc:   # members streamed twice (scan, decode)
            classes, items, n_train = split_layout(list(arc.files), arc.dirs, source)
            paths = [f for f, _ in items]
            x = decode_images(paths, lambda: arc.read(paths), source)
        return _finish(x, items, classes, source, n_train)

    info = ["imagefolder-tar", file_sha256(path)]
    return cached(name, cache_path(stem, info), build,
                  unchanged=lambda: file_signature(path) == before)


def load_imagefolder(path: str | os.PathLike, name: str | None = None) -> ImageData:
    """Load a folder or tar archive holding train/<class>/* and test/<class>/* images."""
    if not str(path).strip():
        raise CRLError("imagefolder: needs a PATH, e.g. imagefolder:/data/cifar10.tar.gz")
    src = Path(path).expanduser()
    name = name or f"{IMAGEFOLDER_PREFIX}{path}"
    if not src.exists():
        raise CRLError(f"imagefolder path {src} does not exist; expected a folder or "
                       f"a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    resolved = src.resolve()
    bare = re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", resolved.name, flags=re.IGNORECASE)
    stem = "imagefolder-" + bare
    if resolved.is_dir():
        return _load_folder(resolved, str(src), name, stem)
    if is_archive(resolved):
        return _load_archive(resolved, str(src), name, stem)
    raise CRLError(f"imagefolder path {src} is neither a folder nor a "
                   f"{'/'.join(ARCHIVE_SUFFIXES)} archive")
