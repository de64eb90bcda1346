"""The verdict (crl.audit.verdict): the one strongest-attack rule, paired changes recomputed
independently, the words chosen by rule from the intervals, and the audit's progress line."""
import io
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from crl.attacks.metrics import attack_metrics
from crl.audit.outcome import AttackOutcome, Evaluation, TargetOutcome
from crl.audit.progress import AuditProgress, clock_text
from crl.audit.verdict import (
    compute_verdict,
    console_lines,
    lowest_resolved_tpr,
    strongest,
    words_of,
)
from crl.cli import main

N = 400   # members and non-members each


def _outcome(defense: str, seed: int, scores: dict[str, np.ndarray], correct: np.ndarray
             ) -> TargetOutcome:
    """A target whose pool holds N members, then len(correct) non-members, with the given
    attack scores; its test predictions are right where `correct` is true."""
    members = np.arange(N + len(correct)) < N
    ev = Evaluation(np.arange(len(members)), members, ~members)
    margins = np.where(np.concatenate([np.ones(N, bool), correct]), 1.0, -1.0)
    attacks = {a: AttackOutcome(a, s, attack_metrics(s, members)) for a, s in scores.items()}
    return TargetOutcome("toy", "mlp", defense, {}, seed, 1.0, float(correct.mean()), ev,
                         np.zeros(len(members), int), margins, attacks)


def _leaky(rng, shift: float) -> np.ndarray:
    """Scores where members sit `shift` higher than non-members."""
    return np.concatenate([rng.normal(shift, 1, N), rng.normal(0, 1, N)])


def _correct(rng, acc: float) -> np.ndarray:
    return rng.random(N) < acc


def test_strongest_is_the_highest_value_skipping_unknown_ones_first_on_ties():
    assert strongest({"loss": 0.6, "lira": 0.8, "rmia": 0.7}) == "lira"
    assert strongest({"loss": None, "lira": 0.55, "nn": float("nan")}) == "lira"
    assert strongest({"a": 0.7, "b": 0.7}) == "a"
    assert strongest({"a": None}) is None and strongest({}) is None


@pytest.mark.parametrize("lo_hi, privacy", [
    ((-0.2, -0.1), "protects"), ((0.05, 0.1), "leaks more than ce"),
    ((-0.1, 0.1), "within noise of ce on the strongest attacks")])
@pytest.mark.parametrize("acc_ci, cost", [((-0.05, -0.01), "at a cost"), ((-0.02, 0.01), ""),
                                          ((0.01, 0.03), "and more accurate")])
def test_words_follow_the_rule_on_the_95_percent_intervals(lo_hi, privacy, acc_ci, cost):
    auc = {"ci": list(lo_hi)}
    assert words_of([auc], {"ci": list(acc_ci)}, "ce") == (privacy, cost)
    # one strongest attack wholly above 0 outweighs another wholly below
    assert words_of([{"ci": [-0.2, -0.1]}, {"ci": [0.01, 0.02]}], {"ci": [0, 0]}, "ce")[0] == \
        "leaks more than ce"


def _pairs(rng, seeds=(0, 1)):
    """ce leaks through `lira` (and a weaker `loss`); crl leaks little and is less accurate."""
    out = []
    for s in seeds:
        out.append(_outcome("ce", s, {"loss": _leaky(rng, 0.6), "lira": _leaky(rng, 1.5)},
                            _correct(rng, 0.9)))
    for s in seeds:
        out.append(_outcome("crl", s, {"loss": _leaky(rng, 0.3), "lira": _leaky(rng, 0.1)},
                            _correct(rng, 0.8)))
    return out


def test_verdict_recomputes_from_the_scores_and_says_protects_at_a_cost():
    outcomes = _pairs(np.random.default_rng(0))
    v = compute_verdict(outcomes, n_boot=300)
    assert v["baseline"] == "ce" and v["metrics"] == ["auc", "tpr_at_1pct_fpr"]
    (d,) = v["defenses"]
    ce, crl = outcomes[:2], outcomes[2:]
    members = np.arange(2 * N) < N
    auc = {(o.defense, a): roc_auc_score(members, o.attacks[a].scores) for o in outcomes
           for a in o.attacks}
    # strongest by AUC on each side, the change averaged over the two seeds
    best_ce = max(("loss", "lira"), key=lambda a: sum(auc[o.defense, a] for o in ce))
    best_crl = max(("loss", "lira"), key=lambda a: np.mean(
        [roc_auc_score(members, o.attacks[a].scores) for o in crl]))
    c = d["strongest"]["auc"]
    assert (c["baseline_attack"], c["attack"]) == (best_ce, best_crl) == ("lira", "loss")
    want = np.mean([roc_auc_score(members, o.attacks["loss"].scores) for o in crl]) - np.mean(
        [roc_auc_score(members, o.attacks["lira"].scores) for o in ce])
    assert c["change"] == pytest.approx(want) and c["ci"][0] < want < c["ci"][1] < 0
    acc = d["accuracy"]
    assert acc["change"] == pytest.approx(np.mean([o.test_acc for o in crl])
                                          - np.mean([o.test_acc for o in ce]))
    assert acc["ci"][0] < acc["change"] < acc["ci"][1] < 0
    assert (d["words"], d["cost"]) == ("protects", "at a cost")
    assert d["sentence"].startswith("crl: AUC lira 0.") and \
        d["sentence"].endswith(": protects, at a cost")
    lines = console_lines(v)
    assert all(len(line) <= 100 for line in lines) and "crl: protects, at a cost" in lines[1]
    json.dumps(v)   # verdict.json's content is plain JSON


def test_verdict_leaks_more_and_within_noise():
    rng = np.random.default_rng(1)
    outcomes = _pairs(rng)
    swapped = [_outcome("crl" if o.defense == "ce" else "ce", o.seed,
                        {a: x.scores for a, x in o.attacks.items()},
                        o.margins[N:] > 0) for o in outcomes]
    (d,) = compute_verdict(swapped, n_boot=200)["defenses"]
    assert (d["words"], d["cost"]) == ("leaks more than ce", "and more accurate")
    same = [_outcome(name, o.seed, {a: x.scores for a, x in o.attacks.items()},
                     o.margins[N:] > 0) for name in ("ce", "crl") for o in outcomes[:2]]
    (d,) = compute_verdict(same, n_boot=200)["defenses"]
    assert d["strongest"]["auc"]["change"] == 0 and d["accuracy"]["change"] == 0
    assert (d["words"], d["cost"]) == ("within noise of ce on the strongest attacks", "")


def test_baseline_is_ce_else_the_first_defense_and_one_training_gives_no_verdict():
    outcomes = _pairs(np.random.default_rng(2), seeds=(0,))
    renamed = [_outcome({"ce": "dpsgd", "crl": "crl"}[o.defense], o.seed,
                        {a: x.scores for a, x in o.attacks.items()}, o.margins[N:] > 0)
               for o in outcomes]
    v = compute_verdict(renamed, n_boot=50)
    assert v["baseline"] == "dpsgd" and "first defense listed" in v["baseline_reason"]
    assert [d["defense"] for d in v["defenses"]] == ["crl"]
    v = compute_verdict(outcomes[:1], n_boot=50)
    assert v["baseline"] is None and v["defenses"] == []
    assert v["reason"].startswith("only one training audited (ce)")
    assert console_lines(v)[0].startswith("Verdict: none (only one training audited")


def test_the_tpr_metric_is_the_lowest_fpr_every_target_resolves():
    outcomes = _pairs(np.random.default_rng(3), seeds=(0,))
    assert lowest_resolved_tpr(outcomes) == "tpr_at_1pct_fpr"      # 400 non-members: >= 0.25%
    small = [_outcome(o.defense, 0, {a: x.scores[:N + 50] for a, x in o.attacks.items()},
                      np.ones(50, bool)) for o in outcomes]     # 50 non-members: 2% at best
    assert lowest_resolved_tpr(small) is None


def test_progress_line_shows_models_done_of_total_elapsed_and_eta():
    now = [0.0]
    out = io.StringIO()
    p = AuditProgress(4, stream=out, every=0.0, clock=lambda: now[0])
    p.target("[ce seed 0]")
    now[0] = 30.0
    p.model_done()
    p.attack("[ce seed 0]", 0, 2, "lira")
    now[0] = 60.0
    p.model_done()
    p.model_done()
    p.model_done()
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "audit: models 0/4 (0%), 0:00 elapsed; [ce seed 0] training"
    assert lines[1] == "audit: models 1/4 (25%), 0:30 elapsed, ETA 1:30; [ce seed 0] training"
    assert lines[2].endswith("ETA 1:30; [ce seed 0] attacks 0/2 done, running lira")
    assert lines[3] == ("audit: models 2/4 (50%), 1:00 elapsed, ETA 1:00; [ce seed 0] attacks "
                        "0/2 done, running lira")
    assert lines[-1] == "audit: models 4/4 (100%), 1:00 elapsed; done"
    assert clock_text(3725) == "1:02:05"


def test_the_audit_prints_its_progress_and_verdict_and_quiet_silences_progress(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRL_CACHE", str(tmp_path / "cache"))
    args = ["audit", "--epochs", "1", "--subset", "100", "--seeds", "0", "--shadows", "0",
            "--defenses", "ce,crl", "--attacks", "loss,mentr"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "audit: models 0/2 (0%)" in err and "audit: models 2/2 (100%)" in err
    assert "[crl seed 0] attacks 0/2 done, running loss" in err
    verdict = json.loads((tmp_path / "a" / "verdict.json").read_text())
    tail = out.splitlines()[-len(console_lines(verdict)):]
    assert tail == console_lines(verdict) and tail[1].startswith("  crl: ")
    assert isinstance(json.loads((tmp_path / "a" / "results.json").read_text()), list)
    from crl.report.verdict_section import write_verdict

    def verdict_only(out, outcomes, cfg):      # the same audit, no figures (fast)
        write_verdict(out, outcomes, 10)
        return ""

    monkeypatch.setattr("crl.report.write_report", verdict_only)
    assert main([*args, "--quiet", "--out", str(tmp_path / "b")]) == 0
    assert "audit: models" not in capsys.readouterr().err


def test_one_training_gets_no_verdict_in_the_report_but_the_reason():
    from crl.report.verdict_section import strongest_table, verdict_section

    outcomes = _pairs(np.random.default_rng(4), seeds=(0,))
    v = compute_verdict(outcomes[:1], n_boot=20)
    section = verdict_section(v)
    assert section[0] == "## Verdict" and section[2].startswith("No verdict: only one training")
    assert strongest_table(v) == []
    v = compute_verdict(outcomes, n_boot=20)
    table = strongest_table(v)
    assert table[0] == "## The strongest attacks" and len([r for r in table if
                                                           r.startswith("| crl |")]) == 3
