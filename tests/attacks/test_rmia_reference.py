"""crl's RMIA against the RMIA authors' own code, on identical logits.

tests/attacks/data/rmia_reference.npz holds seeded logits (1 target + 8 reference models in
complementary pairs, 50 pool samples, 20 population samples) and the scores that the authors'
code gave for target model 0, computed once by benchmarks/rmia_reference.py (see its docstring
for the commits):
  research_*: `aggregate_signals` of the paper's code (research/2024_rmia), signal "softmax
              relative" at temperature 2, trimmed mean 0.2, no augmentation; their
              num_ref_models counts IN + OUT models, so offline it is 2 x crl's num_refs.
  meter_*:    `run_rmia` of the maintained ml_privacy_meter tool (gamma 1, plain mean,
              temperature 1, OUT references only).
The scores are equal, not just equally ranked: both count population samples z with
LR(x) / LR(z) > gamma, crl in log space.
"""
from pathlib import Path

import numpy as np
import pytest

from crl.attacks.base import AttackContext, build_attack
from crl.attacks.metrics import attack_metrics
from crl.attacks.rmia import A_GRID, rmia_scores
from crl.attacks.signals import Signals

DATA = Path(__file__).parent / "data" / "rmia_reference.npz"


@pytest.fixture(scope="module")
def ref():
    d = np.load(DATA)
    n, z = d["labels"].shape[0], d["pop_labels"].shape[0]
    sig = Signals(d["logits"], d["member"], d["labels"], np.arange(n))
    pop = Signals(d["pop_logits"], np.zeros(d["pop_logits"].shape[:2], bool), d["pop_labels"],
                  np.arange(n, n + z))
    return sig, pop, d


PAPER = {"temperature": 2.0, "trim": 0.2}
CASES = [   # (reference key, crl params)
    ("research_offline_k4_g2", {**PAPER, "offline": True, "num_refs": 4, "a": 0.3, "gamma": 2.0}),
    ("research_offline_k2_g2", {**PAPER, "offline": True, "num_refs": 2, "a": 0.3, "gamma": 2.0}),
    ("research_offline_k4_g1", {**PAPER, "offline": True, "num_refs": 4, "a": 0.6, "gamma": 1.0}),
    ("research_online_8_g2", {**PAPER, "offline": False, "num_refs": 8, "gamma": 2.0}),
    ("research_online_8_g1", {**PAPER, "offline": False, "num_refs": 8, "gamma": 1.0}),
    ("meter_offline_k4_a0.3", {"offline": True, "num_refs": 4, "a": 0.3, "gamma": 1.0,
                               "temperature": 1.0, "trim": 0.0}),
    ("meter_offline_k4_a1.0", {"offline": True, "num_refs": 4, "a": 1.0, "gamma": 1.0,
                               "temperature": 1.0, "trim": 0.0}),
]


@pytest.mark.parametrize("key, params", CASES, ids=[c[0] for c in CASES])
def test_scores_equal_the_authors_code(ref, key, params):
    sig, pop, d = ref
    np.testing.assert_allclose(rmia_scores(sig, pop, 0, **params), d[key], atol=1e-12)


def test_defaults_are_the_papers_settings(ref):
    """Defaults: gamma 2, temperature 2, trim 0.2, every reference (4 OUT offline, 8 online)."""
    sig, pop, d = ref
    np.testing.assert_allclose(rmia_scores(sig, pop, 0, a=0.3), d["research_offline_k4_g2"],
                               atol=1e-12)
    np.testing.assert_allclose(rmia_scores(sig, pop, 0, offline=False),
                               d["research_online_8_g2"], atol=1e-12)


def test_auto_a_is_the_best_auc_on_reference_model_1_without_the_target(ref):
    sig, pop, _ = ref
    res = build_attack("rmia").run(AttackContext(target=sig, num_classes=10, population=pop))
    # independent recomputation: model 1 attacked by models 2.. for every a of the grid
    drop = Signals(sig.logits[1:], sig.member[1:], sig.labels, sig.sample_idx)
    pdrop = Signals(pop.logits[1:], pop.member[1:], pop.labels, pop.sample_idx)
    aucs = {a: attack_metrics(rmia_scores(drop, pdrop, 0, a=a), sig.member[1])["auc"]
            for a in A_GRID}
    best = max(aucs.values())
    assert res.extra["a"] == min(a for a in A_GRID if aucs[a] == best)
    assert res.extra["a_auc"] == pytest.approx(aucs)
    np.testing.assert_allclose(res.scores, rmia_scores(sig, pop, 0, a=res.extra["a"]))
    # the audited target (model 0) takes no part in the choice: change it, same a
    lg, member = sig.logits.copy(), sig.member.copy()
    lg[0] = np.random.default_rng(1).normal(0, 3, lg[0].shape)
    member[0] = ~member[0]
    other = build_attack("rmia").run(AttackContext(
        target=Signals(lg, member, sig.labels, sig.sample_idx), num_classes=10, population=pop))
    assert other.extra["a"] == res.extra["a"] and other.extra["a_auc"] == res.extra["a_auc"]


def test_user_a_overrides_and_is_recorded(ref):
    sig, pop, _ = ref
    res = build_attack("rmia", {"a": 0.3}).run(
        AttackContext(target=sig, num_classes=10, population=pop))
    assert res.extra["a"] == 0.3 and res.extra["a_chosen_on"] == "set by the user"
    assert "a_auc" not in res.extra and res.extra["num_refs"] == 4
    online = build_attack("rmia", {"offline": False}).run(
        AttackContext(target=sig, num_classes=10, population=pop))
    assert online.extra["a"] is None and online.extra["num_refs"] == 8


def test_report_names_a_chosen_on_the_references():
    from types import SimpleNamespace as NS

    from crl.report.tables import _rmia_a
    chosen = NS(defense="ce", seed=0, attacks={"rmia": NS(extra={"a": 0.4, "a_auc": {0.4: 0.8}})})
    user = NS(defense="crl", seed=1, attacks={"rmia": NS(extra={"a": 0.3})})
    assert "ce seed 0: 0.4" in _rmia_a([chosen, user]) and "crl" not in _rmia_a([chosen, user])
    assert _rmia_a([user]) == ""
