"""Tests for crl.data: splits, datasets (digits, imagefolder, cache), safe archives, augmentation."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crl.data.datasets as ds
from crl.data import (
    PoolSplit, augment_batch, check_disjoint, flip_batch, half_split, load_dataset,
    make_pool_split, random_halves,
)
from crl.data.archive import open_archive
from crl.errors import CRLError


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CRL_CACHE", str(tmp_path / "cache"))


def _labels(n: int = 203, k: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, size=n)


# --------------------------------------------------------------------------- splits

def test_pool_split_disjoint_covering_and_deterministic():
    y = _labels()
    a, b = make_pool_split(y, seed=3), make_pool_split(y, seed=3)
    assert a == b
    for arr in (a.target_members, a.target_nonmembers, a.shadow_pool):
        assert arr.dtype == np.int64 and np.all(np.diff(arr) > 0)
    check_disjoint(m=a.target_members, n=a.target_nonmembers, s=a.shadow_pool)
    allidx = np.concatenate([a.target_pool, a.shadow_pool])
    assert np.array_equal(np.sort(allidx), np.arange(y.size))
    assert a.target_pool.size == y.size // 2 and a.target_members.size == a.target_pool.size // 2
    assert make_pool_split(y, seed=4) != a


def _within_one(part: np.ndarray, whole: np.ndarray, y: np.ndarray) -> None:
    for c in np.unique(y[whole]):
        ideal = (y[whole] == c).sum() * part.size / whole.size
        assert abs((y[part] == c).sum() - ideal) < 1.0 + 1e-9, c


def test_pool_split_stratified():
    y = _labels(500, 9)
    s = make_pool_split(y, seed=0)
    everything = np.arange(y.size)
    _within_one(s.target_pool, everything, y)
    _within_one(s.shadow_pool, everything, y)
    _within_one(s.target_members, s.target_pool, y)
    _within_one(s.target_nonmembers, s.target_pool, y)


@pytest.mark.parametrize("n", [4, 5, 100, 101, 203])
def test_subset_sizes(n):
    y = _labels()
    s = make_pool_split(y, seed=2, subset=n)
    total = s.target_pool.size + s.shadow_pool.size
    assert total == n and s.target_pool.size == n // 2
    assert s.target_members.size == (n // 2) // 2 and s.target_members.size >= 1
    assert np.unique(np.concatenate([s.target_pool, s.shadow_pool])).size == n
    if n == 100:
        chosen = np.concatenate([s.target_pool, s.shadow_pool])
        _within_one(chosen, np.arange(y.size), y)
    assert make_pool_split(y, seed=2, subset=n) == s


@pytest.mark.parametrize("n", [3, 0, -1, 204, 2.5])
def test_impossible_subset(n):
    with pytest.raises(CRLError, match="subset N="):
        make_pool_split(_labels(), subset=n)


def test_split_bad_inputs():
    with pytest.raises(CRLError):
        make_pool_split(np.arange(3))
    with pytest.raises(CRLError):
        make_pool_split(np.zeros((4, 2), dtype=int))
    with pytest.raises(CRLError):
        make_pool_split(_labels(), seed=-1)


def test_half_split():
    y = _labels()
    pool = np.arange(10, 150, 2)
    m, n = half_split(pool, y, seed=5)
    m2, n2 = half_split(pool[::-1], y, seed=5)
    assert np.array_equal(m, m2) and np.array_equal(n, n2)
    assert np.array_equal(np.sort(np.concatenate([m, n])), pool)
    assert m.size == pool.size // 2
    check_disjoint(members=m, nonmembers=n)
    _within_one(m, pool, y)
    assert not np.array_equal(half_split(pool, y, seed=6)[0], m)
    with pytest.raises(CRLError):
        half_split(np.array([1]), y, 0)
    with pytest.raises(CRLError):
        half_split(np.array([1, 1, 2]), y, 0)
    with pytest.raises(CRLError):
        half_split(np.array([1, 999]), y, 0)


def test_random_halves():
    k = random_halves(50, 7, seed=1)
    assert k.shape == (7, 50) and k.dtype == bool
    assert np.all(k.sum(0) == 3)
    assert np.all(np.abs(k.sum(1) - 50 * 3 / 7) < 20)
    assert np.array_equal(k, random_halves(50, 7, seed=1))
    assert not np.array_equal(k, random_halves(50, 7, seed=2))
    with pytest.raises(CRLError, match="num_models"):
        random_halves(10, 1, 0)


def test_check_disjoint_names_both():
    with pytest.raises(CRLError, match="'alpha' and 'gamma'"):
        check_disjoint(alpha=np.array([1, 2]), beta=np.array([3]), gamma=np.array([2, 9]))


def test_pool_split_json_roundtrip():
    s = make_pool_split(_labels(), seed=9, subset=40)
    back = PoolSplit.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.seed == 9
    with pytest.raises(CRLError, match="shadow_pool"):
        PoolSplit.from_dict({"seed": 0, "target_members": [], "target_nonmembers": []})
    with pytest.raises(CRLError, match="overlap"):
        PoolSplit.from_dict({"seed": 0, "target_members": [1], "target_nonmembers": [2],
                             "shadow_pool": [1]})


# --------------------------------------------------------------------------- datasets

def test_digits():
    d = load_dataset("digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == torch.uint8
    assert d.num_classes == 10 and d.y.dtype == torch.int64 and int(d.x.max()) == 255
    assert len(d.mean) == 1 and 0 < d.std[0] < 1


def test_unknown_and_torchvision_errors(tmp_path):
    with pytest.raises(CRLError, match="imagefolder:PATH"):
        load_dataset("mnistt")
    with pytest.raises(CRLError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(CRLError, match="not found"):
        load_dataset("svhn", data_root=str(tmp_path))


def _img(size, mode, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _write_tree(root: Path, spec=None, gray=False) -> None:
    """train/{cat,dog}, test/{cat,dog}; mixed sizes and modes unless gray."""
    spec = spec or {"train": {"dog": 3, "cat": 2}, "test": {"cat": 1, "dog": 2}}
    seed = 0
    for split, classes in spec.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                mode = "L" if gray else ["RGB", "L", "RGBA", "P"][seed % 4]
                size = (6, 5) if seed % 3 else (9, 7)
                ext = "png" if seed % 2 or mode != "RGB" else "jpg"
                _img(size, mode, seed).save(root / split / cls / f"{i:02d}.{ext}")


def _targz(src: Path, out: Path, arcname: str) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return out


def _check_tree_data(d) -> None:
    assert d.classes == ["cat", "dog"]
    assert d.x.shape == (8, 3, 5, 6) and d.x.dtype == torch.uint8
    assert d.y.tolist() == [0, 0, 1, 1, 1, 0, 1, 1]  # train (cat, dog) then test (cat, dog)
    assert len(d.mean) == 3 and all(0 < s < 1 for s in d.std)


def test_imagefolder_folder_and_toplevel(tmp_path):
    _write_tree(tmp_path / "bare")
    d = load_dataset(f"imagefolder:{tmp_path / 'bare'}")
    _check_tree_data(d)
    _write_tree(tmp_path / "outer" / "mydata")
    d2 = load_dataset(f"imagefolder:{tmp_path / 'outer'}")
    _check_tree_data(d2)
    assert torch.equal(d.x, d2.x)


def test_imagefolder_grayscale_one_channel(tmp_path):
    _write_tree(tmp_path / "g", gray=True)
    d = load_dataset(f"imagefolder:{tmp_path / 'g'}")
    assert d.x.shape == (8, 1, 5, 6) and len(d.mean) == 1


def test_imagefolder_targz_and_cache_hit(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")
    arc = _targz(tmp_path / "tree", tmp_path / "data.tar.gz", "data")
    d = load_dataset(f"imagefolder:{arc}")
    _check_tree_data(d)
    ref = load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    assert torch.equal(d.x, ref.x)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(ds, "_decode_images", boom)
    again = load_dataset(f"imagefolder:{arc}")
    assert torch.equal(again.x, d.x) and again.classes == d.classes
    # A corrupt cache file is ignored and rebuilt (rebuilding calls the decoder).
    cache = next((tmp_path / "cache" / "datasets").glob("imagefolder-data-*.pt"))
    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="rebuilding"), pytest.raises(AssertionError, match="again"):
        load_dataset(f"imagefolder:{arc}")
    monkeypatch.undo()
    monkeypatch.setenv("CRL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_dataset(f"imagefolder:{arc}")
    assert torch.equal(rebuilt.x, d.x)


def test_imagefolder_wrong_layouts(tmp_path):
    _write_tree(tmp_path / "a", spec={"train": {"cat": 1}})
    with pytest.raises(CRLError, match="expected train/ and test/.*found: train"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")
    _write_tree(tmp_path / "b", spec={"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    (tmp_path / "b" / "test" / "dog").mkdir()
    with pytest.raises(CRLError, match="'test/dog' holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}")
    _write_tree(tmp_path / "c", spec={"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "cow": 1}})
    with pytest.raises(CRLError, match="test classes differ"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")
    _write_tree(tmp_path / "e", spec={"train": {"cat": 1}, "test": {"cat": 1}})
    (tmp_path / "e" / "test" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(CRLError, match="broken.jpg"):
        load_dataset(f"imagefolder:{tmp_path / 'e'}")
    with pytest.raises(CRLError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")


# --------------------------------------------------------------------------- archives

def _evil_tar(path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        member.size = len(data) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, link
    return m


@pytest.mark.parametrize("member, why", [
    (_member("/etc/evil.jpg"), "absolute"),
    (_member("../evil.jpg"), "inside the archive"),
    (_member("data/train/../../evil.jpg"), "inside the archive"),
    (_member("data/link", tarfile.SYMTYPE, "../../etc/passwd"), "links"),
    (_member("data/hard", tarfile.LNKTYPE, "fine.txt"), "links"),
    (_member("data/fifo", tarfile.FIFOTYPE), "special"),
    (_member("data/dev", tarfile.CHRTYPE), "special"),
])
def test_unsafe_members_refused(tmp_path, member, why):
    arc = _evil_tar(tmp_path / "x.tar.gz", member, b"xx")
    with pytest.raises(CRLError, match=rf"unsafe archive member '{member.name}'.*{why}"):
        open_archive(arc)
    with pytest.raises(CRLError, match="unsafe archive member"):
        load_dataset(f"imagefolder:{arc}")


def test_corrupt_archives(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not a tar file at all" * 20)
    with pytest.raises(CRLError, match="cannot read archive"):
        load_dataset(f"imagefolder:{junk}")
    _write_tree(tmp_path / "t")
    good = _targz(tmp_path / "t", tmp_path / "good.tgz", "t").read_bytes()
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CRLError, match="cannot read archive"):
        load_dataset(f"imagefolder:{cut}")


def test_archive_missing_test_split(tmp_path):
    _write_tree(tmp_path / "t", spec={"train": {"cat": 2}})
    arc = _targz(tmp_path / "t", tmp_path / "t.tar", "only")
    with pytest.raises(CRLError, match=r"found: only \(inside it: train\)"):
        load_dataset(f"imagefolder:{arc}")


# --------------------------------------------------------------------------- augment

def _batch(b=32, c=2, h=6, w=7):
    return torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w) + 1.0


def test_augment_deterministic_and_shapes():
    x = _batch()
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert augment_batch(x, torch.Generator(), pad=0, flip=False) is x


def test_augment_crop_shifts_content():
    x, pad = _batch(), 2
    out = augment_batch(x, torch.Generator().manual_seed(3), pad=pad, flip=False)
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    shifts = []
    for i in range(x.shape[0]):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])]
        assert len(hits) == 1
        shifts.append(hits[0])
    assert len(set(shifts)) > 5  # per-sample offsets, not one shift for the batch
    assert (out == 0).any()  # zero padding entered somewhere


def test_augment_flip():
    x = _batch()
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=True)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(32)]
    same = [torch.equal(out[i], x[i]) for i in range(32)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    assert torch.equal(flip_batch(x)[:, :, :, 0], x[:, :, :, -1])
    with pytest.raises(CRLError):
        augment_batch(x[0], torch.Generator())
