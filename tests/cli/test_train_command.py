"""`crl train`: one model on the dataset's own train split (the boundary each loader records),
reloadable, reproducing its printed accuracy, refusing bad input, resuming an interrupted run."""
import json
import re
import tarfile

import numpy as np
import pytest
import torch
import yaml

import crl
from crl.cli import main
from crl.data import load_dataset, own_split
from crl.models.io import load_model_file

QUICK = ["train", "--epochs", "2", "--quiet"]


def _folder(root, per_class: dict[str, int]) -> None:
    """An imagefolder with 3 classes: per_class[split] noisy 8x8 images per class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = (rng.integers(0, 64, (8, 8)) + 60 * c).astype(np.uint8)
                Image.fromarray(img, "L").save(root / split / f"c{c}" / f"{i}.png")


def test_loaders_record_their_own_train_test_boundary(tmp_path, capsys):
    _folder(tmp_path / "tree", {"train": 5, "test": 2})
    arc = tmp_path / "tree.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="data")
    for source in (tmp_path / "tree", arc, tmp_path / "tree"):   # the third from the cache
        data = load_dataset(f"imagefolder:{source}")
        assert data.train_size == 15 and len(data) == 21
        train, test, how = own_split(data)
        assert train.tolist() == list(range(15)) and test.tolist() == list(range(15, 21))
        assert data.y[test].tolist() == [0, 0, 1, 1, 2, 2] and "own split" in how
    out = tmp_path / "run"     # an untrained model (lr 1e-9): crl train says it is at chance
    assert main(["train", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--model", "mlp",
                 "--defense", "ce", "--epochs", "1", "--lr", "1e-9", "--quiet",
                 "--out", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    assert split["train"] == list(range(15)) and split["test"] == list(range(15, 21))
    assert "WARNING: target at chance" in capsys.readouterr().out
    assert crl.load_model(out / "model.pt").class_names == ("c0", "c1", "c2")
    assert "target at chance" in json.loads((out / "result.json").read_text())["warning"]


def test_digits_gets_a_fixed_stratified_test_split(digits):
    assert digits.train_size is None
    train, test, how = own_split(digits)
    again, test_again, _ = own_split(digits)
    assert np.array_equal(train, again) and np.array_equal(test, test_again)
    assert len(test) == round(0.2 * len(digits)) and not set(train) & set(test)
    assert len(train) + len(test) == len(digits)
    per_class = np.bincount(digits.y.numpy())
    assert np.all(np.abs(np.bincount(digits.y[test].numpy()) - 0.2 * per_class) <= 1)
    assert "seed_for(0, 'digits-test-split')" in how


def _printed(stdout: str) -> tuple[float, float]:
    m = re.search(r"train accuracy ([\d.]+)% on \d+ samples, test accuracy ([\d.]+)% on", stdout)
    assert m, stdout
    return float(m.group(1)), float(m.group(2))


def test_crl_train_writes_a_model_that_reproduces_its_printed_accuracy(tmp_path, capsys, digits):
    out = tmp_path / "model"
    assert main([*QUICK, "--out", str(out)]) == 0
    train_pct, test_pct = _printed(capsys.readouterr().out)
    split = json.loads((out / "split.json").read_text())
    train, test, _ = own_split(digits)
    assert split["train"] == train.tolist() and split["test"] == test.tolist()
    assert split["content_hash"] == digits.content_hash
    model = crl.load_model(out / "model.pt")
    idx = torch.as_tensor(split["test"])
    with torch.no_grad():
        acc = float((model(digits.x[idx].float() / 255).argmax(1) == digits.y[idx]).float().mean())
    result = json.loads((out / "result.json").read_text())
    assert acc == pytest.approx(result["test_acc"], abs=1e-9)
    assert f"{100 * acc:.2f}" == f"{test_pct:.2f}" and result["test_acc"] > 0.5
    assert f"{100 * result['train_acc']:.2f}" == f"{train_pct:.2f}"
    _, _, extra = load_model_file(out / "model.pt")
    assert not {"trained_on", "groups"} & set(extra)   # a shipped model carries no member ids
    assert extra["class_names"] == digits.classes and model.class_names == tuple(digits.classes)
    assert extra["input"] == {"layout": "NCHW", "channels": 1, "height": 8, "width": 8,
                              "value_range": [0.0, 1.0]}
    assert json.loads((out / "members.json").read_text()) == {"members": split["train"],
                                                              "held_out": []}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["test_acc"] == pytest.approx(acc)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["defense"], cfg["model"], cfg["epochs"], cfg["batch_size"]) == ("crl", "mlp", 2, 32)
    assert "source" in json.loads((out / "version.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--defense", "nope"], "unknown defense 'nope'"),
    (["--defense", "ce,crl"], "defense = 'ce,crl': expected one defense name"),
    (["--epochs", "0"], "epochs = 0: expected an integer >= 1"),
    (["--lr", "fast"], "lr = 'fast': expected"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--seed", "-1"], "seed = -1: expected an integer >= 0"),
    (["--set", "crl.alpha_rce=-1"], "alpha_rce"),
    (["--set", "crl.nope=1"], "nope"),
    (["--device", "tpu"], "device = 'tpu': expected auto, cpu, cuda or cuda:N"),
])
def test_crl_train_refuses_bad_input_in_one_line_before_writing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main([*QUICK, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crl: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_crl_train_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main([*QUICK, "--out", str(tmp_path / "f")]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_resume_continues_an_interrupted_crl_train(tmp_path, monkeypatch, capsys):
    """Killed after epoch 2 of 3, `--resume` ends with the weights of an uninterrupted run."""
    import crl.engine.fit

    args = ["train", "--epochs", "3", "--quiet", "--no-cache", "--defense", "crl"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    save = crl.engine.fit._save_checkpoint

    def save_then_stop(path, fingerprint, epoch, *rest):
        save(path, fingerprint, epoch, *rest)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(crl.engine.fit, "_save_checkpoint", save_then_stop)
    cut = tmp_path / "cut"
    assert main([*args, "--out", str(cut)]) == 130
    assert (cut / "checkpoint.pt").is_file() and not (cut / "model.pt").exists()
    monkeypatch.setattr(crl.engine.fit, "_save_checkpoint", save)
    assert main([*args, "--resume", "--out", str(cut)]) == 0
    whole_net, _, _ = load_model_file(tmp_path / "whole" / "model.pt")
    cut_net, _, _ = load_model_file(cut / "model.pt")
    for (k, a), b in zip(whole_net.state_dict().items(), cut_net.state_dict().values()):
        assert torch.equal(a, b), k
    assert (cut / "metrics.jsonl").read_text() == (tmp_path / "whole" / "metrics.jsonl").read_text()
    assert json.loads((cut / "result.json").read_text())["test_acc"] == \
        json.loads((tmp_path / "whole" / "result.json").read_text())["test_acc"]
    capsys.readouterr()


def test_crl_train_runs_a_small_model_on_one_cpu_thread(tmp_path, monkeypatch, capsys):
    """A digits MLP's matrices are too small for a thread pool (docs/performance.md): training
    runs on one intra-op thread, and the caller's thread count comes back afterwards."""
    import crl.commands.train

    seen = []
    train = crl.commands.train._train
    monkeypatch.setattr(crl.commands.train, "_train",
                        lambda *a: seen.append(torch.get_num_threads()) or train(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main([*QUICK, "--device", "cpu", "--no-cache", "--out", str(tmp_path / "m")]) == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()


def test_members_json_names_what_a_defense_held_out(tmp_path, capsys):
    """early_stopping trains on part of the train split: members.json says which part, and
    model.pt carries none of it."""
    out = tmp_path / "es"
    assert main([*QUICK, "--defense", "early_stopping", "--out", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    members = json.loads((out / "members.json").read_text())
    assert members["held_out"] and not set(members["members"]) & set(members["held_out"])
    assert sorted(members["members"] + members["held_out"]) == sorted(split["train"])
    assert json.loads((out / "result.json").read_text())["n_train"] == len(members["members"])
    _, _, extra = load_model_file(out / "model.pt")
    assert not {"trained_on", "groups"} & set(extra)
    capsys.readouterr()
