"""`Recipe`: how one model trains (SGD with momentum and weight decay, multistep LR schedule)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from crl.config import DATASET_DEFAULTS, MachineConfig, RecipeConfig
from crl.core.errors import CRLError

#: a Recipe's defaults are the commands' (crl.config declares each once): the recipe of every
#: dataset but digits, and the config fields' own defaults
_DATASET = DATASET_DEFAULTS["*"]
_FIELD = {f.name: f.default for cls in (RecipeConfig, MachineConfig)
          for f in dataclasses.fields(cls)}


@dataclass
class Recipe:
    """How to train. `seed` is the model's own seed: its named streams (init, shuffle,
    augmentation, a defense's draws) are derived from it with `crl.core.seeding.seed_for`.
    Unlike the commands' default recipe, a bare Recipe trains at a constant lr (milestones
    belong to their epoch count)."""

    epochs: int = _DATASET["epochs"]
    batch_size: int = _DATASET["batch_size"]
    lr: float = _DATASET["lr"]
    momentum: float = _FIELD["momentum"]
    weight_decay: float = _FIELD["weight_decay"]
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = False
    seed: int = 0
    device: str = _FIELD["device"]
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        try:
            self.milestones = tuple(int(m) for m in self.milestones)
        except (TypeError, ValueError):
            raise CRLError(f"milestones = {self.milestones!r}: expected a list of positive "
                           "integers") from None
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CRLError(f"{name} = {v!r}: expected an integer >= 1")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise CRLError(f"{name} = {v!r}: expected a number >= 0")
        if self.lr == 0:
            raise CRLError("lr = 0: expected a number > 0")
        if any(m <= 0 for m in self.milestones):
            raise CRLError(f"milestones = {list(self.milestones)}: expected positive epochs")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def weights_key(self) -> dict[str, Any]:
        """The fields that shape the weights (the device does not)."""
        return {k: v for k, v in self.to_dict().items() if k != "device"}
