"""CIFAR-10 ResNets and plain nets of He et al. 2016, Sec. 4.2.

A 3x3 conv with 16 filters, then three stages of n basic blocks at 32, 16 and 8 pixels
with 16, 32 and 64 filters (6n + 2 weighted layers in all), global average pooling and
a 10-way linear layer. BN follows every conv. Shortcut options (Sec. 3.3):

- A: identity; where the shape changes, stride-2 subsampling and zero-filled extra
  channels (no parameters). The paper's CIFAR-10 default.
- B: identity, but a 1x1 conv + BN projection where the shape changes.
- C: a projection on every shortcut.
- plain nets: the same layers with no shortcuts at all.

Parameters (tested to the unit in tests/test_models.py):

| model      | n   | option A = plain | option B | option C |
|------------|-----|------------------|----------|----------|
| resnet20   | 3   | 269,722          | 272,474  | 283,962  |
| resnet32   | 5   | 464,154          |          |          |
| resnet44   | 7   | 658,586          |          |          |
| resnet56   | 9   | 853,018          | 855,770  | 900,858  |
| resnet110  | 18  | 1,727,962        |          |          |
| resnet1202 | 200 | 19,421,274       |          |          |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastres.errors import RunError
from fastres.recipe import SHORTCUTS
from fastres.runtime import memory_bytes

STAGE_WIDTHS = (16, 32, 64)
PAPER_DEPTHS = {"resnet": (20, 32, 44, 56, 110, 1202), "plain": (20, 32, 44, 56, 110)}


class ShortcutA(nn.Module):
    """Option A: subsample by `stride` and add zero channels; no parameters. fastres
    appends them (`front=0`); a model imported from a peer that puts half of them in front
    (akamaster's) sets `front` to compute that peer's function exactly. `runs` members
    stacked on the channel axis (a fused group, `fastres.fused`) are each padded on their
    own, so one implementation serves a single model and a group alike."""

    def __init__(self, in_planes: int, planes: int, stride: int, front: int = 0, runs: int = 1) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError(f"option A cannot shrink channels ({in_planes} -> {planes})")
        self.in_planes, self.planes, self.stride, self.front, self.runs = in_planes, planes, stride, front, runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dims first: (W, W, H, H, C_front, C_back).
        pad = (0, 0, 0, 0, self.front, self.planes - self.in_planes - self.front)
        if self.runs == 1:  # padded as it is, which keeps a channels_last input channels_last
            return F.pad(x, pad)
        return F.pad(x.unflatten(1, (self.runs, self.in_planes)), pad).flatten(1, 2)  # (B, N, C, H, W)

    def extra_repr(self) -> str:
        where = f", {self.front} in front" if self.front else ""
        members = f"{self.runs} x " if self.runs > 1 else ""
        return f"{members}{self.in_planes}->{self.planes}, stride={self.stride}, zero-pad{where}"


def projection(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Options B and C: a 1x1 conv and BN, as in the paper's projection shortcut."""
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


def make_shortcut(shortcut: str | None, in_planes: int, planes: int, stride: int) -> nn.Module | None:
    """The shortcut module of one block, or None for a plain net."""
    reshapes = stride != 1 or in_planes != planes
    if shortcut is None:
        return None
    if shortcut == "C" or (shortcut == "B" and reshapes):
        return projection(in_planes, planes, stride)
    if shortcut == "A" and reshapes:
        return ShortcutA(in_planes, planes, stride)
    if shortcut in SHORTCUTS:
        return nn.Identity()
    raise ValueError(f"unknown shortcut {shortcut!r}: choose one of {', '.join(SHORTCUTS)}")


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; ReLU after the addition (paper Fig. 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(shortcut, in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """A 6n+2-layer CIFAR network; `shortcut=None` makes the plain counterpart."""

    def __init__(self, depth: int, shortcut: str | None = "A", num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut is not None and shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}: choose one of {', '.join(SHORTCUTS)}")
        self.depth, self.shortcut = depth, shortcut
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_planes = STAGE_WIDTHS[0]
        stages = []
        for i, planes in enumerate(STAGE_WIDTHS):
            stages.append(self._make_stage(in_planes, planes, n, stride=1 if i == 0 else 2))
            in_planes = planes
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _make_stage(self, in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride, self.shortcut)]
        blocks += [BasicBlock(planes, planes, 1, self.shortcut) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # He et al. 2015 as in the authors' reference code (fb.resnet.torch): conv weights
        # ~ N(0, 2 / (k*k*out_channels)); BN gamma 1, beta 0; classifier bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet(depth: int, shortcut: str = "A", num_classes: int = 10) -> CifarResNet:
    """A CIFAR ResNet of any depth 6n+2."""
    return CifarResNet(depth, shortcut, num_classes)


def plain(depth: int, num_classes: int = 10) -> CifarResNet:
    """A plain CIFAR net of any depth 6n+2: the ResNet's layers, no shortcuts."""
    return CifarResNet(depth, None, num_classes)


def list_models() -> list[str]:
    """The paper's CIFAR-10 model names; `build_model` also takes any other depth 6n+2."""
    return [f"{family}{d}" for family, depths in PAPER_DEPTHS.items() for d in depths]


@dataclass(frozen=True, order=True)
class ModelSpec:
    """A model as the paper names it: family, depth and shortcut option. The one place that
    parses `resnet56`, `resnet56:B` and `plain20`, checks them, and names their runs."""

    family: str  # "plain" sorts before "resnet", as in the paper's tables
    depth: int
    shortcut: str | None  # A, B or C for ResNets; None for plain nets

    @classmethod
    def parse(cls, text: str, shortcut: str | None = None) -> ModelSpec:
        """`resnet56` (option A unless `shortcut` says otherwise), `resnet56:B`, `plain20`;
        ValueError with a one-line message on anything else."""
        name, _, option = text.partition(":")
        if option and shortcut and option != shortcut:
            raise ValueError(f"{text} names shortcut {option}, but --shortcut says {shortcut}")
        shortcut = option or shortcut
        for family in PAPER_DEPTHS:
            digits = name[len(family):]
            if name.startswith(family) and digits.isdigit():
                depth = int(digits)
                if depth < 8 or (depth - 2) % 6:
                    raise ValueError(f"{name}: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)")
                if family == "plain":
                    if shortcut not in (None, "none"):
                        raise ValueError(f"{name} is a plain net: it has no shortcuts to set to {shortcut!r}")
                    return cls(family, depth, None)
                if (shortcut or "A") not in SHORTCUTS:
                    raise ValueError(f"unknown shortcut {shortcut!r}: choose one of {', '.join(SHORTCUTS)}")
                return cls(family, depth, shortcut or "A")
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(list_models())} (or any depth 6n+2)")

    @property
    def name(self) -> str:
        return f"{self.family}{self.depth}"

    @property
    def tag(self) -> str:
        """How runs of this model are named: `resnet56-A`, `plain20`."""
        return f"{self.name}-{self.shortcut}" if self.shortcut else self.name

    def parameter_count(self, num_classes: int = 10) -> int:
        """The model's learnable parameters, from its depth alone (equal to
        `count_parameters` of the built model, tested to the unit): what a model needs is
        known before anything is allocated."""
        n, total, cin = (self.depth - 2) // 6, 3 * STAGE_WIDTHS[0] * 9 + 2 * STAGE_WIDTHS[0], STAGE_WIDTHS[0]
        for stage, width in enumerate(STAGE_WIDTHS):
            first = cin * width * 9 + width * width * 9 + 4 * width + self._projection(cin, width, stage > 0)
            rest = 2 * width * width * 9 + 4 * width + self._projection(width, width, False)
            total, cin = total + first + (n - 1) * rest, width
        return total + cin * num_classes + num_classes

    def _projection(self, cin: int, width: int, strided: bool) -> int:
        """Parameters of one block's shortcut: a 1x1 conv and BN for C, and for B where the shape changes."""
        reshapes = strided or cin != width
        return cin * width + 2 * width if self.shortcut == "C" or (self.shortcut == "B" and reshapes) else 0

    def activations_per_image(self) -> int:
        """The output elements of every convolution for one image: the least a training step
        keeps for its backward pass (each is saved at least once, as BN's input)."""
        n = (self.depth - 2) // 6
        sizes = [width * (32 >> stage) ** 2 for stage, width in enumerate(STAGE_WIDTHS)]
        return sizes[0] + 2 * n * sum(sizes)

    def check_fits(self, memory: int, num_classes: int = 10, batch_size: int = 0, runs: int = 1,
                   element_bytes: int = 4) -> None:
        """Refuse in one line a model that cannot fit in `memory` bytes, before any of it is
        built: its weights alone (`batch_size` 0: evaluation, export) or, to train, a lower
        bound of what a step holds: weights, gradients and momentum in fp32, and one saved
        activation per convolution output at `element_bytes`, for `runs` fused runs. A lower
        bound, so nothing that could fit is refused."""
        params = self.parameter_count(num_classes)
        activations = batch_size * self.activations_per_image() * element_bytes
        need = runs * (params * 4 * (3 if batch_size else 1) + activations)
        if need > memory:
            what = f"to train at batch {batch_size}" + (f" x{runs} runs" if runs > 1 else "") if batch_size else ""
            raise RunError(f"{self.name} ({params:,} parameters) needs at least {need / 2**30:,.1f} GiB {what}"
                           f"{' ' if what else ''}and this device has {memory / 2**30:,.1f} GiB: choose a smaller depth"
                           + (" or batch" if batch_size else ""))

    def build(self, num_classes: int = 10) -> CifarResNet:
        """The model, built on the host once its weights are known to fit there."""
        self.check_fits(memory_bytes(torch.device("cpu")), num_classes)
        return CifarResNet(self.depth, self.shortcut, num_classes)


def build_model(name: str, shortcut: str | None = None, num_classes: int = 10) -> CifarResNet:
    """Build a model by name (`resnet56`, `resnet56:B`, `plain20`); `shortcut` (A, B or C)
    applies to ResNets only, default A. Trained weights: `fastres.weights.load_model`."""
    return ModelSpec.parse(name, shortcut).build(num_classes)


def count_parameters(model: nn.Module) -> int:
    """Learnable parameters (BN running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())
