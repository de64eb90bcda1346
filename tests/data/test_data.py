"""Tests for crl.data: splits, datasets (digits, imagefolder, cache, content hash), safe and
hostile archives, size caps, the synthetic digit dataset, augmentation."""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crl.data.imagefolder as imf
from crl.core.errors import CRLError
from crl.data import (
    PoolSplit,
    augment_batch,
    check_disjoint,
    flip_batch,
    half_split,
    load_dataset,
    make_pool_split,
    random_halves,
)
from crl.data.archive import SafeArchive, open_archive
from crl.data.synthetic import main as synthetic_main
from crl.data.synthetic import make_digit_folder
from crl.data.types import ImageData, content_digest


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

    monkeypatch.setattr(imf, "decode_images", boom)
    again = load_dataset(f"imagefolder:{arc}")
    assert torch.equal(again.x, d.x) and again.classes == d.classes
    # A corrupt cache file is ignored and rebuilt (rebuilding calls the decoder).
    cache = next((tmp_path / "cache" / "datasets").glob("imagefolder-data-*.pt"))
    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="rebuilding"), \
            pytest.raises(AssertionError, match="again"):
        load_dataset(f"imagefolder:{arc}")
    monkeypatch.undo()
    monkeypatch.setenv("CRL_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_dataset(f"imagefolder:{arc}")
    assert torch.equal(rebuilt.x, d.x)


def test_imagefolder_wrong_layouts(tmp_path):
    _write_tree(tmp_path / "a", spec={"images": {"cat": 1}})
    with pytest.raises(CRLError, match="expected a train/ folder.*found: images"):
        load_dataset(f"imagefolder:{tmp_path / 'a'}")
    _write_tree(tmp_path / "b", spec={"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}})
    (tmp_path / "b" / "test" / "dog").mkdir()
    with pytest.raises(CRLError, match="'test/dog' holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'b'}")
    _write_tree(tmp_path / "c", spec={"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "cow": 1}})
    with pytest.raises(CRLError, match="test classes differ"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")
    _write_tree(tmp_path / "e", spec={"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}})
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
    _write_tree(tmp_path / "t", spec={"train": {"cat": 2, "dog": 2}})
    arc = _targz(tmp_path / "t", tmp_path / "t.tar", "only")
    data = load_dataset(f"imagefolder:{arc}")          # train/ alone: no split of its own
    assert len(data) == 4 and data.train_size is None and data.classes == ["cat", "dog"]
    _write_tree(tmp_path / "u", spec={"images": {"cat": 2}})
    arc = _targz(tmp_path / "u", tmp_path / "u.tar", "only")
    with pytest.raises(CRLError, match=r"found: only \(inside it: images\)"):
        load_dataset(f"imagefolder:{arc}")


def _many_pngs(n: int = 120) -> list[tuple[str, bytes]]:
    """n small random greyscale PNGs in data/{train,test}/{a,b}/ (n // 4 per folder)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(buf, "PNG")
        out.append((f"data/{('train', 'test')[k % 2]}/{'ab'[(k // 2) % 2]}/{k:03d}.png",
                    buf.getvalue()))
    return out


def _tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_gzip_corrupted_late_fails_instead_of_dropping_images(tmp_path):
    good = gzip.compress(_tar_bytes(_many_pngs()), mtime=0)
    path = tmp_path / "good.tar.gz"
    path.write_bytes(good)
    assert len(load_dataset(f"imagefolder:{path}")) == 120
    # tarfile alone stops at the first unreadable header and keeps the members before it, and
    # never reaches the CRC when the damage is inside member data: both must be errors (a
    # damaged header may also decode as an invalid member, e.g. a name listed twice).
    for pos in range(len(good) // 2, len(good), 29):
        bad = bytearray(good)
        bad[pos] ^= 0x5A
        arc = tmp_path / f"bad{pos}.tar.gz"
        arc.write_bytes(bytes(bad))
        with pytest.raises(CRLError, match=rf"archive .*bad{pos}\.tar\.gz"):
            load_dataset(f"imagefolder:{arc}")


def test_damaged_tar_inside_valid_gzip_and_truncated_tar(tmp_path):
    raw = bytearray(_tar_bytes(_many_pngs()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        headers = [m.offset for m in tf.getmembers()]
    raw[headers[100] + 148:headers[100] + 156] = b"garbage!"  # the 101st header's checksum
    arc = tmp_path / "hdr.tgz"
    arc.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(CRLError, match=r"hdr\.tgz: it is damaged after member '.*099\.png'"):
        load_dataset(f"imagefolder:{arc}")
    whole = _tar_bytes(_many_pngs())
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:headers[100]])  # ends on a member boundary, no end marker
    with pytest.raises(CRLError, match=r"cut\.tar: it ends after member .*end-of-archive"):
        load_dataset(f"imagefolder:{cut}")


def test_archive_folders_include_parents_of_explicit_folders(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tf:
        folder = tarfile.TarInfo("a/b/c")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        f = tarfile.TarInfo("a/b/c/x.png")
        f.size = 1
        tf.addfile(f, io.BytesIO(b"x"))
    with open_archive(path) as arc:
        assert arc.dirs == {"a", "a/b", "a/b/c"} and list(arc.files) == ["a/b/c/x.png"]


def test_decoded_count_must_match_listing(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")
    arc = _targz(tmp_path / "tree", tmp_path / "data.tar.gz", "data")
    real = SafeArchive.read
    monkeypatch.setattr(SafeArchive, "read", lambda self, names: list(real(self, names))[1:])
    with pytest.raises(CRLError, match=r"data\.tar\.gz: read 7 images; expected the 8"):
        load_dataset(f"imagefolder:{arc}")


def _huge_member_tgz(path: Path, size: int, data: bytes) -> Path:
    """A tar.gz whose member data/train/a/big.png claims `size` bytes and holds `data`."""
    info = tarfile.TarInfo("data/train/a/big.png")
    info.size = size
    payload = info.tobuf(format=tarfile.GNU_FORMAT) + data
    payload += b"\0" * (-len(payload) % 512) + b"\0" * 1024
    path.write_bytes(gzip.compress(payload))
    return path


def test_member_size_cap_fails_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setenv("CRL_MAX_MEMBER_BYTES", "1M")
    honest = _huge_member_tgz(tmp_path / "zeros.tgz", 4 << 20, b"\0" * (4 << 20))
    with pytest.raises(CRLError, match=r"member 'data/train/a/big.png' is 4194304 bytes; "
                                       r"expected at most 1048576 \(raise CRL_MAX_MEMBER_BYTES"):
        load_dataset(f"imagefolder:{honest}")
    # A header claiming 3 GiB in a 2 KB file: any read of the member's data would fail with a
    # different error (missing data), so the cap is checked from the header alone.
    monkeypatch.delenv("CRL_MAX_MEMBER_BYTES")
    liar = _huge_member_tgz(tmp_path / "liar.tgz", 3 << 30, b"")
    with pytest.raises(CRLError, match=r"is 3221225472 bytes; expected at most 67108864"):
        open_archive(liar)


def test_decoded_size_cap(tmp_path, monkeypatch):
    _write_tree(tmp_path / "tree")               # 8 images decode to 8 x 3 x 5 x 6 = 720 bytes
    monkeypatch.setenv("CRL_MAX_DECODED_BYTES", "700")
    with pytest.raises(CRLError, match=r"8 images of 3x5x6 takes 720 bytes; expected at most "
                                       r"700 \(raise CRL_MAX_DECODED_BYTES"):
        load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    monkeypatch.setenv("CRL_MAX_DECODED_BYTES", "100")
    with pytest.raises(CRLError, match=r"image '.*' in .* takes \d+ bytes; expected at most 100"):
        load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    arc = _targz(tmp_path / "tree", tmp_path / "data.tar.gz", "data")
    # archive members are streamed: the same per-image check, no cap on the raw bytes read
    with pytest.raises(CRLError, match=r"image '.*' in .* takes \d+ bytes; expected at most 100"):
        load_dataset(f"imagefolder:{arc}")
    monkeypatch.setenv("CRL_MAX_DECODED_BYTES", "lots")
    with pytest.raises(CRLError, match=r"CRL_MAX_DECODED_BYTES = 'lots': expected a number of "
                                       "bytes >= 1"):
        load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    monkeypatch.setenv("CRL_MAX_DECODED_BYTES", "1k")
    assert len(load_dataset(f"imagefolder:{tmp_path / 'tree'}")) == 8


def test_single_class_refused(tmp_path):
    _write_tree(tmp_path / "one", spec={"train": {"cat": 2}, "test": {"cat": 1}})
    with pytest.raises(CRLError, match=r"found 1 class \('cat'\); expected at least 2 class"):
        load_dataset(f"imagefolder:{tmp_path / 'one'}")
    arc = _targz(tmp_path / "one", tmp_path / "one.tar.gz", "one")
    with pytest.raises(CRLError, match=r"one\.tar\.gz: found 1 class"):
        load_dataset(f"imagefolder:{arc}")


# --------------------------------------------------------------------------- content identity

def test_content_hash_for_every_loader(tmp_path, digits):
    d = load_dataset("digits")
    assert re.fullmatch(r"[0-9a-f]{64}", d.content_hash)
    assert d.content_hash == content_digest(d.x, d.y, d.classes, d.num_classes)
    assert d.content_hash == digits.content_hash
    _write_tree(tmp_path / "tree")
    folder = load_dataset(f"imagefolder:{tmp_path / 'tree'}")
    arc = load_dataset(f"imagefolder:{_targz(tmp_path / 'tree', tmp_path / 'a.tar.gz', 'a')}")
    assert folder.content_hash == arc.content_hash != d.content_hash
    # Built by hand, an ImageData computes its own; other labels give another hash.
    y = torch.roll(d.y, 1)
    assert ImageData("x", d.x, y, 10, d.mean, d.std, d.classes).content_hash == \
        content_digest(d.x, y, d.classes, 10) != d.content_hash


def test_overwritten_archive_is_never_served_stale(tmp_path):
    a = make_digit_folder(tmp_path / "a.tar.gz", n_per_class=3, seed=0).read_bytes()
    b = make_digit_folder(tmp_path / "b.tar.gz", n_per_class=3, seed=1).read_bytes()
    size = max(len(a), len(b))             # gzip allows zero padding: make the sizes equal
    arc = tmp_path / "d.tar.gz"
    arc.write_bytes(a.ljust(size, b"\0"))
    first = load_dataset(f"imagefolder:{arc}")
    st = arc.stat()
    with open(arc, "r+b") as f:            # in place: same inode and size, old mtime put back
        f.write(b.ljust(size, b"\0"))
    os.utime(arc, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert arc.stat().st_size == st.st_size and arc.stat().st_ino == st.st_ino
    second = load_dataset(f"imagefolder:{arc}")
    assert len(second) == len(first) == 30
    assert second.content_hash != first.content_hash and not torch.equal(second.x, first.x)
    assert second.content_hash == load_dataset(f"imagefolder:{tmp_path / 'b.tar.gz'}").content_hash


def test_edited_folder_is_never_served_stale(tmp_path, monkeypatch):
    _write_tree(tmp_path / "t", gray=True)
    img = tmp_path / "t" / "train" / "cat" / "00.png"
    _img((6, 5), "L", 1).save(img.with_suffix(".bmp"))
    img.unlink()
    bmp = img.with_suffix(".bmp")
    first = load_dataset(f"imagefolder:{tmp_path / 't'}")
    with monkeypatch.context() as m:  # an unchanged folder is served from the cache
        m.setattr(imf, "decode_images", None)
        assert load_dataset(f"imagefolder:{tmp_path / 't'}").content_hash == first.content_hash
    st = bmp.stat()
    other = tmp_path / "other.bmp"
    _img((6, 5), "L", 99).save(other)
    assert other.stat().st_size == st.st_size
    bmp.write_bytes(other.read_bytes())  # same size, same inode, old mtime put back
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_dataset(f"imagefolder:{tmp_path / 't'}")
    assert second.content_hash != first.content_hash


def _cache_file(tmp_path: Path, stem: str) -> Path:
    return next((tmp_path / "cache" / "datasets").glob(f"{stem}-*.pt"))


def test_cache_entry_verified_and_old_entries_upgraded(tmp_path):
    d = load_dataset("digits")
    path = _cache_file(tmp_path, "digits")
    entry = torch.load(path, weights_only=True)
    assert entry["content_hash"] == d.content_hash
    old = {k: v for k, v in entry.items() if k not in ("content_hash", "check")}
    torch.save(old, path)
    assert load_dataset("digits").content_hash == d.content_hash
    assert torch.load(path, weights_only=True)["content_hash"] == d.content_hash  # rewritten
    damaged = dict(entry, x=entry["x"].clone())
    damaged["x"][0, 0, 0, 0] ^= 1
    torch.save(damaged, path)
    with pytest.warns(UserWarning, match="does not match its content hash"):
        again = load_dataset("digits")
    assert torch.equal(again.x, d.x) and again.content_hash == d.content_hash
    torch.save(dict(entry, mean=[0.5]), path)
    with pytest.warns(UserWarning, match="does not match its content hash"):
        assert load_dataset("digits").mean == d.mean


# --------------------------------------------------------------------------- synthetic

def test_make_digit_folder_loads_and_is_deterministic(tmp_path):
    arc = make_digit_folder(tmp_path / "d.tar.gz", n_per_class=12, seed=3)
    d = load_dataset(f"imagefolder:{arc}")
    assert d.x.shape == (120, 1, 28, 28) and d.num_classes == 10
    assert d.classes == [str(c) for c in range(10)]
    assert torch.bincount(d.y).tolist() == [12] * 10
    with open_archive(arc) as a:
        assert sum(n.startswith("test/") for n in a.files) == 10 * 2  # round(12 * 0.2) each
    ink, corners = d.x[:, 0, 9:19, 9:19].float().mean(), d.x[:, 0, :3, :3].float().mean()
    assert ink > corners + 30                              # a digit in the middle, dark border
    assert len({img.tobytes() for img in d.x.numpy()}) == 120  # every image distinct
    again = make_digit_folder(tmp_path / "again.tar.gz", n_per_class=12, seed=3)
    assert again.read_bytes() == arc.read_bytes()
    folder = make_digit_folder(tmp_path / "folder", n_per_class=12, seed=3, archive=False)
    assert load_dataset(f"imagefolder:{folder}").content_hash == d.content_hash
    other = make_digit_folder(tmp_path / "other.tar.gz", n_per_class=12, seed=4)
    assert load_dataset(f"imagefolder:{other}").content_hash != d.content_hash


def test_make_digit_folder_bad_input_and_cli(tmp_path, capsys):
    with pytest.raises(CRLError, match=r"make_digit_folder.n_per_class = 1: expected an integer"):
        make_digit_folder(tmp_path / "x.tar.gz", n_per_class=1)
    with pytest.raises(CRLError, match=r"fmt = 'gif': expected one of: png, bmp, jpg"):
        make_digit_folder(tmp_path / "x.tar.gz", fmt="gif")
    with pytest.raises(CRLError, match=r"x\.zip must end in \.tar\.gz"):
        make_digit_folder(tmp_path / "x.zip")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CRLError, match="already exists"):
        make_digit_folder(tmp_path / "taken", n_per_class=2, archive=False)
    assert synthetic_main([str(tmp_path / "c.tgz"), "--per-class", "3", "--seed", "3"]) == 0
    assert "wrote 30 images" in capsys.readouterr().out
    assert len(load_dataset(f"imagefolder:{tmp_path / 'c.tgz'}")) == 30
    assert synthetic_main([str(tmp_path / "s"), "--folder", "--per-class", "2", "--size", "32",
                           "--format", "bmp"]) == 0
    assert load_dataset(f"imagefolder:{tmp_path / 's'}").x.shape == (20, 1, 32, 32)
    assert synthetic_main([str(tmp_path / "c.tgz"), "--per-class", "0"]) == 2
    assert "n_per_class = 0" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*"))  # nothing half-written left behind


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
