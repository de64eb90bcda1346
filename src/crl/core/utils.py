"""Small shared helpers: atomic writes, seeding, devices, code version. Imports torch only in
the functions that use it (the CLI reads the code hash and cache folder without it)."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)   # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
    write_text_atomic(path, text + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON data (anything json cannot write becomes its str)."""
    return json.loads(json.dumps(obj, default=str))


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else is passed to torch.device."""
    import torch

    from crl.core.errors import CRLError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CRLError(f"bad --device '{device}'; expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CRLError(f"--device '{device}' asked for CUDA but no CUDA device is available")
    return dev


def code_version() -> dict:
    """The package version and, when run from a git checkout, the commit and dirty flag."""
    import torch

    from crl import __version__

    info: dict[str, Any] = {"crl": __version__, "source": code_hash(), "torch": torch.__version__}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here, capture_output=True, text=True, timeout=5,
            )
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def source_hash(root: str | os.PathLike) -> str:
    """sha256 (16 hex) over every .py file under `root`: relative path and bytes."""
    import hashlib

    root = Path(root)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """The package version plus the hash of the installed `crl` package's source: any edit
    anywhere in src/crl changes it, so cached models retrain (the safe side)."""
    from crl import __version__

    return f"{__version__}+{source_hash(Path(__file__).resolve().parent)}"


def cache_dir() -> Path:
    """Where decoded datasets and trained models are cached ($CRL_CACHE or ~/.cache/crl)."""
    return Path(os.environ.get("CRL_CACHE", Path.home() / ".cache" / "crl"))
