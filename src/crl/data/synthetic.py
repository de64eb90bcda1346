"""A realistic stand-in for an unseen image dataset: 28x28 greyscale digits in ImageFolder
layout, made from scikit-learn's bundled 8x8 digits (1797 images, offline).

Each image is a source digit of its class, upsampled (bilinear) into a 20x20 box of a 28x28
canvas as MNIST is, with a random rotation (up to 12 degrees), scale (0.9-1.1), shift (up to
2.5 pixels), stroke intensity (0.75-1) and additive Gaussian noise (sigma 10 of 255). Each
class cycles through its shuffled sources (174 to 183 per class), so with up to 174 images
per class no source repeats and train and test share no source digit; above that every
source appears about equally often, each time distorted differently, and a test image may
share its source with a training image.

    python -m crl.data.synthetic digits28.tar.gz --per-class 800     # 8000 images, seconds

Output is deterministic for a seed (the tar.gz is byte-identical: fixed member and gzip
times), so repeated runs reuse crl's decoded-data cache.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crl.core.errors import CRLError
from crl.core.params import check_value
from crl.core.seeding import numpy_rng
from crl.core.utils import atomic_path

NUM_CLASSES = 10
FORMATS = {"png": "PNG", "bmp": "BMP", "jpg": "JPEG"}
_OWNER = "make_digit_folder"
_BOX = 20 / 28          # the digit's box as a fraction of the canvas (MNIST's 20 of 28)
_MAX_ROTATION = np.deg2rad(12.0)
_MAX_SHIFT = 2.5        # pixels of a 28x28 canvas (scaled with image_size)
_NOISE_SIGMA = 10.0


def _sources() -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's digits as float [N, 1, 8, 8] in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    return x, bunch.target.astype(np.int64)


def _choose(labels: np.ndarray, n_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Source indices, class by class: each class' shuffled sources, cycled to n_per_class."""
    picks = [np.resize(rng.permutation(np.flatnonzero(labels == c)), n_per_class)
             for c in range(NUM_CLASSES)]
    return np.concatenate(picks)


def _affines(n: int, rng: np.random.Generator) -> torch.Tensor:
    """[n, 2, 3] maps from output to source coordinates (affine_grid's convention)."""
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, n)
    zoom = 1.0 / (_BOX * rng.uniform(0.9, 1.1, n))
    shift = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, (n, 2)) * (2.0 / 28.0)  # normalised units
    cos, sin = np.cos(angle) * zoom, np.sin(angle) * zoom
    a = np.stack([np.stack([cos, sin], 1), np.stack([-sin, cos], 1)], 1)     # [n, 2, 2]
    b = -np.einsum("nij,nj->ni", a, shift)
    return torch.from_numpy(np.concatenate([a, b[:, :, None]], 2).astype(np.float32))


def digit_images(n_per_class: int, image_size: int = 28, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [10 * n_per_class, image_size, image_size] and int64 labels, class by
    class (within a class, in source order: see the module docstring)."""
    src, labels = _sources()
    rng = numpy_rng(seed, "synthetic-digits")
    idx = _choose(labels, n_per_class, rng)
    n = idx.size
    grid = F.affine_grid(_affines(n, rng), [n, 1, image_size, image_size],
                         align_corners=False)
    out = F.grid_sample(src[idx], grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[:, 0].numpy()
    gain = rng.uniform(0.75, 1.0, (n, 1, 1))
    noisy = out * gain * 255.0 + rng.normal(0.0, _NOISE_SIGMA, out.shape)
    return np.rint(noisy).clip(0, 255).astype(np.uint8), labels[idx]


def _encode(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "L").save(buf, format=FORMATS[fmt])
    return buf.getvalue()


def _files(images: np.ndarray, labels: np.ndarray, n_test: int, fmt: str
           ) -> list[tuple[str, bytes]]:
    """(relative path, encoded image): per class, the last n_test images go to test/."""
    out = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)
        n_train = members.size - n_test
        for k, i in enumerate(members):
            split, j = ("train", k) if k < n_train else ("test", k - n_train)
            out.append((f"{split}/{c}/{j:05d}.{fmt}", _encode(images[i], fmt)))
    return out


def _write_targz(path: Path, files: list[tuple[str, bytes]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


def _write_folder(path: Path, files: list[tuple[str, bytes]]) -> None:
    if path.exists():
        raise CRLError(f"{_OWNER}: {path} already exists; expected a new folder path "
                       "(or an archive path ending in .tar.gz)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for name, data in files:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_args(path: Path, n_per_class: int, test_fraction: float, image_size: int,
                seed: int, fmt: str, archive: bool) -> int:
    """Validate the arguments; returns the number of test images per class."""
    check_value(_OWNER, "n_per_class", n_per_class, kind=int, low=2)
    check_value(_OWNER, "test_fraction", test_fraction, kind=float, low=0.0, high=1.0,
                low_open=True, high_open=True)
    check_value(_OWNER, "image_size", image_size, kind=int, low=8, high=1024)
    check_value(_OWNER, "seed", seed, kind=int, low=0)
    check_value(_OWNER, "fmt", fmt, kind=str, choices=tuple(FORMATS))
    if archive and not str(path).lower().endswith((".tar.gz", ".tgz")):
        raise CRLError(f"{_OWNER}: path {path} must end in .tar.gz or .tgz to write an archive "
                       "(or pass archive=False for a folder)")
    n_test = round(n_per_class * test_fraction)
    return min(max(n_test, 1), n_per_class - 1)


def make_digit_folder(path: str | os.PathLike, *, n_per_class: int = 200,
                      test_fraction: float = 0.2, image_size: int = 28, seed: int = 0,
                      fmt: str = "png", archive: bool = True) -> Path:
    """Write 10 * n_per_class greyscale digit images as train/<class>/* and test/<class>/*
    (classes '0'..'9'; round(n_per_class * test_fraction) test images per class, at least one
    per split) to a .tar.gz archive (archive=True) or a new folder, atomically. Returns path.
    """
    path = Path(path)
    n_test = _check_args(path, n_per_class, test_fraction, image_size, seed, fmt, archive)
    images, labels = digit_images(n_per_class, image_size, seed)
    files = _files(images, labels, n_test, fmt)
    (_write_targz if archive else _write_folder)(path, files)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crl.data.synthetic",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="OUT.tar.gz (or a new folder with --folder)")
    p.add_argument("--per-class", type=int, default=200, help="images per class (default 200)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of each class written to test/ (default 0.2)")
    p.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="png", help="png (default), bmp or jpg")
    p.add_argument("--folder", action="store_true", help="write a folder, not an archive")
    a = p.parse_args(argv)
    try:
        out = make_digit_folder(a.out, n_per_class=a.per_class, test_fraction=a.test_fraction,
                                image_size=a.size, seed=a.seed, fmt=a.format,
                                archive=not a.folder)
    except CRLError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {NUM_CLASSES * a.per_class} images ({NUM_CLASSES} classes, {a.size}x{a.size}) "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
