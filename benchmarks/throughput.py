"""Training throughput of a model on CIFAR-shaped data (images/s, full SGD step).

    python benchmarks/throughput.py --model cnn --batch-size 128 --steps 30
Prints one Markdown row per setting (fp32, channels_last, bf16 autocast).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from crl.models import create_model


def measure(model_name: str, batch: int, steps: int, channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, 3, 32, 10)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    print(f"# {a.model}, batch {a.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| setting | images/s |\n|---|---|")
    for name, cl, bf in [("fp32", False, False), ("channels_last", True, False),
                         ("bf16 autocast", False, True), ("channels_last + bf16", True, True)]:
        print(f"| {name} | {measure(a.model, a.batch_size, a.steps, cl, bf):.0f} |")


if __name__ == "__main__":
    main()
