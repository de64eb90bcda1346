"""Fingerprints: short digests that say which data, which training indices and which
architecture a model or checkpoint belongs to (the checkpoint's fingerprint in crl.engine.fit, the
model cache's key in crl.audit.factory, a study's setup in crl.tune.study)."""
from __future__ import annotations

import hashlib
import json

import numpy as np
from torch import nn

from crl.data.types import ImageData


def indices_digest(idx) -> str:
    """sha256 (24 hex) of an index array, as int64 in the given order."""
    arr = np.asarray(idx, dtype=np.int64)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:24]


def data_identity(data: ImageData) -> str:
    """The dataset's content hash where the loader computed one, else its name and size."""
    return getattr(data, "content_hash", "") or f"{data.name}:{len(data)}"


def architecture_digest(model: nn.Module) -> str:
    """Module type and every parameter/buffer name and shape."""
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    blob = json.dumps([type(model).__name__, shapes])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
