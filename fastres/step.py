"""The training step and evaluation: the hot path, free of host synchronisation."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fastres import recipe
from fastres.optim import RunsSGD
from fastres.runtime import autocast

if TYPE_CHECKING:
    from fastres.data.loaders import Loader

RECOMPILE_LIMIT = 64  # compiled models and modes per process before Dynamo gives up (see compile_model)
_BACKEND = contextvars.ContextVar("fastres_compile_backend", default="inductor")


@contextlib.contextmanager
def compiler_backend(name: str) -> Iterator[None]:
    """Every compile_model inside the block uses torch.compile's backend `name` instead of
    Inductor. For the GPU check's CPU rehearsal ("aot_eager_decomp_partition"): Dynamo and
    AOTAutograd trace the graphs, with Inductor's decompositions and its partition of forward
    and backward, and count breaks and recompiles as on a GPU; the graphs then run op by op.
    What is skipped is Inductor's own graph passes, fusion and code generation: C++ on a CPU
    (tens of seconds a graph), Triton on a GPU, which only a GPU can rehearse."""
    token = _BACKEND.set(name)
    try:
        yield
    finally:
        _BACKEND.reset(token)


def compile_model(model: nn.Module, device: torch.device, cuda_graphs: bool | None = None) -> nn.Module:
    """torch.compile; on CUDA with CUDA graphs ("reduce-overhead"): the several hundred
    kernel launches of a ResNet-56 forward and backward (option A: 55 convolutions,
    55 BNs, their gradients; tests/test_models.py) become two graph replays. Shapes are
    static (the loaders drop partial training batches), so the graphs are captured once
    per mode (train, eval) and replayed; BN's running statistics are buffers updated in
    place inside the graph. `dynamic=False`: without it, the first evaluation batch of
    another size makes Dynamo mark the batch dimension dynamic, and every later compile of
    the same code (the next model in a benchmark, the train graph after an evaluation)
    becomes a different, dynamic graph. The training loop, the benchmark and the GPU check
    all compile through this one function. `cuda_graphs`: False for a module run inside a
    graph captured by hand (inductor's own graphs cannot nest in one); None: the default,
    `uses_cuda_graphs`.

    Every model and mode compiled in a process is one more cache entry of the one shared
    `forward` code: past `recompile_limit` entries (8 by default) Dynamo silently runs that
    code eager. A benchmark over 2 models and fused groups of 1, 2 and 4, or a reproduction
    of the paper's 10 models, needs more (measured: the ninth entry, ResNet-56 fused x2,
    fell back to eager), so the limit is raised to RECOMPILE_LIMIT. Inside `compiler_backend`,
    its backend instead of Inductor."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    backend = _BACKEND.get()
    if backend != "inductor":  # compiler_backend: no Inductor, so none of its modes
        return torch.compile(model, backend=backend, dynamic=False)
    graphs = uses_cuda_graphs(model, device) if cuda_graphs is None else cuda_graphs
    return torch.compile(model, mode="reduce-overhead" if graphs else None, dynamic=False)


def uses_cuda_graphs(model: nn.Module, device: torch.device) -> bool:
    """CUDA graphs on a GPU, except under DDP, whose all-reduce hooks run outside them."""
    return device.type == "cuda" and not isinstance(model, nn.parallel.DistributedDataParallel)


class Objective(nn.Module):
    """The forward and the loss as one module, so that one compile holds both, and the
    backward (AOTAutograd's) comes from the same graph: returns the loss to minimise (the sum
    of the runs' mean losses), each run's loss (detached) and each run's wrong predictions,
    for x and labels y (B, runs). A DDP model is called inside, so its hooks still fire."""

    def __init__(self, model: nn.Module, runs: int) -> None:
        super().__init__()
        self.model, self.runs = model, runs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(x).unflatten(1, (self.runs, -1))  # (B, runs, classes)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y).mean(0)
        wrong = (logits.detach().argmax(2) != y).sum(0)
        return losses.sum(), losses.detach(), wrong


class TrainStep:
    """forward, loss, backward and update for one batch. Returns the loss and the number of
    wrong predictions of each run as device tensors of shape (runs,): reading them is left
    to the caller, every N steps.

    `runs` > 1: the model is a fused group (`fastres.fused`), x holds the runs' batches
    stacked on the channel axis and y their labels, (B, runs). The loss minimised is the
    sum of the runs' mean losses, so each run's gradient is the one it has alone.

    `compile`: the forward, the loss and the wrong counts are one compiled `Objective` (its
    backward compiled with it). The optimizer stays eager: one SGD per run
    (`fastres.optim.RunsSGD`, each run's own hyperparameters), fused SGD on CUDA being one
    kernel for all of a run's parameters; the learning rates live in device tensors the
    caller fills before each step, so a schedule change never recompiles nor re-records.
    `hyper`: each run's (momentum, weight decay), by default the paper's. `compiled_loss=False`
    compiles the model alone and runs the loss and wrong counts eagerly after it, as fastres
    did before the `Objective`: the benchmark's row for what compiling them together gains.

    `whole_step` (CUDA only): the whole step, forward to update and each run's loss and wrong count, is one CUDA
    graph captured by hand (`_WholeStep`), replayed each step from static input buffers. It
    cannot hold fp16's GradScaler (its skip decision reads the device) nor DDP (its
    all-reduce hooks run outside graphs), and a CPU has no CUDA graphs: each is refused in
    one line. Written from PyTorch's CUDA-graph docs ("whole network capture"); no GPU has
    run it yet (docs/training.md says what its GPU check is)."""

    def __init__(self, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, compile: bool, *,
                 hyper: list[tuple[float, float]] | None = None, runs: int = 1, whole_step: bool = False,
                 compiled_loss: bool = True) -> None:
        if whole_step:
            _check_whole_step(model, device, amp_dtype)
        self.model, self.device, self.amp_dtype, self.runs = model, device, amp_dtype, runs
        hyper = hyper or [(recipe.MOMENTUM, recipe.WEIGHT_DECAY)] * runs
        self.optimizer = RunsSGD(model, runs, device, amp_dtype, hyper)
        self.cuda_graphs = compile and not whole_step and uses_cuda_graphs(model, device)
        if compile and not compiled_loss:
            self.objective = Objective(compile_model(model, device, self.cuda_graphs), runs)
        else:
            objective = Objective(model, runs)
            self.objective = compile_model(objective, device, self.cuda_graphs) if compile else objective
        # evaluation's forward (compiled lazily: `_predictions` runs it on a CPU only, where it pays)
        self.forward = compile_model(model, device) if compile else model
        # fp16 needs loss scaling; bf16 has fp32's range and does not. One scaler for a fused
        # group: an overflow in a run skips that run's step, and lowers the scale of all.
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        # Steps the scaler skipped (an overflow lowers the scale and skips the update): normal
        # under fp16, counted on the device and read at log points, never taken for divergence.
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._scale_before = torch.zeros((), device=device)  # reused every step: no allocation
        self._lowered = torch.zeros((), dtype=torch.bool, device=device)
        self.whole_step = whole_step
        self._graph: _WholeStep | None = None
        self._steps = 0  # steps run, for the whole step's warm-up

    def set_lr(self, lr: float | list[float]) -> None:
        """The learning rate of the next step: each run's, or one for all."""
        self.optimizer.set_lr([lr] * self.runs if isinstance(lr, float | int) else lr)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = y.view(len(y), self.runs)
        if self.whole_step:
            return self._graphed(x, y)
        if self.cuda_graphs:  # tells the graph replays that the previous step's outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad()
        return self._body(x, y)

    def _body(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step from gradients None to the update: free of host syncs, so also what a
        CUDA graph captures."""
        # Inside a captured graph autocast must not cache its casts of the weights (the
        # CUDA-graph docs, "Usage with torch.cuda.amp"): the cache is freed at each exit.
        amp = (torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None, cache_enabled=False)
               if self.whole_step else autocast(self.device, self.amp_dtype))
        with amp:
            loss, losses, wrong = self.objective(x, y)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            self._scale_before.copy_(self.scaler._scale)  # the live scale tensor: compared on the device, no sync
            self.optimizer.step(self.scaler)
            self.scaler.update()
            torch.lt(self.scaler._scale, self._scale_before, out=self._lowered)
            self.skipped += self._lowered
        else:
            self.optimizer.step()
        return losses, wrong

    def _graphed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole step: its first WARMUP_STEPS steps eager on a side stream (real steps: the
        compile, cuDNN's autotuning and the momentum buffers' creation happen outside the
        capture, as the CUDA-graph docs require), then one capture, replayed every step after.
        Outputs are cloned: the graph's own are overwritten by the next replay."""
        if self._graph is None and self._steps < WARMUP_STEPS:
            self._steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad()
                out = self._body(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        if self._graph is None:
            self._graph = _WholeStep(self, x, y)
        return self._graph.replay(x, y)

    def read_skipped(self) -> dict[str, int]:
        """Steps skipped by the fp16 scaler since the last read (nothing without a scaler)."""
        if not self.scaler.is_enabled():
            return {}
        skipped = int(self.skipped)  # note: a host sync, at log points only
        self.skipped.zero_()
        return {"skipped_steps": skipped}

    def errors(self, loader: Loader) -> list[float]:
        """Each run's top-1 error over an evaluation loader."""
        return error_rates(self.model, loader, self.device, self.amp_dtype, self.forward, self.runs)


WARMUP_STEPS = 3  # eager steps before the capture: the docs' example warms up 3 iterations


def _check_whole_step(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """A ValueError, in one line, where the whole step cannot be one CUDA graph."""
    if device.type != "cuda":
        raise ValueError(f"whole_step needs CUDA graphs, and {device.type} has none")
    if amp_dtype == torch.float16:
        raise ValueError("whole_step cannot hold fp16's GradScaler: its skip decision reads the device")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("whole_step cannot hold DDP: its all-reduce hooks run outside CUDA graphs")


class _WholeStep:
    """One training step captured as a CUDA graph: static input buffers the batch is copied
    into, and the static outputs the replay writes. The gradients are set to None just before
    the capture, so the captured backward allocates them from the graph's pool and each replay
    writes them afresh (no accumulation); the update reads each run's lr tensor, so the
    schedule's fills between replays reach it."""

    def __init__(self, step: TrainStep, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x.clone(), y.clone()  # clone keeps x's layout (channels_last)
        self.graph = torch.cuda.CUDAGraph()
        step.optimizer.zero_grad()
        with torch.cuda.graph(self.graph):
            self.losses, self.wrong = step._body(self.x, self.y)

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.losses.clone(), self.wrong.clone()


def _predictions(model: nn.Module, loader: Loader, device: torch.device, amp_dtype: torch.dtype | None,
                 forward: nn.Module | None = None, runs: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(predicted, true) labels of every batch of an evaluation loader, single view, BN in
    eval mode: predicted (B, runs), true (B,). `forward` is the callable to run (e.g. the
    compiled model), default `model`, and on CUDA always `model`; a fused group sees every
    image once per run."""
    # On CUDA, evaluation runs eagerly. Eval mode flips every BN's `training`, so a compiled
    # model would compile and capture a second graph (tens of seconds cold, per model and
    # fused size), and one more for a last, smaller batch (dynamic=False). And once the
    # training step has called `cudagraph_mark_step_begin`, CUDA-graph trees take their
    # generation from those marks alone (torch/_inductor/cudagraph_trees.py,
    # `get_curr_generation`): an evaluation batch without a mark is recorded as a child of
    # what ran before it while that one's outputs live (the last backward's gradients do).
    # A mark before each batch would stop that but not the compiles, and buys little: at
    # batch 1000 the GPU is the limit, so eager launches (a few dozen a batch) are hidden,
    # and 10 batches take milliseconds either way. A CPU has no CUDA graphs, and keeps the
    # compiled forward: measured there (ResNet-20, 10k images, 2 busy cores), a compiled pass
    # took 50 s against 105 s eager, repaying its eval-mode compile (about 70 s) within the
    # second evaluation.
    forward = model if forward is None or device.type == "cuda" else forward
    model.eval()
    try:
        for x, y in loader.epoch(0):
            if runs > 1:
                x = x.repeat(1, runs, 1, 1).contiguous(memory_format=_layout(x))
            with autocast(device, amp_dtype):
                predicted = forward(x).unflatten(1, (runs, -1)).argmax(2)
            yield predicted, y
    finally:
        model.train()


def _layout(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.no_grad()
def error_rates(model: nn.Module, loader: Loader, device: torch.device, amp_dtype: torch.dtype | None,
                forward: nn.Module | None = None, runs: int = 1) -> list[float]:
    """Top-1 error of each of `runs` fused runs over a whole evaluation loader."""
    wrong = torch.zeros(runs, dtype=torch.int64, device=device)
    seen = 0
    for predicted, y in _predictions(model, loader, device, amp_dtype, forward, runs):
        wrong += (predicted != y[:, None]).sum(0)
        seen += len(y)
    return [w / seen for w in wrong.tolist()]  # note: a CPU-GPU sync point, once per evaluation


def error_rate(model: nn.Module, loader: Loader, device: torch.device, amp_dtype: torch.dtype | None,
               forward: nn.Module | None = None) -> float:
    """Top-1 error of one model over a whole evaluation loader."""
    return error_rates(model, loader, device, amp_dtype, forward)[0]


@torch.no_grad()
def class_errors(model: nn.Module, loader: Loader, device: torch.device, amp_dtype: torch.dtype | None,
                 num_classes: int) -> tuple[list[int], list[int]]:
    """Wrong predictions and images per true class over a whole evaluation loader (the
    per-class table of `fastres.evaluate`)."""
    wrong = torch.zeros(num_classes, dtype=torch.int64, device=device)
    total = torch.zeros(num_classes, dtype=torch.int64, device=device)
    for predicted, y in _predictions(model, loader, device, amp_dtype):
        predicted = predicted[:, 0]
        total += torch.bincount(y, minlength=num_classes)
        wrong += torch.bincount(y[predicted != y], minlength=num_classes)
    return wrong.tolist(), total.tolist()  # note: a CPU-GPU sync point, once per evaluation
