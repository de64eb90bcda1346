"""Model files: a checksummed header (the ModelSpec) plus weights, loaded with weights_only=True.

    save_model(path, net, spec, extra={...})   # atomic: crl.core.integrity.save_verified
    net, spec, extra = load_model_file(path)   # the raw network (expects normalised inputs)
    model = load_model(path)                   # NormalizedModel: takes images in [0, 1]
    model.predict(images)                      # labels and class names from PIL/numpy images

A model file for users (`released_extra`: crl train's and the audit's model.pt) stores the class
names and the expected input, never dataset indices: which samples trained the model is written
beside it (split.json / members.json), so a shipped model does not carry its members' ids.
Files written before class names were stored still load (class_names None).

A file can never run code, a flipped byte fails the checksum, and a header that disagrees with
its weights (another architecture, another number of classes) is refused with a one-line
CRLError naming the file, never loaded into a silently different model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crl.core.errors import CRLError
from crl.core.integrity import load_verified, save_verified
from crl.data.limits import check_memory
from crl.models.deployed import DeployedModel
from crl.models.spec import ModelSpec, NormalizedModel

MODEL_FORMAT = "crl-model-2"
_SCALARS = (type(None), bool, int, float, str)   # exact types: numpy scalars do not reload


def save_model(path: str | os.PathLike, net: nn.Module, spec: ModelSpec, *,
               extra: dict | None = None) -> None:
    """Atomically write `net`'s weights (on the CPU) with `spec` and the plain dict `extra`.

    `net` is the raw network `spec.build()` makes (a NormalizedModel with the same spec is
    unwrapped); a network whose weights do not fit `spec` is refused before anything is written.
    """
    where = f"cannot save model file {path}"
    net = _raw_network(net, spec, where)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise CRLError(f"{where}: extra = {type(extra).__name__}: expected a dict")
    _check_plain(extra, "extra", where)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with torch.device("meta"):   # shapes only: no memory, no initialisation cost
        reference = spec.build().state_dict()
    problem = _weights_mismatch(reference, state)
    if problem:
        raise CRLError(f"{where}: the network does not fit its spec ({spec.describe()}): "
                       f"{problem}")
    save_verified(path, {"format": MODEL_FORMAT, "spec": spec.to_dict(), "state_dict": state,
                         "extra": extra})


def load_model_file(path: str | os.PathLike) -> tuple[nn.Module, ModelSpec, dict]:
    """(raw network in eval mode, its spec, the `extra` dict) from a file `save_model` wrote.

    The network expects NORMALISED inputs; `load_model` gives one that takes images in [0, 1].
    """
    where = f"model file {Path(path)}"
    payload = load_verified(path, "model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CRLError(f"{where} is not a crl model (format {found!r}; expected {MODEL_FORMAT})")
    spec = ModelSpec.from_dict(payload.get("spec"), source=where)
    state = _state_dict_in(payload, where)
    extra = payload.get("extra", {})
    if not isinstance(extra, dict):
        raise CRLError(f"{where}: extra = {type(extra).__name__}: expected a dict")
    with torch.device("meta"):   # the header's network, shapes only: nothing allocated yet
        reference = spec.build().state_dict()
    problem = _weights_mismatch(reference, state)
    if problem:
        raise CRLError(f"{where}: its weights do not match its header ({spec.describe()}): "
                       f"{problem}")
    check_memory(f"{where}: the network of its header ({spec.describe()})",
                 sum(t.numel() * t.element_size() for t in reference.values()))
    net = spec.build()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).replace("\n", " ").replace("\t", "")
        raise CRLError(f"{where}: its weights do not load into {spec.describe()}: "
                       f"{detail[:200]}") from None
    return net.eval(), spec, extra


def load_model(path: str | os.PathLike) -> DeployedModel:
    """The model saved at `path`, in eval mode, taking float images in [0, 1] (uint8 / 255); it
    warns once if given other values, and `.predict(images)` converts PIL / numpy images."""
    net, spec, extra = load_model_file(path)
    return DeployedModel(net, spec, _class_names(extra, spec, f"model file {Path(path)}")).eval()


def released_extra(spec: ModelSpec, class_names: list[str] | None, **info: Any) -> dict:
    """`extra` for a model file given to users: the class names (dataset order; None: the class
    indices as strings), the expected input and `info` (e.g. the defense's report, the training
    history): never dataset indices, which belong in split.json / members.json beside it."""
    names = [str(c) for c in class_names] if class_names else []
    if len(names) != spec.num_classes:
        names = [str(i) for i in range(spec.num_classes)]
    leaked = sorted(k for k in info if k in _INDEX_KEYS)
    if leaked:
        raise CRLError(f"a released model file must not carry dataset indices ({leaked[0]}): "
                       "write them to split.json / members.json")
    return {"class_names": names, "input": spec.input_description(), **info}


_INDEX_KEYS = ("trained_on", "groups", "train_idx", "members")


def _class_names(extra: dict, spec: ModelSpec, where: str) -> tuple[str, ...] | None:
    """The stored class names (None in files written before they were stored), checked."""
    stated = extra.get("input")
    if stated is not None and stated != spec.input_description():
        raise CRLError(f"{where}: input = {str(stated)[:120]} disagrees with its spec "
                       f"({spec.describe()})")
    names = extra.get("class_names")
    if names is None:
        return None
    if (not isinstance(names, list) or len(names) != spec.num_classes
            or not all(isinstance(n, str) for n in names)):
        raise CRLError(f"{where}: class_names = {str(names)[:80]}: expected a list of "
                       f"{spec.num_classes} strings")
    return tuple(names)


def _raw_network(net: Any, spec: Any, where: str) -> nn.Module:
    if not isinstance(spec, ModelSpec):
        raise CRLError(f"{where}: spec is a {type(spec).__name__}; expected a ModelSpec")
    if isinstance(net, NormalizedModel):
        if net.spec != spec:
            raise CRLError(f"{where}: the model's spec ({net.spec.describe()}) is not the spec "
                           f"given ({spec.describe()})")
        net = net.net
    if not isinstance(net, nn.Module):
        raise CRLError(f"{where}: net is a {type(net).__name__}; expected an nn.Module")
    return net


def _check_plain(value: Any, name: str, where: str) -> None:
    """Refuse values torch.load(weights_only=True) could not read back (e.g. numpy scalars)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise CRLError(f"{where}: {name} has the key {k!r}: expected str or int keys")
            _check_plain(v, f"{name}[{k!r}]", where)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{name}[{i}]", where)
    elif type(value) not in _SCALARS and not isinstance(value, torch.Tensor):
        raise CRLError(f"{where}: {name} = {value!r} is a {type(value).__name__}: expected "
                       "str, int, float, bool, None, tensors, lists or dicts")


def _state_dict_in(payload: dict, where: str) -> dict[str, torch.Tensor]:
    state = payload.get("state_dict")
    if state is None:
        raise CRLError(f"{where} has no state_dict (no weights)")
    if not isinstance(state, dict):
        raise CRLError(f"{where}: state_dict is a {type(state).__name__}; expected a dict of "
                       "tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CRLError(f"{where}: state_dict[{key!r}] is a {type(value).__name__}; "
                           "expected a tensor")
    return state


def _weights_mismatch(expected: dict, got: dict) -> str | None:
    """The first difference between two state dicts' names and shapes, in words (None: same)."""
    for key, ref in expected.items():
        if key not in got:
            return f"the weight '{key}' is missing"
        if tuple(got[key].shape) != tuple(ref.shape):
            return (f"'{key}' has shape {list(got[key].shape)}, expected "
                    f"{list(ref.shape)}")
    extra = [k for k in got if k not in expected]
    if extra:
        return f"'{extra[0]}' is not a weight of this architecture"
    return None
