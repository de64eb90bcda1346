"""Dataset loaders (train and test merged) with a decoded-tensor cache.

Samples come train first, then test; `ImageData.train_size` records the boundary of sources
that have one (torchvision's train/test files, imagefolder's train/ and test/ folders).

Built-in names live in `crl.core.registry.DATASETS`; `imagefolder:PATH` loads a folder or a tar
archive laid out as `train/<class>/*` and `test/<class>/*` (optionally inside one top-level
folder; crl.data.imagefolder). Decoded data is cached and verified by crl.data.cache; every
loaded ImageData carries its content hash (crl.data.types.content_digest).

Untrusted folders and archives are size-capped through two environment variables (details
in crl.data.limits): CRL_MAX_MEMBER_BYTES (one file or archive member, default 64 MiB) and
CRL_MAX_DECODED_BYTES (decoded data, default 8 GiB).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crl.core.errors import CRLError
from crl.core.registry import DATASETS
from crl.core.utils import cache_dir
from crl.data.cache import cache_path, cached, file_signature
from crl.data.imagefolder import IMAGEFOLDER_PREFIX, load_imagefolder
from crl.data.types import ImageData, channel_stats

__all__ = ["DATASET_NAMES", "IMAGEFOLDER_PREFIX", "load_dataset", "load_imagefolder"]

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


# --------------------------------------------------------------------------- digits

@DATASETS.register("digits", description="scikit-learn's 8x8 handwritten digits, 1797 images, "
                   "offline (UCI; Alpaydin & Kaynak 1998)")
def load_digits(data_root: str | None = None, download: bool = False) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, offline); data_root is ignored. It has
    no train/test split of its own (train_size None; crl.data.splits.own_split)."""
    import sklearn

    def build() -> dict:
        from sklearn.datasets import load_digits as _sk_digits

        bunch = _sk_digits()
        x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
        xt = torch.from_numpy(np.ascontiguousarray(x))
        mean, std = channel_stats(xt)
        return {"x": xt, "y": torch.from_numpy(bunch.target.astype(np.int64)),
                "classes": [str(i) for i in range(10)], "mean": mean, "std": std}

    return cached("digits", cache_path("digits", ["digits", sklearn.__version__]), build)


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
    return {"x": x, "y": y, "classes": classes, "mean": mean, "std": std,
            "train_size": len(ys[0])}


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
        except Exception as e:  # network/disk errors become one clear line
            raise CRLError(f"could not download {name} into {root}: {e}") from e
    sigs = [[f.name, file_signature(f)] for f in files]
    return cached(name, cache_path(name, [name, str(root.resolve()), sigs]),
                  lambda: _decode_torchvision(name, root),
                  unchanged=lambda: [[f.name, file_signature(f)] for f in files] == sigs)


def _register_tv(name: str) -> None:
    def loader(data_root: str | None = None, download: bool = False) -> ImageData:
        return _load_torchvision(name, data_root, download)

    loader.__name__ = f"load_{name}"
    loader.__doc__ = (f"torchvision {name} (train then test) from data_root; "
                      "downloads only if asked.")
    DATASETS.register(name, description=TV_DESCRIPTIONS[name])(loader)


TV_DESCRIPTIONS = {
    "cifar10": "CIFAR-10: 60k 32x32 colour images, 10 classes (Krizhevsky 2009)",
    "cifar100": "CIFAR-100: 60k 32x32 colour images, 100 classes (Krizhevsky 2009)",
    "svhn": "SVHN: 32x32 street-view house numbers, 10 classes (Netzer et al., 2011)",
}

for _n in ("cifar10", "cifar100", "svhn"):
    _register_tv(_n)

DATASET_NAMES: tuple[str, ...] = tuple(DATASETS.names())


# --------------------------------------------------------------------------- entry point

def load_dataset(name: str, data_root: str | None = None, download: bool = False) -> ImageData:
    """Load a dataset by registry name or as `imagefolder:PATH`; train first, then test."""
    if not isinstance(name, str):
        raise CRLError(f"dataset name {name!r}: expected a string")
    if name.startswith(IMAGEFOLDER_PREFIX):
        return load_imagefolder(name[len(IMAGEFOLDER_PREFIX):], name=name)
    name = DATASETS.canonical(name)
    if name not in DATASETS:
        raise CRLError(f"unknown dataset '{name}'{DATASETS.suggestion(name)}; expected one of: "
                       f"{', '.join(DATASETS.names())}, or {IMAGEFOLDER_PREFIX}PATH")
    return DATASETS.get(name)(data_root=data_root, download=download)
