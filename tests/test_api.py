"""crl.audit_training (the caller's own training code, audited like `crl audit`) and
crl.attack_signals (attacks on logits the caller already has)."""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import crl
from crl.cli import main
from crl.core.errors import CRLError
from crl.core.integrity import load_verified
from crl.core.seeding import seed_for

README = Path(__file__).resolve().parents[1] / "README.md"
ATTACKS = ("loss", "mentr", "gradx", "lira", "rmia")
PARAMS = {"rmia": {"num_refs": 1}, "lira": {"flip": True}}   # 4 references suffice for both


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


class Recorder:
    """A plain-torch train_fn (full-batch Adam) that remembers every call."""

    def __init__(self, steps: int = 60) -> None:
        self.steps, self.calls = steps, []

    def __call__(self, x_train, y_train, seed):
        self.calls.append((x_train.clone(), y_train.clone(), seed))
        np.random.seed(seed)                  # user code seeds numpy: the seed fits 32 bits
        model = _mlp(seed)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(self.steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x_train), y_train).backward()
            opt.step()
        return model


@pytest.fixture(scope="module")
def user_run(digits, tmp_path_factory):
    """One audit of a recorded train_fn on digits images (4-D floats in [0, 1])."""
    x, y = digits.x.float() / 255, digits.y
    fn = Recorder()
    out = tmp_path_factory.mktemp("user") / "run"
    result = crl.audit_training(fn, x, y, attacks=ATTACKS, references=4, seeds=(0,), out=out,
                                subset=400, params=PARAMS, progress=False)
    return {"x": x, "y": y, "fn": fn, "out": out, "result": result}


def _keys(row: dict) -> set[str]:
    return {k for k in row if k != "warning"}


def test_rows_have_the_audits_schema(user_run, tmp_path, capsys):
    ref = tmp_path / "audit"
    assert main(["audit", "--epochs", "2", "--subset", "200", "--seeds", "0", "--quiet",
                 "--shadows", "0", "--references", "4", "--defenses", "ce", "--attacks",
                 ",".join(ATTACKS), "--set", "rmia.num_refs=1", "--set", "lira.flip=true",
                 "--no-cache", "--out", str(ref)]) == 0, capsys.readouterr().err
    audit_row = json.loads((ref / "results.json").read_text())[0]
    rows = json.loads((user_run["out"] / "results.json").read_text())
    assert rows == json.loads(json.dumps(user_run["result"]["rows"]))
    row = rows[0]
    assert _keys(row) == _keys(audit_row)
    assert row["defense"] == "user" and row["model"] == "Sequential" and row["n_held_out"] == 0
    for name in ATTACKS:
        assert set(row["attacks"][name]) == set(audit_row["attacks"][name]), name
    for name in ("lira", "rmia"):   # pooled leave-one-out, or why a model lacked references
        assert "leave_one_out" in row["attacks"][name] or "loo_skipped" in row["attacks"][name]
    assert row["attacks"]["lira"]["flip"] is True
    report = (user_run["out"] / "report.md").read_text()
    assert "caller's own code" in report and "| user |" in report


def test_member_lists_are_what_train_fn_received(user_run):
    x, y, out = user_run["x"], user_run["y"], user_run["out"]
    calls = user_run["fn"].calls
    assert len(calls) == 5                                   # the target and 4 references
    folder = out / "models" / "user" / "seed0"
    members = json.loads((folder / "members.json").read_text())
    split = json.loads((out / "splits" / "seed0.json").read_text())
    assert members["members"] == split["target_members"]
    assert members["nonmembers"] == split["target_nonmembers"]
    x0, y0, s0 = calls[0]
    assert torch.equal(x0, x[members["members"]]) and torch.equal(y0, y[members["members"]])
    assert s0 == seed_for(0, "target") & 0xFFFFFFFF           # the planned seed, in 32 bits
    pool = np.sort(np.r_[split["target_members"], split["target_nonmembers"]])
    ins = np.zeros(len(pool), int)
    for j, (xj, yj, sj) in enumerate(calls[1:]):
        saved = load_verified(folder / f"reference{j}.pt")
        idx = saved["train_idx"].numpy()
        assert sj == seed_for(0, "reference", j) & 0xFFFFFFFF == saved["seed"]
        assert torch.equal(xj, x[idx]) and torch.equal(yj, y[idx])
        ins += np.isin(pool, idx)
    assert (ins == 2).all()                                  # each pool sample IN for half
    target = load_verified(folder / "target.pt")
    model = _mlp(0)
    model.load_state_dict(target["state_dict"])              # a state dict, not a pickled module
    with torch.no_grad():
        mine = model.eval()(x[pool]).numpy()
    with np.load(out / "logits" / "seed0.npz") as z:
        np.testing.assert_allclose(z["target_logits"][0], mine, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(z["target_idx"], pool)


def test_attack_signals_reproduces_the_audit_from_its_saved_logits(user_run):
    row = json.loads((user_run["out"] / "results.json").read_text())[0]
    with np.load(user_run["out"] / "logits" / "seed0.npz") as z:
        saved = {k: z[k] for k in z.files}
    logit_attacks = ["loss", "mentr", "rmia"]
    got = crl.attack_signals(
        torch.from_numpy(saved["target_logits"]), saved["target_labels"], saved["target_member"],
        attack=logit_attacks, population_logits=saved["population_logits"],
        population_labels=saved["population_labels"], params={"rmia": {"num_refs": 1}}, seed=0)
    for name in logit_attacks:
        mine = json.loads(json.dumps(got[name]))
        theirs = row["attacks"][name]
        mine.pop("seconds"), theirs.pop("seconds")
        # a skipped leave-one-out names a dataset index, which bare logits do not carry
        assert ("loo_skipped" in mine) == ("loo_skipped" in theirs), name
        mine.pop("loo_skipped", None), theirs.pop("loo_skipped", None)
        assert mine == theirs, name
    lira = crl.attack_signals(saved["target_logits"], saved["target_labels"],
                              saved["target_member"], attack="lira")["lira"]
    assert lira["flip"] is False and lira["num_references"] == 4 and 0.0 <= lira["auc"] <= 1.0


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    code = re.search(r"<!-- crl-audit-training-example.*?-->\n```python\n(.*?)```", text,
                     re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    row = scope["result"]["rows"][0]
    assert set(row["attacks"]) == {"loss", "lira"} and row["test_acc"] > 0.8
    printed = capsys.readouterr().out
    assert str(row["attacks"]["lira"]["auc"]) in printed
    # the verdict closes the output as crl audit's does: one training audited, so none, and why
    verdict = printed[printed.index("Verdict: none"):].splitlines()
    assert "only one training audited (user)" in " ".join(verdict)
    assert all(len(line) <= 100 for line in verdict)
    run = tmp_path / "runs" / "my-training"
    for name in ("results.json", "report.md", "logits/seed0.npz", "scores/user_seed0.npz",
                 "models/user/seed0/members.json", "models/user/seed0/reference7.pt"):
        assert (run / name).is_file(), name


def test_a_target_at_chance_is_named(digits):
    x, y = digits.x.float() / 255, digits.y
    with pytest.warns(RuntimeWarning, match="target at chance"):
        result = crl.audit_training(lambda xt, yt, seed: _mlp(seed), x, y, attacks=("loss",),
                                    subset=200, progress=False)
    assert "target at chance" in result["rows"][0]["warning"] and result["out"] is None


def test_no_verdict_without_a_run_directory_either(digits, capsys):
    x, y = digits.x.float() / 255, digits.y
    with pytest.warns(RuntimeWarning):
        crl.audit_training(lambda xt, yt, seed: _mlp(seed), x, y, attacks=("loss",),
                           subset=200, bootstrap=50)
    assert "Verdict: none (only one training audited (user)" in capsys.readouterr().out


def _digits_xy(digits):
    return digits.x.float() / 255, digits.y


BAD_AUDITS = [
    ({"x": "ints"}, r"audit_training\.x = torch\.int64 tensor"),
    ({"x": "nan"}, r"audit_training\.x holds NaN"),
    ({"y": "float"}, r"audit_training\.y = torch\.float32 tensor"),
    ({"y": "short"}, r"audit_training\.y = .*: expected an int64 tensor of 1797 class ids"),
    ({"num_classes": 5}, r"audit_training\.num_classes = 5: expected an integer >= 2"),
    ({"train_fn": 3}, r"audit_training\.train_fn = int: expected a function"),
    ({"train_fn": "none"}, r"train_fn\(x_train, y_train, seed\) for the target = NoneType"),
    ({"train_fn": "wide"}, r"model\(x\) of Sequential = .*\[100, 12\]: expected finite logits"),
    ({"attacks": ("loss", "nope")}, r"unknown attack 'nope'"),
    ({"attacks": ("lira",), "references": 2}, r"references = 2: attack 'lira' needs at least 4"),
    ({"attacks": ("nn",)}, r"shadows = 0: attack 'nn' needs at least 1 shadow model"),
    ({"attacks": ("loss",), "params": {"lira": {}}}, r"audit_training\.params = \{'lira'"),
    ({"attacks": ("lira",), "params": {"lira": {"flip": True}}, "x": "flat"},
     r"audit_training\.x = .*expected images"),
    ({"seeds": ()}, r"seeds = \[\]: expected a non-empty list"),
    ({"attacks": ("augment",)}, r"attack 'augment' queries the models on inputs it builds"),
    ({"claimed_epsilon": -1.0}, r"audit_training\.claimed_epsilon = -1\.0: expected a finite"),
    ({"canaries": "7:ghosts"}, r"canaries = '7:ghosts': expected N or N:KIND"),
    ({"batch_size": 0}, r"audit_training\.batch_size = 0: expected an integer >= 1"),
]


@pytest.mark.parametrize("change,message", BAD_AUDITS)
def test_bad_audit_inputs_are_one_line_errors(digits, change, message, tmp_path):
    x, y = _digits_xy(digits)
    fn = {3: 3, "none": lambda *a: None,
          "wide": lambda xt, yt, s: torch.nn.Sequential(torch.nn.Flatten(),
                                                        torch.nn.Linear(64, 12))}
    kwargs = {"attacks": ("loss",), "subset": 200, "progress": False, "out": tmp_path / "run",
              **{k: v for k, v in change.items() if k not in ("x", "y", "train_fn")}}
    x = {"ints": x.long(), "nan": x.clone().fill_(float("nan")), "flat": x.flatten(1),
         None: x}[change.get("x")]
    y = {"float": y.float(), "short": y[:10], None: y}[change.get("y")]
    train_fn = fn.get(change.get("train_fn"), Recorder(steps=1))
    with pytest.raises(CRLError, match=message) as err:
        crl.audit_training(train_fn, x, y, **kwargs)
    assert "\n" not in str(err.value)
    if "train_fn" not in change:                             # refused before any training
        assert not (tmp_path / "run").exists()


def _logits(models=5, n=40, c=3, seed=0):
    rng = np.random.default_rng(seed)
    member = np.zeros((models, n), bool)
    member[:, : n // 2] = True
    for m in range(models):
        member[m] = rng.permutation(member[m])
    return rng.normal(size=(models, n, c)), rng.integers(0, c, n), member


BAD_SIGNALS = [
    ({"logits": "2d"}, r"attack_signals\.logits = float64 array of shape \[40, 3\]: expected"),
    ({"logits": "nan"}, r"attack_signals\.logits holds 1 NaN"),
    ({"labels": "big"}, r"attack_signals\.labels = .*: expected 40 integer class ids in \[0, 3\)"),
    ({"member": "shape"}, r"attack_signals\.member = bool array of shape \[5, 39\]"),
    ({"member": "all"}, r"attack_signals\.member\[0\] has 40 members of 40"),
    ({"attack": "gradx"}, r"attack_signals\.attack = 'gradx': needs the models' input grad"),
    ({"attack": "nn"}, r"attack_signals\.attack = 'nn': needs shadow models"),
    ({"attack": "rmia"}, r"attack_signals\.population_logits = None: attack 'rmia' needs"),
    ({"attack": "lira", "models": 3},
     r"attack_signals\.logits = 3 models: expected the target plus at least 4 reference"),
    ({"attack": "lira", "params": {"lira": {"flip": True}}}, r"needs logits on flipped inputs"),
    ({"attack": "rmia", "population": "classes"},
     r"attack_signals\.population_logits = float64 array of shape \[5, 10, 4\]"),
    ({"attack": "rmia", "population": "nolabels"}, r"attack_signals\.population_labels = None"),
]


@pytest.mark.parametrize("change,message", BAD_SIGNALS)
def test_bad_signal_inputs_are_one_line_errors(change, message):
    logits, labels, member = _logits(change.get("models", 5))
    logits = {"2d": logits[0], "nan": np.where(np.arange(logits.size).reshape(logits.shape) == 7,
                                               np.nan, logits), None: logits}[change.get("logits")]
    labels = {"big": labels + 3, None: labels}[change.get("labels")]
    member = {"shape": member[:, 1:], "all": np.ones_like(member), None: member}[
        change.get("member")]
    pop = {"classes": (np.zeros((5, 10, 4)), np.zeros(10, int)),
           "nolabels": (np.zeros((5, 10, 3)), None), None: (None, None)}[change.get("population")]
    with pytest.raises(CRLError, match=message) as err:
        crl.attack_signals(logits, labels, member, attack=change.get("attack", "loss"),
                           params=change.get("params"), population_logits=pop[0],
                           population_labels=pop[1])
    assert "\n" not in str(err.value)


SAME_ROWS_ATTACKS = ("loss", "confidence", "entropy", "mentr", "gradx", "lira", "rmia")


def test_crl_training_as_a_model_source_gives_the_rows_of_crl_audit(digits, tmp_path, capsys):
    """audit_training's path (the caller's data, a model source, query wrappers on x) and
    crl audit share every stage after training: with crl's own mlp training as the source,
    handed each planned model's seed, the rows are crl audit's."""
    from dataclasses import replace

    from crl.audit import DefenseChoice, ModelCache, ModelFactory
    from crl.audit.pipeline import recipe_of
    from crl.commands.audit_training import TrainFnSource, audit_source, user_config
    from crl.config import AuditConfig
    from crl.data.types import normalize

    flags = ["--model", "mlp", "--epochs", "2", "--subset", "200", "--seeds", "0", "--quiet",
             "--shadows", "0", "--references", "4", "--engine", "sequential", "--no-cache"]
    assert main(["audit", *flags, "--defenses", "ce", "--attacks", ",".join(SAME_ROWS_ATTACKS),
                 "--set", "rmia.num_refs=1", "--out", str(tmp_path / "audit")]) == 0
    audit_row = json.loads((tmp_path / "audit" / "results.json").read_text())[0]
    recipe = recipe_of(AuditConfig(dataset="digits", model="mlp", epochs=2).resolved())
    factory = ModelFactory(digits, "mlp", recipe, ModelCache(None), progress=False,
                           engine="sequential")

    class CrlTraining(TrainFnSource):
        def train(self, job):   # crl's training with the planned seed (all 63 bits)
            return factory.get(replace(job, defense=DefenseChoice("ce"))).model

    cfg = user_config(attacks=SAME_ROWS_ATTACKS, seeds=(0,), references=4, shadows=0,
                      bootstrap=200, subset=200, out=None, params={"rmia": {"num_refs": 1}},
                      canaries=None, progress=False)
    x = normalize(digits.x, digits.mean, digits.std)        # what crl's models take
    row = audit_source(lambda data: CrlTraining(_mlp, data), x, digits.y, cfg)["rows"][0]
    for key in ("train_acc", "test_acc", "n_members", "n_nonmembers", "n_held_out"):
        assert row[key] == audit_row[key], key
    for name in SAME_ROWS_ATTACKS:
        assert abs(row["attacks"][name]["auc"] - audit_row["attacks"][name]["auc"]) <= 1e-6, name
    for name in ("lira", "rmia"):      # pooled rows, or the same reason for skipping them
        mine, theirs = (r["attacks"][name].get("leave_one_out") for r in (row, audit_row))
        assert (mine is None) == (theirs is None), name
        assert mine is None or abs(mine["auc"] - theirs["auc"]) <= 1e-6, name
    assert row["models_used"]["attacks"] == audit_row["models_used"]["attacks"]
    assert row["models_used"]["references"] == 4


def test_canaries_and_a_false_claimed_epsilon_give_the_bound_and_the_warning(digits, tmp_path):
    """Issue 20: audit_training(canaries=, claimed_epsilon=) gives the user's own (DP)
    training crl audit's canaries (each in the target independently with probability 1/2),
    its epsilon lower bound and its loud warning when the bound exceeds the claim."""
    x, y = _digits_xy(digits)
    fn, out = Recorder(steps=150), tmp_path / "run"
    kwargs = {"attacks": ("loss",), "references": 2, "seeds": (0,), "subset": 400,
              "canaries": 60, "progress": False}
    with pytest.warns(RuntimeWarning, match="PRIVACY AUDIT FAILURE"):
        result = crl.audit_training(fn, x, y, out=out, claimed_epsilon=0.01, **kwargs)
    canaries = result["rows"][0]["canaries"]
    bound = canaries["epsilon_lower_bound"]
    assert canaries["n"] == 60 and bound["attack"] == "loss"
    assert bound["accountant_epsilon"] == 0.01 and "exceeds" in bound["warning"]
    assert bound["one_run"]["epsilon_lower_bound"] > 0.01
    assert "PRIVACY AUDIT FAILURE" in (out / "report.md").read_text()
    members = json.loads((out / "models" / "user" / "seed0" / "members.json").read_text())
    ids = json.loads((out / "canaries.json").read_text())["indices"]
    assert 0 < len(members["canaries"]) < 60 and set(members["canaries"]) < set(ids)
    got = fn.calls[0][0]                                     # the target's training rows
    assert len(got) == len(members["members"]) + len(members["canaries"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)       # an honest claim: no warning
        again = crl.audit_training(Recorder(steps=150), x, y, claimed_epsilon=1e3, **kwargs)
    assert again["rows"][0]["canaries"]["epsilon_lower_bound"]["warning"] is None
