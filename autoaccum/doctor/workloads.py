"""The doctor's built-in workloads: a ResNet, a GPT-style transformer (bf16, token loss), an MLP.

A batch is a CPU tensor of sample indices; ``loss`` builds each sample's input from its index on
the device (integer hashing, so the values do not depend on which micro-batch a sample is in) and
returns the micro-batch's loss. Host batches therefore cost 8 bytes a sample, any target size is
cheap to feed, and the memory a micro-batch needs is its inputs plus its activations, as in a real
loop whose loader hands over device batches. Models are built from a fixed seed, so every build is
the same initial model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_HASH_MOD = 65521


def hashed(idx: torch.Tensor, width: int) -> torch.Tensor:
    """``(len(idx), width)`` float32 values in [-0.5, 0.5) determined by the index alone (exact
    integer arithmetic, then one correctly rounded division: bitwise the same in any batch)."""
    grid = torch.arange(width, device=idx.device, dtype=torch.int64)
    values = (idx[:, None] * 2654435761 + grid[None, :] * 40503) % _HASH_MOD
    return values.to(torch.float32) / _HASH_MOD - 0.5


# -------------------------------------------------------------------------------------- models
class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = _shortcut(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.down(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """torchvision's ResNet layout (no torchvision needed): ``bottleneck=True, layers=(3, 4, 6,
    3), widths=(64, 128, 256, 512), imagenet_stem=True`` is ResNet-50 (25.6 M parameters)."""

    def __init__(
        self,
        layers: tuple[int, ...],
        widths: tuple[int, ...],
        classes: int,
        *,
        bottleneck: bool,
        imagenet_stem: bool,
    ) -> None:
        super().__init__()
        block: type[_Basic | _Bottleneck] = _Bottleneck if bottleneck else _Basic
        stem = widths[0]
        if imagenet_stem:
            self.stem: nn.Module = nn.Sequential(
                nn.Conv2d(3, stem, 7, 2, 3, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()
            )
        blocks: list[nn.Module] = []
        cin = stem
        for i, (count, width) in enumerate(zip(layers, widths)):
            for j in range(count):
                blocks.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _GptBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Gpt(nn.Module):
    """A GPT-style causal transformer: token and position embeddings, pre-norm blocks, LM head."""

    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.Sequential(*(_GptBlock(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))


# ------------------------------------------------------------------------------------ workloads
LossFn = Callable[[nn.Module, torch.Tensor], Any]


@dataclass(frozen=True)
class Workload:
    """A model, its inputs and its loss.

    ``loss(model, idx)`` returns the mean loss of the samples ``idx`` (a device tensor of
    indices), or ``(loss_sum, num_items)`` when ``token``. ``target`` is the samples per step on
    a simulated device (on a GPU the doctor sizes the target to the device). ``probe`` is a
    micro-batch size small enough to run anywhere the model fits, used to measure memory per
    sample. ``exact``: the per-sample loss does not depend on the other samples of the
    micro-batch (no BatchNorm), so any split gives the same gradient up to rounding.
    """

    name: str
    summary: str
    build: Callable[[], nn.Module]
    loss: LossFn
    target: int
    probe: int
    token: bool = False
    exact: bool = True

    def model(self, device: torch.device) -> nn.Module:
        """A fresh copy of the initial model on ``device`` (the same weights every call)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.build().to(device)


def _classification(shape: tuple[int, ...], classes: int) -> LossFn:
    width = math.prod(shape)

    def loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        x = hashed(idx, width).view(-1, *shape)
        return F.cross_entropy(model(x), (idx * 7) % classes)

    return loss


def token_batch(idx: torch.Tensor, vocab: int, seq: int) -> tuple[torch.Tensor, ...]:
    """``(tokens, targets, mask)`` of sequences of ``seq // 4`` to ``seq`` real tokens (the rest
    is padding that the mask drops), all derived from the sample index."""
    pos = torch.arange(seq + 1, device=idx.device)
    stream = (idx[:, None] * 1000003 + pos[None, :] * 7919 + (idx[:, None] * pos) % 613) % vocab
    shortest = max(1, seq // 4)
    lengths = shortest + (idx * 37) % (seq - shortest + 1)
    mask = pos[None, :seq] < lengths[:, None]
    return stream[:, :-1], stream[:, 1:], mask


def _token_loss(vocab: int, seq: int) -> LossFn:
    """bf16 autocast forward; the loss in fp32 over the real tokens (sum, count)."""

    def loss(model: nn.Module, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, targets, mask = token_batch(idx, vocab, seq)
        with torch.autocast(idx.device.type, dtype=torch.bfloat16):
            logits = model(tokens)
        per_token = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), reduction="none"
        )
        return (per_token * mask.flatten()).sum(), mask.sum()

    return loss


def _mlp(width_in: int, hidden: tuple[int, ...], classes: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        layers: list[nn.Module] = []
        cin = width_in
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            cin = h
        return nn.Sequential(*layers, nn.Linear(cin, classes))

    return build


def mlp(width_in: int, hidden: tuple[int, ...], target: int, probe: int) -> Workload:
    summary = f"MLP {width_in}-{'-'.join(map(str, hidden))}-10, fp32, mean cross-entropy"
    return Workload("mlp", summary, _mlp(width_in, hidden, 10),
                    _classification((width_in,), 10), target, probe)


def gpt(vocab: int, seq: int, d: int, layers: int, heads: int, target: int, probe: int,
        name: str = "gpt") -> Workload:
    summary = (f"GPT-style transformer ({layers} layers, d={d}, {heads} heads, {seq} tokens, "
               f"vocabulary {vocab}), bf16 autocast, token loss on padded sequences")
    return Workload(name, summary, lambda: Gpt(vocab, seq, d, layers, heads),
                    _token_loss(vocab, seq), target, probe, token=True)


def resnet50(target: int = 1024, probe: int = 8) -> Workload:
    return Workload(
        "resnet50", "ResNet-50, 224x224 inputs, 1000 classes, fp32, mean cross-entropy",
        lambda: ResNet((3, 4, 6, 3), (64, 128, 256, 512), 1000, bottleneck=True,
                       imagenet_stem=True),
        _classification((3, 224, 224), 1000), target, probe, exact=False,
    )


def resnet_mini(target: int = 128, probe: int = 4) -> Workload:
    return Workload(
        "resnet-mini", "ResNet (basic blocks 1-1, widths 8-16), 3x16x16 inputs, fp32",
        lambda: ResNet((1, 1), (8, 16), 10, bottleneck=False, imagenet_stem=False),
        _classification((3, 16, 16), 10), target, probe, exact=False,
    )


def plan_workloads(cuda: bool, quick: bool) -> list[Workload]:
    """The workloads of the plan-accuracy check."""
    if cuda:
        if quick:
            return [gpt(32768, 512, 512, 4, 8, target=256, probe=2), _cuda_mlp()]
        return [resnet50(), gpt(32768, 1024, 768, 8, 12, target=256, probe=1), _cuda_mlp()]
    cpu = [
        mlp(64, (256, 256), target=1024, probe=16),
        gpt(512, 32, 64, 2, 4, target=128, probe=4),
    ]
    return cpu if quick else [*cpu, resnet_mini()]


def _cuda_mlp() -> Workload:
    # Narrow: memory per sample is what the checks measure, and a wide fp32 MLP would spend
    # seconds of matmul per step of the millions of samples that fill a large GPU.
    return mlp(256, (1024, 1024), target=1 << 16, probe=4096)


def recovery_workload(cuda: bool) -> Workload:
    """An exact fp32 workload (any split gives the same gradient up to rounding)."""
    if cuda:
        return _cuda_mlp()
    return mlp(64, (256, 256), target=256, probe=8)


def overhead_workload(cuda: bool) -> Workload:
    """A workload whose micro-batch is heavy enough that the model, not Python, dominates."""
    if cuda:
        return gpt(32768, 512, 512, 4, 8, target=64, probe=2)
    return mlp(256, (512, 512), target=256, probe=32)
