"""The audit recipe: YAML keys mirror the CLI flags; the resolved recipe is saved with each run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crl.errors import CRLError

DEFAULT_ATTACKS = ["loss", "confidence", "entropy", "mentr", "gradx", "nn", "lira", "rmia"]

# Per-dataset defaults, applied to every field the user left unset (see docs/models.md).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"model": "mlp", "epochs": 60, "batch_size": 32, "lr": 0.05, "subset": 400,
               "references": 32},
    "*": {"model": "cnn", "epochs": 30, "batch_size": 128, "lr": 0.05, "subset": None,
          "references": 16},
}


@dataclass
class AuditConfig:
    dataset: str = "digits"
    model: str | None = None
    defenses: list[str] = field(default_factory=lambda: ["ce", "crl"])
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=list)
    augment: bool = False
    bf16: bool = False
    channels_last: bool = False
    subset: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    shadows: int = 5
    references: int | None = None
    shadow_defense: str = "same"
    out: str = "runs/audit"
    device: str = "auto"
    data_root: str | None = None
    download: bool = False
    resume: bool = False
    cache: bool = True
    progress: bool = True
    set: dict[str, dict[str, Any]] = field(default_factory=dict)

    def resolved(self) -> "AuditConfig":
        """A copy with per-dataset defaults filled in and every value checked."""
        key = self.dataset if self.dataset in DATASET_DEFAULTS else "*"
        filled = {k: v for k, v in DATASET_DEFAULTS[key].items() if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **filled)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "references"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                raise CRLError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not isinstance(self.shadows, int) or isinstance(self.shadows, bool) or self.shadows < 0:
            raise CRLError(f"--shadows must be a non-negative integer, got {self.shadows!r}")
        if self.lr is not None and (not isinstance(self.lr, (int, float)) or self.lr <= 0):
            raise CRLError(f"--lr must be a positive number, got {self.lr!r}")
        if self.subset is not None and (not isinstance(self.subset, int) or self.subset <= 0):
            raise CRLError(f"--subset must be a positive integer, got {self.subset!r}")
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise CRLError(f"--seeds must be non-negative integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise CRLError(f"--seeds has duplicates: {self.seeds!r}")
        if self.shadow_defense not in ("same", "none"):
            raise CRLError(f"--shadow-defense must be 'same' or 'none', got {self.shadow_defense!r}")
        if not self.defenses:
            raise CRLError("--defenses is empty; expected at least one defense name")
        if not self.attacks:
            raise CRLError("--attacks is empty; expected at least one attack name")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(AuditConfig)}


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
    if isinstance(out.get("seeds"), int):
        out["seeds"] = [out["seeds"]]
    return out


def split_names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`crl.alpha_rce=0.5` -> {'crl': {'alpha_rce': 0.5}} (values parsed as YAML scalars)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise CRLError(f"--set '{item}': expected NAME.PARAM=VALUE, e.g. crl.alpha_rce=0.5")
        lhs, value = item.split("=", 1)
        owner, param = lhs.split(".", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        out.setdefault(owner.strip(), {})[param.strip()] = parsed
    return out
