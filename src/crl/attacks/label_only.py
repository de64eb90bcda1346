"""Label-only attacks: the attacker sees only the predicted label of inputs it chooses.

Each queries the pool models through crl.models.query (ctx.queries, requirement "oracle"), in
label-only mode, so no score here can read a confidence. Scores are for the target (model 0)
on the target pool, higher = member:

    gap       1 if the target predicts the true label, else 0 (Yeom et al., CSF 2018)
    augment   how many of the sample's flips and translations (|i| + |j| = d pixels) the
              target labels correctly (Choquette-Choo et al., ICML 2021, Sec. 4)
    boundary  estimated L2 distance (inputs on the [0, 1] scale) from the sample to the target's
              decision boundary, found with label queries only (HopSkipJump-style, Chen, Jordan
              & Wainwright, S&P 2020, as Li & Zhang, CCS 2021 and Choquette-Choo et al. use it);
              0 for a misclassified sample

and, NOT label-only and reported separately, boundary_whitebox: the same distance found with
the target's input gradients, the reference a label-only search can at best approach.

Sample budget: the two boundary attacks cost tens of queries per sample, so they score at most
`per_class` samples of each class of the target pool (default 500), drawn uniformly within the
class by a generator seeded from the run seed (stream "<attack>-sample"), members and
non-members as they come; the rest are left unscored (AttackResult.scored) and never enter a
metric.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from crl.attacks.base import Attack, AttackContext, AttackResult
from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import ATTACKS
from crl.core.seeding import numpy_rng, torch_generator
from crl.models.query import QueryAccess, QueryOracle

CHUNK = 256   # samples per batch of queries


class LabelOnlyAttack(Attack):
    """Base: needs label-only query access to the target ("oracle")."""

    def budget(self, ctx: AttackContext) -> np.ndarray:
        """The samples to score: at most params['per_class'] of each class (module doc)."""
        return sample_per_class(ctx.target.labels, self.params["per_class"],
                                numpy_rng(ctx.seed, f"{self.name}-sample"))

    def batches(self, scored: np.ndarray, access: QueryAccess):
        """Chunks of the positions in `scored`, with a progress bar named after the attack."""
        idx = np.flatnonzero(scored)
        return tqdm([idx[c] for c in self.chunks(len(idx))], desc=self.name, leave=False,
                    disable=not access.progress, dynamic_ncols=True)

    def requirements(self) -> frozenset[str]:
        return frozenset({"oracle"})

    def access(self, ctx: AttackContext) -> QueryAccess:
        if ctx.queries is None:
            raise CRLError(f"attack '{self.name}' needs query access to the target "
                           "(ctx.queries is None)")
        return ctx.queries

    def chunks(self, n: int):
        return [np.arange(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


@ATTACKS.register("gap")
class GapAttack(LabelOnlyAttack):
    """Correct prediction means member: score 1 if the predicted label is right, else 0."""

    description: ClassVar[str] = ("gap: correctly classified means member, labels only "
                                   "(Yeom et al., CSF 2018)")

    def run(self, ctx: AttackContext) -> AttackResult:
        access = self.access(ctx)
        oracle = access.oracle(0)
        pred = np.concatenate([oracle.labels(access.inputs(p))
                               for p in self.chunks(len(ctx.target.labels))] or [np.zeros(0)])
        scores = (pred == ctx.target.labels).astype(np.float64)
        return AttackResult(scores=scores, extra={"queries": oracle.queries})


def translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Shift images [B, C, H, W] by dx columns and dy rows, filling with zeros (black)."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_r, dst_r = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_c, dst_c = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_r, dst_c] = x[..., src_r, src_c]
    return out


def augmentations(d: int, flip: bool) -> list[tuple[bool, int, int]]:
    """(flip, dx, dy): the image itself and its 4 d translations with |dx| + |dy| = d (the
    paper's 4 d + 1 translation queries), each also horizontally flipped when `flip`: 10
    augmentations for d = 1."""
    shifts = [(0, 0)] + [(dx, dy) for dx in range(-d, d + 1) for dy in range(-d, d + 1)
                         if d > 0 and abs(dx) + abs(dy) == d]
    return [(f, dx, dy) for f in ((False, True) if flip else (False,)) for dx, dy in shifts]


def augmented_correct(oracle: QueryOracle, x: torch.Tensor, y: np.ndarray,
                      augs: list[tuple[bool, int, int]]) -> np.ndarray:
    """Bool [B, A]: whether each augmentation of each image is labelled y (one batched query)."""
    views = [translate(x.flip(-1) if f else x, dx, dy) for f, dx, dy in augs]
    pred = oracle.labels(torch.cat(views)).reshape(len(augs), len(x)).T
    return pred == y[:, None]


@ATTACKS.register("augment")
class AugmentAttack(LabelOnlyAttack):
    """Number of augmented views (flips, translations up to d pixels) labelled correctly."""

    description: ClassVar[str] = ("augment: labels of flipped and translated copies, count "
                                  "correct (Choquette-Choo et al., ICML 2021)")
    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("d", 1, int, low=0, help="translations by |dx| + |dy| = d pixels (0: none)"),
        Param("flip", True, bool, help="also query horizontally flipped copies"),
        Param("fitted", False, bool,
              help="score with a logistic regression on the correctness vectors, fitted on "
                   "the shadow models (the paper's attack model; needs --shadows >= 1)"),
    )

    def requirements(self) -> frozenset[str]:
        return super().requirements() | ({"shadows"} if self.params["fitted"] else set())

    def correctness(self, oracle: QueryOracle, inputs, labels: np.ndarray) -> np.ndarray:
        """Bool [N, A]: which augmentations of each sample `oracle` labels correctly."""
        augs = augmentations(self.params["d"], self.params["flip"])
        return np.concatenate([augmented_correct(oracle, inputs(p), labels[p], augs)
                               for p in self.chunks(len(labels))]
                              or [np.zeros((0, len(augs)), bool)])

    def shadow_model_fit(self, ctx: AttackContext, access: QueryAccess):
        """Logistic regression from shadow correctness vectors to shadow membership."""
        from sklearn.linear_model import LogisticRegression

        if ctx.shadow is None or not access.shadow_models:
            raise CRLError("augment.fitted = true: expected shadow models (--shadows >= 1)")
        x = np.concatenate([self.correctness(access.oracle(k, shadow=True),
                                             access.shadow_inputs, ctx.shadow.labels)
                            for k in range(len(access.shadow_models))])
        return LogisticRegression().fit(x.astype(np.float64), ctx.shadow.member.reshape(-1))

    def run(self, ctx: AttackContext) -> AttackResult:
        access = self.access(ctx)
        oracle = access.oracle(0)
        correct = self.correctness(oracle, access.inputs, ctx.target.labels)
        extra = {"queries": oracle.queries, "augmentations": correct.shape[1]}
        if not self.params["fitted"]:
            return AttackResult(scores=correct.sum(1).astype(np.float64), extra=extra)
        clf = self.shadow_model_fit(ctx, access)
        return AttackResult(scores=clf.decision_function(correct.astype(np.float64)),
                            extra=extra)


PER_CLASS = Param("per_class", 500, int, low=1, nullable=True,
                  help="samples scored per class of the target pool, drawn at random "
                       "(null: every sample)")


def sample_per_class(labels: np.ndarray, per_class: int | None,
                     rng: np.random.Generator) -> np.ndarray:
    """Bool mask [N]: at most `per_class` samples of each class, uniformly within the class
    (all of them when per_class is None)."""
    chosen = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class is not None and len(idx) > per_class:
            idx = rng.choice(idx, per_class, replace=False)
        chosen[idx] = True
    return chosen


#: Cost = queries per sample x samples scored. Defaults: at most 4 + 8 + 1 + 2 (24 + 5 + 8) = 87
#: label queries per sample, on at most 500 samples per class: 5,000 samples on CIFAR-10 (whatever
#: the pool size), at most 435k queries. The CPU `cnn` answers about 550 CIFAR-10 images per
#: core-second (docs/performance.md): about 13 core-minutes. Without the budget the 30,000-sample
#: target pool of the full CIFAR-10 split would cost 2.6M queries, about 80 core-minutes.
BOUNDARY_SPEC = ParamSpec(
    PER_CLASS,
    Param("steps", 2, int, low=0, help="HopSkipJump iterations after the first boundary point"),
    Param("grad_samples", 24, int, low=1,
          help="label queries per gradient-direction estimate"),
    Param("search_steps", 8, int, low=1, help="binary-search queries per boundary point"),
    Param("init_tries", 4, int, low=1, help="uniform-noise starts tried per sample"),
)


class BoundarySearch:
    """The decision-based distance of a batch of correctly classified images (module doc).

    1. start: the first of `init_tries` uniform-noise images the target labels differently,
       else a random image of the batch that it labels (correctly) as another class (none: the
       sample keeps the largest distance possible on [0, 1]^D, sqrt(D));
    2. binary search (`search_steps` queries) on the segment from the sample to that start:
       the boundary point is the last adversarial point found;
    3. `steps` HopSkipJump iterations: estimate the boundary's normal at the boundary point
       from `grad_samples` random directions of radius dist / sqrt(D) (sign of "label changed",
       mean-centred), step along it by dist / sqrt(t) (halved up to 5 times until the label
       still differs), binary-search back toward the sample; keep the closer boundary point.
    The distance is the L2 norm from the sample to its final boundary point.
    """

    def __init__(self, oracle: QueryOracle, params: dict, gen: torch.Generator) -> None:
        self.oracle, self.p, self.gen = oracle, params, gen

    def differs(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Whether the target labels the flat points z [n, D] differently from y [n]."""
        pred = self.oracle.labels(z.reshape(-1, *self.shape))
        return torch.from_numpy(pred != y.numpy())

    def search(self, x: torch.Tensor, adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.zeros(len(x), 1), torch.ones(len(x), 1)
        for _ in range(self.p["search_steps"]):
            mid = (lo + hi) / 2
            a = self.differs(x + mid * (adv - x), y)[:, None]
            hi, lo = torch.where(a, mid, hi), torch.where(a, lo, mid)
        return x + hi * (adv - x)

    def start(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.p["init_tries"]
        noise = torch.rand(len(x), t, x.shape[1], generator=self.gen)
        found = self.differs(noise.reshape(-1, x.shape[1]), y.repeat_interleave(t)).view(-1, t)
        adv, found = noise[torch.arange(len(x)), found.float().argmax(1)], found.any(1)
        for i in torch.nonzero(~found).flatten().tolist():   # a batch image of another class
            other = torch.nonzero(y != y[i]).flatten()
            if len(other):
                pick = other[torch.randint(len(other), (1,), generator=self.gen)]
                adv[i], found[i] = x[pick][0], True
        return adv, found

    def normal(self, xb: torch.Tensor, y: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        b = self.p["grad_samples"]
        u = torch.randn(len(xb), b, xb.shape[1], generator=self.gen)
        u = u / u.norm(dim=2, keepdim=True)
        z = (xb[:, None] + radius[:, None, None] * u).clamp(0, 1)
        phi = self.differs(z.reshape(-1, xb.shape[1]), y.repeat_interleave(b)).view(-1, b)
        phi = phi.float() * 2 - 1
        centred = phi - phi.mean(1, keepdim=True)
        mixed = (phi.abs().sum(1) != phi.sum(1).abs())[:, None]   # both signs seen
        g = (torch.where(mixed, centred, phi)[:, :, None] * u).mean(1)
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def step(self, x, xb, y, dist, t: int) -> torch.Tensor:
        g = self.normal(xb, y, dist / math.sqrt(x.shape[1]))
        size = dist / math.sqrt(t)
        cand, ok = xb.clone(), torch.zeros(len(x), dtype=torch.bool)
        for _ in range(5):
            trial = (xb + size[:, None] * g).clamp(0, 1)
            a = self.differs(trial, y) & ~ok
            cand[a], ok = trial[a], ok | a
            size = torch.where(ok, size, size / 2)
        new = self.search(x, cand, y)
        closer = ((new - x).norm(dim=1) < dist) & ok
        return torch.where(closer[:, None], new, xb)

    def distances(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L2 distances [n] for images x [n, C, H, W] that the target labels y."""
        self.shape = x.shape[1:]
        x = x.reshape(len(x), -1)
        adv, found = self.start(x, y)
        xb = self.search(x, adv, y)
        for t in range(1, self.p["steps"] + 1):
            xb = self.step(x, xb, y, (xb - x).norm(dim=1), t)
        dist = (xb - x).norm(dim=1).double()
        return torch.where(found, dist, torch.full_like(dist, math.sqrt(x.shape[1])))


@ATTACKS.register("boundary")
class BoundaryAttack(LabelOnlyAttack):
    """Estimated L2 distance to the decision boundary from label queries (larger: member)."""

    description: ClassVar[str] = ("boundary: label-only distance to the decision boundary, "
                                  "per_class samples a class (HopSkipJump; Li & Zhang, CCS 2021)")
    spec: ClassVar[ParamSpec] = BOUNDARY_SPEC

    def queries_per_sample(self) -> int:
        p = self.params
        return (p["init_tries"] + p["search_steps"] + 1
                + p["steps"] * (p["grad_samples"] + 5 + p["search_steps"]))

    def run(self, ctx: AttackContext) -> AttackResult:
        access = self.access(ctx)
        oracle = access.oracle(0)
        search = BoundarySearch(oracle, self.params, torch_generator(ctx.seed, "boundary"))
        y_all = ctx.target.labels
        scores, scored = np.zeros(len(y_all)), self.budget(ctx)
        for p in self.batches(scored, access):
            x, y = access.inputs(p), torch.as_tensor(y_all[p])
            right = torch.from_numpy(oracle.labels(x) == y_all[p])
            if right.any():
                scores[p[right.numpy()]] = search.distances(x[right], y[right]).numpy()
        return AttackResult(scores=scores, scored=scored, extra={
            "queries": oracle.queries, "queries_per_sample_max": self.queries_per_sample()})


def gradient_path_distances(oracle: QueryOracle, x: torch.Tensor, y: torch.Tensor, *,
                            steps: int, search_steps: int) -> torch.Tensor:
    """White-box distances [n] of images x [n, C, H, W] that the target labels y: normalised
    cross-entropy gradient-ascent steps (0.01 sqrt(D) growing 1.5x per step) until the label
    changes, then a binary search on the segment from x to that point (sqrt(D) when no step
    changed the label)."""
    n, shape = len(x), x.shape[1:]
    d = int(np.prod(shape))
    xt, adv = x.clone(), x.clone()
    size, done = torch.full((n,), 0.01 * math.sqrt(d)), torch.zeros(n, dtype=torch.bool)
    for _ in range(steps):
        act = torch.nonzero(~done).flatten()
        if not len(act):
            break
        g = oracle.input_gradients(xt[act], y[act]).flatten(1)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        xt[act] = (xt[act].flatten(1) + size[act, None] * g).clamp(0, 1).view(-1, *shape)
        size[act] *= 1.5
        flipped = act[torch.from_numpy(oracle.labels(xt[act]) != y[act].numpy())]
        done[flipped], adv[flipped] = True, xt[flipped]
    search = BoundarySearch(oracle, {"search_steps": search_steps}, torch.Generator())
    search.shape = shape
    dist = torch.full((n,), math.sqrt(d), dtype=torch.float64)
    if done.any():
        flat_x = x[done].flatten(1)
        edge = search.search(flat_x, adv[done].flatten(1), y[done])
        dist[done] = (edge - flat_x).norm(dim=1).double()
    return dist


@ATTACKS.register("boundary_whitebox")
class WhiteboxBoundaryAttack(LabelOnlyAttack):
    """NOT label-only: the boundary distance found with input gradients of the target, the
    reference a label-only boundary search can at best approach (reported separately)."""

    description: ClassVar[str] = ("boundary_whitebox: boundary distance from gradients, white-box "
                                  "bound, per_class samples a class (Choquette-Choo 2021)")
    spec: ClassVar[ParamSpec] = ParamSpec(
        PER_CLASS,
        Param("steps", 20, int, low=1, help="gradient steps at most (step size grows 1.5x)"),
        Param("search_steps", 10, int, low=1, help="binary-search queries on the segment"),
    )

    def run(self, ctx: AttackContext) -> AttackResult:
        access = self.access(ctx)
        oracle = access.oracle(0, label_only=False)
        y_all = ctx.target.labels
        scores, scored = np.zeros(len(y_all)), self.budget(ctx)
        for p in self.batches(scored, access):
            x = access.inputs(p)
            right = torch.from_numpy(oracle.labels(x) == y_all[p])
            if right.any():
                scores[p[right.numpy()]] = gradient_path_distances(
                    oracle, x[right], torch.as_tensor(y_all[p])[right],
                    steps=self.params["steps"], search_steps=self.params["search_steps"]).numpy()
        return AttackResult(scores=scores, scored=scored,
                            extra={"queries": oracle.queries, "white_box": True})
