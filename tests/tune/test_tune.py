"""`crl tune`: the study persists in the run directory and a larger --trials continues it,
collapsed trials are failed, the recommendation respects --max-accuracy-drop, and tune.json /
tune.md / pareto.png agree with the stored trials; bad options fail with one line."""
import json
import re
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from crl.cli import main
from crl.core.errors import CRLError
from crl.tune.evaluate import POOLED, TARGET, Point, attack_values
from crl.tune.space import search_space
from crl.tune.study import STUDY_FILE, STUDY_NAME, first_difference, open_study, recommend

TINY = ["--epochs", "3", "--batch-size", "8", "--subset", "200", "--seeds", "0",
        "--attacks", "loss", "--bootstrap", "50", "--quiet"]


def _tune(args, capsys):
    code = main(["tune", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _stored(out):
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY_FILE}")
    return optuna.load_study(study_name=STUDY_NAME, storage=storage).trials


def _check_consistent(out, result):
    """tune.json lists exactly the stored trials (params, state, values), the stored front, and
    tune.md shows every front trial."""
    stored = _stored(out)
    assert [t["number"] for t in result["trials"]] == [t.number for t in stored]
    for row, t in zip(result["trials"], stored):
        assert (row["state"], row["searched"], row["values"]) == (t.state.name, t.params,
                                                                  t.values)
    done = [t for t in stored if t.state.name == "COMPLETE"]
    front = {t.number for t in done if not any(
        o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
        for o in done)}
    assert set(result["front"]) == front
    md = (out / "tune.md").read_text()
    for n in front:
        assert f"\n| {n} | " in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def _check_recommendation(result, drop):
    """The recommended trial meets the constraint and no feasible trial is more private."""
    ce = result["references"]["ce"]["test_acc"]
    feasible = [t for t in result["trials"] if t["state"] == "COMPLETE"
                and t["values"][0] >= ce - drop - 1e-12]
    rec = result["best_within_budget"]
    if not feasible:
        assert rec is None
        return
    assert rec["point"]["test_acc"] >= ce - drop - 1e-12
    assert rec["point"]["objective"] == min(t["values"][1] for t in feasible)
    assert rec["trial"] in result["front"]
    labels = [r["label"] for r in result["confirm"]["rows"]]
    assert labels[:2] == ["ce", f"crl (trial {rec['trial']})"]
    assert result["confirm"]["seeds"] == [1]          # fresh: the search used seed 0
    for row in result["confirm"]["rows"]:             # fresh-seed accuracy has its interval
        lo, hi = row["accuracy_interval"]
        assert lo <= row["point"]["test_acc"] <= hi and hi - lo > 0
        assert (row["change"] is None) == (row["label"] == "ce")
    assert result["recommendation"]["status"] in ("recommended", "no gain",
                                                  "within noise on fresh seeds")


def test_study_persists_and_a_larger_n_continues_it(tmp_path, capsys):
    out = tmp_path / "tune"
    args = [*TINY, "--max-accuracy-drop", "0.05", "--out", str(out)]
    code, stdout, err = _tune([*args, "--trials", "2"], capsys)
    assert code == 0, err
    first = json.loads((out / "tune.json").read_text())
    assert len(first["trials"]) == 2 and (out / STUDY_FILE).is_file()

    code, stdout, err = _tune([*args, "--trials", "3"], capsys)
    assert code == 0, err
    assert "trial 2 (3/3)" in stdout and "(1/3)" not in stdout     # only the third ran
    result = json.loads((out / "tune.json").read_text())
    assert [t["searched"] for t in result["trials"][:2]] == \
        [t["searched"] for t in first["trials"]]
    assert [t["values"] for t in result["trials"][:2]] == [t["values"] for t in first["trials"]]
    assert len(result["trials"]) == 3
    _check_consistent(out, result)
    _check_recommendation(result, 0.05)
    assert result["seconds"]["total"] >= result["seconds"]["run"]
    # one numbering everywhere: the console, tune.json, tune.md and the recommendation
    assert [int(n) for n in re.findall(r"^trial (\d+) \(", stdout, re.MULTILINE)] == [2]
    rec, md = result["best_within_budget"]["trial"], (out / "tune.md").read_text()
    assert f"(trial {rec})" in stdout and f"Trial {rec}:" in md and f"crl (trial {rec})" in md
    words = result["recommendation"]["words"]
    assert words in " ".join(stdout.split()) and words[1:] in " ".join(md.split())
    assert ("recommended (trial" in stdout) == (result["recommendation"]["status"]
                                                 == "recommended")

    code, _, err = _tune([*TINY, "--trials", "3", "--epochs", "4", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1                      # another recipe: refused
    assert "recipe.epochs = 4: the study in" in err and "was run with 3" in err


def test_trials_that_collapse_to_chance_are_failed(tmp_path, capsys):
    """Pure-noise images with random labels: no setting can learn, so every trial fails with
    its reason, the front is empty and nothing is recommended; failed trials still count."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "noise"
    for part, n in (("train", 30), ("test", 10)):
        for c in range(4):
            (root / part / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                Image.fromarray(img, mode="L").save(root / part / f"c{c}" / f"{i}.png")
    out = tmp_path / "tune"
    args = ["--dataset", f"imagefolder:{root}", "--model", "mlp", "--epochs", "2", "--seeds",
            "0", "--quiet", "--attacks", "loss", "--bootstrap", "50", "--trials", "2",
            "--out", str(out)]
    code, stdout, err = _tune(args, capsys)
    assert code == 0, err
    result = json.loads((out / "tune.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["FAIL", "FAIL"]
    assert all(t["failed"].startswith("chance: target at chance") for t in result["trials"])
    assert all(t["point"]["warnings"] for t in result["trials"])
    assert result["front"] == [] and result["best_within_budget"] is None
    assert result["recommendation"]["status"] == "no trial within the budget"
    assert "no setting beats ce within the budget" in stdout and "recommended" not in stdout
    _check_consistent(out, result)
    code, stdout, err = _tune(args, capsys)                         # N = 2 already reached
    assert code == 0, err
    assert "trial " not in stdout.split("reference points")[0]
    assert len(json.loads((out / "tune.json").read_text())["trials"]) == 2


def _point(test_acc, objective, name="crl"):
    return Point(name, {}, [0], 1.0, test_acc, [test_acc], {"loss": objective}, TARGET)


def test_recommendation_respects_the_accuracy_constraint():
    ce = _point(0.90, 0.70, "ce")
    trials = [(0, _point(0.95, 0.68)), (1, _point(0.85, 0.55)), (2, _point(0.895, 0.60)),
              (3, _point(0.91, 0.60)), (4, _point(0.80, 0.50))]
    assert recommend(trials, ce, 0.01)[0] == 3         # 0.60 at 91% beats 0.60 at 89.5%
    assert recommend(trials, ce, 0.0)[0] == 3
    assert recommend(trials, ce, 0.06)[0] == 1
    assert recommend(trials, ce, 1.0)[0] == 4
    assert recommend(trials[:2], _point(0.99, 0.7, "ce"), 0.01) is None


def test_the_search_space_comes_from_the_defense_spec():
    from crl.defenses.crl import CRLDefense

    space = search_space("crl", {})
    for p in CRLDefense.spec:
        if p.search is None:
            assert p.name not in space
        else:
            d = space[p.name]
            assert (d.low, d.high, d.log) == (p.search[0], p.search[1], p.search[2] == "log")
    assert "lam" not in search_space("crl", {"lam": 0.2})            # --set fixes it
    with pytest.raises(CRLError, match="defense = 'ce': no parameter with a search range"):
        search_space("ce", {})


def test_the_sampler_is_seeded_by_name_and_a_continued_study_draws_afresh(tmp_path):
    space = search_space("relaxloss", {})
    setup = {"defense": "relaxloss"}

    def asked(folder, n):
        folder.mkdir(exist_ok=True)
        study = open_study(folder, setup, run_seed=0)
        values = []
        for _ in range(n):
            trial = study.ask(space)
            values.append(trial.params["alpha"])
            study.tell(trial, [0.5, 0.5])
        return values

    a, b = asked(tmp_path / "a", 2), asked(tmp_path / "b", 2)
    assert a == b                                      # same run seed, same proposals
    assert asked(tmp_path / "a", 2) != a               # continued: stream ("sampler", 2)
    assert len(_stored(tmp_path / "a")) == 4


def test_a_study_continues_only_with_the_same_setup():
    stored = {"objective": "auc", "recipe": {"epochs": 3, "set": {"crl": {"lam": 0.1}}}}
    assert first_difference(stored, stored) is None
    assert first_difference(stored, {**stored, "objective": "tpr@1"}) == "objective"
    changed = {"objective": "auc", "recipe": {"epochs": 3, "set": {"crl": {"lam": 0.2}}}}
    assert first_difference(stored, changed) == "recipe.set.crl.lam"
    # a recipe field another version added is tolerated at its default only
    assert first_difference(stored, {**stored, "recipe": {**stored["recipe"],
                                                          "augment": False}}) is None
    assert first_difference(stored, {**stored, "recipe": {**stored["recipe"],
                                                          "augment": True}}) == "recipe.augment"


def test_tpr_objective_uses_pooled_leave_one_out_where_one_target_cannot_resolve_it():
    def outcome(target, loo):
        metrics = {"tpr_at_0.1pct_fpr": target}
        return SimpleNamespace(attacks={
            "lira": SimpleNamespace(metrics=metrics, leave_one_out={"tpr_at_0.1pct_fpr": loo}),
            "gradx": SimpleNamespace(metrics=metrics, leave_one_out=None)})

    values, source = attack_values([outcome(None, 0.1), outcome(None, 0.3)], "tpr_at_0.1pct_fpr")
    assert source == POOLED and values == pytest.approx({"lira": 0.2})
    values, source = attack_values([outcome(0.05, 0.1)], "tpr_at_0.1pct_fpr")
    assert source == TARGET and values == {"lira": 0.05, "gradx": 0.05}
    with pytest.raises(CRLError, match="no attack resolves it"):
        attack_values([SimpleNamespace(attacks={"gradx": outcome(None, 0).attacks["gradx"]})],
                      "tpr_at_0.1pct_fpr")


@pytest.mark.parametrize("extra, message", [
    (["--objective", "tpr@5"], "objective = 'tpr@5': expected one of: auc, tpr@1, tpr@0.1"),
    (["--max-accuracy-drop", "2"], "max_accuracy_drop = 2: expected a number in [0.0, 1.0]"),
    (["--trials", "0"], "trials = 0: expected an integer >= 1"),
    (["--confirm-seeds", "0,7"], "confirm_seeds = [0, 7]: expected seeds the search does not use"),
    (["--defense", "ce"], "defense = 'ce': no parameter with a search range to tune"),
    (["--set", "crl.lam=-1"], "crl.lam = -1: expected a number >= 0.0"),
    (["--objective", "tpr@0.1"], "expected at least 1000 to resolve 0.1% FPR"),
])
def test_bad_tune_options_fail_with_one_line_before_any_training(tmp_path, capsys, extra,
                                                                 message):
    out = tmp_path / "tune"
    code, _, err = _tune([*TINY, "--trials", "1", "--out", str(out), *extra], capsys)
    assert code == 2 and err.count("\n") == 1
    assert message in err
    assert not (out / STUDY_FILE).exists()


def test_a_killed_run_keeps_the_time_of_its_finished_trials(tmp_path, capsys, monkeypatch):
    """The study's wall time is stored per trial, so "for the study so far" counts a run that
    was killed after some trials; the next run adds its own time to that."""
    import crl.tune.run as tune_run

    class Killed(BaseException):
        pass

    def killed(*_args, **_kwargs):
        raise Killed

    out = tmp_path / "tune"
    args = [*TINY, "--trials", "2", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(tune_run, "reference_points", killed)
        with pytest.raises(Killed):
            main(["tune", *args])
    assert "trial 1 (2/2)" in capsys.readouterr().out
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY_FILE}")
    kept = optuna.load_study(study_name=STUDY_NAME, storage=storage).user_attrs["seconds"]
    assert kept > 0 and not (out / "tune.json").exists()

    code, stdout, err = _tune(args, capsys)
    assert code == 0, err
    assert "(1/2)" not in stdout                     # the two trials were kept, not rerun
    seconds = json.loads((out / "tune.json").read_text())["seconds"]
    assert abs(seconds["total"] - (kept + seconds["run"])) <= 1    # both rounded to 1 s


def _result(rec, ce_objective=0.70, change_ci=None, intervals=((0.60, 0.66), (0.67, 0.73))):
    """A TuneResult with CE at `ce_objective`, the best trial within the budget `rec` and, on
    fresh seeds, the trial's paired change against CE (`change_ci`) and both intervals."""
    from crl.tune.output import ConfirmRow, TuneResult

    ce = _point(0.90, ce_objective, "ce")
    rows = []
    if rec is not None:
        change = None if change_ci is None else {
            "metric": "auc", "attack": "loss", "baseline_attack": "loss", "defense": 0.6,
            "baseline": 0.7, "change": sum(change_ci) / 2, "ci": list(change_ci)}
        rows = [ConfirmRow("ce", _point(0.9, 0.7, "ce"), list(intervals[1])),
                ConfirmRow(f"crl (trial {rec[0]})", rec[1], list(intervals[0]), change=change)]
    return TuneResult({"setup": {"defense": "crl"}}, "auc", [], ["loss"], [], [], {"ce": ce},
                      0.01, rec, rows, [3], ["loss"])


@pytest.mark.parametrize("case, expected", [
    ({"rec": None}, "no trial within the budget"),
    ({"rec": (7, _point(0.9, 0.71))}, "no gain"),                         # worse than CE
    ({"rec": (7, _point(0.9, 0.70))}, "no gain"),                         # equal to CE
    ({"rec": (7, _point(0.9, 0.60)), "change_ci": (-0.09, 0.01)}, "within noise on fresh seeds"),
    ({"rec": (7, _point(0.9, 0.60)), "change_ci": (-0.09, -0.01)}, "recommended"),
    ({"rec": (7, _point(0.9, 0.60))}, "recommended"),                     # intervals apart
    ({"rec": (7, _point(0.9, 0.60)), "intervals": ((0.6, 0.68), (0.67, 0.73))},
     "within noise on fresh seeds"),                                      # overlapping
])
def test_a_setting_is_recommended_only_when_it_beats_ce_beyond_noise(case, expected):
    from crl.tune.output import markdown, status

    r = _result(**case)
    state, words = status(r)
    assert state == expected
    assert words.startswith("recommended: trial 7") == (expected == "recommended")
    if expected != "recommended":
        assert words.startswith("no setting beats ce within the budget")
        assert "recommended" not in words
    if expected == "no gain":
        assert "trial 7" in words
    r.meta.update(command="crl tune", machine="m", date="d", seconds={"run": 1, "total": 1})
    r.meta["setup"]["objective"] = "auc"
    section = "\n".join(markdown(r)).split("## Recommendation")[1].split("\n##")[0]
    body = section.split("\n", 1)[1]               # below its heading
    assert words[1:] in body
    assert ("recommended" in body.lower()) == (expected == "recommended")


@pytest.mark.parametrize("change_ci, label", [((-0.09, -0.01), "trial 7: recommended"),
                                              ((-0.09, 0.01), ("trial 7: best within the budget, "
                                                               "within noise on fresh seeds"))])
def test_pareto_png_labels_trials_by_their_numbers(change_ci, label, tmp_path, monkeypatch):
    """The front's points carry the trial numbers of tune.md and tune.json, and the marked
    trial is called recommended only when it is."""
    import matplotlib.axes

    from crl.tune.output import plot_front

    p = _point(0.9, 0.60)
    r = _result((7, p), change_ci=change_ci)
    r.trials = [{"number": 7, "state": "COMPLETE", "point": p.to_dict()}]
    r.front = [7]
    r.meta["setup"]["recipe"] = {"seeds": [0]}
    notes, labels = [], []
    real_annotate, real_legend = matplotlib.axes.Axes.annotate, matplotlib.axes.Axes.legend
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda ax, text, *a, **k: notes.append(text) or real_annotate(
                            ax, text, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda ax, *a, **k: labels.extend(
        ax.get_legend_handles_labels()[1]) or real_legend(ax, *a, **k))
    plot_front(tmp_path / "pareto.png", r)
    assert notes == ["7"] and label in labels
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
