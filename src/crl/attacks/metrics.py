"""Membership-inference metrics: AUC, TPR at low FPR, the oracle balanced accuracy, ROC curves,
and bootstrap intervals for them.

Scores are oriented "higher = member". All values are floats in [0, 1] or None. A NaN score
means "not scored" (an attack on a sample budget, crl.attacks.base.AttackResult.scored; a
held-out pair): every function here leaves such samples out; an infinite score is an error.

TPR at a fixed FPR is the highest TPR over every achievable ROC point (every distinct threshold)
whose FPR does not exceed the level. An FPR level below 1 / (number of non-members) cannot be
resolved: its value is None (JSON null) and `min_resolvable_fpr` stands beside it.

`oracle_balanced_accuracy` is the balanced accuracy of the best threshold chosen on the target's
own membership labels: an upper bound no attacker can pick without those labels (the threshold
attacks also report `shadow_threshold_accuracy`, with thresholds fitted on shadow models).

Intervals: percentile bootstrap. `metrics_with_ci` resamples one target's members and
non-members separately; `pooled_ci` resamples seeds and then samples within each seed;
`paired_difference` resamples the sample ids two defenses share. Every replicate is computed
from sample weights (a sample's multiplicity in the resample) on the samples grouped by distinct
score, so no resample is ever sorted: AUC from weighted ranks, ROC points from cumulative
weights, many replicates at once.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.metrics import roc_auc_score, roc_curve

from crl.core.errors import CRLError
from crl.core.params import DEFAULT_BOOTSTRAP, check_value
from crl.core.seeding import numpy_rng

LOW_FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001, "tpr_at_0.01pct_fpr": 0.0001}
#: the metrics that get intervals (metrics_with_ci) and may be pooled or compared
CI_METRICS = ("auc", *LOW_FPRS)
_CELLS_PER_CHUNK = 250_000   # replicates x samples per step (small steps stay in cache: fastest)


def _check(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """(scores, membership) of the scored samples (NaN score: not scored, left out)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(is_member).ravel()
    if s.shape != m.shape:
        raise CRLError(f"scores and is_member differ in length: {s.shape[0]} vs {m.shape[0]}")
    if not np.isin(m, [0, 1]).all():
        raise CRLError("is_member must hold only 0/1 or booleans")
    if np.isinf(s).any():
        raise CRLError(f"{int(np.isinf(s).sum())} membership scores are infinite")
    scored = ~np.isnan(s)
    s, m = s[scored], m[scored].astype(bool)
    if m.all() or not m.any():
        raise CRLError("attack metrics need both members and non-members among the scored "
                       f"samples, got {int(m.sum())} and {int((~m).sum())}")
    return s, m


def _scored_only(scores, values) -> np.ndarray:
    """`values` (one per score) of the scored samples, as _check keeps them (`values` of
    another length come back as they are, for the caller's length check)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    v = np.asarray(values).ravel()
    return v[~np.isnan(s)] if v.shape == s.shape else v


def _resolvable(target: float, n_nonmembers: float) -> bool:
    return target * n_nonmembers >= 1.0 - 1e-9


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among ROC points whose FPR does not exceed `target` (no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(scores, is_member) -> dict[str, float | None]:
    """auc, tpr_at_1pct_fpr, tpr_at_0.1pct_fpr, tpr_at_0.01pct_fpr (None when unresolvable),
    oracle_balanced_accuracy and min_resolvable_fpr = 1 / number of non-members."""
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=False)
    n_out = int((~m).sum())
    out: dict[str, float | None] = {"auc": float(roc_auc_score(m, s))}
    for key, target in LOW_FPRS.items():
        out[key] = tpr_at_fpr(fpr, tpr, target) if _resolvable(target, n_out) else None
    out["oracle_balanced_accuracy"] = float(np.max((tpr + 1.0 - fpr) / 2.0))
    out["min_resolvable_fpr"] = 1.0 / n_out
    return out


def thresholded_balanced_accuracy(scores, is_member, labels, thresholds) -> float:
    """Balanced accuracy of the rule `member iff score >= thresholds[label]` (e.g. per-class
    thresholds fitted on shadow models: the shadow_threshold_accuracy of threshold attacks)."""
    s, m = _check(scores, is_member)
    y = _scored_only(scores, labels)
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if y.shape != s.shape or not np.issubdtype(y.dtype, np.integer):
        raise CRLError(f"labels must be {s.shape[0]} integers (one per score), "
                       f"got {y.shape[0]} of dtype {y.dtype}")
    if y.min() < 0 or y.max() >= len(t):
        raise CRLError(f"labels must lie in [0, {len(t)}) (one threshold per class), "
                       f"got range [{y.min()}, {y.max()}]")
    pred = s >= t[y]
    return float(0.5 * (pred[m].mean() + (~pred[~m]).mean()))


def roc(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, every achievable point."""
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s, drop_intermediate=False)
    return fpr, tpr


# ------------------------------------------------------------------------- bootstrap engine
#
# A replicate is described by how many times it draws each distinct score from the members (w1)
# and from the non-members (w0), [replicates, distinct scores], highest score first. Lowering
# the threshold one distinct score at a time, the cumulative sums are the ROC points' TP and FP.


def _grouped(s: np.ndarray) -> tuple[np.ndarray, int]:
    """Each sample's rank among the distinct scores, highest first, and the number of them."""
    distinct, group = np.unique(-s, return_inverse=True)
    return group.ravel(), len(distinct)


class _Side:
    """One scored sample set, seen through resamples of some `items` (sample positions)."""

    def __init__(self, scores: np.ndarray, member: np.ndarray) -> None:
        self.group, self.n_groups = _grouped(scores)
        self.member = member

    def item_groups(self, positions: np.ndarray) -> np.ndarray:
        """Group of each item (a position in this side's samples, or -1: not on this side,
        mapped to a discarded extra group)."""
        return np.where(positions >= 0, self.group[np.maximum(positions, 0)], self.n_groups)

    def counts(self, draws: np.ndarray, item_groups: np.ndarray) -> np.ndarray:
        """[B, n_groups]: how often each distinct score is drawn by each row of `draws`."""
        b, width = draws.shape[0], self.n_groups + 1
        cells = (item_groups[draws] + width * np.arange(b)[:, None]).ravel()
        return np.bincount(cells, minlength=b * width).reshape(b, width)[:, :-1].astype(float)


def _curve_metrics(w1: np.ndarray, w0: np.ndarray, keys: tuple[str, ...]) -> dict:
    """`keys` (from CI_METRICS) of each replicate; NaN where a replicate lacks a class."""
    tp, fp = np.cumsum(w1, axis=1), np.cumsum(w0, axis=1)
    n1, n0 = tp[:, -1], fp[:, -1]
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if "auc" in keys:   # members beat the non-members below them and tie with those level
            out["auc"] = (w1 * (n0[:, None] - fp + 0.5 * w0)).sum(1) / (n1 * n0)
        for key in set(keys) & set(LOW_FPRS):
            k = (fp <= (LOW_FPRS[key] + 1e-12) * n0[:, None]).sum(1)   # a prefix: fp rises
            out[key] = tp[np.arange(len(k)), np.maximum(k - 1, 0)] * (k > 0) / n1
    bad = (n1 <= 0) | (n0 <= 0)
    return {key: np.where(bad, np.nan, v) for key, v in out.items()}


def _chunks(n_boot: int, n_cols: int) -> Iterator[int]:
    size = max(1, _CELLS_PER_CHUNK // max(n_cols, 1))
    for start in range(0, n_boot, size):
        yield min(size, n_boot - start)


def _replicates(sides: list[_Side], items: tuple[np.ndarray, np.ndarray], n_boot: int,
                rng: np.random.Generator, keys: tuple[str, ...]) -> list[dict]:
    """`keys` of every side over n_boot resamples of `items` = (member items, non-member items),
    each an array [n_sides, n_items] of positions in each side (-1: absent), resampled
    separately with replacement. Returns one {key: [n_boot]} per side."""
    maps = [[side.item_groups(pos[j]) for pos in items] for j, side in enumerate(sides)]
    parts: list[list[dict]] = [[] for _ in sides]
    for reps in _chunks(n_boot, sum(pos.shape[1] for pos in items)):
        draws = [rng.integers(0, pos.shape[1], size=(reps, pos.shape[1])) for pos in items]
        for j, side in enumerate(sides):
            w1, w0 = (side.counts(d, g) for d, g in zip(draws, maps[j]))
            parts[j].append(_curve_metrics(w1, w0, keys))
    return [{k: np.concatenate([p[k] for p in side_parts]) for k in keys} for side_parts in parts]


def _bootstrap(s: np.ndarray, m: np.ndarray, n_boot: int, rng: np.random.Generator,
               keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`keys` over n_boot stratified resamples of one target's samples."""
    items = (np.flatnonzero(m)[None], np.flatnonzero(~m)[None])
    return _replicates([_Side(s, m)], items, n_boot, rng, keys)[0]


def percentile_interval(values: np.ndarray, level: float) -> list[float] | None:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return [float(lo), float(hi)]


def _check_boot(n_boot, seed, level, metric: str | None = None) -> np.random.Generator:
    check_value("bootstrap", "n_boot", n_boot, kind=int, low=1)
    check_value("bootstrap", "level", level, kind=float, low=0.0, high=1.0, low_open=True,
                high_open=True)
    if metric is not None:
        check_value("bootstrap", "metric", metric, kind=str, choices=CI_METRICS)
    return numpy_rng(seed, "bootstrap")


# ------------------------------------------------------------------------- intervals


def metrics_with_ci(scores, is_member, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                    level: float = 0.95) -> dict[str, float | list[float] | None]:
    """attack_metrics plus `<metric>_ci` = [lo, hi] for every CI_METRICS key (None where the
    point value is None): a percentile bootstrap over the samples, members and non-members
    resampled separately (their counts stay fixed, so every level stays resolvable)."""
    rng = _check_boot(n_boot, seed, level)
    out = attack_metrics(scores, is_member)
    s, m = _check(scores, is_member)
    keys = tuple(k for k in CI_METRICS if out[k] is not None)
    reps = _bootstrap(s, m, n_boot, rng, keys)
    for key in CI_METRICS:
        out[f"{key}_ci"] = percentile_interval(reps[key], level) if key in reps else None
    return out


def _cluster_weights(draws: np.ndarray, k: int) -> np.ndarray:
    """[B, k]: how often each cluster is drawn by each row of `draws`."""
    b = draws.shape[0]
    cells = (draws + k * np.arange(b)[:, None]).ravel()
    return np.bincount(cells, minlength=b * k).reshape(b, k).astype(float)


def cluster_replicates(s: np.ndarray, m: np.ndarray, clusters: np.ndarray, n_boot: int,
                        rng: np.random.Generator, keys: tuple[str, ...]) -> dict:
    """`keys` over n_boot resamples of the clusters (with replacement), every pair of a drawn
    cluster counted as often as the cluster is drawn."""
    group, n_groups = _grouped(s)
    _, cl = np.unique(clusters, return_inverse=True)
    k = int(cl.max()) + 1
    on = [csr_matrix((side.astype(float), (cl.ravel(), group)), shape=(k, n_groups))
          for side in (m, ~m)]
    parts = []
    for reps in _chunks(n_boot, n_groups):
        w = _cluster_weights(rng.integers(0, k, size=(reps, k)), k)
        w1, w0 = (np.asarray((a.T @ w.T).T) for a in on)
        parts.append(_curve_metrics(w1, w0, keys))
    return {key: np.concatenate([p[key] for p in parts]) for key in keys}


def clustered_metrics_with_ci(scores, is_member, clusters, *, n_boot: int = DEFAULT_BOOTSTRAP,
                              seed: int = 0, level: float = 0.95) -> dict:
    """attack_metrics of all (score, membership) pairs plus `<metric>_ci` = [lo, hi] from a
    percentile bootstrap that resamples `clusters` (one id per pair), so pairs of one cluster
    (e.g. one sample scored by many models) move together."""
    check_value("bootstrap", "n_boot", n_boot, kind=int, low=1)
    s, m = _check(scores, is_member)
    c = _scored_only(scores, clusters)
    if c.shape != s.shape:
        raise CRLError(f"clusters of {len(c)} entries: expected {len(s)} (one per score)")
    out = attack_metrics(s, m)
    keys = tuple(k for k in CI_METRICS if out[k] is not None)
    reps = cluster_replicates(s, m, c, n_boot, numpy_rng(seed, "bootstrap"), keys)
    for key in CI_METRICS:
        out[f"{key}_ci"] = percentile_interval(reps[key], level) if key in reps else None
    return out


def pooled_ci(groups, metric: str, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
              level: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(mean, lo, hi) of `metric` averaged over groups = [(scores, is_member), ...], one per
    seed: a two-level bootstrap (resample the seeds, then each drawn seed's samples, stratified).
    All None when the metric is unresolvable for some seed."""
    rng = _check_boot(n_boot, seed, level, metric)
    groups = [_check(*_fields(f"pooled_ci group {j}", g, "scores, is_member"))
              for j, g in enumerate(groups)]
    if not groups:
        raise CRLError("pooled_ci needs at least one (scores, is_member) group, got none")
    points = [attack_metrics(s, m)[metric] for s, m in groups]
    if any(p is None for p in points):
        return None, None, None
    g = len(groups)
    picks = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot)     # [n_boot, g] seed draws
    total = np.zeros(n_boot)
    for j, (s, m) in enumerate(groups):
        vals = _bootstrap(s, m, int(picks[:, j].sum()), rng, (metric,))[metric]
        owner = np.repeat(np.arange(n_boot), picks[:, j])
        total += np.bincount(owner, weights=vals, minlength=n_boot)
    lo, hi = percentile_interval(total / g, level) or (None, None)
    return float(np.mean(points)), lo, hi


def _fields(what: str, item, names: str) -> tuple:
    """`item` as a tuple of the len(names) fields `names`, else a one-line CRLError."""
    parts = tuple(item) if isinstance(item, (tuple, list)) else ()
    if len(parts) != len(names.split(",")):
        raise CRLError(f"{what}: expected ({names}), got {type(item).__name__} "
                       f"of {len(parts)} fields")
    return parts


def _paired_side(name: str, side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, scores, member = _fields(f"paired_difference {name}", side,
                                  "sample_ids, scores, is_member")
    s, m = _check(scores, member)
    ids = _scored_only(scores, ids)
    if ids.shape != s.shape or len(np.unique(ids)) != len(ids):
        raise CRLError(f"paired_difference {name}: sample_ids must be {len(s)} distinct ids "
                       f"(one per score), got {ids.shape[0]} ids, {len(np.unique(ids))} distinct")
    return ids, s, m


def _union_items(a, b) -> tuple[np.ndarray, np.ndarray]:
    """(member items, non-member items) of the union of both sides' sample ids: [2, n] each,
    every union id's position on side a and side b (-1: absent). Membership must agree."""
    ids = np.union1d(a[0], b[0])
    member = np.zeros(len(ids), bool)
    pos = np.full((2, len(ids)), -1)
    for j, (ids_side, _, m_side) in enumerate((a, b)):
        at = np.searchsorted(ids, ids_side)
        pos[j, at] = np.arange(len(ids_side))
        member[at] = m_side
    for ids_side, _, m_side in (a, b):
        wrong = member[np.searchsorted(ids, ids_side)] != m_side
        if wrong.any():
            raise CRLError(f"paired_difference: sample {ids_side[wrong][0]} is a member on one "
                           f"side and a non-member on the other; expected the same split")
    return pos[:, member], pos[:, ~member]


def paired_difference(a, b, metric: str, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                      level: float = 0.95) -> dict:
    """metric(a) - metric(b) for two defenses evaluated on the SAME split, a and b each
    (sample_ids, scores, is_member); their sample sets may differ (held-out members).

    Each replicate resamples the union of sample ids (members and non-members separately) and
    computes each side's metric on its own samples within it. Returns {"diff", "ci": [lo, hi],
    "within_noise": lo <= 0 <= hi}; all None when the metric is unresolvable on a side."""
    return paired_difference_over_seeds([a], [b], metric, n_boot=n_boot, seed=seed, level=level)


def paired_difference_over_seeds(a_list, b_list, metric: str, *, n_boot: int = DEFAULT_BOOTSTRAP,
                                 seed: int = 0, level: float = 0.95) -> dict:
    """The mean over seeds of metric(a_s) - metric(b_s), where a_s and b_s share seed s's
    split, with a paired-bootstrap interval: each replicate resamples every seed's samples
    (as in `paired_difference`) and averages the per-seed differences."""
    if len(a_list) != len(b_list) or not a_list:
        raise CRLError(f"paired difference over seeds needs equally many (>= 1) pairs, got "
                       f"{len(a_list)} and {len(b_list)}")
    rng = _check_boot(n_boot, seed, level, metric)
    diffs, reps = [], []
    for a, b in zip(a_list, b_list):
        a, b = _paired_side("a", a), _paired_side("b", b)
        point_a, point_b = attack_metrics(a[1], a[2])[metric], attack_metrics(b[1], b[2])[metric]
        if point_a is None or point_b is None:
            return {"diff": None, "ci": None, "within_noise": None}
        sides = [_Side(s, m) for _, s, m in (a, b)]
        rep_a, rep_b = _replicates(sides, _union_items(a, b), n_boot, rng, (metric,))
        diffs.append(point_a - point_b)
        reps.append(rep_a[metric] - rep_b[metric])
    ci = percentile_interval(np.mean(reps, axis=0), level)
    return {"diff": float(np.mean(diffs)), "ci": ci,
            "within_noise": None if ci is None else bool(ci[0] <= 0.0 <= ci[1])}
