"""The paper's learning-rate schedule, by iteration (He et al. 2016, Sec. 4.2; its
constants are `fastres.recipe`'s)."""

from __future__ import annotations

from collections.abc import Sequence

from fastres import recipe


def lr_at(
    step: int,
    base_lr: float = recipe.LR,
    milestones: Sequence[int] = recipe.MILESTONES,
    warmup_iters: int = 0,
    warmup_lr: float = recipe.WARMUP_LR,
    factor: float = recipe.LR_DROP,
) -> float:
    """Learning rate for the update at 0-based iteration `step`: a pure function, so a
    resumed run can never drift from the schedule."""
    if step < warmup_iters:
        return warmup_lr
    return base_lr / factor ** sum(step >= m for m in milestones)


def describe(iters: int, milestones: Sequence[int], factor: float = recipe.LR_DROP) -> str:
    """`64000 iterations, lr /10 at 32000, 48000`: how the trainer's start and the report's
    rows name a schedule, so the two read alike."""
    drops = f"lr /{factor:g} at {', '.join(map(str, milestones))}" if milestones else "no lr drop"
    return f"{iters} iterations, {drops}"
