"""benchmarks/sweep.py's tiers and analysis: a tiered sweep end to end on digits (rerun skips,
second pass, summary.png/summary.md/answer.md), the choice of the settings nearest CE's test
accuracy from synthetic results, and the answer's words on synthetic result tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from benchmark_scripts import load_benchmark

from crl.core.errors import CRLError

ROOT = Path(__file__).resolve().parents[1]


sweep = load_benchmark("sweep")
FRONTS = ROOT / "experiments" / "sweeps" / "fronts_cifar10_cnn.yaml"


def _row(defense: str, test_acc: float, aucs: dict, seed: int = 0, n: int = 10_000) -> dict:
    """A results.json row: each attack's AUC with a bootstrap interval of +-half."""
    attacks = {a: {"auc": v, "auc_ci": [v - h, v + h], "tpr_at_1pct_fpr": None,
                   "tpr_at_1pct_fpr_ci": None} for a, (v, h) in aucs.items()}
    return {"defense": defense, "seed": seed, "train_acc": 1.0, "test_acc": test_acc,
            "n_nonmembers": n, "attacks": attacks}


def _point(name: str, test_acc: float, aucs: dict):
    defense = name.rsplit("-", 1)[0]
    return sweep.point_of(sweep.Variant(name, defense, {}), [_row(defense, test_acc, aucs)])


def _write_sweep(tmp_path: Path, tiers: dict, variants: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "dataset": "digits", "model": "mlp", "epochs": 1, "subset": 200, "seeds": [0],
        "shadows": 0, "attacks": ["loss", "confidence"]}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "out": str(tmp_path / "runs"),
                                    "variants": variants, "tiers": tiers}))
    return path


def test_tiered_sweep_end_to_end_on_digits(tmp_path, capsys):
    path = _write_sweep(tmp_path, {1: {"defenses": ["ce", "relaxloss"]},
                                   2: {"from": [1], "nearest": 1,
                                       "config": {"attacks": ["gap"]}}},
                        {"ce": [{}], "relaxloss": [{"alpha": 0.3}, {"alpha": 1.5}]})
    flags = ["--", "--quiet", "--bootstrap", "50"]
    assert sweep.main([str(path), "--tier", "1", *flags]) == 0
    runs = tmp_path / "runs"
    for name in ("summary.md", "summary.png", "answer.md"):
        assert (runs / name).stat().st_size > 0, name
    answer = (runs / "answer.md").read_text()
    assert "## threshold" in answer and "## label-only" in answer
    capsys.readouterr()
    assert sweep.main([str(path), "--tier", "1", *flags]) == 0          # a rerun skips
    assert capsys.readouterr().out.count("done already") == 3
    s = sweep.load_sweep(path)
    recipe = s.recipe_path(s.variant("ce-0"))
    assert sweep.done(recipe, flags[1:])
    manifest = runs / "ce-0" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"running"', 1))
    assert not sweep.done(recipe, flags[1:])                  # killed mid-audit: not done
    assert sweep.main([str(path), "--tier", "1", "--resume", *flags]) == 0
    assert sweep.done(recipe, flags[1:])
    assert sweep.main([str(path), "--tier", "2", *flags]) == 0
    out = capsys.readouterr().out
    assert "tier 2: the 1 settings per defense nearest CE's test accuracy" in out
    chosen = sorted(p.name for p in (runs / "tier2").iterdir() if p.name != "recipes")
    assert chosen[0] == "ce-0" and len(chosen) == 2
    table = (runs / "summary.md").read_text()
    head = next(line for line in table.splitlines() if line.startswith("| setting |"))
    ce_line = next(line for line in table.splitlines() if line.startswith("| ce-0 "))
    column = head.split(" | ").index("gap")                  # tier 2's attack merged in
    assert ce_line.split(" | ")[column] != "-"
    assert ce_line.split(" | ")[head.split(" | ").index("loss")] != "-"


def test_resume_continues_only_the_interrupted_settings(tmp_path, monkeypatch):
    """A setting whose manifest says "running" (killed mid-audit) is not done: a rerun with
    --resume passes --resume to its audit; a complete one is skipped."""
    import crl.cli

    path = _write_sweep(tmp_path, {1: {"defenses": ["ce", "relaxloss"]}},
                        {"ce": [{}], "relaxloss": [{"alpha": 0.3}]})
    s = sweep.load_sweep(path)
    calls = []
    monkeypatch.setattr(crl.cli, "main", lambda args: calls.append(args) or 0)
    assert sweep.run(s, ["--quiet"], tier=s.tiers[1], resume=True, echo=lambda _: None) == 0
    assert [c[2].endswith(n) for c, n in zip(calls, ("ce-0.yaml", "relaxloss-0.yaml"))] == \
        [True, True] and all(c[-1] == "--resume" for c in calls)
    monkeypatch.setattr(sweep, "done", lambda recipe, extra: "ce-0" in str(recipe))
    calls.clear()
    assert sweep.run(s, ["--quiet"], tier=s.tiers[1], resume=True, echo=lambda _: None) == 0
    assert len(calls) == 1 and calls[0][2].endswith("relaxloss-0.yaml")


def test_second_pass_picks_the_settings_nearest_ce(tmp_path):
    path = _write_sweep(tmp_path, {1: {"defenses": ["ce", "crl", "relaxloss"]},
                                   2: {"from": [1], "nearest": 2}},
                        {"ce": [{}], "crl": [{"alpha_rce": a} for a in (0.1, 0.3, 0.5, 0.8)],
                         "relaxloss": [{"alpha": a} for a in (0.1, 0.5, 1.0)]})
    s = sweep.load_sweep(path)
    accs = {"ce-0": 0.70, "crl-0": 0.69, "crl-1": 0.66, "crl-2": 0.705, "crl-3": 0.60,
            "relaxloss-0": 0.72, "relaxloss-1": 0.64}           # relaxloss-2 not run yet
    for name, acc in accs.items():
        folder = s.folder(s.variant(name))
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps([_row("x", acc, {"loss": (0.6, 0.01)})]))
    variants, text = sweep.second_pass(s, s.tiers[2])
    assert [v.name for v in variants] == ["ce-0", "crl-2", "crl-0", "relaxloss-0",
                                          "relaxloss-1"]
    assert "crl-2 (70.50%)" in text and "CE's test accuracy (70.00%)" in text
    assert sweep.choose_nearest({"a-0": ("a", 0.5), "a-1": ("a", 0.7)}, 0.6, 1) == ["a-0"]


def test_second_pass_needs_ce_results(tmp_path):
    path = _write_sweep(tmp_path, {1: {"defenses": ["ce"]}, 2: {"from": [1]}}, {"ce": [{}]})
    s = sweep.load_sweep(path)
    with pytest.raises(CRLError, match="expected --tier 1 first"):
        sweep.second_pass(s, s.tiers[2])


def test_answer_names_the_leaner_defense_when_intervals_are_apart():
    points = [_point("ce-0", 0.700, {"loss": (0.80, 0.01), "nn": (0.85, 0.01)}),
              _point("crl-0", 0.697, {"loss": (0.60, 0.01), "nn": (0.62, 0.01)}),
              _point("relaxloss-0", 0.702, {"loss": (0.70, 0.01), "nn": (0.66, 0.01)})]
    text = sweep.answer_text(points, "synthetic")
    threshold = text.split("## threshold")[1].split("## NN")[0]
    assert ("within 1 point of CE's test accuracy (70.0%) or above, each front's least leaky "
            "point, the least leaky is crl") in threshold
    assert "crl leaks less than relaxloss by 0.100 (intervals apart)" in threshold
    nn = text.split("## NN")[1].split("## LiRA")[0]
    assert "crl leaks less than relaxloss by 0.040 (intervals apart)" in nn
    assert "yes: crl-0 (69.7%)" in text


def test_answer_says_within_noise_when_intervals_overlap():
    points = [_point("ce-0", 0.700, {"loss": (0.80, 0.01)}),
              _point("crl-0", 0.640, {"loss": (0.60, 0.02)}),
              _point("crl-1", 0.600, {"loss": (0.55, 0.02)}),
              _point("relaxloss-0", 0.645, {"loss": (0.61, 0.02)})]
    text = sweep.answer_text(points, "synthetic")
    threshold = text.split("## threshold")[1].split("## NN")[0]
    assert "no two defenses within 1 point of CE's test accuracy (70.0%)" in threshold
    assert "crl and relaxloss are within noise of each other (difference 0.010" in threshold
    assert "crl vs relaxloss, matched" in threshold          # 64.0% vs 64.5%
    assert "no: the most accurate CRL setting, crl-0, reaches 64.0%, 6.0 points below" in text
    assert "no point has this attack family" in text.split("## LiRA/RMIA")[1]


def test_fronts_compare_their_least_leaky_points_at_matched_accuracy():
    """A front's barely-defended point nearest CE's accuracy must not stand for the front when a
    more private point of it is as accurate; fronts compare where both reach."""
    points = [_point("ce-0", 0.700, {"loss": (0.80, 0.005)}),
              _point("crl-0", 0.699, {"loss": (0.79, 0.005)}),      # nearest CE, barely relaxed
              _point("crl-1", 0.705, {"loss": (0.65, 0.005)}),      # as accurate, more private
              _point("crl-2", 0.600, {"loss": (0.55, 0.005)}),
              _point("hamp-0", 0.695, {"loss": (0.70, 0.005)}),
              _point("relaxloss-0", 0.640, {"loss": (0.70, 0.005)}),
              _point("relaxloss-1", 0.600, {"loss": (0.60, 0.005)})]
    threshold = sweep.answer_text(points, "synthetic").split("## threshold")[1].split("## NN")[0]
    assert "the least leaky is crl, crl-1 (70.5% test): loss AUC 0.650" in threshold
    assert "next: hamp, hamp-0 (69.5% test)" in threshold
    # relaxloss reaches 64.0% at most: CRL's least leaky point at or above 63% is crl-1
    assert ("crl vs relaxloss, not matched (6.5 points of test accuracy apart), at 64.0% (the "
            "highest test accuracy both fronts reach): crl-1 (70.5% test)") in threshold
    assert ("crl vs hamp, matched, at 69.5% (the highest test accuracy both fronts reach): "
            "crl-1 (70.5% test)") in threshold


def test_the_white_box_boundary_is_not_counted_as_label_only():
    points = [_point("ce-0", 0.700, {"boundary": (0.70, 0.01), "boundary_whitebox": (0.90, 0.01)}),
              _point("crl-0", 0.697, {"boundary": (0.65, 0.01),
                                      "boundary_whitebox": (0.88, 0.01)})]
    text = sweep.answer_text(points, "synthetic")
    label_only = text.split("## label-only")[1].split("## white-box boundary")[0]
    assert "boundary AUC 0.650" in label_only and "0.880" not in label_only
    assert "boundary_whitebox AUC 0.880" in text.split("## white-box boundary")[1]


def test_points_are_compared_on_the_attacks_both_ran():
    """RMIA ran at CE's point only (a second-pass tier): CRL's point must not be set against
    CE's RMIA with its own weaker attacks, in the CRL-at-CE lines or in "any attack"."""
    points = [_point("ce-0", 0.700, {"loss": (0.80, 0.01), "rmia": (0.95, 0.01)}),
              _point("crl-0", 0.698, {"loss": (0.70, 0.01)}),
              _point("crl-1", 0.690, {"loss": (0.60, 0.01), "rmia": (0.90, 0.01)})]
    text = sweep.answer_text(points, "synthetic")
    reach = text.split("## Does a CRL")[1].split("## threshold")[0]
    assert ("crl-0 (69.8% test): loss AUC 0.700 [0.690, 0.710] against CE ce-0 (70.0% test): "
            "loss AUC 0.800") in reach
    assert ("crl-1 (69.0% test): rmia AUC 0.900 [0.890, 0.910] against CE ce-0 (70.0% test): "
            "rmia AUC 0.950") in reach
    anything = text.split(f"## {sweep.ANY}")[1]
    assert "rmia" not in anything and "ce-0 (70.0% test): loss AUC 0.800" in anything
    assert "crl-1 (69.0% test): rmia AUC 0.900" in text.split("## LiRA/RMIA")[1]


def test_seed_intervals_span_the_seeds():
    rows = [_row("crl", 0.60, {"loss": (0.60, 0.01)}, seed=0),
            _row("crl", 0.64, {"loss": (0.64, 0.01)}, seed=1)]
    p = sweep.point_of(sweep.Variant("crl-0", "crl", {}), rows)
    assert p.seeds == (0, 1) and p.metrics["loss"]["auc"].value == pytest.approx(0.62)
    assert (p.metrics["loss"]["auc"].lo, p.metrics["loss"]["auc"].hi) == pytest.approx(
        (0.59, 0.65))
    assert p.test_acc.lo < 0.60 and p.test_acc.hi > 0.64


def test_the_fronts_sweep_has_every_tier_it_needs():
    s = sweep.load_sweep(FRONTS)
    count = {d: sum(v.defense == d for v in s.variants) for d in {v.defense for v in s.variants}}
    assert set(s.tiers[1].defenses) == {"ce", "crl", "relaxloss", "hamp", "dpsgd"}
    assert set(s.tiers[2].defenses) == {"advreg", "dmp", "early_stopping", "label_smoothing",
                                        "confidence_penalty"}
    assert all(n >= 4 for d, n in count.items() if d not in ("ce", "dpsgd"))
    assert 2 <= count["dpsgd"] <= 3
    assert s.tiers[3].config == {"attacks": ["rmia"], "references": 8}
    assert s.tiers[4].config["attacks"] == ["gap", "augment", "boundary"]
    assert s.tiers[3].nearest == s.tiers[4].nearest == s.tiers[5].nearest == 2
    cfg = s.recipe(s.variants[0], s.tiers[5])
    assert cfg["seeds"] == [1, 2] and cfg["out"].endswith("tier5/ce-0")


@pytest.mark.parametrize("tiers,message", [
    ({0: {"defenses": ["ce"]}}, "expected a tier number >= 1"),
    ({1: {"defenses": ["nope"]}}, r"tiers.1.defenses = \['nope'\]"),
    ({1: {"from": [2]}}, r"tiers.1.from = \[2\]"),
    ({1: {"nearest": 2}}, "expected `defenses` \\(a first pass\\)"),
    ({1: {"defenses": ["ce"]}, 2: {"from": [1], "nearest": 0}}, "nearest = 0"),
    ({1: {"defenses": ["ce"]}, 2: {"from": [1]}, 3: {"from": [2]}}, r"tiers.3.from = \[2\]"),
])
def test_tier_errors_are_one_line(tmp_path, tiers, message):
    path = _write_sweep(tmp_path, tiers, {"ce": [{}]})
    with pytest.raises(CRLError, match=message) as e:
        sweep.load_sweep(path)
    assert "\n" not in str(e.value)


def test_points_at_chance_are_named_in_the_table_and_the_answer():
    rows = [{**_row("crl", 0.10, {"loss": (0.50, 0.02)}), "warning": "target at chance: ..."}]
    p = sweep.point_of(sweep.Variant("crl-0", "crl", {}), rows)
    ce = _point("ce-0", 0.70, {"loss": (0.80, 0.01)})
    assert "| crl-0 (at chance) |" in sweep.summary_table([ce, p])
    assert "crl-0 (10.0% test, target at chance)" in sweep.answer_text([ce, p], "synthetic")
