"""The paper's SGD, and SGD for a fused group whose runs differ in their hyperparameters
(a sweep: `--sweep lr=0.05,0.1,0.2`).

Every parameter of a fused model is its runs' parameters stacked on dim 0 (`fastres.fused`),
so run k's parameters are views of slice k of each. Each run gets its own
`torch.optim.SGD` over those views, with its own learning rate, momentum and weight
decay: the update of run k is then the very code and arithmetic of a run trained alone,
on tensors of the same shapes, so it is bit for bit that run's update given its gradients
(tests/test_sweep.py holds it). Its state dict is a single run's, as a checkpoint keeps it.

Each run's learning rate is a 0-dim tensor on the device, written in place by the schedule:
an update captured in a CUDA graph (`TrainStep(whole_step=True)`) reads the current one,
and a change never recompiles nor re-records anything (see `lr_tensor` for its dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastres import recipe


def make_optimizer(params: nn.Module | Sequence[torch.Tensor], device: torch.device, amp_dtype: torch.dtype | None,
                   momentum: float = recipe.MOMENTUM, weight_decay: float = recipe.WEIGHT_DECAY) -> torch.optim.SGD:
    """The paper's SGD: momentum 0.9 and weight decay 1e-4 on every parameter (as in the
    authors' code, BN included). Fused on CUDA (one kernel for all parameters), foreach
    elsewhere; also foreach under fp16 loss scaling, where fused SGD has been reported to
    advance its momentum on the steps GradScaler skips (torch 2.11, LibreYOLO PR #771)."""
    fused = device.type == "cuda" and amp_dtype != torch.float16
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    return torch.optim.SGD(params, lr=recipe.LR, momentum=momentum, weight_decay=weight_decay,
                           fused=fused or None, foreach=None if fused else True)


def lr_tensor(optimizer: torch.optim.SGD) -> torch.Tensor | None:
    """The 0-dim tensor a run's learning rate lives in, or None where a Python float must stay.
    Foreach SGD takes `alpha=-lr`, a double-precision scalar, and turns a tensor lr into it
    with `.item()` (torch/optim/sgd.py, `_multi_tensor_sgd`): a float64 tensor keeps that
    exact, so on a CPU (where the item is no sync) the update is bit for bit a float lr's
    (tests/test_step.py). Fused SGD on CUDA reads a tensor lr on the device through a float
    pointer (no sync; `sgd_math` in aten/src/ATen/native/cuda/FusedSgdKernel.cu: float32
    only), widened to double as a float lr is: so there the lr is 0.1 rounded to float32, a
    relative change of at most 2**-24 = 6e-8 per update against a float lr, not bit for bit.
    Foreach on CUDA (fp16 loss scaling) would pay a host sync per step for the item, so it
    keeps the float."""
    device = optimizer.param_groups[0]["params"][0].device
    if device.type != "cuda":
        return torch.tensor(recipe.LR, dtype=torch.float64, device=device)
    if optimizer.defaults["fused"]:  # as make_optimizer chose it
        return torch.tensor(recipe.LR, dtype=torch.float32, device=device)
    return None


class RunsSGD:
    """One SGD per run of a fused model, each over its run's slice of every parameter.
    `hyper`: each run's (momentum, weight decay); the learning rates are set every step."""

    def __init__(self, model: nn.Module, runs: int, device: torch.device, amp_dtype: torch.dtype | None,
                 hyper: Sequence[tuple[float, float]]) -> None:
        self.params = list(model.parameters())
        self.runs = runs
        # a single run's own parameters; else views (leaves, sharing the fused storage)
        self.views = [self.params] if runs == 1 else [[p.detach().chunk(runs)[k] for p in self.params]
                                                       for k in range(runs)]
        self.optimizers = [make_optimizer(views, device, amp_dtype, momentum, wd)
                           for views, (momentum, wd) in zip(self.views, hyper, strict=True)]
        self.lrs = [lr_tensor(optimizer) for optimizer in self.optimizers]
        self._install_lrs()

    def _install_lrs(self) -> None:
        """Each run's lr tensor into its param group (where it has one)."""
        for optimizer, lr in zip(self.optimizers, self.lrs, strict=True):
            if lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr

    def set_lr(self, lrs: Sequence[float]) -> None:
        """Each run's learning rate for the next step, written into its tensor in place (a
        fill from a host scalar: no sync), or its param group's float."""
        for optimizer, tensor, lr in zip(self.optimizers, self.lrs, lrs, strict=True):
            if tensor is not None:
                tensor.fill_(lr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Each run's update from its slice of the fused gradients. With a GradScaler, a run
        whose gradients overflowed skips its step, as it would alone; the scale is shared."""
        if self.runs > 1:
            for k, views in enumerate(self.views):
                for v, p in zip(views, self.params, strict=True):
                    v.grad = None if p.grad is None else p.grad.chunk(self.runs)[k]
        for optimizer in self.optimizers:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if self.runs > 1:  # the views' gradients are the fused ones': let them go with them
            for views in self.views:
                for v in views:
                    v.grad = None

    def state_dicts(self) -> list[dict[str, Any]]:
        """Each run's SGD state dict, in a single run's format: the lr a float, as a float lr
        saves it (one host sync per tensor, at checkpoints only)."""
        states = [optimizer.state_dict() for optimizer in self.optimizers]
        for state in states:
            for group in state["param_groups"]:  # state_dict's own copies of the groups
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"] = group["lr"].item()
        return states

    def load_state_dicts(self, states: Sequence[dict[str, Any]]) -> None:
        """Each run's SGD state back; a momentum buffer of another shape is a ValueError
        (`load_state_dict` does not check it)."""
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
            for group in optimizer.param_groups:
                for param in group["params"]:
                    buf = optimizer.state.get(param, {}).get("momentum_buffer")
                    if buf is not None and buf.shape != param.shape:
                        raise ValueError(f"a momentum buffer of shape {tuple(buf.shape)} for a parameter of "
                                         f"{tuple(param.shape)}")
        self.set_lr([optimizer.param_groups[0]["lr"] for optimizer in self.optimizers])  # the saved lrs
        self._install_lrs()
