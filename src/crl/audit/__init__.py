"""`crl audit` as stages, each usable from Python:

    plan_models      which models a (defense, seed) needs, seeds derived by name   (plan.py)
    ModelSource      where the models come from and how the audit queries them    (source.py)
                     FactorySource: crl's own; crl.commands.audit_training.TrainFnSource: train_fn
    ModelFactory     train or fetch from the verified cache, save, load             (factory.py)
    extract_signals  logits etc., only what the attacks declared they need
                                                            (signal_extraction.py)
    run_attacks      scores -> metrics with intervals, groups, leave-one-out        (attacking.py)
    TargetOutcome    the typed result the report reads                              (outcome.py)

`Audit` holds what is fixed for a run (resolved config, data, model source, attacks) and audits
one (defense, seed) at a time; `run_audit` is the whole command; crl.audit_training is the same
`Audit` with the caller's train_fn as its source.
"""
from crl.audit.attacking import run_attacks
from crl.audit.factory import ModelCache, ModelFactory, TrainedModel
from crl.audit.outcome import AttackOutcome, Evaluation, TargetOutcome
from crl.audit.pipeline import Audit, run_audit, validate_names
from crl.audit.plan import DefenseChoice, ModelJob, plan_models
from crl.audit.signal_extraction import extract_signals
from crl.audit.source import FactorySource, ModelSource

__all__ = [
           "AttackOutcome",
           "Audit",
           "DefenseChoice",
           "Evaluation",
           "FactorySource",
           "ModelCache",
           "ModelFactory",
           "ModelJob",
           "ModelSource",
           "TargetOutcome",
           "TrainedModel",
           "extract_signals",
           "plan_models",
           "run_attacks",
           "run_audit",
           "validate_names",
]
