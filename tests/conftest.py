from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset/model cache, never the user's."""
    monkeypatch.setenv("CRL_CACHE", str(tmp_path_factory.mktemp("crl-cache")))
    torch.set_num_threads(1)   # tiny models: one thread is faster and avoids oversubscription


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    import os

    os.environ.setdefault("CRL_CACHE", str(tmp_path_factory.mktemp("crl-cache-digits")))
    from crl.data.datasets import load_dataset

    return load_dataset("digits")


def write_image_folder(root: Path, counts: dict[str, int], classes: int, shift: int = 0,
                       seed: int = 0) -> Path:
    """8x8 grayscale PNGs at root/<split>/c<k>/<i>.png, counts[split] per class: pure noise in
    0..255 (shift 0: nothing to learn), else noise in 0..63 plus shift * k (class k learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    high = 64 if shift else 256
    for split, n in counts.items():
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, high, (8, 8), dtype=np.uint8) + np.uint8(shift * c)
                Image.fromarray(img, mode="L").save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def image_folder():
    """write_image_folder, for tests that need an `imagefolder:PATH` dataset on disk."""
    return write_image_folder
