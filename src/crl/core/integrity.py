"""Checksummed torch files: every checkpoint, model and cache file carries a digest of its
content, verified on load (a flipped byte is an error, never a silently different model).

The file is an ordinary `torch.save` of {"format": FORMAT, "sha256": digest, "payload": obj},
read with weights_only=True (a file can never run code). The digest covers every tensor's bytes,
dtype and shape and every plain value, in a canonical order.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl.core.errors import CRLError
from crl.core.utils import torch_save_atomic

FORMAT = "crl-verified-1"


def digest(obj: Any) -> str:
    """sha256 of `obj` (nested dicts/lists/tuples of tensors, arrays and plain values)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"A{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def save_verified(path: str | os.PathLike, payload: Any) -> None:
    """Atomically write `payload` with its digest."""
    torch_save_atomic({"format": FORMAT, "sha256": digest(payload), "payload": payload}, path)


def load_verified(path: str | os.PathLike, what: str = "file") -> Any:
    """The payload of a file written by `save_verified`; CRLError naming the file if it is
    missing, unreadable, not such a file, or fails its checksum."""
    path = Path(path)
    if not path.is_file():
        raise CRLError(f"{what} {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CRLError(f"{what} {path} is unreadable ({type(e).__name__}); expected a crl "
                       "file written by this tool") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or "payload" not in blob:
        raise CRLError(f"{what} {path} is not a checksummed crl file (expected format {FORMAT})")
    if digest(blob["payload"]) != blob.get("sha256"):
        raise CRLError(f"{what} {path} fails its checksum: the file is corrupt or was edited")
    return blob["payload"]


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"sha256": hex digest of the file's bytes, "size": bytes}, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "size": size}
