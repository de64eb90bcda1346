"""Each command's config over one shared base; YAML keys mirror the CLI flags; the resolved
config is saved with each run.

    RecipeConfig    what every command trains: data, model, training recipe, `set`
    MachineConfig   where and how it runs (device, data files, resume, cache, progress bars)
    AuditConfig     `crl audit` (and `crl tune`'s stages, `crl.audit_training`): RecipeConfig +
                    the audit's fields (AuditRecipe) + MachineConfig + the engine options
    TrainConfig     `crl train` (crl.train_options): RecipeConfig + one defense + MachineConfig
    TuneOptions     `crl tune`'s own options (crl.tune.options), beside its AuditConfig

Every field declares its check and its default once, with `option(...)`: the type and range (a
`crl.core.params.Param`, so errors read `epochs = 1.5: expected an integer >= 1`), whether it is a
list, its CLI help and flag; the per-dataset defaults are DATASET_DEFAULTS. `.resolved()` checks
every value before anything is written; `crl.cli` builds each parser from the same declarations
(`cli_fields(cls)`). Code reads a field as an attribute, never with a fallback default.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from crl.core.canary_spec import SPEC_PATTERN as CANARY_PATTERN
from crl.core.canary_spec import SPEC_WORDS as CANARY_WORDS
from crl.core.errors import CRLError
from crl.core.params import DEFAULT_BOOTSTRAP, Param

ENGINE_NAMES = ("sequential", "ensemble", "auto", "ray")   # crl.engine's registered engines
DEFAULT_ATTACKS = ["loss", "confidence", "entropy", "mentr", "gradx", "nn", "lira", "rmia"]

# Per-dataset defaults, applied to every field the user left unset (see docs/models.md); the
# milestones only together with the epochs (a schedule fits one epoch count: see resolved()).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": "mlp", "epochs": 60, "batch_size": 32, "lr": 0.05, "milestones": [],
               "subset": 400, "references": 64},
    "*": {"model": "cnn", "epochs": 30, "batch_size": 128, "lr": 0.05, "milestones": [15, 25],
          "subset": None, "references": 16},
}


@dataclass(frozen=True)
class FieldSpec(Param):
    """A config field's check: a `Param` (each item's check when `many`), plus
    many:    the value is a list of such items (`unique`: no repeats; `nonempty`: >= 1 item)
    pattern: a regular expression a str value must match in full
    words:   what a valid value looks like, when Param.expected() cannot say it
    flag:    the CLI flag when not --name-with-dashes (cli=False: a YAML key only)."""

    many: bool = False
    unique: bool = False
    nonempty: bool = False
    pattern: str | None = None
    words: str | None = None
    flag: str | None = None
    cli: bool = True

    def expected(self) -> str:
        return self.words or super().expected()

    @property
    def flags(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def check_field(self, value: Any) -> Any:
        """`value` converted to this field's type, else a one-line CRLError."""
        if value is None and self.nullable:
            return None
        if not self.many:
            if self._item_ok(value):
                return self.kind(value)
        elif isinstance(value, (list, tuple)) and all(self._item_ok(v) for v in value):
            items = [self.kind(v) for v in value]
            if (items or not self.nonempty) and (len(set(items)) == len(items) or not self.unique):
                return items
        raise CRLError(f"{self.name} = {value!r}: expected {self.expected()}")

    def _item_ok(self, v: Any) -> bool:
        if not self._valid(v):
            return False
        return self.pattern is None or re.fullmatch(self.pattern, v) is not None


def option(default: Any = None, *, factory: Any = None, **check: Any) -> Any:
    """A dataclass field whose metadata holds its check (the keywords of FieldSpec)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


C = TypeVar("C", bound="RecipeConfig")
_NAMES = dict(kind=str, many=True, unique=True, nonempty=True, pattern=r"[^,\s]+")
_FILL = "(default per dataset)"


@dataclass
class RecipeConfig:
    """What every command trains, shared by audit, tune and train: the data, the model and its
    training recipe, the defenses' parameters (`set`). The checks (`resolved`, `checked`) serve
    every command's config, each over its own declared fields."""

    #: the flags --help lists first, in this order (then the others in declaration order)
    HELP_FIRST: ClassVar[tuple[str, ...]] = ("dataset", "model")

    dataset: str = option("digits", kind=str, pattern=r"(?s).+", words="a dataset name",
                          help="digits (default) | cifar10 | cifar100 | svhn | imagefolder:PATH")
    model: str | None = option(None, kind=str, nullable=True,
                               help="mlp | cnn | resnet18 | vgg11_bn | densenet121 | googlenet")
    epochs: int | None = option(None, kind=int, low=1, nullable=True, help=f"epochs {_FILL}")
    batch_size: int | None = option(None, kind=int, low=1, nullable=True,
                                    help=f"batch size {_FILL}")
    lr: float | None = option(None, kind=float, low=0, low_open=True, nullable=True,
                              help=f"SGD learning rate {_FILL}")
    momentum: float = option(0.9, kind=float, low=0, cli=False)
    weight_decay: float = option(5e-4, kind=float, low=0, cli=False)
    milestones: list[int] | None = option(None, kind=int, low=1, many=True, nullable=True,
                                          words="a list of positive integers",
                                          help="epochs at which the lr is multiplied by 0.1 "
                                               "(default per dataset when --epochs is too; "
                                               "'' for none)")
    augment: bool = option(False, kind=bool, help="random crop + flip")
    bf16: bool = option(False, kind=bool, help="bfloat16 autocast")
    channels_last: bool = option(False, kind=bool,
                                 help="channels_last memory format (faster convolutions on CPU)")
    set: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resolved(self: C) -> C:
        """A copy with every value checked (and converted, e.g. 2.0 -> 2) and the per-dataset
        defaults filled into the fields of this config the user left unset."""
        cfg = dataclasses.replace(self, **self.checked())
        key = cfg.dataset if cfg.dataset in DATASET_DEFAULTS else "*"
        filled = {k: v for k, v in DATASET_DEFAULTS[key].items()
                  if k in field_specs(type(self)) and getattr(cfg, k) is None}
        if cfg.milestones is None and cfg.epochs is not None:
            filled["milestones"] = []    # the default schedule belongs to the default epochs
        return dataclasses.replace(cfg, **filled)

    def validate(self) -> None:
        """Raise a one-line CRLError on the first bad value."""
        self.checked()

    def checked(self) -> dict[str, Any]:
        """Every field's value, checked and converted to its declared type."""
        values = {name: spec.check_field(getattr(self, name))
                  for name, spec in field_specs(type(self)).items()}
        values["set"] = check_set(self.set)
        return values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def components(self) -> list[str]:
        """The defense and attack names this run uses (the `--set` owners it reads)."""
        raise NotImplementedError


@dataclass
class MachineConfig:
    """Where and how a command runs (shared by every command): the device, the dataset files,
    whether it resumes or replaces a run, the model cache, progress bars."""

    device: str = option("auto", kind=str, pattern=r"auto|cpu|cuda(:\d+)?",
                         words="auto, cpu, cuda or cuda:N",
                         help="auto (default) | cpu | cuda | cuda:N")
    data_root: str | None = option(None, kind=str, nullable=True,
                                   help="folder holding torchvision dataset files")
    download: bool = option(False, kind=bool, help="allow torchvision to download the dataset")
    resume: bool = option(False, kind=bool, help="continue an interrupted run in --out")
    overwrite: bool = option(False, kind=bool,
                             help="replace the run in --out (removed first) by this one")
    cache: bool = option(True, kind=bool, flag="--no-cache",
                         help="do not reuse or store trained models in the model cache")
    progress: bool = option(True, kind=bool, flag="--quiet", help="no progress bars")


@dataclass
class AuditRecipe(RecipeConfig):
    """What an audit measures, beyond the shared recipe (declared apart from AuditConfig's
    engine options so that the fields keep their order: recipe, audit, machine, engine)."""

    HELP_FIRST: ClassVar[tuple[str, ...]] = ("dataset", "model", "defenses", "attacks")

    defenses: list[str] = option(factory=lambda: ["ce", "crl"], **_NAMES,
                                 words="a non-empty list of distinct defense names",
                                 help="comma-separated defense names (default: ce,crl)")
    attacks: list[str] = option(factory=lambda: list(DEFAULT_ATTACKS), **_NAMES,
                                words="a non-empty list of distinct attack names",
                                help="comma-separated attack names (default: all)")
    subset: int | None = option(None, kind=int, low=1, nullable=True,
                                help="use N samples in total (stratified)")
    seeds: list[int] = option(factory=lambda: [0, 1, 2], kind=int, low=0, many=True,
                              unique=True, nonempty=True,
                              words="a non-empty list of distinct integers >= 0",
                              help="comma-separated seeds (default 0,1,2)")
    shadows: int = option(5, kind=int, low=0, help="shadow models per target (default 5)")
    references: int | None = option(None, kind=int, low=1, nullable=True,
                                    help=f"LiRA/RMIA reference models {_FILL}")
    bootstrap: int = option(DEFAULT_BOOTSTRAP, kind=int, low=50,
                            help="bootstrap resamples behind every 95%% interval "
                                 f"(default {DEFAULT_BOOTSTRAP})")
    shadow_defense: str = option("same", kind=str, choices=("same", "none"),
                                 help="train shadows with the target's defense (same, default) "
                                      "or none")
    canaries: str | None = option(None, kind=str, nullable=True, pattern=CANARY_PATTERN,
                                  words=CANARY_WORDS,
                                  help="N[:KIND]: add N canaries (mislabeled, default, or noise) "
                                       "to the target pool; worst-case metrics "
                                       "(docs/worst-case.md)")
    epsilon_attack: str | None = option(None, kind=str, nullable=True, pattern=r"[A-Za-z0-9_]+",
                                        words="an attack name or null",
                                        help="--canaries: the attack whose canary scores give "
                                             "the epsilon lower bound (default: lira when it "
                                             "runs, else loss)")
    epsilon_delta: float = option(1e-5, kind=float, low=0, high=1, high_open=True,
                                  help="delta of the epsilon lower bound (default 1e-5)")
    out: str = option("runs/audit", kind=str, pattern=r"(?s).+", words="a non-empty path",
                      help="run directory (default runs/audit)")

    def components(self) -> list[str]:
        return [*self.defenses, *self.attacks]


@dataclass
class AuditConfig(MachineConfig, AuditRecipe):
    """`crl audit`'s config (also the recipe of `crl tune`'s stages and of
    `crl.audit_training`): the shared recipe, the audit's fields, the machine, the engine."""

    engine: str = option("auto", kind=str, choices=ENGINE_NAMES,
                         help="how models train: auto (default: per model and device, "
                              "docs/performance.md) | sequential | ensemble (K at once) | ray")
    ensemble_size: int | None = option(None, kind=int, low=1, nullable=True,
                                       help="--engine ensemble/auto: models trained at once "
                                            "(default: from the model size, at most 64)")
    ray_address: str | None = option(None, kind=str, nullable=True, pattern=r"\S+",
                                     words="a Ray head address (HOST:PORT or auto) or null",
                                     help="--engine ray: the running Ray cluster to use, e.g. "
                                          "HEAD:6379 (default: start a local Ray)")
    ray_chunk: int | None = option(None, kind=int, low=1, nullable=True,
                                   help="--engine ray: models per Ray task (default: spread "
                                        "evenly over the cluster's CPUs or GPUs)")


@functools.cache
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """The FieldSpec of every `option(...)` field of the dataclass `cls` (a command's config,
    or another command's options, e.g. crl.tune's), in declaration order."""
    specs = {}
    for f in dataclasses.fields(cls):
        if "check" in f.metadata:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            specs[f.name] = FieldSpec(f.name, default, **f.metadata["check"])
    return specs


FIELD_SPECS: dict[str, FieldSpec] = field_specs(AuditConfig)
FIELDS = frozenset(f.name for f in dataclasses.fields(AuditConfig))


def cli_fields(cls: type = AuditConfig) -> list[FieldSpec]:
    """The fields of `cls` with a CLI flag, `cls.HELP_FIRST` first, then in declaration order
    (crl.cli builds its parsers from them)."""
    specs = field_specs(cls)
    first = [specs[name] for name in cls.HELP_FIRST]
    return first + [s for s in specs.values() if s.cli and s.name not in cls.HELP_FIRST]


def check_set(value: Any) -> dict[str, dict[str, Any]]:
    """`set` maps a defense/attack name to {PARAM: VALUE}; the values are checked later by the
    component's own ParamSpec."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise CRLError(f"set = {value!r}: expected a mapping of defense/attack names to "
                       "{PARAM: VALUE}")
    for owner, params in value.items():
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise CRLError(f"set.{owner} = {params!r}: expected a mapping of parameter names "
                           "to values")
    return {owner: dict(params) for owner, params in value.items()}


def load_yaml_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe whose keys mirror the CLI flags (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise CRLError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise CRLError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise CRLError(f"--config {path}: expected a mapping of flag names to values")
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS:
            raise CRLError(f"--config {path}: unknown key '{k}'; expected one of: "
                           f"{', '.join(sorted(FIELDS))}")
        out[key] = v
    for key in ("defenses", "attacks"):
        if isinstance(out.get(key), str):
            out[key] = split_names(out[key])
    if isinstance(out.get("seeds"), int) and not isinstance(out["seeds"], bool):
        out["seeds"] = [out["seeds"]]
    if isinstance(out.get("canaries"), int) and not isinstance(out["canaries"], bool):
        out["canaries"] = str(out["canaries"])
    return out


def split_names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`crl.alpha_rce=0.5` -> {'crl': {'alpha_rce': 0.5}} (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        lhs = item.split("=", 1)[0]
        if "=" not in item or "." not in lhs or "" in (p.strip() for p in lhs.split(".", 1)):
            raise CRLError(f"--set '{item}': expected NAME.PARAM=VALUE, e.g. crl.alpha_rce=0.5")
        value = item.split("=", 1)[1]
        owner, param = lhs.split(".", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out.setdefault(owner.strip(), {})[param.strip()] = parsed
    return out


def unused_set_owners(cfg: RecipeConfig, defenses: Iterable[str] | None = None,
                      attacks: Iterable[str] | None = None) -> list[str]:
    """The `--set` owners that are real defenses or attacks but not part of this run (their
    values are ignored); a CRLError for an owner that is neither. `defenses`/`attacks` are the
    known names (default: the registries)."""
    if not cfg.set:
        return []
    defenses, attacks = _known_names(defenses, attacks)
    known = set(defenses) | set(attacks)
    for owner in cfg.set:
        if owner not in known:
            raise CRLError(f"--set names '{owner}', which is neither a defense nor an attack; "
                           f"expected one of: {', '.join(sorted(known))}")
    in_run = set(cfg.components())
    return [owner for owner in cfg.set if owner not in in_run]


def set_warnings(cfg: RecipeConfig, defenses: Iterable[str] | None = None,
                 attacks: Iterable[str] | None = None) -> list[str]:
    """One line per ignored `--set` owner, e.g. `--set relaxloss.alpha: relaxloss is not among
    --defenses/--attacks of this run; ignored` (for the caller to print)."""
    lines = []
    for owner in unused_set_owners(cfg, defenses, attacks):
        names = ", ".join(f"{owner}.{param}" for param in cfg.set[owner]) or owner
        lines.append(f"--set {names}: {owner} is not among --defenses/--attacks of this run; "
                     "ignored")
    return lines


def _known_names(defenses: Iterable[str] | None,
                 attacks: Iterable[str] | None) -> tuple[list[str], list[str]]:
    if defenses is None or attacks is None:
        from crl.core.catalog import NAMES  # the registries' names, without importing torch

        defenses = NAMES["defense"] if defenses is None else defenses
        attacks = NAMES["attack"] if attacks is None else attacks
    return list(defenses), list(attacks)
