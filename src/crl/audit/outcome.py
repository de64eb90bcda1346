"""The typed outcome of auditing one target (one defense, one seed), which the report reads,
and its results.json row."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crl.core.errors import CRLError
from crl.core.utils import atomic_path


@dataclass
class Evaluation:
    """Who counts as what for the target, as masks over the target pool's samples.

    members: the samples the released model actually trained on; nonmembers: the split's
    non-members; samples a defense held out are neither. groups: extra positive sets attacked
    separately against the same non-members (e.g. DMP's teacher-only half). canary: the
    canaries (--canaries), which are never members, non-members or in a group here: they are
    scored on their own (`TargetOutcome.canaries`)."""

    sample_idx: np.ndarray
    members: np.ndarray
    nonmembers: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    canary: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.canary is None:
            self.canary = np.zeros(len(self.sample_idx), bool)

    @property
    def evaluated(self) -> np.ndarray:
        return self.members | self.nonmembers

    def labels_of(self, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(selection mask over the pool, is_member over the selection) for `positives`."""
        sel = positives | self.nonmembers
        return sel, positives[sel]


@dataclass
class AttackOutcome:
    name: str
    scores: np.ndarray                       # [pool] target scores (higher = member)
    metrics: dict[str, Any]                  # on the evaluated samples, with intervals
    extra: dict[str, Any] = field(default_factory=dict)
    leave_one_out: dict[str, Any] | None = None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    pooled: np.ndarray | None = None         # [models, pool] every model as the target (LOO)

    def row(self) -> dict[str, Any]:
        out = {**self.metrics, **self.extra}
        if self.leave_one_out is not None or "loo_skipped" in self.extra:
            out["leave_one_out"] = self.leave_one_out
        for name, m in self.groups.items():
            out[name] = m
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class Exposure:
    """Per-sample exposure of the target pool: over the models that trained on a sample, the
    fraction whose score for it exceeds that model's threshold at `fpr` (set on its
    non-members); NaN for a sample no model trained on. `top`: pool positions of the most
    exposed samples, most exposed first, with their images (uint8 [k, C, H, W])."""

    attack: str
    fpr: float
    values: np.ndarray                       # [pool]
    n_in: np.ndarray                         # [pool] models that trained on the sample
    thresholds: np.ndarray                   # [models]
    top: np.ndarray                          # [k]
    top_images: np.ndarray                   # [k, C, H, W]


@dataclass
class TargetOutcome:
    dataset: str
    model: str
    defense: str
    params: dict[str, Any]
    seed: int
    train_acc: float
    test_acc: float
    evaluation: Evaluation
    labels: np.ndarray                       # [pool]
    margins: np.ndarray                      # [pool] logit margin of the target
    attacks: dict[str, AttackOutcome]
    defense_report: dict[str, Any] = field(default_factory=dict)
    chance_warning: str | None = None
    model_member: np.ndarray | None = None   # [models, pool] what each pool model trained on
    model_held_out: np.ndarray | None = None  # [models, pool] handed to it but held out
    canaries: dict[str, Any] | None = None   # {"n", "kind", "attacks": {name: metrics}}
    exposure: Exposure | None = None
    # what ran: {"trained_by", "references", "shadows", "attacks": {name: [models used]}}
    # (crl.audit.pipeline.models_used); None in runs written before it was recorded
    models_used: dict[str, Any] | None = None

    @property
    def is_member(self) -> np.ndarray:
        """Membership of the evaluated samples (in pool order)."""
        return self.evaluation.members[self.evaluation.evaluated]

    def evaluated(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)[self.evaluation.evaluated]

    def row(self) -> dict[str, Any]:
        ev = self.evaluation
        row = {
            "dataset": self.dataset, "model": self.model, "defense": self.defense,
            "params": self.params, "seed": self.seed, "train_acc": self.train_acc,
            "test_acc": self.test_acc, "n_members": int(ev.members.sum()),
            "n_nonmembers": int(ev.nonmembers.sum()),
            "n_held_out": int(len(ev.sample_idx) - ev.evaluated.sum()),
            "defense_report": self.defense_report,
            "attacks": {k: a.row() for k, a in self.attacks.items()},
        }
        if self.chance_warning:
            row["warning"] = self.chance_warning
        if self.canaries is not None:
            row["canaries"] = self.canaries
        if self.models_used is not None:
            row["models_used"] = self.models_used
        return row


def _meta(o: TargetOutcome) -> dict[str, Any]:
    attacks = {k: {"metrics": a.metrics, "extra": a.extra, "leave_one_out": a.leave_one_out,
                   "groups": a.groups, "seconds": a.seconds} for k, a in o.attacks.items()}
    return {"dataset": o.dataset, "model": o.model, "defense": o.defense, "params": o.params,
            "seed": o.seed, "train_acc": o.train_acc, "test_acc": o.test_acc,
            "defense_report": o.defense_report, "chance_warning": o.chance_warning,
            "attacks": attacks, "canaries": o.canaries, "models_used": o.models_used,
            "exposure": None if o.exposure is None else {"attack": o.exposure.attack,
                                                        "fpr": o.exposure.fpr}}


_EXPOSURE_ARRAYS = ("values", "n_in", "thresholds", "top", "top_images")


def _arrays(o: TargetOutcome) -> dict[str, np.ndarray]:
    """The per-sample arrays of `o` under their npz names."""
    ev = o.evaluation
    arrays = {"sample_idx": ev.sample_idx, "members": ev.members, "nonmembers": ev.nonmembers,
              "canary": ev.canary, "labels": o.labels, "margins": o.margins}
    arrays.update({f"group__{k}": v for k, v in ev.groups.items()})
    arrays.update({f"scores__{k}": a.scores for k, a in o.attacks.items()})
    arrays.update({f"pooled__{k}": a.pooled for k, a in o.attacks.items()
                   if a.pooled is not None})
    if o.model_member is not None:
        arrays["model_member"] = o.model_member
    if o.model_held_out is not None:
        arrays["model_held_out"] = o.model_held_out
    if o.exposure is not None:
        arrays.update({f"exposure__{k}": getattr(o.exposure, k) for k in _EXPOSURE_ARRAYS})
    return arrays


def _exposure(meta: dict[str, Any] | None, arrays: dict[str, np.ndarray]) -> Exposure | None:
    if meta is None:
        return None
    return Exposure(meta["attack"], meta["fpr"],
                    **{k: arrays[f"exposure__{k}"] for k in _EXPOSURE_ARRAYS})


def outcome_path(folder: Path, defense: str, seed: int) -> Path:
    return Path(folder) / f"{defense}_seed{seed}.npz"


def save_outcome(folder: Path, o: TargetOutcome) -> Path:
    """Per-sample arrays (scores of every attack, margins, membership masks) plus every metric,
    compressed: `crl report` rebuilds the report from these without training."""
    arrays = {**_arrays(o), "meta": np.array(json.dumps(_meta(o), default=_plain_json))}
    path = outcome_path(folder, o.defense, o.seed)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_outcome(path: Path) -> TargetOutcome:
    """The TargetOutcome saved by `save_outcome` (no pickle: plain arrays and JSON)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError) as e:
        raise CRLError(f"scores file {path} is unreadable ({type(e).__name__}); expected a "
                       "file written by crl audit") from None
    groups = {k[len("group__"):]: v for k, v in arrays.items() if k.startswith("group__")}
    ev = Evaluation(arrays["sample_idx"], arrays["members"], arrays["nonmembers"], groups,
                    arrays.get("canary"))
    attacks = {k: AttackOutcome(name=k, scores=arrays[f"scores__{k}"],
                                pooled=arrays.get(f"pooled__{k}"), **v)
               for k, v in meta.pop("attacks").items()}
    exposure = _exposure(meta.pop("exposure", None), arrays)
    return TargetOutcome(evaluation=ev, labels=arrays["labels"], margins=arrays["margins"],
                         attacks=attacks, model_member=arrays.get("model_member"),
                         model_held_out=arrays.get("model_held_out"),
                         exposure=exposure, **meta)


def _plain_json(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
