"""Size caps for untrusted image data (archives and folders), checked before memory is spent.

Two environment variables set them; each takes a number of bytes, optionally with a binary
suffix K, M, G or T (`CRL_MAX_DECODED_BYTES=16G`):

    CRL_MAX_MEMBER_BYTES    the largest file one archive member (or one image file of a folder)
                            may hold; default 64 MiB. Checked from the tar header, before the
                            member's data is read, and on the file's size, before it is read.
    CRL_MAX_DECODED_BYTES   the most bytes decoding may produce: the whole uint8 image array
                            (N x C x H x W), one decoded image, and the image files read into
                            memory at once; default 8 GiB (CIFAR-10/100 take 184 MB, SVHN 304 MB,
                            ImageNet at 64x64 pixels 16 GB: raise it for that).

    CRL_MEMORY_BUDGET       the most memory one estimated allocation may take before it is
                            made: canary images, the reference models' logits, the decoded
                            images of a dataset, a model file's network; default half of the
                            memory available when it is checked (MemAvailable of
                            /proc/meminfo; 8 GiB where that is unknown).

A value that is not a positive byte count is a CRLError naming the variable.
"""
from __future__ import annotations

import os
import re

from crl.core.errors import CRLError

MEMBER_ENV = "CRL_MAX_MEMBER_BYTES"
DECODED_ENV = "CRL_MAX_DECODED_BYTES"
BUDGET_ENV = "CRL_MEMORY_BUDGET"
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
DEFAULT_MAX_DECODED_BYTES = 8 * 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def _env_bytes(var: str, default: int) -> int:
    text = os.environ.get(var, "")
    if not text.strip():
        return default
    match = _SIZE.fullmatch(text)
    value = int(match.group(1)) * _UNITS[match.group(2).upper()] if match else 0
    if value < 1:
        raise CRLError(f"{var} = {text!r}: expected a number of bytes >= 1, "
                       "optionally with a suffix K, M, G or T")
    return value


def max_member_bytes() -> int:
    """The cap on one archive member / image file (CRL_MAX_MEMBER_BYTES, default 64 MiB)."""
    return _env_bytes(MEMBER_ENV, DEFAULT_MAX_MEMBER_BYTES)


def max_decoded_bytes() -> int:
    """The cap on decoded data held at once (CRL_MAX_DECODED_BYTES, default 8 GiB)."""
    return _env_bytes(DECODED_ENV, DEFAULT_MAX_DECODED_BYTES)


def check_member_size(what: str, size: int) -> None:
    """CRLError when `what` (e.g. "archive a.tgz: member 'x.png'") holds more than the cap."""
    cap = max_member_bytes()
    if size > cap:
        raise CRLError(f"{what} is {size} bytes; expected at most {cap} "
                       f"(raise {MEMBER_ENV} to allow more)")


def check_decoded_size(what: str, size: int) -> None:
    """CRLError when `what` (a description of decoded data) needs more than the cap or the
    memory budget."""
    cap = max_decoded_bytes()
    if size > cap:
        raise CRLError(f"{what} takes {size} bytes; expected at most {cap} "
                       f"(raise {DECODED_ENV} to allow more)")
    check_memory(what, size)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations now (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def memory_budget() -> int:
    """CRL_MEMORY_BUDGET, default half of the available memory (8 GiB if that is unknown)."""
    available = available_memory()
    default = available // 2 if available else 8 * 2**30
    return _env_bytes(BUDGET_ENV, max(default, 1))


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_memory(what: str, size: int) -> None:
    """CRLError, before allocating, when `what` (estimated at `size` bytes) exceeds the memory
    budget. `what` starts with the setting that asks for it ("canaries = 10**8:noise: ...")."""
    budget = memory_budget()
    if size > budget:
        source = (f"{BUDGET_ENV}" if os.environ.get(BUDGET_ENV, "").strip()
                  else f"half the available memory; set {BUDGET_ENV} to change it")
        raise CRLError(f"{what} would take about {human_bytes(size)}; expected at most "
                       f"{human_bytes(budget)} (the memory budget: {source})")


def check_reference_scores(references: int, samples: int, classes: int) -> None:
    """Refuse a reference-model count whose logits could not be held: per reference model
    and sample, its logits on plain and mirrored inputs (2 x classes float32), its membership
    (1 byte) and its share of training indices (4 bytes)."""
    check_memory(f"references = {references}: the reference models' logits on {samples} "
                 f"samples of {classes} classes", references * samples * (8 * classes + 5))
