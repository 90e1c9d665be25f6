import pytest

from fastres.recipe import default_warmup_iters
from fastres.schedule import lr_at


@pytest.mark.parametrize(("step", "lr"), [(0, 0.1), (399, 0.1), (400, 0.1), (31_999, 0.1), (32_000, 0.01),
                                          (47_999, 0.01), (48_000, 0.001), (63_999, 0.001)])
def test_paper_schedule(step: int, lr: float) -> None:
    assert lr_at(step) == lr


@pytest.mark.parametrize(("step", "lr"), [(0, 0.01), (399, 0.01), (400, 0.1), (31_999, 0.1), (32_000, 0.01),
                                          (48_000, 0.001), (63_999, 0.001)])
def test_resnet110_warmup_returns_to_base_lr(step: int, lr: float) -> None:
    assert lr_at(step, warmup_iters=default_warmup_iters(110)) == lr


def test_warmup_only_for_deep_nets() -> None:
    assert [default_warmup_iters(d) for d in (20, 56, 110, 1202)] == [0, 0, 400, 400]


def test_custom_milestones() -> None:
    assert [lr_at(s, 0.1, (1000, 1500)) for s in (999, 1000, 1499, 1500)] == [0.1, 0.01, 0.01, 0.001]
