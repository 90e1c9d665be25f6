"""The paper's learning-rate schedule, by iteration (He et al. 2016, Sec. 4.2)."""

from __future__ import annotations

from collections.abc import Sequence

PAPER_ITERS = 64_000
PAPER_MILESTONES = (32_000, 48_000)
PAPER_LR = 0.1
# ResNet-110 (and 1202) start at 0.01 "until the training error is below 80% (about 400
# iterations), and then go back to 0.1".
WARMUP_LR = 0.01
WARMUP_ITERS = 400
WARMUP_MIN_DEPTH = 110


def default_warmup_iters(depth: int) -> int:
    """Warm-up length the paper used for a given depth: 400 for 110 layers and deeper."""
    return WARMUP_ITERS if depth >= WARMUP_MIN_DEPTH else 0


def lr_at(
    step: int,
    base_lr: float = PAPER_LR,
    milestones: Sequence[int] = PAPER_MILESTONES,
    warmup_iters: int = 0,
    warmup_lr: float = WARMUP_LR,
    factor: float = 10.0,
) -> float:
    """Learning rate for the update at 0-based iteration `step`: a pure function, so a
    resumed run can never drift from the schedule."""
    if step < warmup_iters:
        return warmup_lr
    return base_lr / factor ** sum(step >= m for m in milestones)
