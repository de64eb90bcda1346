"""The run directory as one record: one command and one config per directory, every file
checksummed in manifest.json, `crl report` refusing what does not match, and `--overwrite`."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import crl
from crl.cli import main
from crl.core.errors import CRLError
from crl.core.manifest import MANIFEST, read_manifest
from crl.report.rebuild import verify_run

QUICK = ["--epochs", "2", "--attacks", "loss", "--shadows", "0", "--seeds", "0", "--subset",
         "200", "--quiet", "--no-cache"]
AUDIT = ["audit", *QUICK, "--defenses", "ce,crl"]


def _listed(folder: Path) -> dict[str, str]:
    """What manifest.json must list: the snapshot without the manifest itself."""
    return {k: v for k, v in _snapshot(folder).items() if k != MANIFEST}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the lock aside) and the sha256 of its bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".crl-lock"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished audits of ce and crl that differ only in --epochs (read-only: copy them)."""
    root = tmp_path_factory.mktemp("manifest")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRL_CACHE", str(root / "cache"))
        for name, epochs in (("run", "2"), ("other", "3")):
            assert main([*AUDIT, "--epochs", epochs, "--out", str(root / name)]) == 0
    return root


def _copy(runs: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(runs / name, tmp_path / name)
    return tmp_path / name


def _report(run: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["report", str(run)])
    return code, capsys.readouterr().err


def test_the_manifest_checksums_every_file_under_the_configs_hash(runs):
    run = runs / "run"
    m = read_manifest(run)
    assert m["state"] == "complete" and m["command"] == "audit"
    files = {rel: e["sha256"] for rel, e in m["files"].items()}
    assert files == _listed(run)
    assert {"config.yaml", "results.json", "scores/ce_seed0.npz", "scores/crl_seed0.npz",
            "models/ce/seed0/model.pt", "splits/seed0.json"} <= set(files)
    assert m["config"]["epochs"] == 2 and "out" not in m["config"]
    assert m["config_sha256"] != read_manifest(runs / "other")["config_sha256"]


# --- crl report verifies the run against its manifest ------------------------------------------

def _other_defense(run: Path, other: Path) -> None:
    shutil.copy(run / "scores" / "ce_seed0.npz", run / "scores" / "crl_seed0.npz")


def _other_run(run: Path, other: Path) -> None:
    shutil.copy(other / "scores" / "crl_seed0.npz", run / "scores" / "crl_seed0.npz")


def _extra(run: Path, other: Path) -> None:
    shutil.copy(run / "scores" / "ce_seed0.npz", run / "scores" / "ce_seed1.npz")


def _truncated(run: Path, other: Path) -> None:
    path = run / "scores" / "ce_seed0.npz"
    path.write_bytes(path.read_bytes()[:1000])


def _results(run: Path, other: Path) -> None:
    shutil.copy(other / "results.json", run / "results.json")


def _config(run: Path, other: Path) -> None:
    shutil.copy(other / "config.yaml", run / "config.yaml")


def _missing(run: Path, other: Path) -> None:
    (run / "models" / "ce" / "seed0" / "members.json").unlink()


@pytest.mark.parametrize("tamper, message", [
    (_other_defense, "scores/crl_seed0.npz changed after the run wrote it"),
    (_other_run, "scores/crl_seed0.npz changed after the run wrote it"),
    (_extra, "scores/ce_seed1.npz is not a file of this run"),
    (_truncated, "scores/ce_seed0.npz changed after the run wrote it"),
    (_config, "config.yaml is not the config this run was written with"),
    (_missing, "models/ce/seed0/members.json is missing"),
])
def test_crl_report_refuses_a_run_that_does_not_match_its_manifest(runs, tmp_path, capsys,
                                                                   tamper, message):
    run = _copy(runs, tmp_path)
    tamper(run, runs / "other")
    before = _snapshot(run)
    code, err = _report(run, capsys)
    assert code == 2 and err.startswith(f"crl: error: report.run = '{run}': ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before                      # nothing rewritten


@pytest.mark.parametrize("tamper, message", [
    (_other_defense, ("scores file scores/crl_seed0.npz holds the scores of ce seed 0; expected "
                      "crl seed 0")),
    (_truncated, "scores file scores/ce_seed0.npz is unreadable (BadZipFile)"),
])
def test_a_run_without_manifest_is_not_verified_and_its_scores_still_checked(runs, tmp_path,
                                                                            capsys, tamper,
                                                                            message):
    run = _copy(runs, tmp_path)
    (run / MANIFEST).unlink()
    capsys.readouterr()
    crl.report.load_run(run)                              # what crl report renders
    assert capsys.readouterr().err.count("not verified (no manifest)") == 1
    assert not (run / MANIFEST).exists()                 # never blessed after the fact
    tamper(run, runs / "other")
    code, err = _report(run, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("crl: error:") == 1


def test_rebuilding_the_report_updates_the_manifest_for_what_it_rewrites(runs, tmp_path, capsys):
    """The report's own files are rewritten from the verified scores, whatever they held (a
    results.json of another run is not left in place), and the manifest lists them anew."""
    run = _copy(runs, tmp_path)
    _results(run, runs / "other")
    (run / "report.md").write_text("an older report")
    shutil.rmtree(run / "figures")
    assert _report(run, capsys)[0] == 0
    for name in ("report.md", "results.json"):
        assert (run / name).read_text() == (runs / "run" / name).read_text()
    files = {rel: e["sha256"] for rel, e in read_manifest(run)["files"].items()}
    assert files == _listed(run)
    assert verify_run(run) is not None                    # verifies again after the rebuild


# --- one run per directory -----------------------------------------------------------------------

def test_a_killed_new_audit_never_leaves_the_old_scores_to_report(runs, tmp_path, capsys,
                                                                  monkeypatch):
    """Was: the new config's config.yaml over the old run's scores/, rendered by crl report."""
    run = _copy(runs, tmp_path)
    before = _snapshot(run)

    monkeypatch.setattr(crl.report, "write_report", _killed)
    capsys.readouterr()
    assert main([*AUDIT, "--epochs", "3", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds a crl audit run of another config (epochs = 3 here, 2 there)" in err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before
    assert main([*AUDIT, "--epochs", "3", "--overwrite", "--out", str(run)]) == 130
    assert read_manifest(run)["state"] == "running" and not (run / "results.json").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 3
    assert _snapshot(run)["scores/ce_seed0.npz"] != before["scores/ce_seed0.npz"]
    code, err = _report(run, capsys)
    assert code == 2 and "unfinished run (killed, or still running)" in err


def _killed(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_an_interrupted_run_is_refused_by_report_and_resumes_to_the_same_results(
        runs, tmp_path, capsys, monkeypatch):
    """A kill after training: the run is unfinished for crl report; a refused --resume (another
    --subset or --lr) changes nothing; --resume with its config ends as an uninterrupted run."""
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(crl.report, "write_report", _killed)
        assert main([*AUDIT, "--out", str(out)]) == 130
    code, err = _report(out, capsys)
    assert code == 2 and "unfinished" in err and "--resume" in err
    before = _snapshot(out)
    for changed in (["--subset", "202"], ["--lr", "0.1"]):
        assert main([*AUDIT, *changed, "--resume", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("crl: error: cannot resume: ") and len(err.splitlines()) == 1
        assert _snapshot(out) == before                   # config.yaml and splits/ untouched
    assert main([*AUDIT, "--resume", "--out", str(out)]) == 0
    assert _untimed(out / "results.json") == _untimed(runs / "run" / "results.json")
    assert verify_run(out)["state"] == "complete"


def _untimed(path: Path) -> object:
    """results.json without its wall times."""
    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if "seconds" not in k}
        return [strip(x) for x in v] if isinstance(v, list) else v

    return strip(json.loads(path.read_text()))


def test_overwrite_replaces_the_old_run_whole(runs, tmp_path, capsys):
    run = _copy(runs, tmp_path)
    args = ["audit", *QUICK, "--defenses", "ce", "--out", str(run)]
    assert main(args) == 2                                # another config (defenses)
    assert main([*args, "--overwrite"]) == 0
    assert not (run / "scores" / "crl_seed0.npz").exists()
    assert not (run / "models" / "crl").exists()
    assert not [p for p in (run / "vulnerability").iterdir() if "crl" in p.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]     # no old run left beside it
    assert set(read_manifest(run)["files"]) == set(_listed(run))
    assert _report(run, capsys)[0] == 0


def test_crl_train_never_writes_into_an_audit_and_keeps_one_run(runs, tmp_path, capsys):
    """Was: crl train --out <a finished audit> overwrote the audit's config.yaml."""
    audit = _copy(runs, tmp_path)
    before = _snapshot(audit)
    train = ["train", "--epochs", "2", "--quiet", "--no-cache", "--defense", "ce"]
    capsys.readouterr()
    assert main([*train, "--out", str(audit)]) == 2
    err = capsys.readouterr().err
    assert "holds a crl audit run; crl train writes its own run directory" in err
    assert _snapshot(audit) == before
    out = tmp_path / "train"
    assert main([*train, "--out", str(out)]) == 0
    first = _snapshot(out)
    assert read_manifest(out)["command"] == "train"
    assert set(read_manifest(out)["files"]) == set(_listed(out))
    assert main([*train, "--lr", "0.1", "--resume", "--out", str(out)]) == 2
    assert _snapshot(out) == first
    assert main([*train, "--lr", "0.1", "--overwrite", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.1


def test_a_folder_that_is_no_crl_run_is_never_written_or_removed(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--epochs", "1", "--quiet", "--out", str(folder), *extra]) == 2
        assert "holds files that are not a crl run (e.g. notes.txt)" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_an_overwrite_killed_while_deleting_leaves_nothing_the_next_run_keeps(tmp_path):
    from crl.rundir import RunDir

    out = tmp_path / "run"
    trash = tmp_path / ".run.crl-old-123-abcd"
    (trash / "scores").mkdir(parents=True)
    (trash / "scores" / "ce_seed0.npz").write_bytes(b"old")
    keep = tmp_path / ".runner.crl-old-1"
    keep.mkdir()
    with RunDir(out, "train", {"lr": 0.1}).claim() as run:
        (out / "model.pt").write_bytes(b"x")
        run.finish()
    assert not trash.exists() and keep.exists()
    assert set(read_manifest(out)["files"]) == {"model.pt"}


def test_a_legacy_run_is_continued_only_with_its_config(tmp_path):
    from crl.rundir import RunDir

    out = tmp_path / "old"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"lr": 0.1, "out": "x", "resume": False}))
    RunDir(out, "train", {"lr": 0.1, "out": "y", "resume": True}, resume=True).check()
    with pytest.raises(CRLError, match=r"cannot resume: --out .* \(lr = 0.2 here, 0.1 there\)"):
        RunDir(out, "train", {"lr": 0.2}, resume=True).check()
    assert RunDir(out, "train", {"lr": 0.2}, overwrite=True).check() is True
    # a field added to crl since, at its default, is the same config; set otherwise, another
    RunDir(out, "train", {"lr": 0.1, "bootstrap": 200}, resume=True).check()
    with pytest.raises(CRLError, match=r"\(bootstrap = 50 here, None there\)"):
        RunDir(out, "train", {"lr": 0.1, "bootstrap": 50}, resume=True).check()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


@pytest.mark.filterwarnings("ignore:.*target at chance")
def test_audit_training_writes_its_manifest_through_the_same_run_directory(digits, tmp_path,
                                                                          capsys):
    def train_fn(x, y, seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    x, y, out = digits.x.float() / 255, digits.y, tmp_path / "user"
    kwargs = {"attacks": "loss", "references": 2, "seeds": (0,), "out": out, "subset": 200,
              "progress": False}
    crl.audit_training(train_fn, x, y, **kwargs)
    m = read_manifest(out)
    assert m["command"] == "audit_training" and m["config"]["model"] == "Sequential"
    assert _report(out, capsys)[0] == 0
    crl.audit_training(train_fn, x, y, **kwargs)          # the same arguments: the same run
    before = _snapshot(out)
    with pytest.raises(CRLError, match="holds a crl.audit_training run of another config"):
        crl.audit_training(train_fn, x, y, **{**kwargs, "attacks": "loss,mentr"})
    assert _snapshot(out) == before
    crl.audit_training(train_fn, x, y, **{**kwargs, "attacks": "loss,mentr"}, overwrite=True)
    assert read_manifest(out)["config"]["attacks"] == ["loss", "mentr"]


def test_crl_tune_claims_its_directory_like_the_audit(runs, tmp_path, capsys):
    audit = _copy(runs, tmp_path)
    before = _snapshot(audit)
    tune = ["tune", "--epochs", "2", "--batch-size", "8", "--subset", "200", "--seeds", "0",
            "--attacks", "loss", "--bootstrap", "50", "--quiet", "--trials", "1",
            "--out", str(audit)]
    capsys.readouterr()
    assert main(tune) == 2
    assert "holds a crl audit run; crl tune writes its own" in capsys.readouterr().err
    assert _snapshot(audit) == before
    assert main([*tune, "--overwrite"]) == 0
    m = read_manifest(audit)
    assert m["command"] == "tune" and m["config"]["recipe"]["epochs"] == 2
    assert set(m["files"]) == set(_listed(audit)) and "study.db" in m["files"]
    assert not (audit / "scores").exists()
