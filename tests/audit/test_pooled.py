"""Pooled numbers come only from the models they name (issue 18, defects 1, 2, 3 and 6):
reference pools of the target's own defense, held-out samples neither IN nor OUT, reference
counts checked against what each model trains on before training, and clustered intervals."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

import crl.defenses  # noqa: F401  (registers every defense)
from crl.attacks.lira import lira_scores
from crl.attacks.rmia import rmia_scores
from crl.attacks.scores import log_prob_true, logit_confidence
from crl.attacks.signals import Signals
from crl.audit.canary_metrics import exposure_thresholds, pooled_metrics, pooled_view
from crl.audit.outcome import AttackOutcome, load_outcome
from crl.cli import main
from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng
from crl.data.splits import stratified_take
from crl.defenses.base import build_defense
from crl.engine.fit import fit
from crl.tune.evaluate import attack_values, check_resolvable

TINY = ["--epochs", "3", "--subset", "200", "--seeds", "0", "--quiet", "--shadows", "0",
        "--bootstrap", "50"]


def _audit(tmp_path, capsys, *args):
    out = tmp_path / "run"
    code = main(["audit", *TINY, *args, "--out", str(out)])
    return code, out, capsys.readouterr()


# -- defect 1: --shadow-defense none never pools CE models under the defense's name ----------

def test_shadow_defense_none_pools_no_ce_model_under_the_defenses_name(tmp_path, capsys):
    code, out, cap = _audit(tmp_path, capsys, "--defenses", "relaxloss", "--attacks", "lira",
                            "--references", "6", "--shadow-defense", "none", "--canaries", "20")
    assert code == 0, cap.err
    row = json.loads((out / "results.json").read_text())[0]
    lira = row["attacks"]["lira"]
    assert "leave_one_out" in lira and lira["leave_one_out"] is None
    assert "shadow-defense none" in lira["loo_skipped"]
    canary = row["canaries"]["attacks"]["lira"]
    assert canary["pooled"] is False and canary["models"] == 1      # the target alone
    o = load_outcome(out / "scores" / "relaxloss_seed0.npz")
    assert o.attacks["lira"].pooled is None and np.nanmax(o.exposure.n_in) == 1
    report = (out / "report.md").read_text()
    assert re.search(r"relaxloss seed 0, lira: skipped: .*shadow-defense none", report)


def test_tune_refuses_a_pooled_objective_with_ce_reference_models():
    split = SimpleNamespace(target_nonmembers=np.arange(100), target_pool=np.arange(2000))
    audit = SimpleNamespace(cfg=SimpleNamespace(shadow_defense="none", references=64),
                            requirements=frozenset({"references"}))
    with pytest.raises(CRLError, match="shadow-defense none"):
        check_resolvable(audit, split, "tpr@0.1", "tpr_at_0.1pct_fpr")
    audit.cfg.shadow_defense = "same"
    check_resolvable(audit, split, "tpr@0.1", "tpr_at_0.1pct_fpr")      # 2000 distinct samples


# -- defect 2: samples a model held out are neither IN nor OUT for it --------------------------

def _signals(rng, models=9, samples=6, held_rows=(1, 2, 3)):
    logits = rng.normal(size=(models, samples, 3))
    labels = rng.integers(0, 3, samples)
    member = np.zeros((models, samples), bool)
    member[0::2] = True                                   # models 0, 2, 4, ... trained on all
    held = np.zeros_like(member)
    for k in held_rows:                                   # handed but held out
        member[k], held[k] = False, True
    return Signals(logits, member, labels, np.arange(samples), held_out=held), labels


def test_lira_fits_leave_a_reference_models_held_out_samples_out():
    sig, labels = _signals(np.random.default_rng(0))
    phi = logit_confidence(sig.logits, labels)
    refs = np.arange(1, sig.num_models)
    out = refs[(~sig.member[refs, 0]) & (~sig.held_out[refs, 0])]  # OUT: 5, 7
    inn = refs[sig.member[refs, 0]]
    assert out.tolist() == [5, 7]
    mu_o, var_o = phi[out, 0].mean(), phi[out, 0].var(ddof=1)
    mu_i, var_i = phi[inn, 0].mean(), phi[inn, 0].var(ddof=1)

    def logpdf(x, mu, var):
        return -0.5 * (np.log(2 * np.pi * var) + (x - mu) ** 2 / var)

    expected = logpdf(phi[0, 0], mu_i, var_i) - logpdf(phi[0, 0], mu_o, var_o)
    assert lira_scores(sig, 0)[0] == pytest.approx(expected, rel=1e-12)


def test_rmia_never_takes_a_held_out_model_as_an_out_reference():
    sig, labels = _signals(np.random.default_rng(1))
    pop = Signals(np.random.default_rng(2).normal(size=(9, 5, 3)), np.zeros((9, 5), bool),
                  np.zeros(5, int), np.arange(10, 15))
    logp = log_prob_true(sig.logits, labels)
    logp_pop = log_prob_true(pop.logits, pop.labels)
    # offline, 2 references, a = 1: p(x) = mean over the first 2 OUT models after the target
    score = rmia_scores(sig, pop, 0, num_refs=2, a=1.0, gamma=1.0, temperature=1.0, trim=0.0)
    px = np.log(np.exp(logp[[5, 7]]).mean(0))
    pz = np.log(np.exp(logp_pop[[1, 2]]).mean(0))          # population: OUT for every model
    lr_x, lr_z = logp[0] - px, logp_pop[0] - pz
    assert score == pytest.approx((lr_x[:, None] > lr_z[None]).mean(1))


def test_pooled_pairs_and_exposure_leave_held_out_pairs_out():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 99.0, 0.2]])
    member = np.array([[True, False, False], [True, False, False]])
    held = np.array([[False, False, False], [False, True, False]])
    attack = AttackOutcome("x", scores[0], {}, pooled=scores)
    s, m = pooled_view(attack, member, held)
    assert np.isnan(s[1, 1]) and not np.isnan(s).sum() - 1
    assert exposure_thresholds(s, m, 0.5)[1] == 0.2          # 99 (held out) is no non-member
    got = pooled_metrics([(s, m, np.arange(3))], n_boot=10, seed=0)
    assert got["auc"] == 1.0 and got["nonmember_samples"] == 2


def test_held_out_samples_reach_the_signals_of_every_pool_model(tmp_path, capsys):
    code, out, cap = _audit(tmp_path, capsys, "--defenses", "advreg", "--attacks", "lira",
                            "--references", "16")
    assert code == 0, cap.err
    o = load_outcome(out / "scores" / "advreg_seed0.npz")
    held = o.model_held_out
    assert held.shape == o.model_member.shape and not (held & o.model_member).any()
    n_ref = held[1:].sum(1)
    assert (n_ref == 10).all()                                # 0.2 of the 50 a reference gets
    ev = o.evaluation
    assert (held[0] == (~ev.members & ~ev.nonmembers)).all()  # the target's "neither"


# -- defect 3: what every model trains on is known, and checked, before training -------------

@pytest.mark.parametrize("name, params, part", [
    ("early_stopping", {}, 1), ("advreg", {}, 1), ("dmp", {}, 0)])
def test_held_out_is_the_draw_prepare_makes(digits, name, params, part):
    from crl.models.zoo import create_model
    from crl.training.recipe import Recipe

    idx = np.arange(0, 120)
    labels = digits.y.numpy()
    defense = build_defense(name, params)
    fraction = defense.params.get("val_fraction", defense.params.get("ref_fraction"))
    k = round(fraction * len(idx))
    draw = stratified_take(idx, labels, k, numpy_rng(11, name, "split"))
    expected_held = draw[0] if part else draw[1]          # DMP: the teacher keeps the rest
    assert np.array_equal(defense.held_out(idx, labels, 11), expected_held)
    result = fit(create_model("mlp", 1, 8, 10), digits, idx,
                 Recipe(epochs=1, seed=11, device="cpu"), defense)
    trained = np.setdiff1d(idx, expected_held)
    assert np.array_equal(np.sort(result.train_idx), trained)


@pytest.mark.parametrize("name", ["ce", "crl", "relaxloss", "label_smoothing"])
def test_defenses_that_hold_nothing_out_plan_their_whole_set(digits, name):
    assert build_defense(name).held_out(np.arange(50), digits.y.numpy(), 3).size == 0


def test_too_few_references_stop_before_training_naming_how_many(tmp_path, capsys):
    args = ["--defenses", "early_stopping", "--attacks", "loss,lira", "--references"]
    code, out, cap = _audit(tmp_path, capsys, *args, "6")
    assert code == 2 and cap.err.count("\n") == 1 and not out.exists()
    assert "references = 6" in cap.err and "training" not in cap.out
    need = int(re.search(r"needs (\d+) reference models so", cap.err).group(1))
    assert need > 6
    code, out, cap = _audit(tmp_path / "a", capsys, *args, str(need))
    if code == 2:      # a defense that holds data out: leave-one-out rows stop it too
        assert "for its leave-one-out row" in cap.err and not out.exists()
        need = int(re.search(r"needs (\d+) reference models for its leave-one-out row",
                             cap.err).group(1))
        code, out, cap = _audit(tmp_path / "b", capsys, *args, str(need))
    assert code == 0 and "warning" not in cap.err, cap.err
    lira = json.loads((out / "results.json").read_text())[0]["attacks"]["lira"]
    assert lira["leave_one_out"]["auc"] is not None and "loo_skipped" not in lira


def test_dmp_reference_counts_are_checked_against_what_the_student_trains_on(tmp_path, capsys):
    from crl.audit.pipeline import prepare
    from crl.config import AuditConfig

    def check(refs):
        cfg = AuditConfig(dataset="digits", defenses=["dmp"], attacks=["lira"], seeds=[0],
                          references=refs, shadows=0, out=str(tmp_path))
        prepare(cfg)

    with pytest.raises(CRLError, match=r"references = 16: attack 'lira' on 'dmp' .*needs \d+"):
        check(16)
    with pytest.raises(CRLError, match=r"references = 32: .*needs \d+ reference models for "
                                       r"its leave-one-out row"):
        for seed in (0, 1, 2):      # a seed's leave-one-out row falls short: stop, never skip
            cfg = AuditConfig(dataset="digits", defenses=["dmp"], attacks=["lira"],
                              seeds=[seed], references=32, shadows=0, out=str(tmp_path))
            prepare(cfg)
    check(64)                                             # the default: every row completes
    assert "warning" not in capsys.readouterr().err


def test_a_dropped_attack_is_named_in_the_trial_record():
    def outcome(loo, skipped=None):
        extra = {} if skipped is None else {"loo_skipped": skipped}
        return SimpleNamespace(seed=0, attacks={
            "lira": SimpleNamespace(metrics={"tpr_at_0.1pct_fpr": None}, extra=extra,
                                    leave_one_out=loo),
            "rmia": SimpleNamespace(metrics={"tpr_at_0.1pct_fpr": None}, extra={},
                                    leave_one_out={"tpr_at_0.1pct_fpr": 0.01})})

    dropped = {}
    values, _ = attack_values([outcome(None, "sample 3 has 1 IN")], "tpr_at_0.1pct_fpr",
                              dropped)
    assert values == {"rmia": 0.01} and "sample 3 has 1 IN" in dropped["lira"]


# -- defect 6: pooled rows: intervals clustered by sample, FPRs by distinct samples ----------

def test_a_pooled_row_resolves_fprs_only_down_to_its_distinct_nonmember_samples():
    rng = np.random.default_rng(0)
    member = rng.random((10, 300)) < 0.5                   # ~1500 non-member pairs
    scores = rng.normal(size=member.shape) + member
    got = pooled_metrics([(scores, member, np.arange(300))], n_boot=50, seed=0)
    n = int((~member).any(0).sum())
    assert got["nonmember_samples"] == n and got["min_resolvable_fpr"] == pytest.approx(1 / n)
    assert got["tpr_at_0.1pct_fpr"] is None and got["tpr_at_0.1pct_fpr_ci"] is None
    lo, hi = got["auc_ci"]
    assert lo < got["auc"] < hi and got["tpr_at_1pct_fpr"] is not None


def test_the_leave_one_out_row_carries_a_clustered_interval_into_the_report(tmp_path, capsys):
    code, out, cap = _audit(tmp_path, capsys, "--defenses", "ce", "--attacks", "lira",
                            "--references", "6")
    assert code == 0, cap.err
    loo = json.loads((out / "results.json").read_text())[0]["attacks"]["lira"]["leave_one_out"]
    assert loo["nonmember_samples"] == 100 and loo["tpr_at_0.1pct_fpr"] is None
    assert len(loo["auc_ci"]) == 2 and loo["auc_ci"][0] <= loo["auc"] <= loo["auc_ci"][1]
    report = (out / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("| ce | 0 |"))
    assert f"{loo['auc']:.3f} [{loo['auc_ci'][0]:.3f}, {loo['auc_ci'][1]:.3f}]" in line


def test_tunes_pooled_objective_gets_an_interval_clustered_by_sample():
    from crl.audit.outcome import Evaluation
    from crl.tune.evaluate import POOLED, Point, objective_interval

    def outcome(seed):
        rng = np.random.default_rng(seed)
        member = rng.random((8, 400)) < 0.5
        pooled = rng.normal(size=member.shape) + 2 * member
        ev = Evaluation(np.arange(400), member[0], ~member[0])
        return SimpleNamespace(seed=seed, evaluation=ev, model_member=member,
                               model_held_out=None,
                               attacks={"lira": AttackOutcome("lira", pooled[0], {},
                                                              pooled=pooled)})

    outcomes = [outcome(0), outcome(1)]
    point = Point("crl", {}, [0, 1], 1.0, 0.9, [0.9, 0.9], {"lira": 0.5}, POOLED)
    lo, hi = objective_interval(point, outcomes, "tpr_at_1pct_fpr", n_boot=100, seed=0)
    values = [pooled_metrics([(o.attacks["lira"].pooled, o.model_member, np.arange(400))],
                             n_boot=10, seed=0)["tpr_at_1pct_fpr"] for o in outcomes]
    assert lo < np.mean(values) < hi and hi - lo > 0.01
