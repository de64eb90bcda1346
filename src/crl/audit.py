"""`crl audit`: train target, shadow and reference models per defense, attack them, report.

Per (defense, seed):
  split (seed)                         target pool (members / non-members) + shadow pool
  target model                         trained on the target members
  k shadow models (if an attack needs them)      each on its own half of the shadow pool
  M reference models (if LiRA/RMIA asked)        each on a random half of the target pool
  signals -> every attack -> metrics -> results row
Trained models are cached by (dataset, split, model, defense, params, recipe, seed), so one set of
shadow/reference models serves every attack and no model is trained twice.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

import crl.attacks  # noqa: F401  (registers attacks)
import crl.defenses  # noqa: F401  (registers defenses)
from crl.attacks.base import Attack, AttackContext, build_attack
from crl.attacks.signals import Signals
from crl.attacks.threshold import input_gradient_norms
from crl.config import AuditConfig
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.errors import CRLError
from crl.metrics import attack_metrics
from crl.models import create_model
from crl.registry import ATTACKS, DEFENSES
from crl.train import (Recipe, evaluate, fit, load_model_file, predict_logits, save_model,
                       write_metrics)
from crl.utils import cache_dir, code_version, write_json_atomic, write_text_atomic


@dataclass
class TrainedModel:
    model: torch.nn.Module
    train_idx: np.ndarray
    report: dict[str, Any]
    history: list[dict[str, float]]


class ModelCache:
    """Trained models on disk, keyed by everything that determines their weights."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    @staticmethod
    def key(**parts: Any) -> str:
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.pt"

    def get(self, key: str) -> TrainedModel | None:
        p = self.path(key)
        if p is None or not p.exists():
            return None
        try:
            model, extra = load_model_file(p)
        except (CRLError, KeyError, RuntimeError):
            return None   # a corrupt or stale cache entry is retrained, not trusted
        return TrainedModel(model, np.asarray(extra["train_idx"]), extra.get("report", {}),
                            extra.get("history", []))


def _indices_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


class Auditor:
    """Runs one resolved AuditConfig."""

    def __init__(self, cfg: AuditConfig, data: ImageData) -> None:
        self.cfg = cfg
        self.data = data
        self.out = Path(cfg.out)
        self.cache = ModelCache(cache_dir() / "models" if cfg.cache else None)
        self.attacks: dict[str, Attack] = {
            name: build_attack(name, cfg.set.get(name)) for name in cfg.attacks
        }
        self.needs = set().union(*(a.needs for a in self.attacks.values()))
        self.wants_shadows = "shadows" in self.needs or any(
            "shadows" in a.uses for a in self.attacks.values())
        self.device = cfg.device
        self.image_size = data.x.shape[-1]

    # --- training ----------------------------------------------------------------------
    def recipe(self, seed: int) -> Recipe:
        c = self.cfg
        return Recipe(epochs=c.epochs, batch_size=c.batch_size, lr=float(c.lr),
                      momentum=c.momentum, weight_decay=c.weight_decay,
                      milestones=tuple(c.milestones), augment=c.augment, seed=seed,
                      device=c.device, bf16=c.bf16, channels_last=c.channels_last)

    def train(self, defense_name: str, train_idx: np.ndarray, seed: int, *,
              eval_idx: np.ndarray | None = None, run_dir: Path | None = None,
              desc: str = "train") -> TrainedModel:
        params = self.cfg.set.get(defense_name, {})
        defense = build_defense(defense_name, params)
        recipe = self.recipe(seed)
        key = ModelCache.key(dataset=self.data.name, n=len(self.data), model=self.cfg.model,
                             defense=defense_name, params=defense.params,
                             recipe={k: v for k, v in recipe.to_dict().items() if k != "device"},
                             train=_indices_digest(train_idx))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        torch.manual_seed(seed)
        model = create_model(self.cfg.model, self.data.x.shape[1], self.image_size,
                             self.data.num_classes)
        result = fit(model, self.data, train_idx, recipe, defense, eval_idx=eval_idx,
                     run_dir=run_dir, resume=self.cfg.resume, progress=self.cfg.progress,
                     desc=desc)
        trained = TrainedModel(result.model.eval(), result.train_idx, defense.report(),
                               result.history)
        if self.cache.root is not None:
            self.save(self.cache.path(key), trained,
                      extra={"train_idx": result.train_idx.tolist(), "report": trained.report,
                             "history": result.history})
        return trained

    def save(self, path: Path, trained: TrainedModel, extra: dict | None = None) -> None:
        save_model(path, trained.model, arch=self.cfg.model, in_channels=self.data.x.shape[1],
                   image_size=self.image_size, num_classes=self.data.num_classes,
                   mean=self.data.mean, std=self.data.std, extra=extra,
                   opacus_fixed=bool(trained.report.get("opacus_fixed_modules")))

    def logits(self, model: torch.nn.Module, idx: np.ndarray, flip: bool = False) -> np.ndarray:
        return predict_logits(model, self.data, idx, flip=flip).numpy()

    def signals(self, models: list[torch.nn.Module], member: np.ndarray, idx: np.ndarray) -> Signals:
        flip = any(a.params.get("flip") for a in self.attacks.values())
        return Signals(
            logits=np.stack([self.logits(m, idx) for m in models]),
            member=member, labels=self.data.y[torch.as_tensor(idx)].numpy(), sample_idx=idx,
            logits_flip=np.stack([self.logits(m, idx, flip=True) for m in models]) if flip else None,
        )

    # --- one (defense, seed) -----------------------------------------------------------
    def run_one(self, defense_name: str, seed: int, split) -> dict[str, Any]:
        from crl.data.splits import half_split, random_halves

        cfg = self.cfg
        tag = f"{defense_name} seed {seed}"
        pool = split.target_pool
        run_dir = self.out / "models" / defense_name / f"seed{seed}"
        target = self.train(defense_name, split.target_members, seed,
                            eval_idx=split.target_nonmembers, run_dir=run_dir,
                            desc=f"[{tag}] target")
        _, train_acc = evaluate(target.model, self.data, split.target_members)
        _, test_acc = evaluate(target.model, self.data, split.target_nonmembers)
        write_metrics(run_dir / "metrics.jsonl", target.history)   # also when from the cache
        self.save(run_dir / "model.pt", target)

        # shadow and reference models: the target's defense (adaptive attacker) or none
        attacker_defense = defense_name if cfg.shadow_defense == "same" else "ce"
        models = [target.model]
        member = [np.isin(pool, split.target_members)]
        if "references" in self.needs:
            halves = random_halves(len(pool), cfg.references, seed=seed * 1000 + 500)
            for j in tqdm(range(cfg.references), desc=f"[{tag}] references", leave=False,
                          disable=not cfg.progress):
                ref = self.train(attacker_defense, pool[halves[j]], seed * 1000 + 500 + j,
                                 desc=f"[{tag}] reference {j + 1}")
                models.append(ref.model)
                member.append(halves[j])
        target_signals = self.signals(models, np.stack(member), pool)

        shadow_signals = None
        shadow_models: list[torch.nn.Module] = []
        if self.wants_shadows and cfg.shadows > 0:
            shadow_member = []
            for i in tqdm(range(1, cfg.shadows + 1), desc=f"[{tag}] shadows", leave=False,
                          disable=not cfg.progress):
                members, _ = half_split(split.shadow_pool, self.data.y.numpy(),
                                        seed=seed * 1000 + i)
                sh = self.train(attacker_defense, members, seed * 1000 + i,
                                desc=f"[{tag}] shadow {i}")
                shadow_models.append(sh.model)
                shadow_member.append(np.isin(split.shadow_pool, members))
            shadow_signals = self.signals(shadow_models, np.stack(shadow_member), split.shadow_pool)

        population = None
        if "rmia" in self.attacks:
            population = self.signals(models, np.zeros((len(models), len(split.shadow_pool)), bool),
                                      split.shadow_pool)

        ctx = AttackContext(
            target=target_signals, num_classes=self.data.num_classes, seed=seed,
            shadow=shadow_signals, population=population,
            gradient_scores=_memo(lambda k: input_gradient_norms(models[k], self.data, pool)),
            shadow_gradient_scores=_memo(
                lambda k: input_gradient_norms(shadow_models[k], self.data, split.shadow_pool))
            if shadow_models else None,
        )
        attacks: dict[str, Any] = {}
        vulnerability: dict[str, np.ndarray] = {}
        is_member = target_signals.member[0]
        for name, attack in self.attacks.items():
            t0 = time.time()
            res = attack.run(ctx)
            row = attack_metrics(res.scores, is_member)
            row.update({k: v for k, v in res.extra.items() if not isinstance(v, np.ndarray)})
            if res.loo_scores is not None:
                row["leave_one_out"] = attack_metrics(res.loo_scores.ravel(),
                                                      target_signals.member.ravel())
            row["seconds"] = round(time.time() - t0, 3)
            attacks[name] = row
            vulnerability[name] = res.scores
        margins = _margins(target_signals.logits[0], target_signals.labels)
        return {
            "row": {
                "dataset": self.data.name, "model": cfg.model, "defense": defense_name,
                "params": build_defense(defense_name, cfg.set.get(defense_name)).params,
                "seed": seed, "train_acc": train_acc, "test_acc": test_acc,
                "n_members": int(len(split.target_members)),
                "n_nonmembers": int(len(split.target_nonmembers)),
                "defense_report": target.report, "attacks": attacks,
            },
            "margins": margins, "is_member": is_member, "scores": vulnerability,
            "sample_idx": pool, "labels": target_signals.labels,
        }


def _memo(fn: Callable[[int], np.ndarray]) -> Callable[[int], np.ndarray]:
    cache: dict[int, np.ndarray] = {}

    def wrapped(k: int) -> np.ndarray:
        if k not in cache:
            cache[k] = fn(k)
        return cache[k]

    return wrapped


def _margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit margin to the decision boundary, g_y - max_{i != y} g_i (the paper's Fig. 6)."""
    z = np.asarray(logits, dtype=np.float64).copy()
    rows = np.arange(len(labels))
    true = z[rows, labels].copy()
    z[rows, labels] = -np.inf
    return true - z.max(1)


def validate_names(cfg: AuditConfig) -> None:
    """Fail fast, before any training or writing, on unknown names or parameters and on too
    few shadow or reference models for an attack."""
    from crl.models.zoo import MODELS

    MODELS.get(cfg.model)
    for d in cfg.defenses:
        build_defense(d, cfg.set.get(d))
    for attack in (build_attack(a, cfg.set.get(a)) for a in cfg.attacks):
        need = max(2, attack.min_references)
        if "references" in attack.needs and cfg.references is not None and cfg.references < need:
            raise CRLError(f"--references {cfg.references}: attack '{attack.name}' needs at "
                           f"least {need} reference models")
        if "shadows" in attack.needs and cfg.shadows < 1:
            raise CRLError(f"--shadows {cfg.shadows}: the {attack.name} attack needs at least "
                           "1 shadow model")
    known = set(DEFENSES.names()) | set(ATTACKS.names())
    for owner in cfg.set:
        if owner not in known:
            raise CRLError(f"--set names '{owner}', which is neither a defense nor an attack; "
                           f"expected one of: {', '.join(sorted(known))}")
    if len(set(cfg.defenses)) != len(cfg.defenses):
        raise CRLError(f"--defenses has duplicates: {','.join(cfg.defenses)}")


def run_audit(cfg: AuditConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole audit; returns {'rows': [...], 'out': Path}. Writes results atomically."""
    from crl.data.datasets import load_dataset
    from crl.data.splits import make_pool_split
    from crl.report import write_report

    cfg = cfg.resolved()
    validate_names(cfg)
    data = load_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download)
    splits = {s: make_pool_split(data.y.numpy(), seed=s, subset=cfg.subset) for s in cfg.seeds}

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json_atomic(out / "version.json", code_version())
    for s, split in splits.items():
        write_json_atomic(out / "splits" / f"seed{s}.json", split.to_dict())

    auditor = Auditor(cfg, data)
    outcomes = []
    t0 = time.time()
    for defense_name in cfg.defenses:
        for s in cfg.seeds:
            echo(f"[{defense_name} seed {s}] training and attacking ...")
            outcomes.append(auditor.run_one(defense_name, s, splits[s]))
    rows = [o["row"] for o in outcomes]
    table = write_report(out, rows, outcomes, cfg)
    write_json_atomic(out / "results.json", rows)
    echo(table)
    echo(f"wrote {out}/results.json, report.md and figures/ in {time.time() - t0:.0f} s")
    return {"rows": rows, "out": out}
