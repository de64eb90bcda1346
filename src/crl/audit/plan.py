"""Stage 1, the plan: which models an audit of one (defense, seed) needs, each with its seed
(derived by name from the run seed), training indices and defense.

    target           trains on the split's target members
    reference j      LiRA/RMIA: models 2k and 2k+1 train on complementary random halves of the
                     target pool, so every pool sample is IN for exactly half of each pair and
                     adding a model never changes another's data or seed
    shadow i         the NN attack (and shadow-fitted thresholds): a stratified half of the
                     shadow pool
    canaries         (--canaries) each canary joins a random half of the target's training set
                     (stream 'canary-target') and of every reference pair's (stream
                     'canary-pair'), like a pool sample; never a shadow model's
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crl.core.seeding import numpy_rng, seed_for
from crl.data.splits import PoolSplit, half_split


@dataclass(frozen=True)
class DefenseChoice:
    """A defense by name with its (user-set) parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelJob:
    role: str                 # "target" | "reference" | "shadow"
    index: int                # 0 for the target; j for reference j; i for shadow i
    seed: int                 # the model's own seed (init, shuffle, ... derive from it)
    defense: DefenseChoice
    train_idx: np.ndarray     # dataset indices handed to fit (a defense may hold some out)

    @property
    def label(self) -> str:
        return self.role if self.role == "target" else f"{self.role} {self.index}"


def reference_halves(pool_size: int, count: int, seed: int,
                     stream: str = "reference-pair") -> np.ndarray:
    """Bool [count, pool_size]: pair k = (2k, 2k+1) splits the pool into complementary random
    halves drawn from the stream (`stream`, k)."""
    rows = []
    for j in range(count):
        if j % 2 == 0:
            order = numpy_rng(seed, stream, j // 2).permutation(pool_size)
            half = np.zeros(pool_size, bool)
            half[order[: pool_size // 2]] = True
            rows.append(half)
        else:
            rows.append(~rows[-1])
    return np.stack(rows) if rows else np.zeros((0, pool_size), bool)


def canary_halves(n: int, references: int, seed: int) -> np.ndarray:
    """Bool [1 + references, n]: which canaries the target (row 0: each independently with
    probability 1/2, stream 'canary-target', the setting of the one-run epsilon bound,
    crl.audit.epsilon) and each reference model (complementary pairs) train on."""
    target = numpy_rng(seed, "canary-target").random(n) < 0.5
    return np.vstack([target[None], reference_halves(n, references, seed, "canary-pair")])


def plan_models(split: PoolSplit, labels: np.ndarray, seed: int, defense: DefenseChoice,
                attacker: DefenseChoice, *, references: int, shadows: int,
                canaries: np.ndarray | None = None) -> list[ModelJob]:
    """The target, `references` reference models and `shadows` shadow models of one seed;
    `canaries` (dataset indices) join the target's and the references' training sets."""
    canaries = np.zeros(0, np.int64) if canaries is None else np.asarray(canaries, np.int64)
    joins = canary_halves(len(canaries), references, seed)
    jobs = [ModelJob("target", 0, seed_for(seed, "target"), defense,
                     np.concatenate([split.target_members, canaries[joins[0]]]))]
    pool = split.target_pool
    for j, half in enumerate(reference_halves(len(pool), references, seed)):
        jobs.append(ModelJob("reference", j, seed_for(seed, "reference", j), attacker,
                             np.concatenate([pool[half], canaries[joins[1 + j]]])))
    for i in range(1, shadows + 1):
        members, _ = half_split(split.shadow_pool, labels, seed=seed_for(seed, "shadow", i, "half"))
        jobs.append(ModelJob("shadow", i, seed_for(seed, "shadow", i), attacker, members))
    return jobs


def planned_membership(jobs: list[ModelJob], pool: np.ndarray,
                       held_out: Callable[[ModelJob], np.ndarray]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(IN, held out), bool [len(jobs), len(pool)]: which pool samples each job's model will
    train on, and which it is handed but holds out (`held_out(job)`: dataset indices, e.g. the
    model source's Defense.held_out, the same draw its `prepare` makes), known before any
    model trains."""
    rows_in, rows_held = [], []
    for job in jobs:
        handed = np.sort(np.asarray(job.train_idx, np.int64))
        held = held_out(job)
        rows_in.append(np.isin(pool, handed) & ~np.isin(pool, held))
        rows_held.append(np.isin(pool, held))
    return np.array(rows_in, bool).reshape(len(jobs), -1), \
        np.array(rows_held, bool).reshape(len(jobs), -1)


def models_needed(member: np.ndarray, held: np.ndarray, need_in: int, need_out: int,
                  start: int, *, every_model: bool = True) -> int | None:
    """The fewest pool models (target first, then references in plan order; at least `start`)
    such that, for every model in turn left out (every_model; else the target alone), every
    sample has >= need_in IN and >= need_out OUT (neither trained on nor held out) among the
    others; None if all of them are too few."""
    out = ~member & ~held
    n = member.shape[1]
    tot_in, tot_out = np.zeros(n, int), np.zeros(n, int)
    own_in, own_out = member[0].astype(int), out[0].astype(int)   # the left-out model's share
    for k in range(member.shape[0]):
        tot_in += member[k]
        tot_out += out[k]
        if every_model:
            own_in, own_out = np.maximum(own_in, member[k]), np.maximum(own_out, out[k])
        if k + 1 >= start and (tot_in - own_in >= need_in).all() \
                and (tot_out - own_out >= need_out).all():
            return k + 1
    return None
