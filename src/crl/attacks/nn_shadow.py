"""The paper's NN attack (shadow-model attack of Shokri et al. 2017, as in SPEC section 6).

Input: the softmax posterior of a model on a sample concatenated with the one-hot true label
(2C features). Attack model: MLP [2C, 128, 64, 1] with ReLU and dropout, trained with Adam
(batch 256) to tell the k shadow models' members from their non-members: every shadow model
contributes one row per shadow-pool sample (its posterior, the label, whether it trained on it).

Model selection uses held-out SHADOW data only, split BY SAMPLE: `val_fraction` (20%) of the
shadow-pool samples are held out with all their rows (one per shadow model), so the attack model
is never selected on rows of samples it saw under another shadow model. The held-out samples are
drawn per stratum of "how many shadow models trained on the sample" (with one shadow model: a
split stratified by membership). After every epoch the attack model's weighted BCE on the
held-out rows is measured; the weights of the best epoch are kept and training stops after
`patience` epochs without improvement (or at `epochs`). The target model is touched once, at
the end, to produce the scores: the predicted member probability of each target-pool sample
under model 0.

Class balance: with the paper's 50/50 splits members and non-members are balanced; otherwise
the BCE is weighted by pos_weight = (#non-members / #members) of the training rows (also used
for the held-out loss), so imbalance cannot be exploited by a constant prediction.

Guards against the bugs of published code (SPEC section 6): every layer lives in an
nn.Sequential (registered and trained: tests check that every parameter tensor changes), the
epoch is never chosen on the target, and the scores are this attack's own.
Deterministic given ctx.seed: the held-out split, initialisation, dropout and shuffling draw from
streams named (ctx.seed, "attack", <name>, "holdout" | "init" | "dropout" | "shuffle")
(crl.core.seeding) inside a forked torch RNG, so the global RNG state is left untouched.
Training and scoring run on one CPU thread (restored afterwards): the MLP is tiny, and the
result then does not depend on the machine's thread count.
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from crl.attacks.base import Attack, AttackContext, AttackResult
from crl.attacks.scores import check_logits
from crl.attacks.signals import Signals
from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec, check_value
from crl.core.registry import ATTACKS
from crl.core.seeding import numpy_rng, seed_for, torch_generator

NN_SPEC = ParamSpec(
    Param("hidden", "128,64", str, help="hidden layer widths, comma-separated (or a list)"),
    Param("dropout", 0.2, float, low=0.0, high=1.0, high_open=True),
    Param("epochs", 100, int, low=1, help="at most this many epochs"),
    Param("patience", 10, int, low=1, help="stop after this many epochs without improvement"),
    Param("lr", 1e-3, float, low=0.0, low_open=True, help="Adam learning rate"),
    Param("batch_size", 256, int, low=1),
    Param("val_fraction", 0.2, float, low=0.0, high=1.0, low_open=True, high_open=True,
          help="fraction of shadow-pool samples held out for model selection"),
)
_WIDTHS = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def attack_features(logits, labels, num_classes: int | None = None) -> np.ndarray:
    """[softmax posterior, one-hot label] as float32 rows: logits [..., N, C] -> [rows, 2C]."""
    z, y = check_logits(logits, labels)
    c = z.shape[-1]
    if num_classes is not None and c != num_classes:
        raise CRLError(f"logits have {c} classes, expected {num_classes}")
    post = np.exp(z - np.max(z, axis=-1, keepdims=True))
    post /= post.sum(-1, keepdims=True)
    onehot = np.broadcast_to(np.eye(c)[y], post.shape)
    feats = np.concatenate([post, onehot], axis=-1).reshape(-1, 2 * c)
    return feats.astype(np.float32)


def hidden_widths(value: Any, owner: str = "nn") -> tuple[int, ...]:
    """Layer widths from '128,64', [128, 64] or 128; a one-line CRLError otherwise."""
    ok = isinstance(value, (str, list, tuple, int, np.integer)) and not isinstance(value, bool)
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if not ok or not _WIDTHS.match(text) or any(int(t) < 1 for t in text.split(",")):
        raise CRLError(f"{owner}.hidden = {value!r}: expected layer widths, integers >= 1 "
                       f"separated by commas (e.g. 128,64)")
    return tuple(int(t) for t in text.split(","))


def resolve_nn_params(owner: str, params: Any) -> dict[str, Any]:
    """NN_SPEC.resolve with `hidden` also accepted as a list of widths (stored as '128,64')."""
    if isinstance(params, dict) and "hidden" in params:
        params = {**params, "hidden": ",".join(map(str, hidden_widths(params["hidden"], owner)))}
    resolved = NN_SPEC.resolve(owner, params)
    hidden_widths(resolved["hidden"], owner)
    return resolved


def build_attack_mlp(in_dim: int, hidden=(128, 64), dropout: float = 0.2) -> nn.Sequential:
    """Linear/ReLU/Dropout stack ending in one logit; all layers registered in an nn.Sequential.

    Initialised from the global torch RNG (train_nn_attack calls it under its own stream).
    """
    width = check_value("nn", "input size", in_dim, kind=int, low=1)
    dropout = NN_SPEC["dropout"].check("nn", dropout)
    layers: list[nn.Module] = []
    for h in hidden_widths(hidden):
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


@dataclass
class NNAttackFit:
    model: nn.Sequential
    best_epoch: int
    epochs_run: int
    val_loss: float
    val_auc: float
    pos_weight: float
    val_samples: int = 0
    history: list[float] = field(default_factory=list)


def sample_holdout(is_member, sample_ids, fraction: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows), split BY SAMPLE: all rows of a sample id land on the same side.

    About `fraction` of the samples are held out, drawn separately within each stratum of
    "number of member rows of the sample"; each side must hold members and non-members.
    """
    y = np.asarray(is_member).astype(bool)
    for cls in (False, True):
        if (y == cls).sum() < 2:
            raise CRLError(f"NN attack needs >= 2 shadow {'members' if cls else 'non-members'} "
                           f"to hold some out for model selection, got {int((y == cls).sum())}")
    ids, inv = np.unique(np.asarray(sample_ids), return_inverse=True)
    n_in = np.bincount(inv[y], minlength=len(ids))
    held = np.zeros(len(ids), bool)
    for level in np.unique(n_in):
        group = rng.permutation(np.flatnonzero(n_in == level))
        n_val = round(fraction * len(group))
        if len(group) >= 2:
            n_val = min(max(1, n_val), len(group) - 1)
        held[group[:n_val]] = True
    val = held[inv]
    for side, rows in (("training", ~val), ("held-out", val)):
        if y[rows].all() or not y[rows].any():
            raise CRLError(f"NN attack's {side} shadow rows ({int(rows.sum())} rows of "
                           f"{len(ids)} samples) lack members or non-members; expected more "
                           f"shadow samples or another val_fraction (got {fraction})")
    return np.flatnonzero(~val), np.flatnonzero(val)


@contextlib.contextmanager
def _one_thread():
    """Run torch on one intra-op thread, then restore the caller's setting.

    The attack MLP's matrices are tiny: on shared CPUs extra threads only spin (measured: a
    40k-row epoch took 0.14 s on one thread and 10 s on two under load), and one thread also
    makes the result independent of the machine's core count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).squeeze(1) for i in range(0, len(x), batch)]) \
            if len(x) else torch.zeros(0)


def _check_rows(x, is_member, sample_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(is_member).astype(bool)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise CRLError(f"NN attack rows must be x [R, D] and is_member [R], got {list(x.shape)} "
                       f"and {list(y.shape)}")
    ids = np.arange(len(y)) if sample_ids is None else np.asarray(sample_ids)
    if ids.shape != y.shape:
        raise CRLError(f"NN attack sample_ids must be [{len(y)}] (one per row), "
                       f"got {list(ids.shape)}")
    return x, y, ids


def _checked_model(model: nn.Module | None, in_dim: int, params: dict[str, Any]) -> nn.Sequential:
    if model is None:
        model = build_attack_mlp(in_dim, params["hidden"], params["dropout"])
    if (not isinstance(model, nn.Sequential) or len(model) == 0
            or not isinstance(model[0], nn.Linear) or model[0].in_features != in_dim):
        raise CRLError("NN attack model must be an nn.Sequential starting with a Linear "
                       f"layer taking {in_dim} inputs")
    return model.cpu().float()


def _train_epoch(model, opt, loss_fn, xt, yt, batch_size: int, gen: torch.Generator,
                 epoch: int) -> None:
    model.train()
    perm = torch.randperm(len(xt), generator=gen)
    for i in range(0, len(xt), batch_size):
        b = perm[i:i + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xt[b]).squeeze(1), yt[b])
        if not torch.isfinite(loss):
            raise CRLError(f"NN attack training loss became {loss.item()} at epoch {epoch}")
        loss.backward()
        opt.step()


def _fit(model, train, val, loss_fn, params: dict[str, Any], gen: torch.Generator):
    """Train with early stopping on the held-out loss; the best epoch's weights are loaded.
    Returns (best_epoch, epochs_run, best_loss, history)."""
    opt = torch.optim.Adam(model.parameters(), lr=params["lr"])
    best_loss, best_state, best_epoch, since, history = float("inf"), None, 0, 0, []
    epoch = 0
    for epoch in range(1, params["epochs"] + 1):
        _train_epoch(model, opt, loss_fn, *train, params["batch_size"], gen, epoch)
        val_loss = float(loss_fn(_predict_logits(model, val[0]), val[1]))
        if not np.isfinite(val_loss):
            raise CRLError(f"NN attack held-out loss became {val_loss} at epoch {epoch}")
        history.append(val_loss)
        if val_loss < best_loss - 1e-7:
            best_loss, best_epoch, since = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
            if since >= params["patience"]:
                break
    model.load_state_dict(best_state)
    model.eval()
    return best_epoch, epoch, best_loss, history


def _tensors(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(x[rows]), torch.from_numpy(y[rows].astype(np.float32))


def train_nn_attack(x: np.ndarray, is_member: np.ndarray, *, sample_ids=None, seed: int = 0,
                    stream: tuple[str, ...] | None = None, model: nn.Sequential | None = None,
                    **params: Any) -> NNAttackFit:
    """Train the attack MLP on shadow rows (x [R, D] float, is_member [R]); select on held-out
    samples (`sample_ids` [R]: the dataset sample of each row; default: every row its own).

    `params`: NN_SPEC's (hidden, dropout, epochs, patience, lr, batch_size, val_fraction).
    Random streams: (seed, *stream, "holdout" | "init" | "dropout" | "shuffle"), stream
    defaulting to ("attack", "nn"). `model` may be given (built by build_attack_mlp) to inspect
    it before training; otherwise it is built from `hidden`/`dropout` on the "init" stream.
    """
    p = resolve_nn_params(NNAttack.name, params)
    stream = stream or ("attack", NNAttack.name)
    x, y, ids = _check_rows(x, is_member, sample_ids)
    tr, va = sample_holdout(y, ids, p["val_fraction"], numpy_rng(seed, *stream, "holdout"))
    n_pos = int(y[tr].sum())
    pos_weight = float((len(tr) - n_pos) / n_pos)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed_for(seed, *stream, "init"))
        model = _checked_model(model, x.shape[1], p)
        torch.manual_seed(seed_for(seed, *stream, "dropout"))
        val = _tensors(x, y, va)
        best_epoch, epochs_run, best_loss, history = _fit(
            model, _tensors(x, y, tr), val, loss_fn, p, torch_generator(seed, *stream, "shuffle"))
        val_scores = _predict_logits(model, val[0]).double().numpy()
    return NNAttackFit(model=model, best_epoch=best_epoch, epochs_run=epochs_run,
                       val_loss=best_loss, val_auc=float(roc_auc_score(y[va], val_scores)),
                       pos_weight=pos_weight, val_samples=len(np.unique(ids[va])),
                       history=history)


def nn_attack_scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted member probability (float64) of each feature row."""
    with _one_thread():
        logit = _predict_logits(model, torch.from_numpy(np.asarray(x, dtype=np.float32)))
    return torch.sigmoid(logit.double()).numpy()


@ATTACKS.register("nn")
class NNAttack(Attack):
    """The paper's NN attack: MLP on [posterior, one-hot label], trained on the shadow models."""

    description: ClassVar[str] = ("NN attack: an MLP on posterior and label, trained on shadow "
                                  "models (Shokri et al., S&P 2017)")

    spec = NN_SPEC

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params = resolve_nn_params(self.name, params)

    def requirements(self) -> frozenset[str]:
        return frozenset({"shadows"})

    def run(self, ctx: AttackContext) -> AttackResult:
        if ctx.shadow is None:
            raise CRLError(f"attack '{self.name}' needs shadow models (ctx.shadow is None)")
        if not isinstance(ctx.shadow, Signals) or not isinstance(ctx.target, Signals):
            raise CRLError(f"attack '{self.name}' needs Signals for ctx.shadow and ctx.target")
        c = ctx.num_classes
        for what, sig in (("shadow", ctx.shadow), ("target", ctx.target)):
            if sig.logits.shape[2] != c:
                raise CRLError(f"{what} logits have {sig.logits.shape[2]} classes, expected "
                               f"num_classes={c}")
        x_shadow = attack_features(ctx.shadow.logits, ctx.shadow.labels, c)
        ids = np.tile(ctx.shadow.sample_idx, ctx.shadow.num_models)   # row m*N + n -> sample n
        fit = train_nn_attack(x_shadow, ctx.shadow.member.reshape(-1), sample_ids=ids,
                              seed=int(ctx.seed), stream=("attack", self.name), **self.params)
        scores = nn_attack_scores(fit.model, attack_features(ctx.target.logits[0],
                                                             ctx.target.labels, c))
        extra = {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                 "shadow_val_loss": fit.val_loss, "shadow_val_auc": fit.val_auc,
                 "shadow_val_samples": fit.val_samples, "pos_weight": fit.pos_weight,
                 "shadow_models": ctx.shadow.num_models, "shadow_rows": int(x_shadow.shape[0])}
        return AttackResult(scores=scores, extra=extra)
