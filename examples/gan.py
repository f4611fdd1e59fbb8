"""A GAN trained with two AutoAccumOptimizers: the generator's backward writes gradients into the
discriminator's parameters, and the discriminator's next step must not apply them.

Read top to bottom; copy into your own script. No ``zero_grad()`` anywhere: each optimizer's step
applies only the gradients of its own samples, and autoaccum discards gradients written into its
parameters between its calls (warning once), exactly as ``zero_grad()`` would.

    python examples/gan.py [--steps 200] [--target-batch-size 64] [--loader-batch-size 64]

The discriminator and the generator each see one loader batch per call; keep the loader batch
equal to the target batch so that, as in the usual GAN loop, each generator step sees the
discriminator after its whole step.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import autoaccum


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--target-batch-size", type=int, default=64)
    parser.add_argument("--loader-batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    # The data: points on a ring of radius 2. The generator maps noise to 2-d points.
    def real_batch(n: int) -> torch.Tensor:
        angle = torch.rand(n) * 2 * torch.pi
        return torch.stack([2 * angle.cos(), 2 * angle.sin()], 1) + 0.05 * torch.randn(n, 2)

    gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    disc = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    opt_d = autoaccum.AutoAccumOptimizer(torch.optim.Adam, disc.parameters(), lr=2e-3,
                                         betas=(0.5, 0.999), micro_batch_size=16,
                                         target_batch_size=args.target_batch_size)
    opt_g = autoaccum.AutoAccumOptimizer(torch.optim.Adam, gen.parameters(), lr=2e-3,
                                         betas=(0.5, 0.999), micro_batch_size=16,
                                         target_batch_size=args.target_batch_size)

    def d_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        real, fake = disc(batch["real"]), disc(gen(batch["z"]).detach())
        return (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))

    def g_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        fake = disc(gen(batch["z"]))  # this backward also fills disc's .grad
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(1, args.steps + 1):
            n = args.loader_batch_size
            batch = {"real": real_batch(n), "z": torch.randn(n, 4)}
            ld = opt_d.step(d_loss, batch)
            lg = opt_g.step(g_loss, batch)
            if step % 50 == 0 or step == args.steps:
                print(f"step {step}: discriminator loss {float(ld):.3f}, "
                      f"generator loss {float(lg):.3f}")
    with torch.no_grad():
        radius = gen(torch.randn(1000, 4)).norm(dim=1)
    print(f"optimizer steps: discriminator {opt_d.optimizer_steps}, "
          f"generator {opt_g.optimizer_steps}")
    print(f"generated radius: mean {radius.mean():.2f} (real data: 2.00), "
          f"std {radius.std():.2f}")
    print(f"warnings about gradients written outside opt.step: "
          f"{sum('outside opt.step' in str(w.message) for w in seen)}")


if __name__ == "__main__":
    main()
