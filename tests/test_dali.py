"""The DALI loader in CPU-only mode (device_id=None): what it feeds must be what the torch
loader feeds, image for image."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import coordinate_images, decode, tiny_config

from fastres import rundir
from fastres.cli import run_main
from fastres.data import augmentation, dali_loader, pixels, sources
from fastres.data.torch_loader import TorchLoader
from fastres.train import main as train_main
from fastres.train import train

pytest.importorskip("nvidia.dali")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_tree: Path):
    source = sources.resolve(tiny_tree)
    decoded, encoded = sources.load(source), sources.load_encoded(source)
    mean, std = pixels.normalization_stats(decoded.train.images)
    return decoded, encoded, mean, std


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_dali_equals_torch_loader(tiny, train: bool, channels_last: bool) -> None:
    decoded, encoded, mean, std = tiny
    split = "train" if train else "test"
    kw = dict(device=CPU, train=train, seed=7, channels_last=channels_last)
    dali = dali_loader.DaliLoader(getattr(encoded, split), 24, mean, std, **kw)
    ref = TorchLoader(getattr(decoded, split), 24, mean, std, **kw)
    assert dali.steps_per_epoch == ref.steps_per_epoch
    for epoch in (0, 1):
        n = 0
        for (x, y), (rx, ry) in zip(dali.epoch(epoch), ref.epoch(epoch), strict=True):
            assert x.shape == rx.shape and x.dtype == torch.float32 and y.dtype == torch.int64
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            assert x.is_contiguous(memory_format=fmt)
            assert torch.equal(y, ry)  # labels line up with the files
            assert torch.equal(x, rx)  # PNG is lossless: same pixels, and the same arithmetic on them
            n += len(y)
        assert n == (24 * ref.steps_per_epoch if train else len(getattr(decoded, split)))


def test_augmentation_offsets_flips_and_zero_padding() -> None:
    split = coordinate_images(4096)
    zero, one = np.zeros((1, 1, 3), np.float32), np.ones((1, 1, 3), np.float32)
    loader = dali_loader.DaliLoader(split, 4096, zero, one, device=CPU, train=True, seed=11)
    x, y = next(loader.epoch(0))
    dy, dx, flip = decode(x)
    p = augmentation.epoch_plan(4096, 11, 0)
    assert np.array_equal(y.numpy(), p.order.numpy())
    assert np.array_equal(dy, p.offsets[:, 0].numpy()) and np.array_equal(dx, p.offsets[:, 1].numpy())
    assert np.array_equal(flip, p.flips.numpy())
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == 81 and 0.45 < flip.mean() < 0.55
    zero_rows = (x[:, 0] == 0).all(2).sum(1).numpy()
    assert np.array_equal(zero_rows, np.abs(dy))  # padding is exactly zero, |dy| rows of it


def test_fp16_output() -> None:
    zero, one = np.zeros((1, 1, 3), np.float32), np.ones((1, 1, 3), np.float32)
    loader = dali_loader.DaliLoader(coordinate_images(64), 32, zero, one, device=CPU, train=True, dtype=torch.float16)
    x, _ = next(loader.epoch(0))
    assert x.dtype == torch.float16 and x.shape == (32, 3, 32, 32)


def test_shards_partition_an_epoch() -> None:
    split = coordinate_images(1024)  # label = image index
    zero, one = np.zeros((1, 1, 3), np.float32), np.ones((1, 1, 3), np.float32)
    seen = []
    for shard in range(4):
        loader = dali_loader.DaliLoader(split, 64, zero, one, device=CPU, train=True, seed=2, shard_id=shard,
                                        num_shards=4)
        seen.append(torch.cat([y for _, y in loader.epoch(3)]))
    assert all(len(s) == 256 for s in seen)
    assert sorted(torch.cat(seen).tolist()) == list(range(1024))


def test_resume_mid_epoch(tiny) -> None:
    _, encoded, mean, std = tiny
    loader = dali_loader.DaliLoader(encoded.train, 16, mean, std, device=CPU, train=True, seed=4)
    full = list(loader.epoch(2))
    part = list(loader.epoch(2, start=6))
    assert len(part) == len(full) - 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(part, full[6:], strict=True))
    # after a jump, the next epochs continue from the new position (no stale batches)
    assert torch.equal(next(loader.epoch(0))[0], next(loader.epoch(0))[0])
    again = list(loader.epoch(2, start=6)) + list(loader.epoch(3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again[:len(part)], part, strict=True))
    ref = dali_loader.DaliLoader(encoded.train, 16, mean, std, device=CPU, train=True, seed=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again[len(part):], ref.epoch(3), strict=True))


def test_training_with_dali_learns_and_matches_torch(tiny_tree: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    builds = {True: 0, False: 0}
    real_build = dali_loader.DaliLoader._build

    def counting_build(self, first_epoch: int, start: int) -> None:
        builds[self.train] += 1
        real_build(self, first_epoch, start)
    monkeypatch.setattr(dali_loader.DaliLoader, "_build", counting_build)
    runs = {loader: train(tiny_config(tiny_tree, tmp_path / loader, loader=loader, iters=40, milestones=(30,)))
            for loader in ("dali", "torch")}
    losses = {k: [m["train_loss"] for m in rundir.MetricsLog(tmp_path / k).read() if "train_loss" in m]
              for k in runs}
    assert losses["dali"][-1] < 0.5 * losses["dali"][0]
    assert losses["dali"] == losses["torch"]  # same batches, same model: the same run
    assert runs["dali"]["test_error"] == runs["torch"]["test_error"]
    # 8 epochs of 5 batches and 4 evaluations, yet one training and one evaluation pipeline:
    # the trainer takes exactly steps_per_epoch batches and never drains the epoch itself.
    assert builds == {True: 1, False: 1}


def test_missing_dali_is_one_line(tiny_tree: Path, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(dali_loader, "fn", None)
    argv = ["resnet8", "--loader", "dali", "--data", str(tiny_tree), "--out", str(tmp_path / "r")]
    assert run_main(train_main, argv) == 2
    err = capsys.readouterr().err
    assert "nvidia-dali" in err and err.count("\n") == 1
