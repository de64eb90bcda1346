"""What a new user meets first: `crl list` describes every component with its citation, names
are case-insensitive where unambiguous with a "did you mean" for typos, --help shows the default
recipe, and an image folder with train/ alone is accepted."""
from __future__ import annotations

import json

import numpy as np
import pytest

from crl.cli import build_parser, list_lines, main
from crl.core.errors import CRLError
from crl.core.registry import Registry


def _registries():
    from crl.cli import _registries

    return _registries()


def test_every_registered_component_has_its_own_one_line_description():
    for reg in _registries():
        descriptions = {name: reg.description(name) for name in reg.names()}
        for name, text in descriptions.items():
            assert text and "\n" not in text and len(text) <= 120, (reg.kind, name, text)
        # no entry shows another's words (a subclass never inherits its parent's description)
        assert len(set(descriptions.values())) == len(descriptions), reg.kind
    lines = list_lines()
    for reg in _registries():
        for name in reg.names():
            assert f"    {reg.description(name)}" in lines
    assert any("(Chen & Pattabiraman, NDSS 2024)" in line for line in lines)


def test_descriptions_come_from_the_class_itself_or_the_registration():
    reg = Registry("defense")
    parent = reg.register("parent")(type("Parent", (), {"description": "parent words"}))
    reg.register("child")(type("Child", (parent,), {}))
    reg.register("fn", description="function words")(lambda: None)
    assert reg.description("parent") == "parent words"
    assert reg.description("child") == ""
    assert reg.description("fn") == "function words"


def test_names_are_case_insensitive_where_unambiguous_and_typos_get_suggestions():
    reg = Registry("attack")
    for name in ("lira", "lira_offline", "rmia", "Mixed", "mixed"):
        reg.register(name)(type(name, (), {}))
    assert reg.get("LiRA") is reg.get("lira") and reg.canonical("RMIA") == "rmia"
    assert reg.canonical("MIXED") == "MIXED"          # two names match: ambiguous, unchanged
    with pytest.raises(CRLError, match="unknown attack 'MIXED'"):
        reg.get("MIXED")
    with pytest.raises(CRLError, match=r"unknown attack 'lria' \(did you mean .*'lira'"):
        reg.get("lria")
    with pytest.raises(CRLError) as e:
        reg.get("zzzz")
    assert "did you mean" not in str(e.value) and "expected one of: Mixed" in str(e.value)


def test_the_cli_spells_names_as_registered(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["audit", "--dataset", "Digits", "--model", "MLP", "--defenses", "CE",
                 "--attacks", "Loss", "--set", "ConFidence_Penalty.beta=0.2", "--epochs", "1",
                 "--subset", "200", "--seeds", "0", "--shadows", "0", "--quiet",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    row = json.loads((out / "results.json").read_text())[0]
    assert row["defense"] == "ce" and list(row["attacks"]) == ["loss"]
    assert "confidence_penalty.beta: confidence_penalty is not among" in captured.err
    assert main(["audit", "--defenses", "crll", "--out", str(tmp_path / "x")]) == 2
    assert "unknown defense 'crll' (did you mean 'crl'?)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_help_shows_the_default_recipe_and_whole_sentences(capsys):
    parser = build_parser()
    assert parser.description.endswith("and `crl list`.")
    for command in ("audit", "tune", "train"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "digits: mlp, 60 epochs, batch 32, lr 0.05" in text, command
        assert "any other dataset: cnn, 30 epochs, batch 128, lr 0.05" in text, command
        assert ("64 reference models" in text) == (command != "train"), command


def test_an_image_folder_with_train_alone_trains_with_a_test_fraction(tmp_path, capsys,
                                                                      image_folder):
    from crl.data import load_dataset

    image_folder(tmp_path / "tree", {"train": 8}, classes=3, shift=60)
    dataset = f"imagefolder:{tmp_path / 'tree'}"
    data = load_dataset(dataset)
    assert data.train_size is None and len(data) == 24
    out = tmp_path / "model"
    assert main(["train", "--dataset", dataset, "--model", "mlp", "--epochs", "2", "--quiet",
                 "--test-fraction", "0.25", "--out", str(out)]) == 0
    split = json.loads((out / "split.json").read_text())
    test = np.asarray(split["test"])
    assert len(test) == 6 and np.bincount(data.y[test].numpy()).tolist() == [2, 2, 2]
    assert sorted(split["train"] + split["test"]) == list(range(24))
    assert "--test-fraction" in split["boundary"]
    again = tmp_path / "again"
    assert main(["train", "--dataset", dataset, "--model", "mlp", "--epochs", "2", "--quiet",
                 "--test-fraction", "0.25", "--out", str(again)]) == 0
    assert json.loads((again / "split.json").read_text())["test"] == split["test"]   # seeded


def test_test_fraction_is_refused_where_the_data_has_its_own_split(tmp_path, capsys,
                                                                    image_folder):
    image_folder(tmp_path / "tree", {"train": 3, "test": 3}, classes=2, shift=60)
    out = tmp_path / "model"
    code = main(["train", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--model", "mlp",
                 "--test-fraction", "0.5", "--quiet", "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "test_fraction = 0.5: " in capsys.readouterr().err


def test_the_audit_accepts_an_image_folder_with_train_alone(tmp_path, capsys, image_folder):
    image_folder(tmp_path / "tree", {"train": 20}, classes=3, shift=60)
    out = tmp_path / "run"
    code = main(["audit", "--dataset", f"imagefolder:{tmp_path / 'tree'}", "--model", "mlp",
                 "--defenses", "ce", "--attacks", "loss", "--epochs", "2", "--seeds", "0",
                 "--shadows", "0", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())[0]
    assert row["n_members"] > 0 and "auc" in row["attacks"]["loss"]


def test_canonical_names_cover_every_name_field_and_leave_unknown_ones_to_the_checks():
    from crl.cli import canonical_names

    given = {"dataset": "CIFAR10", "model": "ResNet18", "defense": "HAMP", "defenses": ["CE"],
             "compare": ["RelaxLoss"], "attacks": ["LiRA", "nope"], "confirm_attacks": ["RMIA"],
             "set": {"CRL": {"lam": 0.2}, "LiRA": {}}, "seeds": [0]}
    assert canonical_names(given) == {
        "dataset": "cifar10", "model": "resnet18", "defense": "hamp", "defenses": ["ce"],
        "compare": ["relaxloss"], "attacks": ["lira", "nope"], "confirm_attacks": ["rmia"],
        "set": {"crl": {"lam": 0.2}, "lira": {}}, "seeds": [0]}
    assert canonical_names({"dataset": "imagefolder:/Data/X"}) == {"dataset": "imagefolder:/Data/X"}
