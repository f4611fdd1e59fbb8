"""What the per-call gradient watch costs (issue 32): ``GradWatch.mark`` at the end of a call and
``GradWatch.changed`` at the start of the next, over a model with many parameter tensors, next to
one ``opt.step`` call of a tiny micro-batch on the same model (the smallest real call).

    python benchmarks/grad_watch.py [--tensors 1000] [--repeats 200]

Prints medians; results/grad_watch.txt holds the last run."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import autoaccum
from autoaccum.grads import GradWatch


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(args.tensors // 2)])
    params = list(layers.parameters())
    opt = autoaccum.AutoAccumOptimizer(torch.optim.SGD(params, lr=1e-3), target_batch_size=4,
                                       micro_batch_size=4)
    x = torch.randn(4, 8)

    def loss_fn(b: torch.Tensor) -> torch.Tensor:
        return layers(b).pow(2).mean()

    for _ in range(3):
        opt.step(loss_fn, x)
    for p in params:  # the between-calls state of a step in progress: every gradient present
        p.grad = torch.zeros_like(p)
    watch = GradWatch()
    watch.mark(params)
    mark = median_us(lambda: watch.mark(params), args.repeats)
    changed = median_us(lambda: watch.changed(params), args.repeats)
    for p in params:
        p.grad = None
    call = median_us(lambda: opt.step(loss_fn, x), max(20, args.repeats // 10))
    print(f"{len(params)} parameter tensors, torch {torch.__version__}, CPU")
    print(f"GradWatch.mark    median {mark:8.1f} us per call")
    print(f"GradWatch.changed median {changed:8.1f} us per call")
    print(f"opt.step (one step of 4 samples, one micro-batch) median {call:8.1f} us")
    print(f"watch / call: {(mark + changed) / call:.1%}")


if __name__ == "__main__":
    main()
