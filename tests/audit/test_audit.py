"""The staged audit's trust guarantees: membership ground truth, recomputable numbers, fresh
and verified caches, resumable-only-into-the-same-run checkpoints, models that did not learn."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import crl
from crl.audit import DefenseChoice, ModelCache, ModelFactory, ModelJob
from crl.cli import main
from crl.core.utils import source_hash
from crl.data.datasets import load_dataset
from crl.training.recipe import Recipe

TINY = ["--epochs", "3", "--subset", "200", "--seeds", "0", "--quiet", "--shadows", "0"]


def _independent_scores(logits: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Plain-torch float64 threshold scores (higher = member), written from the formulas."""
    z = logits.double()
    logp = torch.log_softmax(z, 1)
    p = logp.exp()
    rows = torch.arange(len(y))
    py = p[rows, y]
    log1mp = torch.log1p(-p.clamp(max=1 - 1e-16))
    mentr = -(1 - py) * logp[rows, y] - (p * log1mp).sum(1) + (py * log1mp[rows, y])
    return {"loss": logp[rows, y].numpy(), "confidence": logp.max(1).values.numpy(),
            "entropy": (p * logp).sum(1).numpy(), "mentr": (-mentr).numpy()}


@pytest.mark.slow
def test_every_threshold_auc_recomputes_from_the_run_directory(tmp_path, capsys):
    """results.json = a recomputation from model.pt + members.json + the raw dataset, for
    defenses that hold members out (early_stopping, advreg, dmp) too."""
    out = tmp_path / "run"
    code = main(["audit", *TINY, "--defenses", "ce,early_stopping,advreg,dmp",
                 "--attacks", "loss,confidence,entropy,mentr", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    split = json.loads((out / "splits" / "seed0.json").read_text())
    data = load_dataset("digits")
    for row in rows:
        folder = out / "models" / row["defense"] / "seed0"
        members = json.loads((folder / "members.json").read_text())
        assert set(members["members"]) <= set(split["target_members"])
        assert members["nonmembers"] == sorted(split["target_nonmembers"]) or \
            set(members["nonmembers"]) == set(split["target_nonmembers"])
        assert row["n_members"] == len(members["members"])
        if row["defense"] == "ce":
            assert row["n_members"] == len(split["target_members"])
        else:   # a held-out share of the members is not counted as members
            assert row["n_members"] < len(split["target_members"])
        model = crl.load_model(folder / "model.pt")
        idx = torch.as_tensor(members["members"] + members["nonmembers"])
        with torch.no_grad():
            logits = model(data.x[idx].float() / 255)
        truth = np.r_[np.ones(len(members["members"])), np.zeros(len(members["nonmembers"]))]
        for name, scores in _independent_scores(logits, data.y[idx]).items():
            assert roc_auc_score(truth, scores) == pytest.approx(
                row["attacks"][name]["auc"], abs=2e-3), (row["defense"], name)
        # the loaded model's logits are the audit's: the stored per-sample loss scores match
        from crl.audit.outcome import load_outcome

        saved = load_outcome(out / "scores" / f"{row['defense']}_seed0.npz")
        where = {int(i): k for k, i in enumerate(saved.evaluation.sample_idx)}
        stored = saved.attacks["loss"].scores[[where[int(i)] for i in idx]]
        mine = torch.log_softmax(logits.double(), 1)[torch.arange(len(idx)), data.y[idx]]
        np.testing.assert_allclose(stored, mine.numpy(), rtol=1e-5, atol=1e-5)
        acc = float((logits[: len(members["members"])].argmax(1) ==
                     data.y[idx[: len(members["members"])]]).float().mean())
        assert acc == pytest.approx(row["train_acc"], abs=1e-6)
    dmp = next(r for r in rows if r["defense"] == "dmp")
    assert "auc" in dmp["attacks"]["loss"]["teacher_only"]


def test_chance_level_target_is_named_loudly(tmp_path, capsys, image_folder):
    """Pure-noise images with random labels: nothing to learn, so the audit says so."""
    root = image_folder(tmp_path / "noise", {"train": 30, "test": 10}, classes=4)
    out = tmp_path / "run"
    code = main(["audit", "--dataset", f"imagefolder:{root}", "--model", "mlp", "--epochs", "3",
                 "--seeds", "0", "--quiet", "--shadows", "0", "--defenses", "ce",
                 "--attacks", "loss", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "target at chance: this audit measures nothing" in captured.out
    report = (out / "report.md").read_text()
    assert report.index("target at chance") < report.index("## Attack AUC")
    assert "target at chance" in json.loads((out / "results.json").read_text())[0]["warning"]


def _factory(digits, root):
    return ModelFactory(digits, "mlp", Recipe(epochs=1, batch_size=32, lr=0.05),
                        ModelCache(root), progress=False)


def _entry(factory, job):
    return factory.cache.path(factory.key(job, Recipe(epochs=1, batch_size=32, lr=0.05,
                                                      seed=job.seed)))


def _job(digits):
    return ModelJob("target", 0, 7, DefenseChoice("ce"), np.arange(0, 120))


def test_cache_serves_only_verified_entries_of_the_same_code(digits, tmp_path, monkeypatch, capsys):
    factory = _factory(digits, tmp_path / "cache")
    first = factory.get(_job(digits))
    assert not first.from_cache
    again = factory.get(_job(digits))
    assert again.from_cache
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    # a changed source (another code hash) retrains
    monkeypatch.setattr("crl.audit.factory.code_hash", lambda: "0.1.0+edited")
    assert not factory.get(_job(digits)).from_cache
    monkeypatch.undo()
    # a flipped byte in the entry: warned about, retrained, never served
    entry = _entry(factory, _job(digits))
    raw = bytearray(entry.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    entry.write_bytes(bytes(raw))
    assert not factory.get(_job(digits)).from_cache
    err = capsys.readouterr().err
    assert err.startswith("crl: warning: ignoring a bad model-cache entry") and err.count("\n") == 1


def test_a_valid_entry_copied_over_another_key_is_not_served(digits, tmp_path, capsys):
    factory = _factory(digits, tmp_path / "cache")
    job_a = _job(digits)
    job_b = ModelJob("target", 0, 7, DefenseChoice("ce"), np.arange(200, 320))
    factory.get(job_a)
    shutil.copy(_entry(factory, job_a), _entry(factory, job_b))
    served = factory.get(job_b)
    err = capsys.readouterr().err
    assert err.startswith("crl: warning: ignoring a bad model-cache entry") and "another key" in err
    assert not served.from_cache and served.trained_on.tolist() == list(range(200, 320))


def test_source_hash_changes_when_any_source_file_changes(tmp_path):
    pkg = tmp_path / "crl"
    shutil.copytree(Path(crl.__file__).parent, pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    before = source_hash(pkg)
    loss = pkg / "losses" / "crl.py"
    loss.write_text(loss.read_text() + "\n# edited\n")
    assert source_hash(pkg) != before


def test_resume_refuses_another_split_or_architecture(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["audit", *TINY, "--defenses", "ce", "--attacks", "loss", "--no-cache",
            "--out", str(out)]
    assert main(base) == 0
    assert (out / "models" / "ce" / "seed0" / "checkpoint.pt").is_file()
    capsys.readouterr()
    code = main([*base, "--resume", "--subset", "202"])
    assert code == 2
    assert "cannot resume" in capsys.readouterr().err
    code = main([*base, "--resume", "--model", "cnn"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resume" in err and "Traceback" not in err


def test_a_tampered_checkpoint_is_an_error_naming_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["audit", *TINY, "--defenses", "ce", "--attacks", "loss", "--no-cache",
            "--out", str(out)]
    assert main(base) == 0
    ckpt = out / "models" / "ce" / "seed0" / "checkpoint.pt"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main([*base, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and len(err.strip().splitlines()) == 1


def test_plan_seeds_are_named_streams():
    from crl.audit.plan import plan_models, reference_halves
    from crl.data.splits import make_pool_split

    labels = np.repeat(np.arange(4), 50)
    split = make_pool_split(labels, seed=3)
    jobs4 = plan_models(split, labels, 0, DefenseChoice("ce"), DefenseChoice("ce"),
                        references=4, shadows=2)
    jobs6 = plan_models(split, labels, 0, DefenseChoice("ce"), DefenseChoice("ce"),
                        references=6, shadows=2)
    seeds4 = {(j.role, j.index): (j.seed, tuple(j.train_idx)) for j in jobs4}
    seeds6 = {(j.role, j.index): (j.seed, tuple(j.train_idx)) for j in jobs6}
    assert all(seeds6[k] == v for k, v in seeds4.items())     # adding models shifts nothing
    assert len({s for s, _ in seeds6.values()}) == len(seeds6)  # no two models share a seed
    halves = reference_halves(len(split.target_pool), 6, seed=0)
    assert (halves.sum(0) == 3).all()                           # IN for exactly half


def test_a_locked_run_directory_refuses_a_second_audit_and_stale_tmp_files_go(tmp_path, capsys):
    from crl.rundir import RunLock

    out = tmp_path / "run"
    args = ["audit", *TINY, "--defenses", "ce", "--attacks", "loss", "--out", str(out)]
    with RunLock(out):
        assert main(args) == 2
        assert "is in use by another crl process" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    stale = out / "figures" / ".roc.png.x1y2.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    assert main(args) == 0
    assert not stale.exists() and (out / "figures" / "roc.png").is_file()


def test_saved_outcomes_rebuild_the_same_report(tmp_path, capsys):
    from crl.audit.outcome import load_outcome
    from crl.config import AuditConfig
    from crl.report import write_report

    out = tmp_path / "run"
    assert main(["audit", *TINY, "--defenses", "ce,crl", "--attacks", "loss,mentr",
                 "--out", str(out)]) == 0
    outcomes = [load_outcome(p) for p in sorted((out / "scores").glob("*.npz"))]
    assert [o.defense for o in outcomes] == ["ce", "crl"]
    # no attack here uses reference models, so none were trained (not --references' 64)
    assert ("Models trained by crl: 3 epochs, batch 32, lr 0.05; per target no reference "
            "models, no shadow models. Models each attack used: loss, mentr: the target "
            "alone.") in (out / "report.md").read_text()
    rows = json.loads((out / "results.json").read_text())
    assert [json.loads(json.dumps(o.row())) for o in outcomes] == rows
    cfg = AuditConfig(**__import__("yaml").safe_load((out / "config.yaml").read_text()))
    again = tmp_path / "again"
    again.mkdir()
    write_report(again, outcomes, cfg)
    assert (again / "report.md").read_text() == (out / "report.md").read_text()


@pytest.mark.parametrize("used, expected", [
    ({"references": 1, "shadows": 1, "attacks": {"nn": ["target", "shadows"]}},
     ("per target 1 reference model, 1 shadow model. Models each attack used: nn: the target "
      "and shadow models")),
    ({"references": 8, "shadows": 3, "attacks": {"loss": ["target"], "lira": [
        "target", "references"], "mentr": ["target", "references (pooled rows)", "shadows"]}},
     ("per target 8 reference models, 3 shadow models. Models each attack used: loss: the "
      "target alone; lira: the target and reference models; mentr: the target, reference "
      "models (pooled rows only) and shadow models")),
    ({"references": 0, "shadows": 0, "attacks": {"loss": ["target"]}},
     ("per target no reference models, no shadow models. Models each attack used: loss: the "
      "target alone")),
])
def test_the_report_header_names_the_models_each_attack_used(used, expected):
    from types import SimpleNamespace

    from crl.report.tables import _models_line

    outcome = SimpleNamespace(models_used={"trained_by": "Models trained by X", **used})
    assert _models_line([outcome]) == f"Models trained by X; {expected}"
    legacy = SimpleNamespace(models_used=None)
    assert "not recorded" in _models_line([outcome, legacy])
