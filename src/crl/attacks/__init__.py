"""Membership-inference attacks; importing this package registers them all."""
from crl.attacks import label_only, lira, nn_shadow, rmia, threshold  # noqa: F401  (registration)
from crl.attacks.base import Attack, AttackContext, AttackResult, build_attack
from crl.attacks.signals import Signals

__all__ = ["Attack", "AttackContext", "AttackResult", "Signals", "build_attack"]
