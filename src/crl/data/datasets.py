"""Dataset loaders (train and test merged) with a decoded-tensor cache.

Built-in names live in `crl.registry.DATASETS`; `imagefolder:PATH` loads a folder or a tar
archive laid out as `train/<class>/*` and `test/<class>/*` (optionally inside one top-level
folder). Decoded data is cached at `cache_dir()/datasets/<key>.pt`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from crl.data.archive import ARCHIVE_SUFFIXES, is_archive, open_archive
from crl.data.types import ImageData
from crl.errors import CRLError
from crl.registry import DATASETS
from crl.utils import cache_dir, torch_save_atomic

IMAGEFOLDER_PREFIX = "imagefolder:"
CACHE_FORMAT = 1
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}

# Standard per-channel statistics on the [0, 1] scale.
_TV_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
# Files torchvision needs under data_root, per dataset.
_TV_FILES = {
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "data_batch_2", "data_batch_3",
                                        "data_batch_4", "data_batch_5", "test_batch",
                                        "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
    "svhn": ("", ("train_32x32.mat", "test_32x32.mat")),
}


# --------------------------------------------------------------------------- cache

def _fingerprint(info: object) -> str:
    blob = json.dumps([CACHE_FORMAT, info], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _cache_path(stem: str, info: object) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "data"
    return cache_dir() / "datasets" / f"{safe[:60]}-{_fingerprint(info)}.pt"


def _valid_cache(d: object) -> bool:
    if not isinstance(d, dict):
        return False
    x, y = d.get("x"), d.get("y")
    return (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
            and isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == x.shape[:1]
            and isinstance(d.get("classes"), list)
            and len(d.get("mean", ())) == x.shape[1] and len(d.get("std", ())) == x.shape[1])


def _cached(name: str, path: Path, build: Callable[[], dict]) -> ImageData:
    """Load `path` if it is a valid cache, else build, save atomically and return."""
    d = None
    if path.exists():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
            warnings.warn(f"ignoring unreadable dataset cache {path} ({e}); rebuilding")
            d = None
        if d is not None and not _valid_cache(d):
            warnings.warn(f"ignoring malformed dataset cache {path}; rebuilding")
            d = None
    if d is None:
        d = build()
        d = {"x": d["x"], "y": d["y"], "classes": list(d["classes"]),
             "mean": [float(v) for v in d["mean"]], "std": [float(v) for v in d["std"]]}
        try:
            torch_save_atomic(d, path)
        except OSError as e:
            warnings.warn(f"could not write dataset cache {path} ({e}); continuing without it")
    return ImageData(
        name=name, x=d["x"], y=d["y"], num_classes=len(d["classes"]),
        mean=tuple(d["mean"]), std=tuple(d["std"]), classes=list(d["classes"]),
    )


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population) of uint8 [N, C, H, W] images on the [0, 1] scale.

    A constant channel gets std 1.0 so normalising never divides by zero.
    """
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for part in torch.split(x, chunk):
        p = part.to(torch.float64).div_(255.0)
        s += p.sum(dim=(0, 2, 3))
        s2 += p.square_().sum(dim=(0, 2, 3))
    count = max(x.shape[0] * x.shape[2] * x.shape[3], 1)
    mean = s / count
    var = (s2 / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# --------------------------------------------------------------------------- digits

@DATASETS.register("digits")
def load_digits(data_root: str | None = None, download: bool = False) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, offline); data_root is ignored."""
    import sklearn

    def build() -> dict:
        from sklearn.datasets import load_digits as _sk_digits

        bunch = _sk_digits()
        x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
        xt = torch.from_numpy(np.ascontiguousarray(x))
        mean, std = channel_stats(xt)
        return {"x": xt, "y": torch.from_numpy(bunch.target.astype(np.int64)),
                "classes": [str(i) for i in range(10)], "mean": mean, "std": std}

    return _cached("digits", _cache_path("digits", ["digits", sklearn.__version__]), build)


# --------------------------------------------------------------------------- torchvision

def _tv_root(name: str, data_root: str | None, download: bool) -> Path:
    if data_root is None:
        if not download:
            raise CRLError(
                f"{name} needs --data-root DIR (a folder holding the torchvision files), "
                "or add --download"
            )
        return cache_dir() / "downloads"
    root = Path(data_root).expanduser()
    sub = _TV_FILES[name][0]
    if sub and root.name == sub:  # pointed straight at the extracted folder
        root = root.parent
    return root


def _tv_files(name: str, root: Path) -> list[Path]:
    sub, files = _TV_FILES[name]
    base = root / sub if sub else root
    return [base / f for f in files]


def _decode_torchvision(name: str, root: Path) -> dict:
    """Read the torchvision files for `name` under `root` (never downloads)."""
    import torchvision.datasets as tvd

    try:
        if name == "svhn":
            parts = [tvd.SVHN(str(root), split=s, download=False) for s in ("train", "test")]
            xs = [p.data for p in parts]                                  # [N, 3, 32, 32]
            ys = [np.asarray(p.labels) for p in parts]
            classes = [str(i) for i in range(10)]
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            parts = [cls(str(root), train=t, download=False) for t in (True, False)]
            xs = [p.data.transpose(0, 3, 1, 2) for p in parts]            # NHWC -> NCHW
            ys = [np.asarray(p.targets) for p in parts]
            classes = list(parts[0].classes)
    except (RuntimeError, OSError, ValueError) as e:
        raise CRLError(f"{name} files in {root} are missing or corrupt ({e}); "
                       "add --download to fetch them again") from e
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)).astype(np.uint8, copy=False))
    y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    mean, std = _TV_STATS[name]
    return {"x": x, "y": y, "classes": classes, "mean": mean, "std": std}


def _load_torchvision(name: str, data_root: str | None, download: bool) -> ImageData:
    root = _tv_root(name, data_root, download)
    files = _tv_files(name, root)
    if not all(f.is_file() for f in files):
        if not download:
            missing = next(f for f in files if not f.is_file())
            raise CRLError(f"{name} files not found in {root} (missing {missing}); "
                           "point --data-root at the folder holding them, or add --download")
        import torchvision.datasets as tvd

        try:
            if name == "svhn":
                for s in ("train", "test"):
                    tvd.SVHN(str(root), split=s, download=True)
            else:
                cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
                for t in (True, False):
                    cls(str(root), train=t, download=True)
        except Exception as e:  # noqa: BLE001 - network/disk errors become one clear line
            raise CRLError(f"could not download {name} into {root}: {e}") from e
    info = [name, str(root.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                          for f in files]
    return _cached(name, _cache_path(name, info), lambda: _decode_torchvision(name, root))


def _register_tv(name: str) -> None:
    def loader(data_root: str | None = None, download: bool = False) -> ImageData:
        return _load_torchvision(name, data_root, download)

    loader.__name__ = f"load_{name}"
    loader.__doc__ = f"torchvision {name} (train then test) from data_root; downloads only if asked."
    DATASETS.register(name)(loader)


for _n in ("cifar10", "cifar100", "svhn"):
    _register_tv(_n)

DATASET_NAMES: tuple[str, ...] = tuple(DATASETS.names())


# --------------------------------------------------------------------------- imagefolder

def _hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _resolve_layout(files: list[str], dirs: set[str], source: str
                    ) -> tuple[list[str], list[tuple[str, int]]]:
    """From relative posix paths, find train/ and test/ and return (classes, [(path, label)]).

    Items are ordered train first, then test; within a split by class, then path.
    """
    files = [f for f in files if not _hidden(f.split("/"))]
    dirs = {d for d in dirs if not _hidden(d.split("/"))}
    tops = {f.split("/")[0] for f in files} | {d.split("/")[0] for d in dirs}
    top_dirs = sorted({d.split("/")[0] for d in dirs})

    def has_splits(prefix: str) -> bool:
        return f"{prefix}train" in dirs and f"{prefix}test" in dirs

    if has_splits(""):
        prefix = ""
    elif len(top_dirs) == 1 and has_splits(f"{top_dirs[0]}/"):
        prefix = f"{top_dirs[0]}/"
    else:
        found = ", ".join(sorted(tops)[:10]) or "nothing"
        if len(top_dirs) == 1:
            inner = sorted({d.split("/")[1] for d in dirs if d.count("/") >= 1
                            and d.startswith(top_dirs[0] + "/")})
            found += f" (inside it: {', '.join(inner[:10]) or 'nothing'})"
        raise CRLError(f"imagefolder {source}: expected train/ and test/ folders "
                       f"(optionally inside one top-level folder); found: {found}")

    per_split: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "test"):
        base = f"{prefix}{split}/"
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
        per_split[split] = classes

    classes = sorted(per_split["train"])
    test_classes = set(per_split["test"])
    if test_classes != set(classes):
        only_train = sorted(set(classes) - test_classes)
        only_test = sorted(test_classes - set(classes))
        raise CRLError(f"imagefolder {source}: test classes differ from train classes "
                       f"(only in train: {only_train}, only in test: {only_test}); "
                       "expected the same class folders")
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, int]] = []
    for split in ("train", "test"):
        for cls in classes:
            items.extend((f, index[cls]) for f in sorted(per_split[split][cls]))
    return classes, items


def _progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", leave=False, disable=None,
                mininterval=0.5)


def _decode_images(paths: list[str], read: Callable[[str], bytes], source: str) -> np.ndarray:
    """Decode images into uint8 [N, C, H, W].

    1 channel if every image is grayscale, else RGB; images whose size differs from the most
    common size are resized to it (bilinear). Unreadable image -> CRLError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    bad = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    sizes: Counter = Counter()
    gray = True
    for p in _progress(paths, len(paths), "scanning images"):
        try:
            with Image.open(io.BytesIO(read(p))) as im:
                sizes[im.size] += 1
                gray = gray and im.mode in _GRAY_MODES
        except bad as e:
            raise CRLError(f"cannot read image '{p}' in {source}: {e}") from e
    (w, h), _ = sizes.most_common(1)[0]
    mode, c = ("L", 1) if gray else ("RGB", 3)
    out = np.empty((len(paths), h, w, c), dtype=np.uint8)
    view = out[..., 0] if c == 1 else out
    for i, p in enumerate(_progress(paths, len(paths), f"decoding {source}")):
        try:
            with Image.open(io.BytesIO(read(p))) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                view[i] = np.asarray(im)
        except bad as e:
            raise CRLError(f"cannot read image '{p}' in {source}: {e}") from e
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _folder_listing(root: Path) -> tuple[list[str], set[str], list]:
    files: list[str] = []
    dirs: set[str] = set()
    stats: list = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if not _hidden([d]))
        for d in dirnames:
            dirs.add(rel_dir + d)
        for f in sorted(filenames):
            rel = rel_dir + f
            st = (Path(dirpath) / f).stat()
            files.append(rel)
            stats.append([rel, st.st_size, st.st_mtime_ns])
    return files, dirs, stats


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
    stem = "imagefolder-" + re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", resolved.name, flags=re.I)
    if resolved.is_dir():
        files, dirs, stats = _folder_listing(resolved)
        info = ["imagefolder-dir", str(resolved), stats]

        def build() -> dict:
            classes, items = _resolve_layout(files, dirs, str(src))
            x = _decode_images([f for f, _ in items],
                               lambda p: (resolved / p).read_bytes(), str(src))
            return _finish(x, items, classes)
    elif is_archive(resolved):
        st = resolved.stat()
        info = ["imagefolder-tar", str(resolved), st.st_size, st.st_mtime_ns]

        def build() -> dict:
            with open_archive(resolved) as arc:
                classes, items = _resolve_layout(list(arc.files), arc.dirs, str(src))
                paths = [f for f, _ in items]
                blobs = dict(_progress(arc.read(paths), len(paths), f"reading {src.name}"))
            x = _decode_images(paths, blobs.__getitem__, str(src))
            return _finish(x, items, classes)
    else:
        raise CRLError(f"imagefolder path {src} is neither a folder nor a "
                       f"{'/'.join(ARCHIVE_SUFFIXES)} archive")
    return _cached(name, _cache_path(stem, info), build)


def _finish(x: np.ndarray, items: list[tuple[str, int]], classes: list[str]) -> dict:
    xt = torch.from_numpy(x)
    mean, std = channel_stats(xt)
    y = torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return {"x": xt, "y": y, "classes": classes, "mean": mean, "std": std}


# --------------------------------------------------------------------------- entry point

def load_dataset(name: str, data_root: str | None = None, download: bool = False) -> ImageData:
    """Load a dataset by registry name or as `imagefolder:PATH`; train first, then test."""
    if not isinstance(name, str):
        raise CRLError(f"dataset name {name!r}: expected a string")
    if name.startswith(IMAGEFOLDER_PREFIX):
        return load_imagefolder(name[len(IMAGEFOLDER_PREFIX):], name=name)
    if name not in DATASETS:
        raise CRLError(f"unknown dataset '{name}'; expected one of: "
                       f"{', '.join(DATASETS.names())}, or {IMAGEFOLDER_PREFIX}PATH")
    return DATASETS.get(name)(data_root=data_root, download=download)
