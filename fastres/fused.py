"""Several independent models trained as one: N CIFAR ResNets fused horizontally (HFTA,
Wang et al., MLSys 2021), so one step of N small models is one set of wider kernels.

Each layer of the N members becomes one layer over N groups of channels:

- a convolution becomes one grouped convolution (`groups=N`), the members' weights stacked
  on the output-channel axis; the members' inputs are stacked on the channel axis;
- a BatchNorm over C channels becomes one over N*C channels: its statistics, running
  statistics and affine parameters are per channel, hence per member, by construction;
- option A's zero-padded shortcut pads each member's channels, never across members;
- the classifier is a batched matrix product, one weight matrix per member.

Every parameter and buffer of the fused model is the members' tensors concatenated on
dim 0 (BN's `num_batches_tracked`, a count all members share, excepted), and the fused
model keeps the single model's module names. So a member's state dict is a slice of the
fused one, in exactly the single model's format; each run's optimiser works on its slices
(`fastres.optim.RunsSGD`), with its own hyperparameters, as in a single run.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fastres.models import ShortcutA


class GroupedLinear(nn.Module):
    """N linear layers on N groups of features: (B, N*in) -> (B, N*out)."""

    def __init__(self, in_features: int, out_features: int, runs: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.runs = in_features, out_features, runs
        self.weight = nn.Parameter(torch.empty(runs * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(runs * out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unflatten(1, (self.runs, self.in_features)).transpose(0, 1)  # (N, B, in)
        w = self.weight.view(self.runs, self.out_features, self.in_features)
        out = torch.baddbmm(self.bias.view(self.runs, 1, self.out_features), x, w.transpose(1, 2))
        return out.transpose(0, 1).flatten(1)  # (B, N*out)

    def extra_repr(self) -> str:
        return f"{self.runs} x ({self.in_features} -> {self.out_features})"


def _stacked(members: list[nn.Module], name: str) -> torch.Tensor:
    return torch.cat([getattr(m, name).detach() for m in members])


def _fuse_layer(members: list[nn.Module]) -> nn.Module | None:
    """The fused counterpart of one layer of every member; None for containers and layers
    without state (ReLU, Identity). Any other layer with parameters is refused, so a new
    layer type can never be silently shared across members."""
    first, runs = members[0], len(members)
    if isinstance(first, nn.Conv2d):
        conv = nn.Conv2d(first.in_channels * runs, first.out_channels * runs, first.kernel_size, first.stride,
                         first.padding, first.dilation, first.groups * runs, first.bias is not None)
        conv.weight.data.copy_(_stacked(members, "weight"))
        if first.bias is not None:
            conv.bias.data.copy_(_stacked(members, "bias"))
        return conv
    if isinstance(first, nn.BatchNorm2d):
        bn = nn.BatchNorm2d(first.num_features * runs, first.eps, first.momentum, first.affine,
                            first.track_running_stats)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).data.copy_(_stacked(members, name))
        bn.num_batches_tracked.copy_(first.num_batches_tracked)
        return bn
    if isinstance(first, nn.Linear):
        fc = GroupedLinear(first.in_features, first.out_features, runs)
        fc.weight.data.copy_(_stacked(members, "weight"))
        fc.bias.data.copy_(_stacked(members, "bias"))
        return fc
    if isinstance(first, ShortcutA):
        return ShortcutA(first.in_planes, first.planes, first.stride, first.front, runs)
    if any(True for _ in first.parameters(recurse=False)) or any(True for _ in first.buffers(recurse=False)):
        raise TypeError(f"cannot fuse {type(first).__name__}: no grouped counterpart")
    return None


def fuse(members: list[nn.Module]) -> nn.Module:
    """One model computing all `members` (same architecture, any weights): it takes their
    inputs stacked on the channel axis, (B, N*3, H, W), and returns their logits side by
    side, (B, N*classes). One member is returned as it is."""
    if len(members) == 1:
        return members[0]
    fused = copy.deepcopy(members[0])
    for name, _ in list(fused.named_modules()):
        if name:
            layer = _fuse_layer([m.get_submodule(name) for m in members])
            if layer is not None:
                fused.set_submodule(name, layer)
    first = next(members[0].parameters())
    return fused.to(first.device, first.dtype)  # the new layers are made on the CPU in float32


def _part(v: Any, runs: int, i: int) -> Any:
    """Member i's share of one fused value: a slice of a stacked tensor, a copy of a shared
    scalar (BN's batch count), anything else as it is."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.chunk(runs)[i].clone() if v.dim() else v.clone()


def _split(d: dict[Any, Any], runs: int) -> list[dict[Any, Any]]:
    return [{k: _part(v, runs, i) for k, v in d.items()} for i in range(runs)]


def _join(ds: list[dict[Any, Any]]) -> dict[Any, Any]:
    return {k: torch.cat([d[k] for d in ds]) if isinstance(v, torch.Tensor) and v.dim() else v
            for k, v in ds[0].items()}


def split_state(state: dict[str, torch.Tensor], runs: int) -> list[dict[str, torch.Tensor]]:
    """The members' state dicts (copies, in the single model's format) from a fused one."""
    return [state] if runs == 1 else _split(state, runs)


def join_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A fused state dict from the members' (the inverse of `split_state`)."""
    return states[0] if len(states) == 1 else _join(states)
