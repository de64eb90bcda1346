"""Training many models at once: the sequential engine vs each ensemble formulation, and the
default `crl audit` with --engine sequential vs auto.

    python benchmarks/engine.py                       # everything (about 20 minutes, 2 cores)
    python benchmarks/engine.py --skip-audit --quick  # a smoke check of the script (minutes)
    python benchmarks/engine.py --cifar PATH --device cuda   # benchmarks/gpu_engine.sh

Cases (each engine's run in a fresh process, so that its peak memory is its own):
  mlp  32 digits MLPs on the digits default recipe: 100 members each, batch 32, lr 0.05,
       60 epochs (what the default audit trains per defense and seed);
  cnn  8 `cnn` models on CIFAR-shaped data (random uint8 3x32x32 images, 10 classes), the
       CIFAR recipe (batch 128, lr 0.05), --cnn-samples per model, --cnn-epochs.
The mlp case also times the floor: the same stacked arithmetic with no engine around it (one
BaddbmmStack forward per step on fixed, already normalised batches of the same sizes, the
cross-entropy, backward and one fused SGD step), the speed-up no batched engine can exceed here.
Each timed run follows an untimed one-epoch warm-up in the same process (library set-up that
a process pays once). For each: seconds, training images/s (models x epochs x samples / s),
peak resident memory of the process and its rise during training, and the speed-up over
sequential. Model cases run with --threads torch threads (default 1: on a shared machine a
second thread mostly waits).
Then the default audit (`crl audit --quiet`, a fresh CRL_CACHE each run, --audit-threads torch
threads, default 1) with 32 references (the default until the ensemble engine) under --engine
sequential and auto, and with today's default of 64 references under auto.

--cifar PATH: `cnn` reference models on CIFAR-10 (an imagefolder archive) on --device, each on
a random half of the audit's target pool (15000 images; or --cifar-samples), --cifar-epochs
epochs with bf16 and
channels_last: --seq-models trained one after another (their time extrapolates to any count)
vs --ensemble-models at once; prints models/s (one model = those epochs) for each.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

CASES = {"mlp": [("sequential", {}), ("ensemble", {"formulation": "baddbmm"}),
                 ("ensemble", {"formulation": "vmap"})],
         "cnn": [("sequential", {}), ("ensemble", {"formulation": "vmap"})]}


def _requests(data, count: int, samples: int, pool=None):
    import numpy as np

    from crl.engine import TrainRequest

    rng = np.random.default_rng(0)
    pool = np.arange(len(data)) if pool is None else pool
    return [TrainRequest(seed=s, train_idx=np.sort(rng.choice(pool, samples, replace=False)))
            for s in range(count)]


def _case(name: str, args: argparse.Namespace):
    """(spec, data, recipe, requests) of a case."""
    import torch

    from crl.data.datasets import load_dataset
    from crl.data.types import ImageData
    from crl.models.spec import ModelSpec
    from crl.training.recipe import Recipe

    if name == "mlp":
        data = load_dataset("digits")
        recipe = Recipe(epochs=args.mlp_epochs, batch_size=32, lr=0.05, device="cpu")
        return (ModelSpec.for_data("mlp", data), data, recipe,
                _requests(data, args.mlp_models, 100))
    gen = torch.Generator().manual_seed(0)
    n = args.cnn_models * args.cnn_samples
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    data = ImageData("cifar-shaped", x, torch.randint(0, 10, (n,), generator=gen), 10,
                     (0.5,) * 3, (0.25,) * 3)
    recipe = Recipe(epochs=args.cnn_epochs, batch_size=128, lr=0.05, device="cpu")
    return (ModelSpec.for_data("cnn", data), data, recipe,
            _requests(data, args.cnn_models, args.cnn_samples))


def _time(name: str, engine: str, options: dict, args: argparse.Namespace, out) -> None:
    """In a fresh process: train the case with one engine; send its numbers back."""
    import torch

    from crl.engine import get_engine

    torch.set_num_threads(args.threads)
    spec, data, recipe, requests = _case(name, args)
    engine_ = get_engine(engine, **options)
    # warm-up, untimed: one epoch (first-call library set-up is paid once per process)
    engine_.train(spec, data, replace(recipe, epochs=1), "ce", {}, requests, progress=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    outputs = engine_.train(spec, data, recipe, "ce", {}, requests, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    images = sum(len(r.train_idx) for r in requests) * recipe.epochs
    out.send((seconds, images, peak, peak - before, outputs[0].report.get("engine", engine)))


def _floor(args: argparse.Namespace, out) -> None:
    """In a fresh process: the mlp case's stacked forward, backward and fused SGD step alone."""
    import torch
    import torch.nn.functional as F

    from crl.data.types import normalize
    from crl.engine.sequential import initial_model
    from crl.engine.stacked import BaddbmmStack

    torch.set_num_threads(args.threads)
    spec, data, recipe, requests = _case("mlp", args)
    stack = BaddbmmStack([initial_model(spec, r.seed) for r in requests])
    opt = torch.optim.SGD(stack.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, fused=True)
    n, b = len(requests[0].train_idx), recipe.batch_size
    idx = torch.stack([torch.as_tensor(r.train_idx) for r in requests])        # [K, n]
    batches = [(normalize(data.x[idx[:, i:i + b]].flatten(0, 1), data.mean, data.std)
                .view(len(requests), -1, *data.x.shape[1:]), data.y[idx[:, i:i + b]])
               for i in range(0, n, b)]
    def epoch() -> None:
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            logits, _ = stack(x)
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") \
                .view(y.shape).mean(1).sum().backward()
            opt.step()

    epoch()                                                   # warm-up, untimed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for _ in range(recipe.epochs):
        epoch()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.send((seconds, n * len(requests) * recipe.epochs, peak, peak - before,
              "floor: bare stacked steps"))


def _run_case(name: str, args: argparse.Namespace) -> None:
    ctx = mp.get_context("spawn")
    print(f"\n{name}: | engine | s | images/s | peak RSS MB (rise) | speed-up |")
    print("|---|---|---|---|---|")
    base = None
    runs = [(_time, (name, engine, options)) for engine, options in CASES[name]]
    if name == "mlp":
        runs.append((_floor, ()))
    for target, what in runs:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*what, args, send))
        proc.start()
        proc.join()
        if not recv.poll():
            raise SystemExit(f"{name}: {target.__name__}{what} failed (exit {proc.exitcode})")
        seconds, images, peak, rise, used = recv.recv()
        base = base or seconds
        print(f"| {used} | {seconds:.1f} | {images / seconds:.0f} | {peak:.0f} ({rise:+.0f}) "
              f"| {base / seconds:.2f}x |", flush=True)


def _audit(engine: str, extra: list[str], threads: int) -> float:
    """Wall seconds of the default `crl audit` with a fresh model and data cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CRL_CACHE": os.path.join(tmp, "cache")}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        cmd = [sys.executable, "-m", "crl.cli", "audit", "--quiet", "--engine", engine,
               "--out", os.path.join(tmp, "run"), *extra]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def _run_audits(threads: int) -> None:
    """The default audit with 32 references (sequential, auto), then with the default 64 (auto):
    the targets are <= 45 s for the first under auto, <= 60 s for the second."""
    print(f"\ndefault audit ({threads or 'default'} threads): | engine | references | wall s |"
          "\n|---|---|---|")
    for engine, refs in (("sequential", "32"), ("auto", "32"), ("auto", "64")):
        seconds = _audit(engine, ["--references", refs], threads)
        print(f"| {engine} | {refs} | {seconds:.0f} |", flush=True)


def _cifar(args: argparse.Namespace) -> None:
    """models/s of `cnn` references on CIFAR-10: sequential vs the ensemble engine."""
    import torch

    from crl.data.datasets import load_dataset
    from crl.data.splits import make_pool_split
    from crl.engine import get_engine
    from crl.models.spec import ModelSpec
    from crl.training.recipe import Recipe

    data = load_dataset(f"imagefolder:{args.cifar}")
    pool = make_pool_split(data.y.numpy(), seed=0).target_pool
    spec = ModelSpec.for_data("cnn", data)
    recipe = Recipe(epochs=args.cifar_epochs, batch_size=128, lr=0.05, device=args.device,
                    bf16=True, channels_last=True)
    get_engine("sequential").train(spec, data, Recipe(epochs=1, device=args.device),
                                   "ce", {}, _requests(data, 1, 256, pool), progress=False)
    print("| engine | models | epochs | s | models/s | speed-up |\n|---|---|---|---|---|---|")
    base = None
    for engine, count in (("sequential", args.seq_models), ("ensemble", args.ensemble_models)):
        requests = _requests(data, count, args.cifar_samples or len(pool) // 2, pool)
        start = time.perf_counter()
        out = get_engine(engine).train(spec, data, recipe, "ce", {}, requests, progress=False)
        seconds = time.perf_counter() - start
        base = base or seconds / count
        print(f"| {out[0].report.get('engine', engine)} | {count} | {recipe.epochs} | "
              f"{seconds:.1f} | {count / seconds:.3f} | {base * count / seconds:.2f}x |",
              flush=True)
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlp-models", type=int, default=32)
    p.add_argument("--mlp-epochs", type=int, default=60)
    p.add_argument("--cnn-models", type=int, default=8)
    p.add_argument("--cnn-samples", type=int, default=512)
    p.add_argument("--cnn-epochs", type=int, default=1)
    p.add_argument("--cases", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model cases")
    p.add_argument("--skip-audit", action="store_true")
    p.add_argument("--audit-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the audits (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--cifar", help="CIFAR-10 imagefolder archive: the models/s mode")
    p.add_argument("--device", default="auto")
    p.add_argument("--cifar-epochs", type=int, default=2)
    p.add_argument("--cifar-samples", type=int, default=0,
                   help="training images per model (0: half the target pool, as a reference)")
    p.add_argument("--seq-models", type=int, default=3)
    p.add_argument("--ensemble-models", type=int, default=32)
    args = p.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.cifar:
        return _cifar(args)
    if args.quick:
        args.mlp_models, args.mlp_epochs, args.cnn_models, args.cnn_samples = 4, 2, 2, 128
    for name in args.cases.split(","):
        _run_case(name, args)
    if not args.skip_audit:
        _run_audits(args.audit_threads)
    print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
