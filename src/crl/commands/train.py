"""`crl train`: one model for deployment, trained on the dataset's own train split.

No member/non-member pool: the model trains on the whole train split (crl.data.splits.own_split:
torchvision's train files, imagefolder's train/ folder; digits, which has no split of its own,
gets a fixed stratified 80/20 split from the stream seed_for(0, "digits-test-split")) and is
evaluated on the test split. OUT then holds

    model.pt        the model (checksummed; crl.load_model(OUT / "model.pt") takes [0, 1] images)
    metrics.jsonl   per-epoch training metrics, with the test split's loss and accuracy
    checkpoint.pt   fit's per-epoch checkpoint: `--resume` continues an interrupted run (its
                    fingerprint holds a hash of the training indices, not the indices)
    config.yaml     the resolved options; version.json: the code version
    split.json      the train and test indices used and where the boundary came from
    members.json    the indices the model trained on (a defense may hold some out)
    result.json     train and test accuracy (and the chance-level warning, if any)
    manifest.json   the command, the config's hash and every file's sha256 (crl.core.manifest)

with the audit's guarantees: every option checked before anything is written (the field checks
and per-dataset defaults every command's config shares, crl.config), atomic writes, OUT locked
against a second run, and the verified model cache (`--no-cache` bypasses it); OUT holds this
run alone (another config is refused unless `--overwrite`; crl.rundir.RunDir).
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from crl.audit.factory import ModelCache, ModelFactory, TrainedModel
from crl.audit.pipeline import chance_warning, recipe_of
from crl.audit.plan import DefenseChoice, ModelJob
from crl.config import set_warnings
from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng, seed_for
from crl.core.utils import (
    cache_dir,
    code_version,
    resolve_device,
    write_json_atomic,
    write_text_atomic,
)
from crl.data.splits import own_split, stratified_take
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.engine.fit import write_metrics
from crl.models.evaluation import evaluate
from crl.models.zoo import MODELS
from crl.rundir import RunDir
from crl.train_options import TrainConfig


@dataclass
class Prepared:
    """What `crl train` checked before writing anything: the resolved options, the data and
    its own split (train indices, test indices, where the boundary came from)."""

    cfg: TrainConfig
    data: ImageData
    train_idx: np.ndarray
    test_idx: np.ndarray
    boundary: str


def prepare_train(cfg: TrainConfig) -> Prepared:
    """Every check that can fail, before anything is written: options, names, parameters,
    the device, the data and its split, the defense's recipe check."""
    from crl.data.datasets import load_dataset

    cfg = cfg.resolved()
    run_dir_of(cfg).check()      # --out holds no other run (read-only)
    MODELS.get(cfg.model)
    defense = build_defense(cfg.defense, cfg.set.get(cfg.defense))
    for w in set_warnings(cfg):
        print(f"crl: warning: {w}", file=sys.stderr)
    resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download)
    train_idx, test_idx, boundary = deployment_split(data, cfg.test_fraction)
    defense.check(recipe_of(cfg), len(train_idx))
    return Prepared(cfg, data, train_idx, test_idx, boundary)


def deployment_split(data: ImageData, test_fraction: float | None
                     ) -> tuple[np.ndarray, np.ndarray, str]:
    """The dataset's own split (crl.data.splits.own_split); for data without one, a
    `test_fraction` given holds out that share of every class instead of the default 20%,
    drawn from the fixed stream seed_for(0, 'test-fraction-split')."""
    if test_fraction is None:
        return own_split(data)
    if data.train_size is not None:
        raise CRLError(f"test_fraction = {test_fraction!r}: {data.name} has a test split of its "
                       "own; expected no --test-fraction for it")
    labels = data.y.numpy().astype(np.int64)
    k = round(test_fraction * len(labels))
    if not 1 <= k <= len(labels) - 1:
        raise CRLError(f"test_fraction = {test_fraction!r}: holds out {k} of {len(labels)} "
                       "samples; expected a fraction that holds out at least 1 and keeps 1")
    test, train = stratified_take(np.arange(len(labels), dtype=np.int64), labels, k,
                                   numpy_rng(0, "test-fraction-split"))
    how = (f"no split of its own: a stratified {100 * test_fraction:g}% test split "
           "(--test-fraction) from the stream seed_for(0, 'test-fraction-split')")
    return np.sort(train), np.sort(test), how


def run_dir_of(cfg: TrainConfig) -> RunDir:
    """OUT as the run directory of this config (crl.rundir.RunDir)."""
    return RunDir(cfg.out, "train", cfg.to_dict(), resume=cfg.resume, overwrite=cfg.overwrite)


def _write_inputs(out: Path, p: Prepared) -> None:
    write_text_atomic(out / "config.yaml", yaml.safe_dump(p.cfg.to_dict(), sort_keys=False))
    write_json_atomic(out / "version.json", code_version())
    write_json_atomic(out / "split.json", {
        "dataset": p.data.name, "content_hash": p.data.content_hash, "boundary": p.boundary,
        "train": p.train_idx.tolist(), "test": p.test_idx.tolist()})


# A model whose batch needs fewer multiply-adds than this (parameters x batch size: exact for an
# MLP, a lower bound for convolutions) trains on one CPU thread: its matrices are too small for a
# thread pool, whose threads only spin on a shared machine (docs/performance.md: digits MLP).
SMALL_BATCH_MACS = 10**7


@contextlib.contextmanager
def _cpu_threads(p: Prepared, factory: ModelFactory):
    """One intra-op thread while a small model trains and is evaluated on the CPU (the result
    then also no longer depends on the core count); the caller's setting is restored."""
    with torch.device("meta"):
        n_params = sum(t.numel() for t in factory.spec.build().parameters())
    small = n_params * p.cfg.batch_size < SMALL_BATCH_MACS
    before = torch.get_num_threads()
    if small and resolve_device(p.cfg.device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _factory(p: Prepared) -> ModelFactory:
    return ModelFactory(p.data, p.cfg.model, recipe_of(p.cfg),
                        ModelCache(cache_dir() / "models" if p.cfg.cache else None),
                        resume=p.cfg.resume, progress=p.cfg.progress)


def _train(out: Path, p: Prepared, factory: ModelFactory) -> TrainedModel:
    cfg = p.cfg
    job = ModelJob("target", 0, seed_for(cfg.seed, "train"),
                   DefenseChoice(cfg.defense, cfg.set.get(cfg.defense, {})), p.train_idx)
    return factory.get(job, run_dir=out, eval_idx=p.test_idx, desc=f"[{cfg.defense}]")


def _members(trained: TrainedModel, p: Prepared) -> dict[str, list[int]]:
    """What the model trained on (model.pt never carries indices); a defense may hold some of
    the train split out (held_out, and its named groups)."""
    members = np.asarray(trained.trained_on, dtype=np.int64)
    out = {"members": members.tolist(),
           "held_out": np.setdiff1d(p.train_idx, members).tolist()}
    out.update({k: np.asarray(v, dtype=np.int64).tolist() for k, v in trained.groups.items()})
    return out


def _result(trained: TrainedModel, p: Prepared) -> dict[str, Any]:
    """Accuracy on what the model trained on and on the test split, and the chance warning."""
    model = trained.model.to(resolve_device(p.cfg.device))
    _, train_acc = evaluate(model, p.data, trained.trained_on)
    test_loss, test_acc = evaluate(model, p.data, p.test_idx)
    trained.model.cpu()
    warning = chance_warning(test_acc, p.data.y[p.test_idx].numpy(), p.data.num_classes)
    return {"dataset": p.data.name, "model": p.cfg.model, "defense": p.cfg.defense,
            "seed": p.cfg.seed, "train_acc": train_acc, "test_acc": test_acc,
            "test_loss": test_loss, "n_train": len(trained.trained_on),
            "n_test": len(p.test_idx), "from_cache": trained.from_cache,
            "warning": warning}


def run_train(cfg: TrainConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole command; returns result.json's content. Writes atomically into a locked OUT."""
    p = prepare_train(cfg)
    out = Path(p.cfg.out)
    with run_dir_of(p.cfg).claim() as run:
        _write_inputs(out, p)
        factory = _factory(p)
        with _cpu_threads(p, factory):
            trained = _train(out, p, factory)
            factory.save(out / "model.pt", trained)
            write_json_atomic(out / "members.json", _members(trained, p))
            write_metrics(out / "metrics.jsonl", trained.history)
            result = _result(trained, p)
        write_json_atomic(out / "result.json", result)
        run.finish()
    echo(f"split: {p.boundary}")
    echo(f"train accuracy {100 * result['train_acc']:.2f}% on {result['n_train']} samples, "
         f"test accuracy {100 * result['test_acc']:.2f}% on {result['n_test']} samples")
    if result["warning"]:
        echo(f"WARNING: {result['warning']}")
    echo(f"wrote {out}/model.pt (load it with crl.load_model), members.json, metrics.jsonl, "
         "result.json")
    return result
