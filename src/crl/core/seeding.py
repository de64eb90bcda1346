"""Named random streams: every seed is derived from the run seed by a path of names.

    seed_for(run_seed, "reference", 3)          the 4th reference model's seed
    seed_for(model_seed, "shuffle")            that model's batch order

Derivation uses numpy's SeedSequence with a spawn key made from the names, so streams never
collide and adding a model (or a stream) never shifts another's seed.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from crl.core.errors import CRLError


def _key(part: str | int) -> int:
    return int.from_bytes(hashlib.sha256(repr(part).encode()).digest()[:4], "little")


def seed_for(seed: int, *path: str | int) -> int:
    """A 63-bit seed for the stream named `path` under `seed`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CRLError(f"seed = {seed!r}: expected an integer >= 0")
    if not path:
        return int(seed)
    seq = np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(_key(p) for p in path))
    return int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, *path: str | int) -> torch.Generator:
    """A CPU torch.Generator on the stream `path` under `seed`."""
    return torch.Generator().manual_seed(seed_for(seed, *path))


def numpy_rng(seed: int, *path: str | int) -> np.random.Generator:
    """A numpy Generator on the stream `path` under `seed`."""
    return np.random.default_rng(seed_for(seed, *path))
