"""The Ray engine: chunks of models as Ray tasks, on this machine or across a cluster.

    get_engine("ray", address="HEAD:6379", chunk=8).train(spec, data, recipe, ...)

The dataset travels once through Ray's object store (one `ray.put` per engine and dataset);
each task trains its chunk inside the worker with an inner engine (`inner`, default `auto`:
the ensemble where it wins for the model on the worker's device, else sequential) and returns
plain state dicts and metadata (CPU tensors, numpy arrays, JSON-able report and history; never
a live module). The driver rebuilds each net from its spec and state dict and calls
on_done(position, output) as each chunk completes, so the model cache is written atomically on
the driver (no shared filesystem) and a rerun skips finished models. A task whose worker dies is
retried (`max_retries`). Without an address a local Ray is started on first use and shut down
with the engine; a Ray already initialised in this process is used as it is.

Ray tasks write no per-epoch checkpoints (TrainRequest.run_dir is not sent: the workers may not
share the driver's disk), so `resume` resumes across models (the cache), not within one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.utils import code_hash, jsonable
from crl.data.types import ImageData
from crl.engine.protocol import ENGINES, Engine, OnDone, TrainOutput, TrainRequest, arithmetic_label
from crl.models.spec import ModelSpec
from crl.training.recipe import Recipe

RAY_MISSING = "engine 'ray' needs ray: pip install 'crl[ray]'"


def import_ray() -> Any:
    """The `ray` module, else the CRLError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise CRLError(RAY_MISSING) from None
    return ray


def registered_engines() -> list[str]:
    """Every engine name registered once the built-in engine modules are imported."""
    import crl.engine.ensemble  # registers 'ensemble' and 'auto'
    import crl.engine.sequential  # noqa: F401  (registers 'sequential')

    return ENGINES.names()


def inner_engine(name: str, options: dict[str, Any]) -> Engine:
    """The registered engine `name` that trains a chunk (crl.engine.get_engine's lookup)."""
    registered_engines()
    return ENGINES.get(name)(**options)


def pack(out: TrainOutput) -> dict[str, Any]:
    """A TrainOutput as plain data for the object store (compact CPU tensors, no module)."""
    return {"state": {k: v.detach().cpu().clone() for k, v in out.net.state_dict().items()},
            "spec": out.spec.to_dict(), "trained_on": np.asarray(out.trained_on, np.int64),
            "report": jsonable(out.report), "history": jsonable(out.history),
            "groups": {k: np.asarray(v, np.int64) for k, v in out.groups.items()}}


def unpack(d: dict[str, Any]) -> TrainOutput:
    """The TrainOutput of `pack`: the net rebuilt from its spec (the global RNG untouched)."""
    spec = ModelSpec.from_dict(d["spec"], "a Ray task's model")
    with torch.random.fork_rng(devices=[]):
        net = spec.build()
    net.load_state_dict(d["state"])
    return TrainOutput(net.eval(), spec, np.asarray(d["trained_on"], np.int64), d["report"],
                       d["history"], {k: np.asarray(v, np.int64) for k, v in d["groups"].items()})


def worker_recipe(recipe: Recipe) -> Recipe:
    """`recipe` for a worker: Ray hands a task its GPUs as cuda:0.., so cuda:N becomes cuda."""
    if recipe.device.startswith("cuda:"):
        return dataclasses.replace(recipe, device="cuda")
    return recipe


def train_chunk(spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
                params: dict[str, Any], requests: list[TrainRequest], inner: str,
                inner_options: dict[str, Any], threads: int) -> dict[str, Any]:
    """Runs in a Ray worker: one chunk of models by the inner engine, returned as plain data
    with the worker's code hash (the driver refuses models trained by other code)."""
    torch.set_num_threads(threads)
    engine = inner_engine(inner, inner_options)
    outputs = engine.train(spec, data, worker_recipe(recipe), defense, params, requests,
                           progress=False)
    return {"code": code_hash(), "outputs": [pack(o) for o in outputs]}


#: what Ray says when a cluster with token authentication refuses this process
_AUTH_SIGNS = ("InvalidAuthToken", "Unauthenticated", "AuthenticationError",
               "authentication token")


def connection_error(address: str, error: BaseException, log: str = "") -> str:
    """The one-line reason `ray.init(address=...)` failed; `log`: what Ray wrote to stderr."""
    said = f"{type(error).__name__} {error}\n{log}"
    if any(sign.lower() in said.lower() for sign in _AUTH_SIGNS):
        return (f"ray.address = {address!r}: the Ray cluster refused this process's "
                "authentication token (Ray 2.60 clusters use token authentication); expected "
                "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
                "~/.ray/auth_token or RAY_AUTH_TOKEN_PATH) on the driver and on every node "
                "(docs/scaling.md)")
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (f"ray.address = {address!r}: expected the address of a running Ray head "
            f"(`ray start --head` prints it); {reason}")


@contextlib.contextmanager
def _fd2_into(file: Any) -> Iterator[None]:
    """File descriptor 2 (stderr) redirected into `file` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


OPTIONS = ParamSpec(
    Param("address", None, kind=str, nullable=True,
          help="a running Ray cluster (HEAD:6379, or 'auto'); null: start a local Ray"),
    Param("chunk", None, kind=int, low=1, nullable=True,
          help="models per task; null: the models spread evenly over the cluster's slots"),
    Param("num_cpus", None, kind=int, low=1, nullable=True,
          help="CPUs of the local Ray this engine starts; null: all of this machine's"),
    Param("cpus_per_task", 1.0, kind=float, low=0, low_open=True, help="CPUs each task holds"),
    Param("gpus_per_task", None, kind=float, low=0, nullable=True,
          help="GPUs each task holds; null: 1 when the recipe's device is cuda (or auto on a "
               "cluster with GPUs), else 0"),
    Param("inner", "auto", kind=str, help="the engine each task runs (auto, ensemble, "
                                          "sequential)"),
    Param("max_retries", 3, kind=int, low=0, help="retries of a task whose worker died"),
)


@ENGINES.register("ray")
class RayEngine:
    """Chunks of models as Ray tasks; finished models come back to the driver as they finish."""

    def __init__(self, inner_options: dict[str, Any] | None = None, **options: Any) -> None:
        """options: see OPTIONS; inner_options: the inner engine's own (e.g. ensemble_size)."""
        self.ray = import_ray()
        self.options = OPTIONS.resolve("ray", options)
        inner, names = self.options["inner"], [n for n in registered_engines() if n != "ray"]
        if inner not in names:
            raise CRLError(f"ray.inner = {inner!r}: expected one of: {', '.join(names)}")
        self.inner_options = dict(inner_options or {})
        inner_engine(inner, self.inner_options)   # the inner engine checks its options here
        self._shutdown: weakref.finalize | None = None
        self._data: tuple[str, Any] | None = None
        if self.options["address"] is not None:
            self.connect()

    def connect(self) -> None:
        """Join the cluster at `address`, or start a local Ray (unless Ray is already up)."""
        ray, address = self.ray, self.options["address"]
        if ray.is_initialized():
            return
        common = {"log_to_driver": False, "ignore_reinit_error": True,
                  "logging_level": logging.WARNING}
        if address is None:
            ray.init(num_cpus=self.options["num_cpus"], include_dashboard=False,
                     _temp_dir=str(Path(tempfile.gettempdir()) / "crl-ray"), **common)
        else:
            with tempfile.TemporaryFile() as log:
                try:
                    with _fd2_into(log):   # Ray's C++ core logs to fd 2, past `logging_level`
                        ray.init(address=address, **common)
                except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as e:
                    log.seek(0)
                    text = log.read().decode(errors="replace")
                    raise CRLError(connection_error(address, e, text)) from None
        self._shutdown = weakref.finalize(self, ray.shutdown)
        self._data = None

    def close(self) -> None:
        """Shut down the Ray this engine started or joined (a no-op otherwise)."""
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None

    def data_ref(self, data: ImageData) -> Any:
        """The dataset in the object store: put once per engine and dataset."""
        if self._data is None or self._data[0] != data.content_hash:
            self._data = (data.content_hash, self.ray.put(data))
        return self._data[1]

    def gpus(self, recipe: Recipe) -> float:
        """GPUs per task: the option, else 1 for a cuda recipe (or auto on a GPU cluster)."""
        if self.options["gpus_per_task"] is not None:
            return self.options["gpus_per_task"]
        if recipe.device.startswith("cuda"):
            return 1.0
        has_gpus = self.ray.cluster_resources().get("GPU", 0) > 0
        return 1.0 if recipe.device == "auto" and has_gpus else 0.0

    def slots(self, gpus: float) -> int:
        """How many tasks the cluster runs at once; a CRLError when one task cannot fit."""
        res = self.ray.cluster_resources()
        needs = {"CPU": self.options["cpus_per_task"], "GPU": gpus}
        for kind, need in needs.items():
            if need > res.get(kind, 0):
                raise CRLError(f"ray.{kind.lower()}s_per_task = {need:g}: expected at most the "
                               f"{res.get(kind, 0):g} {kind}s of the Ray cluster (`ray start "
                               f"--num-{kind.lower()}s=N` on a node adds them)")
        return min(int(res.get(kind, 0) // need) for kind, need in needs.items() if need > 0)

    def chunks(self, n: int, gpus: float) -> list[list[int]]:
        """Positions 0..n-1 in consecutive chunks: `chunk` each, else one per task slot."""
        slots = self.slots(gpus)
        size = self.options["chunk"] or math.ceil(n / slots)
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def submit(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
               params: dict[str, Any], requests: list[TrainRequest]) -> dict[Any, list[int]]:
        """One task per chunk: object ref -> the chunk's positions in `requests`."""
        gpus = self.gpus(recipe)
        task = self.ray.remote(self.chunk_fn).options(
            num_cpus=self.options["cpus_per_task"], num_gpus=gpus,
            max_retries=self.options["max_retries"], name=f"crl-train-{defense}")
        ref, threads = self.data_ref(data), max(1, int(self.options["cpus_per_task"]))
        return {task.remote(spec, ref, recipe, defense, params,
                            [dataclasses.replace(requests[i], run_dir=None) for i in chunk],
                            self.options["inner"], self.inner_options, threads): chunk
                for chunk in self.chunks(len(requests), gpus)}

    chunk_fn = staticmethod(train_chunk)

    def result(self, ref: Any) -> list[TrainOutput]:
        """A finished task's models, rebuilt here; a CRLError in the worker is re-raised as is."""
        try:
            got = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, CRLError):
                raise e.cause from None
            raise
        if got["code"] != code_hash():
            raise CRLError(f"a Ray worker runs crl source {got['code']}, this driver "
                           f"{code_hash()}: expected the same crl installed on every node")
        return [unpack(d) for d in got["outputs"]]

    def worker_device(self, recipe: Recipe) -> str:
        """The device class the tasks compute on: cuda when they hold GPUs (asked of the cluster
        once Ray is up, for --device auto), else the recipe's as it resolves here."""
        if recipe.device == "auto" and self.ray.is_initialized():
            return "cuda" if self.gpus(recipe) else "cpu"
        return arithmetic_label("", worker_recipe(recipe)).rsplit("/", 1)[1]

    def arithmetic(self, spec: ModelSpec, data: ImageData, recipe: Recipe,
                   defense: str) -> str:
        """The inner engine's formulation on the workers' device class. A worker that computes
        otherwise says so in its models' reports (the cache stores them under that)."""
        label = self.inner().arithmetic(spec, data, worker_recipe(recipe), defense)
        return self._on_workers(label, recipe)

    def plan(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
             requests: list[TrainRequest], *, resume: bool = False) -> list[str]:
        """The inner engine's plan over the whole group (each task's inner engine honours it;
        no checkpoints travel, so nothing is planned for resuming)."""
        planned = self.inner().plan(spec, data, worker_recipe(recipe), defense, requests)
        return [self._on_workers(label, recipe) for label in planned]

    def inner(self) -> Any:
        """The engine each task runs (as the driver builds it)."""
        return inner_engine(self.options["inner"], self.inner_options)

    def _on_workers(self, label: str, recipe: Recipe) -> str:
        return f"{label.rsplit('/', 1)[0]}/{self.worker_device(recipe)}"

    def train(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
              params: dict[str, Any], requests: list[TrainRequest], *, resume: bool = False,
              progress: bool = True, on_done: OnDone | None = None) -> list[TrainOutput]:
        """Every request trained by Ray tasks; on_done(position, output) as each chunk ends."""
        if not requests:
            return []
        self.connect()
        pending = self.submit(spec, data, recipe, defense, params, requests)
        outputs: list[TrainOutput | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="models (ray)", leave=False, disable=not progress)
        try:
            while pending:
                (ref,), _ = self.ray.wait(list(pending), num_returns=1)
                chunk = pending.pop(ref)
                for position, out in zip(chunk, self.result(ref)):
                    outputs[position] = out
                    if on_done is not None:
                        on_done(position, out)
                bar.update(len(chunk))
        finally:
            bar.close()
            for ref in pending:
                self.ray.cancel(ref)
        return outputs  # type: ignore[return-value]
