"""Training throughput of a model on CIFAR-shaped data, and the per-step cost of CRL over CE.

    python benchmarks/throughput.py --model cnn --batch-size 128 --steps 30 --device cpu
Prints one Markdown row per setting (fp32, channels_last, bf16 autocast: images/s, full SGD
step), then the per-step time of a plain cross-entropy step and of a CRL step (CRLLoss with the
`crl` defense's default parameters, features from a FeatureTap, the centers' own SGD step) on the
same model and batch, and of the two losses alone. CE and CRL steps alternate (CE, CRL, CE,
CRL, ...) --repeats times so that both see the same machine load; each time is a median over
its --repeats steps. The last line is `crl/ce step-time ratio: X.XX`.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from crl.core.utils import resolve_device
from crl.defenses.crl import CRLDefense
from crl.losses import CRLLoss
from crl.models import FeatureTap, classifier_of, create_model

WARMUP = 5
NUM_CLASSES = 10


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x.to(device), y.to(device)


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def measure(model_name: str, batch: int, steps: int, device: torch.device,
            channels_last: bool, bf16: bool) -> float:
    """Images per second of full CE training steps in one setting."""
    torch.manual_seed(0)
    model = create_model(model_name, 3, 32, NUM_CLASSES).to(device)
    x, y = _batch(batch, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = _sgd(model.parameters())
    for i in range(steps + WARMUP):
        if i == WARMUP:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


Step = Callable[[int], None]        # one training step (or loss evaluation) at a given epoch


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    opt = _sgd(model.parameters())

    def step(epoch: int) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _crl_loss(feat_dim: int, device: torch.device) -> CRLLoss:
    """CRLLoss with the `crl` defense's default parameters."""
    return CRLLoss(NUM_CLASSES, feat_dim, generator=torch.Generator().manual_seed(0),
                   **CRLDefense.spec.defaults()).to(device)


def crl_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    """A CRL step as `fit` runs it: features by a tap, the centers' optimizer stepped too."""
    tap = FeatureTap(model)
    loss_fn = _crl_loss(tap.in_features, x.device)
    opts = [_sgd(model.parameters()), loss_fn.make_center_optimizer()]

    def step(epoch: int) -> None:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss_fn(model(x), tap.pop(), y, epoch).backward()
        for opt in opts:
            opt.step()
    return step


def loss_only_steps(feat_dim: int, y: torch.Tensor) -> dict[str, Step]:
    """The two losses alone (forward + backward on fixed logits and features; CRL also steps
    its centers): the part of a step that differs between CE and CRL."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(len(y), NUM_CLASSES, generator=gen).to(y.device).requires_grad_()
    features = torch.randn(len(y), feat_dim, generator=gen).to(y.device).requires_grad_()
    loss_fn = _crl_loss(feat_dim, y.device)
    center_opt = loss_fn.make_center_optimizer()

    def ce(epoch: int) -> None:
        logits.grad = None
        F.cross_entropy(logits, y).backward()

    def crl(epoch: int) -> None:
        logits.grad = features.grad = None
        center_opt.zero_grad(set_to_none=True)
        loss_fn(logits, features, y, epoch).backward()
        center_opt.step()
    return {"ce": ce, "crl": crl}


def _timed(step: Step, epoch: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step(epoch)
    _sync(device)
    return time.perf_counter() - t0


def median_times(runs: dict[str, Step], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each run, steps interleaved (CE, CRL, CE, CRL, ...), after
    WARMUP untimed steps each; epochs alternate odd/even."""
    for step in runs.values():
        for _ in range(WARMUP):
            step(1)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, step in runs.items():
            times[name].append(_timed(step, 1 + r % 2, device))
    return {name: statistics.median(t) for name, t in times.items()}


def step_runs(model_name: str, batch: int,
              device: torch.device) -> tuple[dict[str, Step], dict[str, Step]]:
    """CE and CRL: full training steps on two copies of one model and one batch, and the
    losses alone on that batch's labels."""
    torch.manual_seed(0)
    model = create_model(model_name, 3, 32, NUM_CLASSES).to(device)
    x, y = _batch(batch, device)
    full = {"ce": ce_step(copy.deepcopy(model), x, y), "crl": crl_step(model, x, y)}
    return full, loss_only_steps(classifier_of(model)[1].in_features, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per throughput setting")
    p.add_argument("--repeats", type=int, default=30, help="CE/CRL step pairs (medians)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else platform.processor() or platform.machine()
    print(f"# {a.model}, batch {a.batch_size}, {device.type} ({name}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| setting | images/s |\n|---|---|")
    for label, cl, bf in [("fp32", False, False), ("channels_last", True, False),
                          ("bf16 autocast", False, True), ("channels_last + bf16", True, True)]:
        print(f"| {label} | {measure(a.model, a.batch_size, a.steps, device, cl, bf):.0f} |")
    full, alone = step_runs(a.model, a.batch_size, device)
    steps = median_times(full, a.repeats, device)
    loss_only = median_times(alone, a.repeats, device)
    print("\n| loss | ms per training step | ms for the loss alone |\n|---|---|---|")
    for loss_name in steps:
        print(f"| {loss_name} | {1e3 * steps[loss_name]:.2f} | {1e3 * loss_only[loss_name]:.3f} |")
    print(f"(medians of {a.repeats} interleaved steps each)")
    print(f"crl/ce step-time ratio: {steps['crl'] / steps['ce']:.2f}")


if __name__ == "__main__":
    main()
