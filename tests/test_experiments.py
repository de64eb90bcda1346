"""The paper's recipes (experiments/): every Table 1 row and every sweep setting parses and
validates as `crl audit --config` would, its defenses accept the full-size split, and every
(model, defense) pair they use takes one training step through crl.engine.fit.fit on synthetic data
of its dataset's shape. Also the sweep runner end to end (tiny digits) and the benchmark
scripts' crl flags (a stand-in `crl` records them)."""
from __future__ import annotations

import dataclasses
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from benchmark_scripts import load_benchmark

from crl.audit.pipeline import recipe_of, validate_names
from crl.cli import build_parser, config_from_args
from crl.config import AuditConfig, load_yaml_recipe
from crl.core.errors import CRLError
from crl.core.seeding import torch_generator
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.engine.fit import fit
from crl.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CNN_RECIPE = ROOT / "experiments" / "cifar10_cnn.yaml"     # the fronts' base, not a Table 1 row
TABLE1 = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if p != CNN_RECIPE)
SWEEP_FILES = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
CIFAR10 = "imagefolder:shared/data/cifar10-jpeg.tar.gz"
# (channels, image size, classes, images in train + test) of each dataset the recipes name.
DATASETS = {CIFAR10: (3, 32, 10, 60_000), "cifar100": (3, 32, 100, 60_000),
            "svhn": (3, 32, 10, 99_289)}
# Table 1's rows and the values SPEC section 7 fixes for them (the rest is ours, commented).
ROWS = {
    (CIFAR10, "vgg11_bn"): {"epochs": 120, "lr": 0.05},
    (CIFAR10, "resnet18"): {"epochs": 100, "lr": 0.01, "milestones": [50, 80]},
    (CIFAR10, "densenet121"): {"epochs": 50},
    ("cifar100", "googlenet"): {"epochs": 80},
    ("cifar100", "resnet18"): {"epochs": 100, "lr": 0.1, "milestones": [50, 80]},
    ("cifar100", "densenet121"): {},
    ("svhn", "vgg11_bn"): {"epochs": 40},
    ("svhn", "resnet18"): {"epochs": 40},
}
PAPER_ATTACKS = ["nn", "entropy", "mentr", "gradx", "lira", "rmia"]
SLOW_MODELS = {"densenet121", "googlenet"}


sweep_runner = load_benchmark("sweep")
SWEEPS = [sweep_runner.load_sweep(p) for p in SWEEP_FILES]


def _all_configs() -> list[tuple[str, AuditConfig]]:
    """(label, resolved config) of every Table 1 recipe and every sweep setting."""
    out = [(p.name, AuditConfig(**load_yaml_recipe(p)).resolved()) for p in TABLE1]
    for s in SWEEPS:
        out += [(f"{s.path.name}:{v.name}", AuditConfig(**s.recipe(v)).resolved())
                for v in s.variants]
    return out


CONFIGS = _all_configs()


def _params(cfg: AuditConfig, defense: str) -> dict:
    """The defense's full parameters in this config (defaults filled in)."""
    return build_defense(defense, cfg.set.get(defense)).params


def lce_floor(num_classes: int, tau_rce: float) -> float:
    """Infimum of ImpRelaxLoss's L_lce (Eq. 5): the normalised logits have norm below
    1 / tau_rce, so the best margin is sqrt(C / (C - 1)) / tau_rce over C - 1 equal rivals."""
    margin = math.sqrt(num_classes / (num_classes - 1)) / tau_rce
    return math.log1p((num_classes - 1) * math.exp(-margin))


def test_one_recipe_per_table1_row_with_distinct_run_folders():
    cfgs = [AuditConfig(**load_yaml_recipe(p)).resolved() for p in TABLE1]
    assert sorted((c.dataset, c.model) for c in cfgs) == sorted(ROWS)
    outs = [c.out for c in cfgs] + [str(s.out) for s in SWEEPS]
    assert len(set(outs)) == len(outs)


@pytest.mark.parametrize("path", TABLE1, ids=lambda p: p.stem)
def test_table1_recipe_is_the_papers_row(path):
    cfg = AuditConfig(**load_yaml_recipe(path)).resolved()
    assert validate_names(cfg) == []          # names, parameters, shadow/reference counts
    assert cfg.defenses == ["ce", "advreg", "relaxloss", "crl"]
    assert cfg.attacks == PAPER_ATTACKS
    for key, value in ROWS[(cfg.dataset, cfg.model)].items():
        assert getattr(cfg, key) == value, key
    assert cfg.batch_size == (32 if cfg.model == "densenet121" else 256)
    assert cfg.augment == (cfg.dataset == "cifar100")
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 5e-4)
    assert (len(cfg.seeds), cfg.shadows, cfg.shadow_defense) == (5, 5, "same")
    assert cfg.milestones and max(cfg.milestones) < cfg.epochs
    if cfg.dataset != CIFAR10:
        assert cfg.data_root and not cfg.download   # torchvision files, never fetched at run time


@pytest.mark.parametrize("label,cfg", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_every_defense_accepts_the_full_size_split(label, cfg):
    """Each model of the audit trains on a quarter of the dataset (members, reference halves
    of the target pool, shadow halves of the shadow pool)."""
    assert validate_names(cfg) == []
    n_train = DATASETS[cfg.dataset][3] // 4
    for d in cfg.defenses:
        build_defense(d, cfg.set.get(d)).check(recipe_of(cfg), n_train)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda s: s.path.stem)
def test_sweep_settings_are_one_defense_each_over_a_table1_recipe(sweep):
    assert sweep.base.resolve() in {p.resolve() for p in [*TABLE1, CNN_RECIPE]}
    assert sweep.variants[0].defense == "ce"
    seen = set()
    for v in sweep.variants:
        cfg = AuditConfig(**sweep.recipe(v)).resolved()
        assert cfg.defenses == [v.defense] and cfg.out == str(sweep.out / v.name)
        setting = (v.defense, tuple(sorted(_params(cfg, v.defense).items())))
        assert setting not in seen, f"{v.name} repeats a setting"
        seen.add(setting)


@pytest.mark.parametrize("label,cfg", CONFIGS, ids=[label for label, _ in CONFIGS])
def test_crl_alpha_rce_lies_above_the_normalised_ce_floor(label, cfg):
    """Below the floor ImpRelaxLoss never relaxes (e.g. alpha_rce 0.5 with 100 classes)."""
    classes = DATASETS[cfg.dataset][2]
    for d in set(cfg.defenses) & {"crl", "imprelaxloss"}:
        p = _params(cfg, d)
        assert p["alpha_rce"] > lce_floor(classes, p["tau_rce"]), (d, p)


def test_lce_floor_matches_the_loss_at_large_logits():
    from crl.losses.crl import CRLLoss

    for classes, tau in [(10, 0.2), (100, 0.2)]:
        best = math.sqrt((classes - 1) / classes) * 1e6       # the optimal direction, scaled
        g = torch.full((1, classes), -best / (classes - 1), dtype=torch.float64)
        g[0, 0] = best
        loss = CRLLoss(classes, None, alpha_rce=0.0, alpha_rcl=0.0, tau_rce=tau, tau_rcl=0.0,
                       lam=0.0)
        loss(g, None, torch.tensor([0]), 1)
        assert float(loss.last_stats["l_lce"]) == pytest.approx(lce_floor(classes, tau), rel=1e-4)


def _pairs() -> dict[tuple[str, str], dict]:
    """Each distinct (model, defense) of the recipes: its first config and the largest
    alpha_rcl any recipe gives it (the center term must not relax from the first step)."""
    pairs: dict[tuple[str, str], dict] = {}
    for _, cfg in CONFIGS:
        for d in cfg.defenses:
            entry = pairs.setdefault((cfg.model, d), {"cfg": cfg, "alpha_rcl": [], "tau": set()})
            p = _params(cfg, d)
            if "alpha_rcl" in p and p.get("lam", 0.1) > 0:
                entry["alpha_rcl"].append(p["alpha_rcl"])
                entry["tau"].add(p["tau_rcl"])
    return pairs


PAIRS = _pairs()


def _synthetic(cfg: AuditConfig, n: int = 4) -> ImageData:
    channels, size, classes, _ = DATASETS[cfg.dataset]
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                      generator=torch_generator(0, "test-experiments", "images"))
    return ImageData("synthetic", x, torch.arange(n) % classes, classes,
                     (0.5,) * channels, (0.25,) * channels)


@pytest.mark.parametrize("model,defense", [
    pytest.param(m, d, marks=[pytest.mark.slow] if m in SLOW_MODELS else [])
    for m, d in PAIRS])
def test_one_training_step_per_model_and_defense(model, defense):
    """Defaults for the step (the recipes' values are checked above at full size); for the
    center term, the recipes' tau_rcl and its first-step level above every alpha_rcl used."""
    entry = PAIRS[(model, defense)]
    cfg, data = entry["cfg"], _synthetic(entry["cfg"])
    assert len(entry["tau"]) <= 1, f"one step per tau_rcl needed: {entry['tau']}"
    params = {"tau_rcl": next(iter(entry["tau"]))} if entry["tau"] and defense == "crl" else {}
    recipe = dataclasses.replace(recipe_of(cfg), epochs=1, device="cpu", bf16=False,
                                 channels_last=False, batch_size=len(data))   # dpsgd: <= n
    torch.manual_seed(0)
    net = ModelSpec.for_data(model, data).build()
    before = [t.detach().clone() for t in net.parameters()]
    res = fit(net, data, np.arange(len(data)), recipe, build_defense(defense, params),
              progress=False)
    assert len(res.history) == 1 and math.isfinite(res.history[0]["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, res.model.parameters()))
    if entry["alpha_rcl"]:
        assert max(entry["alpha_rcl"]) < res.history[0]["l_ct"]


def _tiny_sweep(tmp_path: Path) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"dataset": "digits", "model": "mlp", "epochs": 2,
                                    "subset": 200, "attacks": ["loss", "nn"], "shadows": 1,
                                    "seeds": [0, 1], "set": {"relaxloss": {"upper": 1.0}}}))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": "base.yaml", "config": {"seeds": [0], "attacks": ["loss"]},
        "out": str(tmp_path / "runs"),
        "variants": {"ce": [{}], "relaxloss": [{"alpha": 1.0}]}}))
    return sweep


def test_sweep_runner_runs_every_setting_once_and_summarises(tmp_path, capsys):
    sweep_path = _tiny_sweep(tmp_path)
    assert sweep_runner.main([str(sweep_path), "--", "--quiet", "--bootstrap", "50"]) == 0
    runs = tmp_path / "runs"
    rows = [yaml.safe_load((runs / n / "config.yaml").read_text())
            for n in ("ce-0", "relaxloss-0")]
    assert [r["defenses"] for r in rows] == [["ce"], ["relaxloss"]]
    assert rows[1]["set"] == {"relaxloss": {"upper": 1.0, "alpha": 1.0}}   # merged over base
    assert rows[0]["seeds"] == [0] and rows[0]["attacks"] == ["loss"]
    summary = (runs / "summary.md").read_text()
    assert summary.count("\n| ce-0 |") == 1 and "| relaxloss-0 | relaxloss | alpha 1.0 |" in summary
    assert (runs / "summary.png").stat().st_size > 0
    capsys.readouterr()
    assert sweep_runner.main([str(sweep_path), "--", "--quiet", "--bootstrap", "50"]) == 0
    assert capsys.readouterr().out.count("done already") == 2


@pytest.mark.parametrize("text,message", [
    ("base: base.yaml\nvariants: {ce: [{}]}\nseed: 1\n", r"keys \['base', 'seed', 'variants'\]"),
    ("base: nowhere.yaml\nvariants: {ce: [{}]}\n", "base = 'nowhere.yaml': expected a recipe"),
    ("base: base.yaml\nvariants: {crl: {alpha_rce: 1}}\n", r"variants.crl = \{'alpha_rce': 1\}"),
    ("base: base.yaml\nvariants: {crl: [3]}\n", r"variants.crl\[0\] = 3: expected a mapping"),
    ("base: base.yaml\nconfig: {seed: 1}\nvariants: {ce: [{}]}\n",
     "config.seed = 1: expected an AuditConfig field"),
    ("base: base.yaml\nvariants: [ce\n", "not valid YAML"),
])
def test_sweep_file_errors_are_one_line(tmp_path, text, message):
    (tmp_path / "base.yaml").write_text("dataset: digits\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(CRLError, match=message) as e:
        sweep_runner.load_sweep(path)
    assert "\n" not in str(e.value)


def _script_commands(tmp_path: Path, script: str, *args: str) -> list[list[str]]:
    """The `crl` command lines a benchmark script runs, recorded by a stand-in `crl`."""
    fake = tmp_path / "bin" / "crl"
    fake.parent.mkdir()
    log = tmp_path / "calls.txt"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    fake.chmod(0o755)
    archive = tmp_path / "cifar10.tar.gz"
    archive.write_bytes(b"")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
           "DEVICE": "cpu", "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(ROOT / "benchmarks" / script), *args[:1], str(archive),
                    *args[1:]], env=env, check=True, capture_output=True, text=True)
    lines = log.read_text().splitlines()
    return [line.rstrip("\0").split("\0") for line in lines if line]


def _config_of(argv: list[str]) -> AuditConfig:
    cfg = config_from_args(build_parser().parse_args(argv)).resolved()
    validate_names(cfg)
    return cfg


def test_gpu_table1_script_runs_a_valid_short_table1_row(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)                      # the script's --config is repository-relative
    (argv,) = _script_commands(tmp_path, "gpu_table1.sh")
    cfg = _config_of(argv)
    assert (cfg.model, cfg.defenses, cfg.seeds, cfg.shadows) == (
        "resnet18", ["ce", "relaxloss", "crl"], [0], 1)
    assert (cfg.epochs, cfg.milestones, cfg.bf16, cfg.channels_last) == (20, [10, 16], True, True)
    assert set(cfg.attacks) >= {"nn", "entropy", "mentr", "gradx"}
    assert cfg.dataset == f"imagefolder:{tmp_path / 'cifar10.tar.gz'}" and cfg.device == "cpu"


def test_cpu_table1_script_runs_the_documented_plan(tmp_path):
    calls = _script_commands(tmp_path, "cpu_table1.sh", "all", "--epochs", "1")
    main, lira, baselines = (_config_of(argv) for argv in calls)
    assert (main.model, main.defenses, main.seeds, main.shadows) == (
        "cnn", ["ce", "relaxloss", "crl"], [0, 1, 2], 1)
    assert main.subset is None and main.epochs == 1          # the full 15k/15k split
    assert (lira.attacks, lira.references, lira.seeds) == (["lira", "rmia"], 8, [0])
    assert set(baselines.defenses) == {"ce", "label_smoothing", "confidence_penalty",
                                       "early_stopping", "advreg", "dmp", "dpsgd"}
    assert len({main.out, lira.out, baselines.out}) == 3


def test_benchmark_scripts_refuse_a_missing_archive(tmp_path):
    for script in ("gpu_table1.sh", "cpu_table1.sh"):
        args = ["main"] if script == "cpu_table1.sh" else []
        r = subprocess.run(["bash", str(ROOT / "benchmarks" / script), *args,
                            str(tmp_path / "none.tar.gz")], check=False, capture_output=True,
                           text=True)
        assert r.returncode == 2 and "no CIFAR-10 archive at" in r.stderr
