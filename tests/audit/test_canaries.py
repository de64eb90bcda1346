"""Worst-case privacy with canaries (--canaries): insertion, membership, metrics with a known
answer, exposure, and that mislabeled canaries leak more than the population."""
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from crl.attacks.metrics import clustered_metrics_with_ci
from crl.audit import DefenseChoice, ModelCache, ModelFactory, TrainedModel
from crl.audit.canary_metrics import exposure_thresholds, exposure_values, subset_metrics
from crl.audit.outcome import AttackOutcome, load_outcome
from crl.audit.pipeline import Audit, canaries_for, evaluation_of
from crl.audit.plan import canary_halves
from crl.audit.signal_extraction import extract_signals
from crl.audit.source import image_queries, write_released
from crl.cli import main
from crl.config import AuditConfig
from crl.core.canary_spec import parse_canaries
from crl.core.errors import CRLError
from crl.data.canaries import load_canaries
from crl.models.io import load_model_file
from crl.models.spec import ModelSpec
from crl.training.recipe import Recipe


def _audit(digits, canaries="30", seeds=(0, 1), **kw):
    cfg = AuditConfig(dataset="digits", canaries=canaries, seeds=list(seeds), subset=200,
                      references=4, shadows=2, attacks=["loss", "lira", "nn"], **kw).resolved()
    return Audit(cfg, digits)


def test_mislabeled_canaries_are_relabelled_copies_from_outside_every_pool(digits):
    audit = _audit(digits)
    c = audit.canaries
    assert (c.n, c.kind) == (30, "mislabeled") and audit.data.content_hash != digits.content_hash
    assert len(audit.data) == len(digits) + 30 and c.idx.tolist() == list(range(1797, 1827))
    assert (c.labels != c.source_labels).all()                         # every label is wrong
    assert (c.source_labels == digits.y[c.source].numpy()).all()
    assert (audit.data.y[c.idx].numpy() == c.labels).all()
    assert (audit.data.x[c.idx] == digits.x[c.source]).all()
    for seed in (0, 1):
        split = audit.split(seed)
        used = np.concatenate([split.target_pool, split.shadow_pool])
        assert not np.isin(c.source, used).any() and not np.isin(c.idx, used).any()
        assert split == _audit(digits, canaries=None).split(seed)   # canaries shift no split


def test_each_canary_is_a_member_of_half_the_models_and_never_of_a_shadow(digits):
    audit = _audit(digits)
    split = audit.split(0)
    jobs = audit.plan(DefenseChoice("ce"), 0, split)
    canary = audit.canaries.idx
    member = np.stack([np.isin(canary, j.train_idx) for j in jobs if j.role != "shadow"])
    assert 0 < member[0].sum() < 30              # the target: each canary independently, p 1/2
    assert (member[1:].sum(0) == 2).all()                              # every reference pair: one
    assert all(not np.isin(j.train_idx, canary).any() for j in jobs if j.role == "shadow")
    assert np.isin(split.target_members, jobs[0].train_idx).all()
    halves = canary_halves(31, 6, seed=5)
    assert (halves[1:].sum(0) == 3).all()
    draws = np.stack([canary_halves(31, 0, seed=s)[0] for s in range(200)])
    assert abs(draws.mean() - 0.5) < 0.03 and len(set(draws.sum(1))) > 5   # not a fixed size


def test_canaries_are_excluded_from_accuracy_and_population_metrics(digits):
    """Evaluation masks: canaries are neither members nor non-members; a canary a model did
    not train on (held out by a defense) is a non-member for that model."""
    audit = _audit(digits)
    split = audit.split(0)
    jobs = [j for j in audit.plan(DefenseChoice("ce"), 0, split) if j.role != "shadow"]
    spec = ModelSpec.for_data("mlp", audit.data)
    held_out = audit.canaries.idx[0]
    models = [TrainedModel(spec.build().eval(), spec, np.setdiff1d(j.train_idx, [held_out]))
              for j in jobs]
    for m in models:
        m.queries = image_queries(m.model, audit.data)         # as crl's model source does
    models[0].groups = {"held": audit.canary_idx[:3]}                  # e.g. DMP's teacher half
    ev = evaluation_of(split, models[0], audit.canary_idx)
    assert ev.canary.sum() == 30 and not (ev.canary & ev.evaluated).any()
    assert not ev.groups["held"].any()
    assert not np.isin(audit.canary_idx, split.target_nonmembers).any()  # test accuracy set
    ctx = extract_signals(models, [], audit.data, split, audit.requirements, 0,
                          canaries=audit.canary_idx)
    assert np.array_equal(ctx.target.sample_idx, ev.sample_idx)
    col = np.flatnonzero(ev.sample_idx == held_out)[0]
    assert not ctx.target.member[:, col].any()                          # held out everywhere
    planned = np.stack([np.isin(ev.sample_idx[ev.canary], j.train_idx) for j in jobs])
    got = ctx.target.member[:, ev.canary]
    assert got.sum() == planned.sum() - planned[:, 0].sum() and not got[:, 0].any()


def test_members_json_lists_every_sample_the_model_trained_on_canaries_flagged(digits,
                                                                               tmp_path):
    """README: members.json holds exactly the samples the released model trained on. The
    canaries it trained on are listed under "canaries" (they are neither members nor
    non-members of the population evaluation); the pool's others, "canaries_not_trained_on"."""
    audit = _audit(digits, seeds=(0,))
    split = audit.split(0)
    job = audit.plan(DefenseChoice("ce"), 0, split)[0]
    spec = ModelSpec.for_data("mlp", audit.data)
    trained_on = np.setdiff1d(job.train_idx, [audit.canary_idx[0], split.target_members[0]])
    target = TrainedModel(spec.build().eval(), spec, trained_on)
    ev = evaluation_of(split, target, audit.canary_idx)
    factory = ModelFactory(audit.data, "mlp", Recipe(epochs=1), ModelCache(None),
                           progress=False)
    write_released(tmp_path, factory, target, ev)
    members = json.loads((tmp_path / "members.json").read_text())
    assert sorted(members["members"] + members["canaries"]) == trained_on.tolist()
    assert set(members["canaries"]) < set(audit.canary_idx.tolist())
    assert len(members["canaries"]) == len(np.setdiff1d(np.intersect1d(
        job.train_idx, audit.canary_idx), audit.canary_idx[:1]))   # less the one not trained on
    assert sorted(members["canaries"] + members["canaries_not_trained_on"]) == \
        sorted(audit.canary_idx.tolist())
    assert not set(members["canaries"]) & set(members["members"] + members["nonmembers"])
    _, _, extra = load_model_file(tmp_path / "model.pt")
    assert "trained_on" not in extra       # the ids live in members.json, never in model.pt


def test_the_config_checks_canaries_without_importing_torch():
    code = ("import sys; from crl.config import AuditConfig; "
            "AuditConfig(canaries='40:noise').validate(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_noise_canaries_and_bad_canary_settings(digits, tmp_path):
    audit = _audit(digits, canaries="12:noise", seeds=(0,))
    c = audit.canaries
    assert c.kind == "noise" and (c.source == -1).all() and c.images.shape == (12, 1, 8, 8)
    assert c.images.float().std() > 50                                 # uniform noise, not digits
    from crl.data.canaries import save_canaries
    save_canaries(tmp_path, c)
    again = load_canaries(tmp_path, digits)
    assert (again.images == c.images).all() and (again.labels == c.labels).all()
    assert parse_canaries("40") == (40, "mislabeled") and parse_canaries("7:noise") == (7, "noise")
    for bad in ("0", "1", "5:foo", "-3", "a"):
        with pytest.raises(CRLError, match=r"canaries = '.*': expected N or N:KIND with N >= 2"):
            AuditConfig(canaries=bad).resolved()
    cfg = AuditConfig(dataset="digits", canaries="500", seeds=[0], subset=1700).resolved()
    with pytest.raises(CRLError, match=r"images outside every seed's target and shadow pools; "
                                       r"expected at least 500"):
        canaries_for(cfg, digits)


def test_yaml_canaries_key_takes_an_integer(tmp_path):
    from crl.config import load_yaml_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"canaries": 64}))
    assert AuditConfig(**load_yaml_recipe(path)).resolved().canaries == "64"


def _leaky_canaries(n_models=64, n=40, seed=0):
    """Half the canaries leak perfectly (members score 10), half not at all (score 0)."""
    rng = np.random.default_rng(seed)
    member = rng.random((n_models, n)) < 0.5
    leaky = np.arange(n) < n // 2
    scores = np.where(member & leaky[None], 10.0, 0.0)
    return scores, member, leaky


def test_pooled_canary_metrics_have_the_known_answer_and_sample_level_intervals():
    scores, member, _ = _leaky_canaries()
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    m = clustered_metrics_with_ci(scores.ravel(), member.ravel(), ids.ravel(), n_boot=400)
    # members of leaky canaries (half the members) beat every non-member; the rest tie with them
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(member[:, :20].sum() / member.sum())
    frac = m["tpr_at_0.1pct_fpr"]
    assert m["auc"] == pytest.approx(frac + 0.5 * (1 - frac))
    assert m["min_resolvable_fpr"] == pytest.approx(1 / (~member).sum())
    lo, hi = m["tpr_at_0.1pct_fpr_ci"]
    # 40 canaries, half leaky: the sample-level spread (sd ~0.08), not the pair-level (~0.01)
    assert lo < frac - 0.06 and hi > frac + 0.06 and hi - lo < 0.5


def test_subset_metrics_pool_every_model_or_use_the_target_alone():
    scores, member, _ = _leaky_canaries(n_models=5, n=40)
    cols = np.ones(40, bool)
    pooled = AttackOutcome("a", scores[0], {}, pooled=scores)
    alone = AttackOutcome("b", scores[0], {})
    out = subset_metrics({"a": pooled, "b": alone}, member, np.arange(40), cols, n_boot=50,
                         seed=0)
    assert out["a"]["pooled"] and out["a"]["models"] == 5
    assert not out["b"]["pooled"] and out["b"]["models"] == 1
    assert out["b"]["min_resolvable_fpr"] == pytest.approx(1 / (~member[0]).sum())


def test_exposure_counts_the_models_whose_low_fpr_threshold_a_member_beats():
    rng = np.random.default_rng(1)
    scores = rng.random((4, 2002))                       # 2000 non-member columns in [0, 1)
    member = np.zeros((4, 2002), bool)
    member[[0, 1], 0] = True                             # sample 0: in models 0, 1, both leak
    scores[[0, 1], 0] = 5.0
    member[:, 1] = True                                  # sample 1: in every model, 2 of 4 leak
    scores[:, 1] = [5.0, 0.1, 0.2, 5.0]
    thresholds = exposure_thresholds(scores, member, 0.001)
    for k in range(4):                                   # floor(0.001 * 2000) = 2 exceed it
        assert (scores[k][~member[k]] > thresholds[k]).sum() == 2
    values, n_in, _ = exposure_values(scores, member, thresholds)
    assert values[0] == 1.0 and values[1] == 0.5 and n_in[:2].tolist() == [2, 4]
    assert np.isnan(values[2:]).all()


def test_mislabeled_canaries_leak_more_than_the_population_on_an_undefended_mlp(tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    code = main(["audit", "--epochs", "20", "--seeds", "0", "--quiet", "--shadows", "0",
                 "--defenses", "ce", "--attacks", "loss", "--references", "4",
                 "--canaries", "100", "--bootstrap", "50", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())[0]
    canary = row["canaries"]["attacks"]["loss"]
    population = row["attacks"]["loss"]["leave_one_out"]
    # pooled rows resolve FPRs down to 1 / (distinct non-member samples): 100 canaries, 1%
    assert canary["nonmember_samples"] == 100 and canary["min_resolvable_fpr"] == 0.01
    assert row["canaries"]["n"] == 100 and canary["pooled"] and canary["models"] == 5
    assert canary["tpr_at_1pct_fpr"] > population["tpr_at_1pct_fpr"] + 0.2
    assert canary["tpr_at_1pct_fpr_ci"][0] > population["tpr_at_1pct_fpr"]
    stored = json.loads((out / "models" / "ce" / "seed0" / "canaries.json").read_text())
    assert stored["models"] == ["target"] + [f"reference {j}" for j in range(4)]
    assert stored["member"][0].count("1") == canary_halves(100, 4, 0)[0].sum()   # independent
    saved = json.loads((out / "canaries.json").read_text())
    assert saved["indices"] == stored["canary_idx"] and saved["kind"] == "mislabeled"
    members = json.loads((out / "models" / "ce" / "seed0" / "members.json").read_text())
    assert not set(members["members"] + members["nonmembers"]) & set(saved["indices"])
    target_canaries = [i for i, m in zip(stored["canary_idx"], stored["member"][0]) if m == "1"]
    assert members["canaries"] == target_canaries and len(target_canaries) == canary_halves(
        100, 4, 0)[0].sum()
    report = (out / "report.md").read_text()
    assert "## Worst case: 100 mislabeled canaries" in report
    assert (out / "vulnerability" / "exposed_ce_seed0.png").is_file()
    assert (out / "vulnerability" / "exposure_ce_seed0.csv").read_text().startswith("rank,")
    o = load_outcome(out / "scores" / "ce_seed0.npz")
    assert json.loads(json.dumps(o.row())) == row and o.exposure.attack == "loss"
