"""Opt-in checks on the real CIFAR-10 JPEG copy in ../shared/data (pytest --runslow)."""

from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA, tiny_config

from fastres.data import sources
from fastres.train import train

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no real data at {REAL_DATA}")]


def test_real_data_is_complete() -> None:
    splits = sources.load(sources.resolve(REAL_DATA))
    assert splits.train.images.shape == (50_000, 32, 32, 3) and splits.test.images.shape == (10_000, 32, 32, 3)
    assert np.bincount(splits.train.labels).tolist() == [5000] * 10
    assert np.bincount(splits.test.labels).tolist() == [1000] * 10
    # the copy's README: decoded training mean (125.27, 122.93, 113.86)
    np.testing.assert_allclose(splits.train.images.reshape(-1, 3).mean(0), [125.27, 122.93, 113.86], atol=0.01)


def test_short_real_run_learns(tmp_path: Path) -> None:
    cfg = tiny_config(REAL_DATA, tmp_path / "run", model="resnet20", iters=300, milestones=(200, 250),
                      batch_size=128, log_every=50, eval_every=300, checkpoint_every=300)
    assert train(cfg)["test_error"] < 0.6  # chance is 0.9
