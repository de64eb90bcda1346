"""End-to-end `crl audit` on a tiny digits run, and every bad input the CLI must refuse."""
import json
import subprocess
import sys
import tarfile

import pytest

from crl.cli import main

TINY = ["--epochs", "3", "--subset", "200", "--seeds", "0", "--quiet", "--shadows", "2",
        "--references", "8"]


def _run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_audit_end_to_end_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = _run(["audit", *TINY, "--attacks", "loss,mentr,gradx,nn,lira,rmia",
                            "--out", str(out)], capsys)
    assert code == 0
    assert "| ce |" in stdout and "| crl |" in stdout        # default defenses: ce, crl
    rows = json.loads((out / "results.json").read_text())
    assert [r["defense"] for r in rows] == ["ce", "crl"]
    assert rows[1]["params"]["lam"] > 0
    row = rows[0]
    keys = ("dataset", "model", "defense", "params", "seed", "train_acc", "test_acc", "attacks")
    for key in keys:
        assert key in row
    assert set(row["attacks"]) == {"loss", "mentr", "gradx", "nn", "lira", "rmia"}
    for name, m in row["attacks"].items():
        assert 0.0 <= m["auc"] <= 1.0 and "tpr_at_1pct_fpr" in m and "tpr_at_0.1pct_fpr" in m
        if name in ("loss", "mentr", "gradx"):
            assert "shadow_threshold_accuracy" in m
    assert 0.0 <= row["attacks"]["lira"]["leave_one_out"]["auc"] <= 1.0
    rmia = row["attacks"]["rmia"]     # 8 references are too few for RMIA's leave-one-out
    assert "leave_one_out" in rmia or "needs 4 OUT reference models" in rmia["loo_skipped"]
    for f in ("config.yaml", "version.json", "report.md", "splits/seed0.json",
              "figures/margins.png", "figures/roc.png", "vulnerability/ce_seed0.csv",
              "vulnerability/crl_seed0.csv", "models/ce/seed0/metrics.jsonl",
              "models/ce/seed0/model.pt", "models/crl/seed0/model.pt"):
        assert (out / f).is_file(), f
    split = json.loads((out / "splits" / "seed0.json").read_text())
    assert not set(split["target_members"]) & set(split["target_nonmembers"])
    report = (out / "report.md").read_text()
    assert "| Defense | Train acc % | Test acc % |" in report
    assert "per target 8 reference models, 2 shadow models." in report
    assert "lira, rmia: the target and reference models" in report


def test_second_audit_reuses_cached_models_and_still_writes_metrics(tmp_path, capsys):
    args = ["audit", *TINY, "--attacks", "loss", "--defenses", "ce"]
    assert _run([*args, "--out", str(tmp_path / "a")], capsys)[0] == 0
    first = json.loads((tmp_path / "a" / "results.json").read_text())
    assert _run([*args, "--out", str(tmp_path / "b")], capsys)[0] == 0
    second = json.loads((tmp_path / "b" / "results.json").read_text())
    from crl.models.io import load_model_file

    for run in ("a", "b"):   # trained, then from the cache: the released file has no member ids
        _, _, extra = load_model_file(tmp_path / run / "models" / "ce" / "seed0" / "model.pt")
        assert not {"trained_on", "groups"} & set(extra) and len(extra["class_names"]) == 10
    assert first[0]["attacks"]["loss"] == {**second[0]["attacks"]["loss"],
                                           "seconds": first[0]["attacks"]["loss"]["seconds"]}
    assert (tmp_path / "b" / "models" / "ce" / "seed0" / "metrics.jsonl").read_text() == \
        (tmp_path / "a" / "models" / "ce" / "seed0" / "metrics.jsonl").read_text()
    assert not (tmp_path / "b" / "models" / "ce" / "seed0" / "checkpoint.pt").exists()


def test_yaml_recipe_and_set(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2\nsubset: 200\nseeds: [1]\nattacks: loss\nshadows: 0\n"
                      "quiet: true\n".replace("quiet: true\n", "progress: false\n"))
    out = tmp_path / "run"
    args = ["audit", "--config", str(recipe), "--epochs", "1", "--out", str(out)]
    code, _, _ = _run(args, capsys)
    assert code == 0
    cfg = (out / "config.yaml").read_text()
    assert "epochs: 1" in cfg and "subset: 200" in cfg      # the flag overrides the recipe
    assert json.loads((out / "results.json").read_text())[0]["seed"] == 1


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'; expected one of: cifar10, cifar100, digits"),
    (["--model", "vit"], "unknown model 'vit'; expected one of:"),
    (["--defenses", "magic"], "unknown defense 'magic'; expected one of:"),
    (["--attacks", "loss,oracle"], "unknown attack 'oracle'; expected one of:"),
    (["--epochs", "0"], "epochs = 0: expected an integer >= 1"),
    (["--epochs", "1.5"], "epochs = 1.5: expected an integer >= 1"),
    (["--batch-size", "-1"], "batch_size = -1: expected an integer >= 1"),
    (["--lr", "0"], "lr = 0: expected a number > 0"),
    (["--lr", "nan"], "lr = nan: expected a number > 0"),
    (["--lr", "inf"], "lr = inf: expected a number > 0"),
    (["--lr", "fast"], "lr = 'fast': expected a number > 0"),
    (["--milestones", "abc"], "milestones = ['abc']: expected a list of positive integers"),
    (["--device", "gpu"], "device = 'gpu': expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "device = 'cuda:x': expected auto, cpu, cuda or cuda:N"),
    (["--shadow-defense", "some"], "shadow_defense = 'some': expected one of: same, none"),
    (["--seeds", "a"], "seeds = ['a']: expected a non-empty list of distinct integers >= 0"),
    (["--defenses", ","], "defenses = []: expected a non-empty list of distinct defense names"),
    (["--subset", "3"], "subset N=3"),
    (["--subset", "100000"], "subset N=100000"),
    (["--dataset", "cifar10"], "cifar10 needs --data-root"),
    (["--set", "ce.alpha=1"], "ce.alpha: unknown parameter"),
    (["--set", "zzz.alpha=1"], "'zzz', which is neither a defense nor an attack"),
    (["--set", "noequals"], "expected NAME.PARAM=VALUE"),
    (["--attacks", "nn", "--shadows", "0"], "attack 'nn' needs at least 1 shadow"),
    (["--seeds", "0,0"], "seeds = [0, 0]: expected a non-empty list of distinct integers"),
    (["--attacks", "rmia", "--references", "3"], "attack 'rmia' needs at least 4 reference"),
    (["--attacks", "lira", "--references", "3"], "attack 'lira' needs at least 4 reference"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code, _, err = _run(["audit", *args, "--quiet", "--out", str(out)], capsys)
    assert code == 2
    assert message in err
    assert err.startswith("crl: error:") and err.count("\n") == 1
    assert not out.exists()


def test_bad_archive_and_missing_config(tmp_path, capsys):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        src = tmp_path / "x.txt"
        src.write_text("hi")
        tar.add(src, arcname="../x.txt")
    code, _, err = _run(["audit", "--dataset", f"imagefolder:{bad}", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and "../x.txt" in err and not (tmp_path / "o").exists()
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    code, _, err = _run(["audit", "--dataset", f"imagefolder:{corrupt}"], capsys)
    assert code == 2 and "corrupt.tar.gz" in err
    code, _, err = _run(["audit", "--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "no such file" in err


def test_console_script_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "crl.cli", "audit", "--model", "nope", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("crl: error: unknown model 'nope'")


def test_list(capsys):
    from crl.core.registry import DEFENSES

    code, out, _ = _run(["list"], capsys)
    assert code == 0 and "digits" in out and "ce" in out and "loss" in out
    for name in DEFENSES.names():
        assert f"\n  {name} (engine: " in out
        for p in DEFENSES.get(name).spec:
            assert p.describe() in out


def test_list_shows_parameters_and_engine_of_each_component():
    from crl.cli import IMAGEFOLDER_WORDS, list_lines
    from crl.core.params import Param, ParamSpec
    from crl.core.registry import Registry

    defenses, attacks, datasets = Registry("defense"), Registry("attack"), Registry("dataset")
    alpha = Param("alpha", 0.5, low=0, search=(0.1, 1.0, "linear"), help="relaxation level")
    defenses.register("slow")(type("Slow", (), {"spec": ParamSpec(alpha), "batchable": False}))
    defenses.register("plain")(type("Plain", (), {"spec": ParamSpec()}))
    attacks.register("old")(type("Old", (), {}))             # not ported to a spec yet
    datasets.register("toy")(object())
    assert list_lines([datasets, defenses, attacks]) == [
        "datasets: toy, imagefolder:PATH",
        "  toy",
        "  imagefolder:PATH",
        f"    {IMAGEFOLDER_WORDS}",
        "defenses:",
        "  plain (engine: ensemble; no parameters)",
        "  slow (engine: sequential)",
        "      alpha = 0.5 (a number >= 0) [tune 0.1..1.0 linear] - relaxation level",
        "attacks:",
        "  old",
    ]


def test_set_outside_the_run_warns_and_the_audit_runs(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _run(["audit", "--defenses", "ce", "--attacks", "loss", "--epochs", "2.0",
                         "--subset", "200", "--seeds", "0", "--shadows", "0", "--quiet",
                         "--set", "relaxloss.alpha=0.05", "--out", str(out)], capsys)
    assert code == 0
    assert err.count("crl: warning: --set relaxloss.alpha: relaxloss is not among "
                     "--defenses/--attacks of this run; ignored") == 1
    assert "epochs: 2\n" in (out / "config.yaml").read_text()


def test_dataset_defaults_fill_only_what_the_user_left_unset():
    from crl.config import AuditConfig

    cfg = AuditConfig(set={"crl": {"lam": 0.5}}).resolved()
    assert (cfg.model, cfg.subset, cfg.epochs) == ("mlp", 400, 60)
    assert cfg.set["crl"]["lam"] == 0.5
    cfg = AuditConfig(dataset="cifar10", epochs=3).resolved()
    assert (cfg.model, cfg.epochs, cfg.subset) == ("cnn", 3, None)
