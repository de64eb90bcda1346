"""The `--canaries N[:KIND]` value: its kinds, its pattern and its parser. Kept free of torch so
that `crl.config` can check the value without importing the data layer (crl.data.canaries makes
the canaries)."""
from __future__ import annotations

import re

from crl.core.errors import CRLError

KINDS = ("mislabeled", "noise")
SPEC_PATTERN = r"([2-9]|[1-9]\d+)(:(" + "|".join(KINDS) + r"))?"
SPEC_WORDS = f"N or N:KIND with N >= 2 and KIND one of: {', '.join(KINDS)}"


def parse_canaries(text: str) -> tuple[int, str]:
    """'200' -> (200, 'mislabeled'); '50:noise' -> (50, 'noise')."""
    if not isinstance(text, str) or not re.fullmatch(SPEC_PATTERN, text):
        raise CRLError(f"canaries = {text!r}: expected {SPEC_WORDS}")
    n, _, kind = text.partition(":")
    return int(n), kind or KINDS[0]
