"""`crl train`'s options (crl.deploy runs them): the audit's training fields, declared like
AuditConfig's (`crl.config.option`), plus one --defense, --seed, --test-fraction and --out.
Kept free of torch so that `crl train --help` and its argument errors answer at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from crl.config import AuditConfig, check_set, field_specs, option

_AUDIT_FIELDS = {f.name: f for f in dataclasses.fields(AuditConfig)}
SHARED = ("dataset", "model", "epochs", "batch_size", "lr", "momentum", "weight_decay",
          "milestones", "augment", "bf16", "channels_last", "device", "data_root", "download",
          "resume", "overwrite", "cache", "progress")


def _like(name: str, default: Any = dataclasses.MISSING, **change: Any) -> Any:
    """A field declared like AuditConfig's `name` (same check, default and help unless changed)."""
    f = _AUDIT_FIELDS[name]
    check = {**f.metadata["check"], **change}
    if default is not dataclasses.MISSING:
        return option(default, **check)
    if f.default is dataclasses.MISSING:
        return option(factory=f.default_factory, **check)
    return option(f.default, **check)


@dataclass
class TrainConfig:
    """`crl train`'s options: the audit's training fields plus one --defense, --seed, --out."""

    dataset: str = _like("dataset")
    model: str | None = _like("model")
    defense: str = option("crl", kind=str, pattern=r"[^,\s]+", words="one defense name",
                          help="the defense to train with (default crl; `crl list` shows all)")
    epochs: int | None = _like("epochs")
    batch_size: int | None = _like("batch_size")
    lr: float | None = _like("lr")
    momentum: float = _like("momentum")
    weight_decay: float = _like("weight_decay")
    milestones: list[int] = _like("milestones")
    augment: bool = _like("augment")
    bf16: bool = _like("bf16")
    channels_last: bool = _like("channels_last")
    seed: int = option(0, kind=int, low=0, help="the model's seed (default 0)")
    test_fraction: float | None = option(
        None, kind=float, low=0.0, high=1.0, low_open=True, high_open=True, nullable=True,
        help="for data without a test split of its own (digits, imagefolder with train/ "
             "alone): the share held out for testing, stratified, from a fixed stream "
             "(default 0.2)")
    out: str = _like("out", "runs/train", help="output directory (default runs/train)")
    device: str = _like("device")
    data_root: str | None = _like("data_root")
    download: bool = _like("download")
    resume: bool = _like("resume")
    overwrite: bool = _like("overwrite")
    cache: bool = _like("cache")
    progress: bool = _like("progress")
    set: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def defenses(self) -> list[str]:
        """The run's defenses, as crl.config.set_warnings reads them."""
        return [self.defense]

    @property
    def attacks(self) -> list[str]:
        return []

    def resolved(self) -> TrainConfig:
        """A checked copy, the shared fields checked and filled per dataset by AuditConfig."""
        shared = AuditConfig(**{k: getattr(self, k) for k in SHARED}, set=self.set).resolved()
        own = {k: s.check_field(getattr(self, k)) for k, s in TRAIN_SPECS.items()
               if k not in SHARED}
        return dataclasses.replace(self, **{k: getattr(shared, k) for k in SHARED}, **own,
                                   set=check_set(self.set))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TRAIN_SPECS = field_specs(TrainConfig)
