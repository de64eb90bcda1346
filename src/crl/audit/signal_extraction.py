"""Stage 3, signals: what the attacks declared they need, asked of the trained models through
their query interface (`TrainedModel.queries`, crl.models.query.SampleQueries, set by the
model source).

    logits of the target and reference models on the target pool   (always; with --canaries,
                                                                    the canaries join the pool)
    flipped-input logits                                            ("flip")
    logits of the same models on the population (the shadow pool)   ("population")
    shadow models' logits on the shadow pool                        ("shadows")
    per-sample input-gradient norms, computed on first use          ("input_gradients")
    query access to the pool models on the pool's images            ("oracle")

Membership matrices are what each model actually trained on (`TrainedModel.trained_on`). A
sample a model was handed but a defense held out of its training (`held_out_matrix`: a
validation or reference split, DMP's teacher half) is neither member nor non-member of that
model (Signals.held_out), as for the target's own evaluation.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from crl.attacks.base import AttackContext
from crl.attacks.signals import Signals
from crl.audit.factory import TrainedModel
from crl.core.errors import CRLError
from crl.data.splits import PoolSplit
from crl.models.query import QueryAccess


def held_out_matrix(handed: list[np.ndarray], models: list[TrainedModel],
                    idx: np.ndarray) -> np.ndarray:
    """[M, N] bool: samples idx that model k was handed (`handed[k]`, its planned training
    indices) but did not train on."""
    return np.stack([np.isin(idx, h) & ~np.isin(idx, m.trained_on)
                     for h, m in zip(handed, models)])


def model_signals(models: list[TrainedModel], labels: np.ndarray, idx: np.ndarray, *,
                  flip: bool = False, member: np.ndarray | None = None,
                  held_out: np.ndarray | None = None) -> Signals:
    """Logits [M, N, C] of `models` on samples idx (asked through each model's `queries`),
    membership [M, N] (default: trained_on) and the held-out mask [M, N] (default: none)."""
    if member is None:
        member = np.stack([np.isin(idx, m.trained_on) for m in models])
    return Signals(logits=np.stack([m.queries.logits(idx) for m in models]), member=member,
                   labels=labels[idx], sample_idx=idx,
                   logits_flip=(np.stack([m.queries.logits(idx, flip=True) for m in models])
                                if flip else None),
                   held_out=held_out)


def target_pool_of(split: PoolSplit, canaries: np.ndarray | None = None) -> np.ndarray:
    """The samples attacks score: the split's target pool and the canaries, sorted."""
    if canaries is None:
        return split.target_pool
    return np.union1d(split.target_pool, np.asarray(canaries, np.int64))


def memo(fn: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    cache: dict[int, np.ndarray] = {}

    def wrapped(k: int) -> np.ndarray:
        if k not in cache:
            cache[k] = fn(k)
        return cache[k]

    return wrapped


def extract_signals(pool_models: list[TrainedModel], shadow_models: list[TrainedModel],
                    data: Any, split: PoolSplit, requirements: frozenset[str],
                    run_seed: int, *, canaries: np.ndarray | None = None,
                    handed: list[np.ndarray] | None = None, progress: bool = True,
                    access: Callable[..., QueryAccess] | None = None) -> AttackContext:
    """The AttackContext for one target: model 0 of `pool_models` is the target; `canaries`
    (dataset indices) are scored with the target pool (`target_pool_of`); handed[k]: the
    training indices planned for pool model k (what it did not train on of them is held out).
    Models are asked only through their `queries`; `access` (the model source's
    query_access) gives label-only attacks their oracles (requirement "oracle")."""
    flip, labels = "flip" in requirements, data.y.cpu().numpy()
    pool = target_pool_of(split, canaries)
    held = None if handed is None else held_out_matrix(handed, pool_models, pool)
    target = model_signals(pool_models, labels, pool, flip=flip, held_out=held)
    population = None
    if "population" in requirements:
        population = model_signals(pool_models, labels, split.shadow_pool, flip=flip,
                                   member=np.zeros((len(pool_models), len(split.shadow_pool)),
                                                   bool))
    shadow = (model_signals(shadow_models, labels, split.shadow_pool, flip=flip)
              if shadow_models else None)
    grads = shadow_grads = None
    if "input_gradients" in requirements:
        grads = memo(lambda k: pool_models[k].queries.gradient_norms(pool))
        if shadow_models:
            shadow_grads = memo(lambda k: shadow_models[k].queries.gradient_norms(
                split.shadow_pool))
    queries = None
    if "oracle" in requirements:
        if access is None:
            raise CRLError("attacks that query models on inputs they build (requirement "
                           "'oracle') need query access: expected a model source that gives it")
        queries = access(pool_models, pool, shadow_models, split.shadow_pool, progress=progress)
    return AttackContext(target=target, num_classes=data.num_classes, seed=run_seed,
                         shadow=shadow, population=population, gradient_scores=grads,
                         shadow_gradient_scores=shadow_grads, queries=queries)
