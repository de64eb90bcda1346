"""Seeded, stratified index splits: target/shadow pools, member/non-member halves, LiRA masks.

Spec: the whole dataset (or a stratified subset of it) is split 50/50 into a target pool and a
shadow pool; the target pool is split 50/50 into members (training set of the target model)
and non-members. Stratification is best-effort by largest remainder, so it never fails: each
class gets within one sample of its proportional share of every part.

`own_split` is different: the dataset's own train/test split, for training one model to deploy
(`crl train`), with no member/non-member pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng
from crl.data.types import ImageData

MIN_SPLIT_SIZE = 4
OWN_TEST_FRACTION = 0.2                  # held out when a dataset has no test split of its own
OWN_SPLIT_STREAM = "digits-test-split"   # its named stream: seed_for(0, OWN_SPLIT_STREAM)


def _as_labels(labels: Any) -> np.ndarray:
    """Labels as a 1-D int64 array (CRLError otherwise)."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise CRLError(f"labels of shape {arr.shape}: expected a 1-D array of class ids")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise CRLError(f"labels of dtype {arr.dtype}: expected integer class ids")
    return arr.astype(np.int64, copy=False)


def _is_int(v: Any) -> bool:
    """True for Python and numpy integers, False for bools (which are ints to Python)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _check_seed(seed: Any) -> int:
    if not _is_int(seed) or seed < 0:
        raise CRLError(f"seed {seed!r}: expected a non-negative integer")
    return int(seed)


def stratified_take(
    idx: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick k of `idx` so each class gets floor or ceil of its proportional share.

    Returns (taken, rest), both sorted. Ties in the rounding are broken at random.
    """
    n = idx.size
    if not 0 <= k <= n:
        raise CRLError(f"cannot take {k} of {n} samples: expected between 0 and {n}")
    lab = labels[idx]
    classes, counts = np.unique(lab, return_counts=True)
    ideal = counts * (k / n) if n else counts.astype(float)
    quota = np.floor(ideal).astype(np.int64)
    short = k - int(quota.sum())
    if short > 0:
        frac = ideal - quota
        # Largest remainders first; random tie-break so no class is favoured systematically.
        order = np.lexsort((rng.random(classes.size), -frac))
        quota[order[:short]] += 1
    taken = []
    for c, q in zip(classes, quota):
        members = idx[lab == c]
        taken.append(members[rng.permutation(members.size)[:q]])
    took = np.sort(np.concatenate(taken)) if taken else np.empty(0, np.int64)
    rest = np.setdiff1d(idx, took, assume_unique=True)
    return took.astype(np.int64), rest.astype(np.int64)


def check_disjoint(**named_index_arrays: np.ndarray) -> None:
    """Raise CRLError naming the first two index arrays that share an index."""
    items = [(k, np.asarray(v).ravel()) for k, v in named_index_arrays.items()]
    for (na, a), (nb, b) in combinations(items, 2):
        common = np.intersect1d(a, b)
        if common.size:
            raise CRLError(
                f"index sets '{na}' and '{nb}' overlap in {common.size} indices "
                f"(e.g. {int(common[0])}); expected disjoint sets"
            )


@dataclass(eq=False)
class PoolSplit:
    """Dataset indices of the target members, target non-members and the shadow pool."""

    target_members: np.ndarray
    target_nonmembers: np.ndarray
    shadow_pool: np.ndarray
    seed: int

    def __post_init__(self) -> None:
        for name in ("target_members", "target_nonmembers", "shadow_pool"):
            arr = np.asarray(getattr(self, name))
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise CRLError(f"PoolSplit.{name} of shape {arr.shape} dtype {arr.dtype}: "
                               "expected a 1-D array of integer indices")
            setattr(self, name, np.sort(arr.astype(np.int64)))
        self.seed = int(self.seed)

    @property
    def target_pool(self) -> np.ndarray:
        """Members and non-members together, sorted."""
        return np.sort(np.concatenate([self.target_members, self.target_nonmembers]))

    def to_dict(self) -> dict:
        """Plain lists, for JSON."""
        return {
            "seed": self.seed,
            "target_members": self.target_members.tolist(),
            "target_nonmembers": self.target_nonmembers.tolist(),
            "shadow_pool": self.shadow_pool.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PoolSplit:
        """Inverse of to_dict; checks the keys and that the parts are disjoint."""
        if not isinstance(d, dict):
            raise CRLError(f"split of type {type(d).__name__}: expected a JSON object")
        keys = ("target_members", "target_nonmembers", "shadow_pool", "seed")
        missing = [k for k in keys if k not in d]
        if missing:
            raise CRLError(f"split is missing {', '.join(missing)}; "
                           f"expected keys {', '.join(keys)}")
        split = cls(
            np.asarray(d["target_members"], dtype=np.int64),
            np.asarray(d["target_nonmembers"], dtype=np.int64),
            np.asarray(d["shadow_pool"], dtype=np.int64),
            d["seed"],
        )
        check_disjoint(target_members=split.target_members,
                       target_nonmembers=split.target_nonmembers,
                       shadow_pool=split.shadow_pool)
        return split

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PoolSplit):
            return NotImplemented
        return self.seed == other.seed and all(
            np.array_equal(getattr(self, n), getattr(other, n))
            for n in ("target_members", "target_nonmembers", "shadow_pool")
        )

    def __repr__(self) -> str:
        return (f"PoolSplit(members={self.target_members.size}, "
                f"nonmembers={self.target_nonmembers.size}, "
                f"shadow_pool={self.shadow_pool.size}, seed={self.seed})")


def make_pool_split(labels: np.ndarray, seed: int = 0, subset: int | None = None) -> PoolSplit:
    """Stratified target/shadow pools (50/50) and target members/non-members (50/50).

    With `subset` N, a stratified sample of N indices is drawn first. Odd sizes put the
    extra sample in the shadow pool and in the non-members.
    """
    labels = _as_labels(labels)
    seed = _check_seed(seed)
    n = labels.size
    rng = np.random.default_rng(seed)
    idx = np.arange(n, dtype=np.int64)
    if subset is not None:
        if not _is_int(subset) or not MIN_SPLIT_SIZE <= subset <= n:
            raise CRLError(f"subset N={subset!r}: expected an integer between "
                           f"{MIN_SPLIT_SIZE} and {n}")
        if subset < n:
            idx, _ = stratified_take(idx, labels, int(subset), rng)
    elif n < MIN_SPLIT_SIZE:
        raise CRLError(f"dataset of {n} samples: expected at least {MIN_SPLIT_SIZE} to split")
    target, shadow = stratified_take(idx, labels, idx.size // 2, rng)
    members, nonmembers = stratified_take(target, labels, target.size // 2, rng)
    check_disjoint(target_members=members, target_nonmembers=nonmembers)
    check_disjoint(target_pool=target, shadow_pool=shadow)
    return PoolSplit(members, nonmembers, shadow, seed)


def half_split(pool: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random 50/50 of `pool` (dataset indices) into sorted (members, nonmembers)."""
    labels = _as_labels(labels)
    seed = _check_seed(seed)
    pool = np.asarray(pool)
    if pool.ndim != 1 or (pool.size and not np.issubdtype(pool.dtype, np.integer)):
        raise CRLError(f"pool of shape {pool.shape} dtype {pool.dtype}: "
                       "expected 1-D integer indices")
    pool = pool.astype(np.int64)
    if pool.size < 2:
        raise CRLError(f"pool of {pool.size} samples: expected at least 2 to split in half")
    if pool.min() < 0 or pool.max() >= labels.size:
        raise CRLError(f"pool indices range {pool.min()}..{pool.max()}: "
                       f"expected 0..{labels.size - 1}")
    pool = np.sort(pool)
    if np.any(pool[1:] == pool[:-1]):
        raise CRLError("pool holds duplicate indices; expected each index once")
    rng = np.random.default_rng(seed)
    return stratified_take(pool, labels, pool.size // 2, rng)


def random_halves(num_samples: int, num_models: int, seed: int) -> np.ndarray:
    """Bool [num_models, num_samples] membership mask; each sample is IN for exactly
    floor(num_models / 2) models (argsort of uniform noise along the model axis)."""
    seed = _check_seed(seed)
    if not _is_int(num_models) or num_models < 2:
        raise CRLError(f"num_models={num_models!r}: expected an integer >= 2")
    if not _is_int(num_samples) or num_samples < 1:
        raise CRLError(f"num_samples={num_samples!r}: expected an integer >= 1")
    rng = np.random.default_rng(seed)
    noise = rng.random((int(num_models), int(num_samples)))
    return noise.argsort(axis=0) < num_models // 2


def own_split(data: ImageData) -> tuple[np.ndarray, np.ndarray, str]:
    """(train indices, test indices, how they were chosen) of the dataset's own split.

    Where the loader recorded a boundary (ImageData.train_size: torchvision's train/test files,
    imagefolder's train/ and test/ folders) the first train_size samples are the train split.
    digits (like any source without a split of its own) gets a fixed stratified split holding
    out 20% of every class, drawn from the named stream seed_for(0, "digits-test-split"): the
    same split on every run and machine."""
    n, size = len(data), data.train_size
    if size is not None:
        if not 0 < size < n:
            raise CRLError(f"{data.name}.train_size = {size}: expected a train/test boundary "
                           f"strictly between 0 and {n} samples")
        how = f"the dataset's own split: the first {size} samples train, the other {n - size} test"
        return np.arange(size, dtype=np.int64), np.arange(size, n, dtype=np.int64), how
    if n < MIN_SPLIT_SIZE:
        raise CRLError(f"dataset {data.name} of {n} samples: expected at least "
                       f"{MIN_SPLIT_SIZE} to split")
    labels = _as_labels(data.y.numpy())
    test, train = stratified_take(np.arange(n, dtype=np.int64), labels,
                                   round(n * OWN_TEST_FRACTION), numpy_rng(0, OWN_SPLIT_STREAM))
    how = (f"no split of its own: a fixed stratified {100 * OWN_TEST_FRACTION:.0f}% test split "
           f"from the stream seed_for(0, {OWN_SPLIT_STREAM!r})")
    return train, test, how
