"""Membership-inference attacks; importing this package registers them all."""
from crl.attacks import threshold  # noqa: F401
from crl.attacks.base import Attack, AttackContext, AttackResult, build_attack
from crl.attacks.signals import Signals

for _module in ("lira", "rmia", "nn_shadow"):
    try:
        __import__(f"crl.attacks.{_module}")
    except ModuleNotFoundError as _e:   # not written yet in this checkout
        if _e.name != f"crl.attacks.{_module}":
            raise

__all__ = ["Attack", "AttackContext", "AttackResult", "Signals", "build_attack"]
