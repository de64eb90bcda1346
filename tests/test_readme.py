"""The README's commands and its own-training-loop example stay true."""
import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_install_and_test_commands():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "pip install" in first_block[0] and first_block[0].rstrip().endswith("crl audit")
    assert first_block[1].strip() == "python -m pytest -q"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci


def _run_example(loader):
    text = README.read_text()
    code = re.search(r"<!-- crl-loop-example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    scope = {"loader": loader}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_own_training_loop_example_runs_and_moves_the_centers():
    untrained = _run_example([])                     # same seed, no batches: initial state
    g = torch.Generator().manual_seed(1)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
              for _ in range(2)]
    trained = _run_example(loader)
    c0, c1 = untrained["crl_loss"].centers.detach(), trained["crl_loss"].centers.detach()
    assert trained["tap"].in_features == 512 and c1.shape == (10, 512)
    assert not torch.equal(c0, c1)                   # the centers' optimizer stepped
    w0, w1 = untrained["model"].fc.weight.detach(), trained["model"].fc.weight.detach()
    assert not torch.equal(w0, w1)                   # and so did the model's


# --------------------------------------------------------------------------- the tour's commands

#: what makes a README command small: digits-sized, one epoch, one seed, few models, the two
#: attacks that need no reference model (LiRA on AdvReg's or DMP's held-out halves needs 12)
TINY = {"--epochs": "1", "--subset": "200", "--seeds": "0", "--references": "4",
        "--shadows": "1", "--bootstrap": "50", "--attacks": "loss,mentr"}
CIFAR = re.compile(r"imagefolder:\S*cifar10-jpeg\.tar\.gz")


def readme_commands() -> list[list[str]]:
    """Every `crl ...` command in the README's bash blocks, as argv (continuations joined,
    comments dropped, `a && crl b` chains split)."""
    import shlex

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv[:1] == ["crl"]:
                    commands.append(argv[1:])
    return commands


def _on_digits(argv: list[str]) -> list[str]:
    """argv with the CIFAR-10 archive (not in the repository) swapped for digits."""
    return [CIFAR.sub("digits", a) for a in argv]


def test_the_readme_shows_every_command():
    names = [argv[0] for argv in readme_commands()]
    assert names.count("audit") >= 4 and {"list", "tune"} <= set(names)
    assert any(CIFAR.search(" ".join(argv)) for argv in readme_commands())


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses_and_validates(argv, monkeypatch):
    """The real parser takes it and its config checks out, every name registered and every
    --set owner used, without training (the CIFAR archive swapped for digits)."""
    import crl.attacks  # registers the attacks
    import crl.defenses  # noqa: F401  (registers the defenses)
    from crl.cli import build_parser, canonical_names, config_from_args
    from crl.config import set_warnings
    from crl.core.registry import ATTACKS, DEFENSES

    monkeypatch.chdir(README.parent)              # the README's paths are repository paths
    args = build_parser().parse_args(_on_digits(argv))
    if args.command == "audit":
        cfg = config_from_args(args).resolved()
        assert not set_warnings(cfg)
    elif args.command == "tune":
        from crl.tune.options import TUNE_SPECS, TuneOptions, stage_configs

        opts = TuneOptions(**canonical_names({k: v for k, v in vars(args).items()
                                              if k in TUNE_SPECS and v is not None})).checked()
        audit_args = {k: v for k, v in vars(args).items() if k not in TUNE_SPECS}
        cfg = config_from_args(argparse.Namespace(**audit_args)).resolved()
        assert not stage_configs(cfg, opts)[2]
        cfg = dataclasses.replace(cfg, defenses=[opts.defense, *opts.compare])
    else:
        return
    for name in cfg.defenses:
        DEFENSES.get(name)
    for name in cfg.attacks:
        ATTACKS.get(name)


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_runs_small(argv, tmp_path, monkeypatch, capsys):
    """A small version of each command runs to the end on digits: the tour's flags, then the
    TINY ones (tune: two trials)."""
    from crl.cli import main

    monkeypatch.chdir(README.parent)
    small = _on_digits(argv)
    if small[0] in ("audit", "tune"):
        small += [x for kv in TINY.items() for x in kv] + ["--quiet", "--no-cache",
                                                           "--out", str(tmp_path / "run")]
    if small[0] == "tune":
        small += ["--trials", "2"]
    assert main(small) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if small[0] == "audit":
        assert (tmp_path / "run" / "verdict.json").is_file() and "Verdict" in out
    if small[0] == "tune":
        assert (tmp_path / "run" / "tune.json").is_file()
