"""Attacks on logits the caller already has: `attack_signals` runs the audit's attacks that need
nothing but logits (loss, confidence, entropy, mentr, lira, lira_offline, rmia with population
logits) through the audit's own runner, so its metrics match `crl audit`'s for the same logits.

    logits[models, samples, classes]   model 0 is the target, models 1.. its reference models
    labels[samples]                    class ids
    member[models, samples]            which samples each model trained on (member[0]: truth)
    population_logits[models, Z, C]   (RMIA) the same models on Z samples none trained on
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

import crl.attacks  # noqa: F401  (registers attacks)
from crl.attacks.base import Attack, AttackContext, build_attack
from crl.attacks.signals import Signals
from crl.audit.attacking import run_attacks
from crl.audit.outcome import Evaluation
from crl.core.errors import CRLError
from crl.core.params import DEFAULT_BOOTSTRAP

#: What the caller of attack_signals can supply: reference models (the models axis) and
#: population logits; the rest (flip, shadows, input_gradients) needs the models themselves.
FROM_LOGITS = frozenset({"references", "population"})
_NEEDS_MODELS = {"flip": "logits on flipped inputs", "shadows": "shadow models",
                 "input_gradients": "the models' input gradients",
                 "oracle": "query access to the model (crl audit gives it)"}


def as_array(value: Any, what: str) -> np.ndarray:
    """A numpy array of a numpy array, torch tensor or nested list (CPU, detached)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError):
        raise CRLError(f"attack_signals.{what} = {type(value).__name__}: expected a numpy "
                       "array or torch tensor") from None


def _shape(a: np.ndarray) -> str:
    return f"{a.dtype} array of shape {list(a.shape)}"


def check_logit_array(value: Any, what: str, models: int | None = None,
                      classes: int | None = None) -> np.ndarray:
    """float64 logits [models, samples, classes] with finite values, else a one-line CRLError."""
    z = as_array(value, what)
    m = "models" if models is None else str(models)
    c = "classes>=2" if classes is None else str(classes)
    ok = (z.ndim == 3 and np.issubdtype(z.dtype, np.floating) and z.shape[2] >= 2
          and z.shape[1] >= 1 and (models is None or z.shape[0] == models)
          and (classes is None or z.shape[2] == classes))
    if not ok:
        raise CRLError(f"attack_signals.{what} = {_shape(z)}: expected float logits "
                       f"[{m}, samples, {c}]")
    if not np.isfinite(z).all():
        raise CRLError(f"attack_signals.{what} holds {int((~np.isfinite(z)).sum())} NaN or "
                       "infinite values: expected finite logits")
    return z.astype(np.float64)


def check_labels(value: Any, what: str, n: int, classes: int) -> np.ndarray:
    """int64 class ids [n] in [0, classes), else a one-line CRLError."""
    y = as_array(value, what)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) \
            or (n and (y.min() < 0 or y.max() >= classes)):
        raise CRLError(f"attack_signals.{what} = {_shape(y)}: expected {n} integer class ids "
                       f"in [0, {classes})")
    return y.astype(np.int64)


def check_member(value: Any, shape: tuple[int, int]) -> np.ndarray:
    """Bool membership [models, samples] (bool or 0/1 integers); model 0 needs both kinds."""
    a = as_array(value, "member")
    binary = a.dtype == bool or (np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all())
    if a.shape != shape or not binary:
        raise CRLError(f"attack_signals.member = {_shape(a)}: expected booleans (or 0/1) of "
                       f"shape {list(shape)}, [models, samples] like logits")
    member = a.astype(bool)
    if member[0].all() or not member[0].any():
        raise CRLError(f"attack_signals.member[0] has {int(member[0].sum())} members of "
                       f"{shape[1]} samples: expected both members and non-members of the target")
    return member


def build_attacks(names: Sequence[str], params: Mapping[str, Any], owner: str
                  ) -> dict[str, Attack]:
    """The named attacks with their parameters ({attack: {param: value}}); a CRLError for
    parameters of an attack that was not chosen."""
    if not isinstance(params, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in params.items()):
        raise CRLError(f"{owner}.params = {params!r}: expected a mapping of attack names to "
                       "{PARAM: VALUE}")
    extra = sorted(set(params) - set(names))
    if extra:
        raise CRLError(f"{owner}.params = {{{extra[0]!r}: ...}}: expected parameters of the "
                       f"chosen attacks ({', '.join(names)})")
    return {n: build_attack(n, dict(params.get(n, {}))) for n in names}


def logit_attacks(names: str | Sequence[str], params: Mapping[str, Any] | None,
                  num_models: int, has_population: bool) -> dict[str, Attack]:
    """The named attacks, each checked to be computable from these logits."""
    names = [names] if isinstance(names, str) else list(names)
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise CRLError(f"attack_signals.attack = {names!r}: expected an attack name or a "
                       "non-empty list of distinct names")
    attacks = build_attacks(names, {} if params is None else params, "attack_signals")
    for name, attack in attacks.items():
        missing = sorted(attack.requirements() - FROM_LOGITS)
        if missing:
            raise CRLError(f"attack_signals.attack = {name!r}: needs {_NEEDS_MODELS[missing[0]]}"
                           f", not computable from logits; expected one of loss, confidence, "
                           "entropy, mentr, lira, lira_offline, rmia (crl.audit_training runs "
                           "the others)")
        if "population" in attack.requirements() and not has_population:
            raise CRLError(f"attack_signals.population_logits = None: attack '{name}' needs "
                           "population logits [models, population samples, classes]")
        need = max(2, attack.min_references) if "references" in attack.requirements() else 0
        if num_models - 1 < need:
            raise CRLError(f"attack_signals.logits = {num_models} models: expected the target "
                           f"plus at least {need} reference models for attack '{name}'")
    return attacks


def attack_signals(logits: Any, labels: Any, member: Any, *,
                   attack: str | Sequence[str] = "lira", population_logits: Any = None,
                   population_labels: Any = None, params: Mapping[str, Any] | None = None,
                   n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{attack: metrics} of model 0 (AUC, TPR at low FPR, 95% bootstrap intervals, the
    leave-one-out metrics over every model where the attack provides them): the rows of
    `crl audit`'s results.json. `params` maps an attack to its parameters; `seed` is the run
    seed the bootstrap streams derive from (crl.core.seeding)."""
    z = check_logit_array(logits, "logits")
    m, n, c = z.shape
    target = Signals(z, check_member(member, (m, n)), check_labels(labels, "labels", n, c),
                     np.arange(n))
    population = None
    if population_logits is not None:
        pz = check_logit_array(population_logits, "population_logits", m, c)
        if population_labels is None:
            raise CRLError("attack_signals.population_labels = None: expected the population "
                           "samples' class ids alongside population_logits")
        population = Signals(pz, np.zeros(pz.shape[:2], bool),
                             check_labels(population_labels, "population_labels", pz.shape[1], c),
                             np.arange(pz.shape[1]))
    attacks = logit_attacks(attack, params, m, population is not None)
    ctx = AttackContext(target=target, num_classes=c, seed=seed, population=population)
    ev = Evaluation(np.arange(n), target.member[0].copy(), ~target.member[0])
    return {name: o.row() for name, o in run_attacks(attacks, ctx, ev, n_boot=n_boot).items()}
