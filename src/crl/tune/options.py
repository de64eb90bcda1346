"""`crl tune`'s own options, declared like AuditConfig's fields (`crl.config.option`): one check
per option, shared by the CLI flags and by Python callers; the audit recipe is an AuditConfig.

The search audits the tuned defense, `ce` and every `--compare` defense on the recipe's seeds,
training shadow models only where a search attack requires them (threshold attacks use them
only for the shadow-fitted accuracy, which no objective reads). The confirm stage re-audits on
fresh seeds with `--confirm-attacks` (default: the search's attacks) and the recipe's --shadows.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from crl.config import AuditConfig, FieldSpec, field_specs, option, set_warnings
from crl.core.errors import CRLError

#: --objective -> the attack metric it minimises (crl.attacks.metrics keys)
OBJECTIVES = {"auc": "auc", "tpr@1": "tpr_at_1pct_fpr", "tpr@0.1": "tpr_at_0.1pct_fpr"}
_NAME = r"[^,\s]+"
#: `crl tune`'s run directory when neither --out nor the YAML recipe names one
OUT = "runs/tune"


@dataclass(frozen=True)
class TuneOptions:
    defense: str = option("crl", kind=str, pattern=_NAME, words="a defense name",
                          help="the defense whose search ranges are tuned (default crl)")
    trials: int = option(30, kind=int, low=1,
                         help="trials in the study in total; a rerun with a larger N continues "
                              "it (default 30)")
    objective: str = option("auc", kind=str, choices=tuple(OBJECTIVES),
                            help="minimise the strongest attack's AUC (default), or its TPR at "
                                 "1%% or 0.1%% FPR")
    compare: list[str] = option(factory=list, kind=str, many=True, unique=True, pattern=_NAME,
                                words="a list of distinct defense names",
                                help="comma-separated defenses shown at their defaults as "
                                     "reference points (ce always is)")
    max_accuracy_drop: float = option(0.01, kind=float, low=0.0, high=1.0,
                                      help="recommend the most private trial whose test "
                                           "accuracy is at most this far below CE's "
                                           "(fraction; default 0.01 = 1 point)")
    confirm_seeds: list[int] | None = option(
        None, kind=int, low=0, many=True, unique=True, nonempty=True, nullable=True,
        words="a non-empty list of distinct integers >= 0",
        help="fresh seeds for re-running the recommendation and CE (default: as many as "
             "--seeds, the smallest unused)")
    confirm_attacks: list[str] | None = option(
        None, kind=str, many=True, unique=True, nonempty=True, nullable=True, pattern=_NAME,
        words="a non-empty list of distinct attack names",
        help="attacks of the fresh-seed confirmation (default: --attacks)")

    def checked(self) -> TuneOptions:
        """A copy with every value checked and converted, else a one-line CRLError."""
        return replace(self, **{n: s.check_field(getattr(self, n)) for n, s in TUNE_SPECS.items()})


TUNE_SPECS: dict[str, FieldSpec] = field_specs(TuneOptions)


def fresh_seeds(opts: TuneOptions, seeds: list[int]) -> list[int]:
    """The confirm stage's seeds: --confirm-seeds, else as many as `seeds`, the smallest integers
    >= 0 the search did not use; a CRLError if a given one was searched."""
    if opts.confirm_seeds is None:
        unused = (s for s in itertools.count() if s not in seeds)
        return list(itertools.islice(unused, len(seeds)))
    both = sorted(set(opts.confirm_seeds) & set(seeds))
    if both:
        raise CRLError(f"confirm_seeds = {opts.confirm_seeds}: expected seeds the search does not "
                       f"use (--seeds {','.join(map(str, seeds))}); {both} would be reused")
    return list(opts.confirm_seeds)


def stage_configs(cfg: AuditConfig, opts: TuneOptions
                  ) -> tuple[AuditConfig, AuditConfig, list[str]]:
    """(search, confirm, warnings) from the resolved recipe `cfg` (never mutated). Each stage
    keeps the --set entries of its own defenses and attacks; warnings name the --set owners
    neither stage uses (an owner that is no defense or attack is a CRLError)."""
    from crl.attacks.base import build_attack

    needs_shadows = any("shadows" in build_attack(a, cfg.set.get(a)).requirements()
                        for a in cfg.attacks)
    defenses = list(dict.fromkeys([opts.defense, "ce", *opts.compare]))
    attacks = list(opts.confirm_attacks or cfg.attacks)
    either = replace(cfg, defenses=defenses, attacks=list(dict.fromkeys(cfg.attacks + attacks)))
    search = replace(cfg, defenses=defenses, shadows=cfg.shadows if needs_shadows else 0,
                     resume=False, set=_own_set(cfg, defenses, cfg.attacks))
    confirm = replace(cfg, defenses=defenses[:2], attacks=attacks, resume=False,
                      seeds=fresh_seeds(opts, cfg.seeds), set=_own_set(cfg, defenses[:2], attacks))
    return search, confirm, set_warnings(either)


def _own_set(cfg: AuditConfig, defenses: list[str], attacks: list[str]) -> dict:
    return {k: dict(v) for k, v in cfg.set.items() if k in defenses or k in attacks}
