"""The paper's NN attack (shadow-model attack of Shokri et al. 2017, as in SPEC section 6).

Input: the softmax posterior of a model on a sample concatenated with the one-hot true label
(2C features). Attack model: MLP [2C, 128, 64, 1] with ReLU and dropout, trained with Adam
(batch 256) to tell the k shadow models' members from their non-members: every shadow model
contributes one row per shadow-pool sample (its posterior, the label, whether it trained on it).

Model selection uses held-out SHADOW rows only: `val_fraction` (20%) of the shadow rows, split
stratified by membership with a generator seeded from ctx.seed. After every epoch the attack
model's weighted BCE on those rows is measured; the weights of the best epoch are kept and
training stops after `patience` epochs without improvement (or at `epochs`). The target model is
touched once, at the end, to produce the scores: the predicted member probability of each
target-pool sample under model 0.

Class balance: with the paper's 50/50 splits members and non-members are balanced; otherwise
the BCE is weighted by pos_weight = (#non-members / #members) of the training rows (also used
for the held-out loss), so imbalance cannot be exploited by a constant prediction.

Guards against the bugs of published code (SPEC section 6): every layer lives in an
nn.Sequential (registered and trained: tests check that every parameter tensor changes), the
epoch is never chosen on the target, and the scores are this attack's own.
Deterministic given ctx.seed: initialisation, dropout and shuffling draw from seeded generators
inside a forked torch RNG, so the global RNG state is left untouched. Training and scoring run on
one CPU thread (restored afterwards): the MLP is tiny, and the result then does not depend on the
machine's thread count.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from crl.attacks.base import Attack, AttackContext, AttackResult
from crl.attacks.scores import check_logits
from crl.attacks.signals import Signals
from crl.errors import CRLError
from crl.registry import ATTACKS


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


def _check_arch(in_dim, hidden, dropout) -> tuple[int, list[int], float]:
    if isinstance(in_dim, bool) or not isinstance(in_dim, (int, np.integer)) or in_dim < 1:
        raise CRLError(f"NN attack input size must be a positive integer, got {in_dim!r}")
    ok = isinstance(hidden, (list, tuple)) and len(hidden) > 0 and all(
        isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1 for h in hidden)
    if not ok:
        raise CRLError("NN attack hidden must be a non-empty list of positive integers, "
                       f"got {hidden!r}")
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
            or not 0.0 <= float(dropout) < 1.0):
        raise CRLError(f"NN attack dropout must be in [0, 1), got {dropout!r}")
    return int(in_dim), [int(h) for h in hidden], float(dropout)


def build_attack_mlp(in_dim: int, hidden=(128, 64), dropout: float = 0.2) -> nn.Sequential:
    """Linear/ReLU/Dropout stack ending in one logit; all layers registered in an nn.Sequential.

    Initialised from the global torch RNG (train_nn_attack calls it under its own seed).
    """
    width, hidden, dropout = _check_arch(in_dim, hidden, dropout)
    layers: list[nn.Module] = []
    for h in hidden:
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
    history: list[float] = field(default_factory=list)


def stratified_holdout(is_member: np.ndarray, fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): `fraction` of each class held out; >= 1 row per class on each side."""
    y = np.asarray(is_member).astype(bool)
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for cls in (False, True):
        idx = np.flatnonzero(y == cls)
        if len(idx) < 2:
            raise CRLError(f"NN attack needs >= 2 shadow {'members' if cls else 'non-members'} "
                           f"to hold some out for model selection, got {len(idx)}")
        idx = rng.permutation(idx)
        n_val = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


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


def train_nn_attack(x: np.ndarray, is_member: np.ndarray, *, seed: int = 0, hidden=(128, 64),
                    dropout: float = 0.2, epochs: int = 100, patience: int = 10, lr: float = 1e-3,
                    batch_size: int = 256, val_fraction: float = 0.2,
                    model: nn.Sequential | None = None) -> NNAttackFit:
    """Train the attack MLP on shadow rows (x [R, D] float, is_member [R]); select on held-out rows.

    `model` may be given (built by build_attack_mlp) to inspect it before training; otherwise it
    is built from `hidden`/`dropout` under the seed.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(is_member).astype(bool)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise CRLError(f"NN attack rows must be x [R, D] and is_member [R], got {list(x.shape)} "
                       f"and {list(y.shape)}")
    for name, v, lo in (("epochs", epochs, 1), ("patience", patience, 1),
                        ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise CRLError(f"NN attack {name} must be an integer >= {lo}, got {v!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise CRLError(f"NN attack lr must be > 0, got {lr!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise CRLError(f"NN attack val_fraction must be in (0, 1), got {val_fraction!r}")
    tr_idx, va_idx = stratified_holdout(y, float(val_fraction), seed)
    n_pos = int(y[tr_idx].sum())
    pos_weight = float((len(tr_idx) - n_pos) / n_pos)

    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        if model is None:
            model = build_attack_mlp(x.shape[1], hidden, dropout)
        if (not isinstance(model, nn.Sequential) or len(model) == 0
                or not isinstance(model[0], nn.Linear) or model[0].in_features != x.shape[1]):
            raise CRLError("NN attack model must be an nn.Sequential starting with a Linear "
                           f"layer taking {x.shape[1]} inputs")
        model = model.cpu().float()
        gen = torch.Generator().manual_seed(seed)
        xt, yt = torch.from_numpy(x[tr_idx]), torch.from_numpy(y[tr_idx].astype(np.float32))
        xv, yv = torch.from_numpy(x[va_idx]), torch.from_numpy(y[va_idx].astype(np.float32))
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
        opt = torch.optim.Adam(model.parameters(), lr=float(lr))
        best_loss, best_state, best_epoch, since, history = float("inf"), None, 0, 0, []
        epoch = 0
        for epoch in range(1, int(epochs) + 1):
            model.train()
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), int(batch_size)):
                b = perm[i:i + int(batch_size)]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[b]).squeeze(1), yt[b])
                if not torch.isfinite(loss):
                    raise CRLError(f"NN attack training loss became {loss.item()} at epoch {epoch}")
                loss.backward()
                opt.step()
            val_loss = float(loss_fn(_predict_logits(model, xv), yv))
            if not np.isfinite(val_loss):
                raise CRLError(f"NN attack held-out loss became {val_loss} at epoch {epoch}")
            history.append(val_loss)
            if val_loss < best_loss - 1e-7:
                best_loss, best_epoch, since = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
                if since >= int(patience):
                    break
        model.load_state_dict(best_state)
        model.eval()
        val_scores = _predict_logits(model, xv).double().numpy()
    return NNAttackFit(model=model, best_epoch=best_epoch, epochs_run=epoch, val_loss=best_loss,
                       val_auc=float(roc_auc_score(y[va_idx], val_scores)), pos_weight=pos_weight,
                       history=history)


def nn_attack_scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted member probability (float64) of each feature row."""
    with _one_thread():
        logit = _predict_logits(model, torch.from_numpy(np.asarray(x, dtype=np.float32)))
    return torch.sigmoid(logit.double()).numpy()


@ATTACKS.register("nn")
class NNAttack(Attack):
    """The paper's NN attack: MLP on [posterior, one-hot label], trained on the shadow models."""

    name = "nn"
    needs = frozenset({"shadows"})
    defaults = {"hidden": (128, 64), "dropout": 0.2, "epochs": 100, "patience": 10, "lr": 1e-3,
                "batch_size": 256, "val_fraction": 0.2}

    def __init__(self, **params) -> None:
        super().__init__(**params)
        _check_arch(2, self.params["hidden"], self.params["dropout"])   # validate early

    def run(self, ctx: AttackContext) -> AttackResult:
        if ctx.shadow is None:
            raise CRLError("attack 'nn' needs shadow models (ctx.shadow is None)")
        if not isinstance(ctx.shadow, Signals) or not isinstance(ctx.target, Signals):
            raise CRLError("attack 'nn' needs Signals for ctx.shadow and ctx.target")
        c = ctx.num_classes
        for what, sig in (("shadow", ctx.shadow), ("target", ctx.target)):
            if sig.logits.shape[2] != c:
                raise CRLError(f"{what} logits have {sig.logits.shape[2]} classes, expected "
                               f"num_classes={c}")
        x_shadow = attack_features(ctx.shadow.logits, ctx.shadow.labels, c)
        fit = train_nn_attack(x_shadow, ctx.shadow.member.reshape(-1), seed=int(ctx.seed),
                              **{k: self.params[k] for k in self.defaults})
        x_target = attack_features(ctx.target.logits[0], ctx.target.labels, c)
        scores = nn_attack_scores(fit.model, x_target)
        extra = {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                 "shadow_val_loss": fit.val_loss, "shadow_val_auc": fit.val_auc,
                 "pos_weight": fit.pos_weight, "shadow_models": ctx.shadow.num_models,
                 "shadow_rows": int(x_shadow.shape[0])}
        return AttackResult(scores=scores, extra=extra)
