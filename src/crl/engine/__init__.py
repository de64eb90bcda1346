"""Engines: how a group of models of one architecture, dataset, recipe and defense is trained.

    sequential   one `fit` after another (checkpoints, bitwise resume within a model)
    ensemble     K models at once with stacked parameters (crl.engine.ensemble)
    ray          chunks of models as Ray tasks, on one machine or a cluster (crl.engine.ray_engine)
    auto         per model and device, from the measured table in docs/performance.md

Every engine trains a request from the same inputs (own seed, indices, shuffle order, defense
state), but not with the same arithmetic: the ensemble's batched products round differently from
one model's, and training grows those differences (for the relaxed objectives, whose branch
decisions compare a batch loss with alpha, into other models). What holds (docs/performance.md,
tests/test_engine.py): bitwise within one arithmetic; across arithmetics the same distribution
of models (the mean attack AUC agrees within its standard error), not the same model. So each
output's report names its arithmetic ("arithmetic": "sequential/cpu", "baddbmm/cpu",
"vmap/cuda", ...: `arithmetic_label`), each engine plans in advance which one each request of
a group gets (`Engine.plan`, over every request of the group, cached or not) and honours a
request's planned `arithmetic` when it trains it, and the audit's `ModelFactory` makes it part
of the cache key: a model is served only to a run that would have trained it the same way,
whichever of the group's other models the cache already held.
"""
from __future__ import annotations

from typing import Any

from crl.engine.protocol import ENGINES, Engine, OnDone, TrainOutput, TrainRequest, arithmetic_label

__all__ = ["ENGINES", "Engine", "OnDone", "TrainOutput", "TrainRequest", "arithmetic_label",
           "get_engine"]


def get_engine(name: str, **options: Any) -> Engine:
    """A registered engine by name."""
    import crl.engine.ensemble  # registers 'ensemble' and 'auto'
    import crl.engine.ray_engine  # registers 'ray' (imports ray only when used)
    import crl.engine.sequential  # noqa: F401  (registers the built-in engines)

    return ENGINES.get(name)(**options)
