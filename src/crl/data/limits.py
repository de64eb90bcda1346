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

A value that is not a positive byte count is a CRLError naming the variable.
"""
from __future__ import annotations

import os
import re

from crl.errors import CRLError

MEMBER_ENV = "CRL_MAX_MEMBER_BYTES"
DECODED_ENV = "CRL_MAX_DECODED_BYTES"
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
    """CRLError when `what` (a description of decoded data) needs more than the cap."""
    cap = max_decoded_bytes()
    if size > cap:
        raise CRLError(f"{what} takes {size} bytes; expected at most {cap} "
                       f"(raise {DECODED_ENV} to allow more)")
