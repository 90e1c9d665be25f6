"""Training metrics between two reads: loss and error sums kept on the device, so the hot
loop never waits for the host; read (and summed over processes) every `--log-every` steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastres import distributed


@dataclass
class Sums:
    """A window's sums over all processes, as a checkpoint keeps them."""

    loss: torch.Tensor  # (runs,) float64
    wrong: torch.Tensor  # (runs,) int64
    steps: int


class Window:
    """Sums of the training loss and of wrong predictions since the last read, for `runs`
    runs trained together (one, until several runs share a step). All processes of a
    torchrun group take part in `read` and `state` (collectives)."""

    def __init__(self, device: torch.device, batch_size: int, runs: int = 1) -> None:
        self.batch_size = batch_size  # global: over all processes
        self.loss = torch.zeros(runs, dtype=torch.float64, device=device)  # an fp64 run's losses, kept whole
        self.wrong = torch.zeros(runs, dtype=torch.int64, device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor, wrong: torch.Tensor) -> None:
        self.loss += loss
        self.wrong += wrong
        self.steps += 1

    def read(self, dist: distributed.DistInfo) -> list[dict[str, float]]:
        """Mean loss and error per run over the window, summed over processes, then a new
        window. Note: reading the sums is the CPU-GPU sync point of the loop."""
        loss, wrong = self._summed(dist)
        steps = self.steps
        self.loss.zero_()
        self.wrong.zero_()
        self.steps = 0
        return [{"train_loss": total / (steps * dist.world_size), "train_error": count / (steps * self.batch_size)}
                for total, count in zip(loss.tolist(), wrong.tolist(), strict=True)]

    def peek(self, dist: distributed.DistInfo) -> list[dict[str, float]]:
        """This process's mean loss and error per run over the window so far, for the display
        alone: nothing is reset and nothing is summed over processes (no collective, so rank 0
        may call it alone), so no figure that `read` logs changes. Like `read`, it is a host
        sync: each call waits for the device to finish the steps queued."""
        steps, local_batch = max(self.steps, 1), self.batch_size // dist.world_size
        return [{"train_loss": total / steps, "train_error": count / (steps * local_batch)}
                for total, count in zip(self.loss.tolist(), self.wrong.tolist(), strict=True)]

    def _summed(self, dist: distributed.DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        loss, wrong = self.loss.clone(), self.wrong.clone()
        distributed.all_sum(loss, dist)
        distributed.all_sum(wrong, dist)
        return loss, wrong

    def state(self, dist: distributed.DistInfo) -> Sums:
        """The window as a checkpoint holds it: the sums over all processes, so a resume
        that gives them back to one process reads the same figures as an unbroken run."""
        loss, wrong = self._summed(dist)
        return Sums(loss.cpu(), wrong.cpu(), self.steps)

    def load(self, sums: Sums, dist: distributed.DistInfo) -> None:
        """Give a saved window back: its sums to rank 0 (the others start from zero, so the
        next read sums to the saved figures), its step count to every process."""
        self.steps = sums.steps
        if dist.is_main:
            self.loss.copy_(sums.loss.reshape(-1))
            self.wrong.copy_(sums.wrong.reshape(-1))
