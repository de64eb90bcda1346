"""The audit config (every value checked before anything is written), `--set` owners, and the
run-directory safety of crl.rundir (the --out checks, RunLock, clean_stale_tmp)."""
import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import crl
from crl.cli import build_parser, config_from_args, main
from crl.config import (
    DATASET_DEFAULTS,
    FIELD_SPECS,
    AuditConfig,
    cli_fields,
    set_warnings,
    unused_set_owners,
)
from crl.core.errors import CRLError
from crl.rundir import LOCK_NAME, RunLock, check_out_dir, clean_stale_tmp


def _refused(capsys, argv, out):
    """main(argv) exits 2 with one 'crl: error:' line and creates nothing at `out`."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("crl: error:") and err.count("\n") == 1, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("yaml_text,message", [
    ("set: {crl: 5}", "set.crl = 5: expected a mapping of parameter names to values"),
    ("set: 5", "set = 5: expected a mapping of defense/attack names to {PARAM: VALUE}"),
    ("defenses: 5", "defenses = 5: expected a non-empty list of distinct defense names"),
    ("attacks: [loss, loss]", "attacks = ['loss', 'loss']: expected a non-empty list of distinct"),
    ("milestones: abc", "milestones = 'abc': expected a list of positive integers"),
    ("milestones: [10, 0]", "milestones = [10, 0]: expected a list of positive integers"),
    ("out: 5", "out = 5: expected a non-empty path"),
    ("seeds: [a]", "seeds = ['a']: expected a non-empty list of distinct integers >= 0"),
    ("seeds: true", "seeds = True: expected a non-empty list"),
    ("epochs: 1.5", "epochs = 1.5: expected an integer >= 1"),
    ("bf16: 'yes'", "bf16 = 'yes': expected true or false"),
    ("momentum: -0.1", "momentum = -0.1: expected a number >= 0"),
    ("lr: .inf", "lr = inf: expected a number > 0"),
    ("shadows: -1", "shadows = -1: expected an integer >= 0"),
    ("device: gpu", "device = 'gpu': expected auto, cpu, cuda or cuda:N"),
    ("dataset: [digits]", "dataset = ['digits']: expected a dataset name"),
    ("shadow_defense: some", "shadow_defense = 'some': expected one of: same, none"),
])
def test_every_yaml_value_is_type_checked_before_anything_is_written(tmp_path, capsys,
                                                                       yaml_text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text + "\n")
    out = tmp_path / "run"
    flags = [] if yaml_text.startswith("out:") else ["--out", str(out)]
    err = _refused(capsys, ["audit", "--config", str(recipe), *flags], out)
    assert message in err


def _config(*argv):
    return config_from_args(build_parser().parse_args(["audit", *argv]))


def test_checked_values_are_converted_and_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 2.0\nlr: 1\nseeds: 4\ndefenses: ce, crl\nbatch-size: 8\n"
                      "set: {crl: {lam: 0.5}}\n")
    cfg = _config("--config", str(recipe), "--lr", "1e-3", "--device", "cuda:1",
                  "--set", "crl.tau_rce=0.3").resolved()
    assert cfg.epochs == 2 and type(cfg.epochs) is int
    assert cfg.lr == 0.001 and cfg.batch_size == 8 and cfg.seeds == [4]
    assert cfg.defenses == ["ce", "crl"] and cfg.device == "cuda:1"   # CUDA checked later
    assert cfg.set == {"crl": {"lam": 0.5, "tau_rce": 0.3}}
    assert _config("--lr", "2").resolved().lr == 2.0
    assert type(_config("--lr", "2").resolved().lr) is float


def test_every_flag_comes_from_a_field_and_reaches_the_config():
    specs = cli_fields()
    assert {s.name for s in specs} == set(FIELD_SPECS) - {"momentum", "weight_decay"}
    for spec in specs:
        if spec.kind is bool:
            args = [spec.flags]
            want = not spec.default
        else:
            want = {int: [7], float: [0.5], str: ["cpu"]}[spec.kind] if spec.many else \
                {int: 7, float: 0.5, str: "cpu"}[spec.kind]
            text = ",".join(map(str, want)) if spec.many else str(want)
            args = [spec.flags, text]
        assert getattr(_config(*args), spec.name) == want, spec.flags


def test_declared_and_per_dataset_defaults_pass_their_own_checks():
    for spec in FIELD_SPECS.values():
        assert spec.check_field(spec.default) == spec.default
    for dataset in DATASET_DEFAULTS:
        cfg = AuditConfig(dataset="cifar10" if dataset == "*" else dataset).resolved()
        for key, value in DATASET_DEFAULTS[dataset].items():
            assert getattr(cfg, key) == value
        assert cfg.epochs and cfg.batch_size and cfg.lr and cfg.model


def test_cnn_default_recipe_decays_lr_late_unless_the_user_sets_the_schedule():
    # docs/models.md: the cnn's late excursions at constant lr 0.05 are damped by these milestones
    dataset = "imagefolder:x.tar.gz"
    assert _config("--dataset", dataset).resolved().milestones == [15, 25]
    assert _config("--dataset", dataset, "--milestones", "5").resolved().milestones == [5]
    assert _config("--dataset", dataset, "--milestones", "").resolved().milestones == []
    # a schedule belongs to its epoch count: other epochs get a constant lr unless given one
    assert _config("--dataset", dataset, "--epochs", "60").resolved().milestones == []
    assert AuditConfig(dataset="digits").resolved().milestones == []


def test_resolved_leaves_the_original_alone_and_validate_raises():
    cfg = AuditConfig(epochs=2.0)
    assert cfg.resolved().epochs == 2 and cfg.epochs == 2.0 and cfg.model is None
    with pytest.raises(CRLError, match=r"^epochs = 0: expected an integer >= 1"):
        dataclasses.replace(cfg, epochs=0).validate()


# --- one config per command over a shared base; each default written once ------------------

#: the keys of config.yaml in run directories written before the shared base (main before issue
#: 19), in their old declaration order: the order of the flags in --help
AUDIT_KEYS = ("dataset", "model", "defenses", "attacks", "epochs", "batch_size", "lr", "momentum",
              "weight_decay", "milestones", "augment", "bf16", "channels_last", "subset", "seeds",
              "shadows", "references", "bootstrap", "shadow_defense", "canaries", "epsilon_attack",
              "epsilon_delta", "out", "device", "data_root", "download", "resume", "overwrite",
              "cache", "progress", "engine", "ensemble_size", "ray_address", "ray_chunk", "set")
TRAIN_KEYS = ("dataset", "model", "defense", "epochs", "batch_size", "lr", "momentum",
              "weight_decay", "milestones", "augment", "bf16", "channels_last", "seed",
              "test_fraction", "out", "device", "data_root", "download", "resume", "overwrite",
              "cache", "progress", "set")
NO_FLAG = ("momentum", "weight_decay", "set")


def test_old_run_configs_load_and_every_flag_keeps_its_place(tmp_path):
    import yaml

    from crl.config import load_yaml_recipe
    from crl.train_options import TrainConfig

    cfg = AuditConfig(dataset="digits", seeds=[3], set={"crl": {"lam": 0.5}}).resolved()
    old = tmp_path / "config.yaml"           # what `crl report` reads from an old run
    old.write_text(yaml.safe_dump({k: getattr(cfg, k) for k in AUDIT_KEYS}, sort_keys=False))
    assert AuditConfig(**load_yaml_recipe(old)).resolved() == cfg
    for cls, keys in ((AuditConfig, AUDIT_KEYS), (TrainConfig, TRAIN_KEYS)):
        assert sorted(cls().to_dict()) == sorted(keys)
        assert [s.name for s in cli_fields(cls)] == [k for k in keys if k not in NO_FLAG]


def test_every_config_field_is_declared_once_in_one_class_of_the_shared_base():
    from crl.config import MachineConfig, RecipeConfig
    from crl.train_options import TrainConfig

    def family(cls):
        return [cls, *(c for sub in cls.__subclasses__() for c in family(sub))]

    classes = set(family(RecipeConfig) + family(MachineConfig))
    assert {AuditConfig, TrainConfig} <= classes
    declared = [n for c in classes for n in vars(c).get("__annotations__", {})
                if n != "HELP_FIRST"]
    twice = {n for n in declared if declared.count(n) > 1}
    assert twice == {"out"} and AuditConfig().out != TrainConfig().out   # each command's own
    recipe = {f.name for f in dataclasses.fields(RecipeConfig)}
    assert {"dataset", "model", "epochs", "lr", "milestones", "set"} <= recipe
    for cls in (AuditConfig, TrainConfig):       # one resolution: checks, per-dataset defaults
        assert issubclass(cls, RecipeConfig) and issubclass(cls, MachineConfig)
        assert cls(epochs=3.0).resolved().milestones == [] and cls().resolved().model == "mlp"
        with pytest.raises(CRLError, match=r"^lr = 0: expected a number > 0 or null$"):
            cls(lr=0).validate()
    assert "subset" not in TrainConfig().to_dict()   # the audit's own fields stay the audit's


#: getattr(cfg, "name", default): a field read with a second default of its own
GETATTR_DEFAULT = re.compile(r"getattr\(\s*[\w.]*(cfg|config|opts|options|recipe)\w*\s*,"
                             r"\s*[^,()]+,")
#: a number of bootstrap resamples written as a literal (a default, or a call's value)
BOOT_LITERAL = re.compile(r"\b(n_boot|bootstrap)\b[\"']?\s*(:\s*[\w|\[\]. ]+?\s*=|=|:)\s*"
                          r"(option\(\s*)?\d")


def _src_hits(pattern: re.Pattern) -> list[str]:
    root = Path(crl.__file__).parent
    return [f"{p.relative_to(root)}:{n}: {line.strip()}" for p in sorted(root.rglob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]


def test_no_config_field_is_read_with_a_default_and_the_bootstrap_default_is_written_once():
    from crl.core.params import DEFAULT_BOOTSTRAP

    assert _src_hits(GETATTR_DEFAULT) == []
    assert _src_hits(BOOT_LITERAL) == []
    assert _src_hits(re.compile(r"DEFAULT_BOOTSTRAP\s*=")) == [
        (f"core/params.py:{_line_of('core/params.py', 'DEFAULT_BOOTSTRAP =')}: "
         "DEFAULT_BOOTSTRAP = 200")]
    assert FIELD_SPECS["bootstrap"].default == DEFAULT_BOOTSTRAP
    assert f"(default {DEFAULT_BOOTSTRAP})" in FIELD_SPECS["bootstrap"].help


def _line_of(name: str, text: str) -> int:
    lines = (Path(crl.__file__).parent / name).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.startswith(text))


# --- --set owners ---------------------------------------------------------------------------

KNOWN = dict(defenses=["ce", "crl", "relaxloss"], attacks=["loss", "lira"])


def test_set_for_a_component_outside_the_run_is_a_warning():
    cfg = AuditConfig(defenses=["ce", "crl"], attacks=["loss"],
                      set={"crl": {"lam": 0.1}, "relaxloss": {"alpha": 0.05}, "lira": {"k": 1}})
    assert unused_set_owners(cfg, **KNOWN) == ["relaxloss", "lira"]
    assert set_warnings(cfg, **KNOWN) == [
        "--set relaxloss.alpha: relaxloss is not among --defenses/--attacks of this run; ignored",
        "--set lira.k: lira is not among --defenses/--attacks of this run; ignored"]
    assert unused_set_owners(AuditConfig(set={"crl": {"lam": 0.1}}), **KNOWN) == []


def test_set_for_an_unknown_name_is_an_error():
    cfg = AuditConfig(set={"zzz": {"alpha": 1}})
    with pytest.raises(CRLError, match="'zzz', which is neither a defense nor an attack; "
                                       "expected one of: ce, crl, lira, loss, relaxloss"):
        unused_set_owners(cfg, **KNOWN)


# --- --out ----------------------------------------------------------------------------------

def test_out_must_not_be_a_file_or_under_one(tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    err = _refused(capsys, ["audit", "--out", str(blocker)], tmp_path / "unused")
    assert f"--out {blocker}: is an existing file" in err
    below = blocker / "run" / "deeper"
    err = _refused(capsys, ["audit", "--out", str(below)], tmp_path / "unused")
    assert f"--out {below}: lies under the file {blocker}" in err
    assert check_out_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()          # checking creates nothing


def test_out_needs_a_writable_nearest_existing_parent(tmp_path, monkeypatch):
    asked = []

    def no_access(path, mode):
        asked.append(path)
        return False

    monkeypatch.setattr("crl.rundir.os.access", no_access)
    with pytest.raises(CRLError, match=f"--out {tmp_path / 'a' / 'b'}: {tmp_path} is not writable"):
        check_out_dir(tmp_path / "a" / "b")
    assert asked == [tmp_path]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_in_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(CRLError, match="is not writable"):
        check_out_dir(locked / "run")


# --- RunLock / clean_stale_tmp --------------------------------------------------------------

def test_a_second_lock_in_this_process_fails_at_once_and_the_lock_is_released(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(CRLError, match=rf"^run directory {out} is in use by another crl "
                                           rf"process \(pid {os.getpid()}\); wait for it or "
                                           "choose another --out$"), RunLock(out):
            pass
    assert (out / LOCK_NAME).read_text() == ""
    with RunLock(out):                              # free again after the first one left
        pass


HOLDER = textwrap.dedent("""
    import sys
    from crl.rundir import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def _holder(out):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "locked\n"
    return child


def test_another_process_holding_the_lock_is_named_and_its_death_frees_it(tmp_path):
    out = tmp_path / "run"
    child = _holder(out)
    try:
        with pytest.raises(CRLError, match=rf"in use by another crl process \(pid {child.pid}\)"):
            RunLock(out).__enter__()
    finally:
        child.send_signal(signal.SIGKILL)         # killed mid-run: the kernel drops the lock
        child.wait(timeout=30)
    with RunLock(out):
        pass
    child = _holder(out)
    child.communicate("")                           # a clean exit releases it too
    with RunLock(out):
        pass


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from crl.core.utils import atomic_path
    with atomic_path(Path(sys.argv[1]) / "models" / "results.json") as tmp:
        tmp.write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_clean_stale_tmp_removes_what_a_killed_write_left(tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], timeout=60)
    left = list((out / "models").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".results.json.")   # atomic: no target
    (out / "keep.tmp").write_text("not hidden")
    (out / "config.yaml").write_text("a: 1\n")
    elsewhere = tmp_path / "shared"
    elsewhere.mkdir()
    (elsewhere / ".other.tmp").write_text("another run's write")
    (out / "link").symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="needs this process to hold RunLock"):
        clean_stale_tmp(out)
    with RunLock(out):
        assert clean_stale_tmp(out) == left
    assert not left[0].exists()
    assert (out / "keep.tmp").exists() and (out / "config.yaml").exists()
    assert (elsewhere / ".other.tmp").exists() and (out / LOCK_NAME).exists()


def test_lock_on_a_path_that_is_a_file_is_a_crl_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CRLError, match=f"--out {blocker}: cannot create"):
        RunLock(blocker).__enter__()
