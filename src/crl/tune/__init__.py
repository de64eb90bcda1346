"""`crl tune`: an Optuna multi-objective search of one defense's parameters for the
privacy-utility front, evaluated through the audit's stages only.

    options.py   TuneOptions (declared like AuditConfig's fields), the (search, confirm) configs
    space.py     the search space from the defense's parameter spec (`Param.search`)
    evaluate.py  Point: one setting audited on some seeds; the objective (strongest attack)
    study.py     the study in the run directory (SQLite), its trials, the recommendation
    output.py    tune.json, tune.md and pareto.png
    run.py       run_tune: the whole command

The heavy modules (optuna, the audit) load only with `crl.tune.run`.
"""
from crl.tune.options import OBJECTIVES, TuneOptions

__all__ = ["OBJECTIVES", "TuneOptions"]
