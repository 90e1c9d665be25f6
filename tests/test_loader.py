import numpy as np
import pytest
import torch
from conftest import coordinate_images, decode
from torch.utils._python_dispatch import TorchDispatchMode

from fastres.data import pixels, torch_loader
from fastres.data.dataset import Split
from fastres.data.torch_loader import TorchLoader

CPU = torch.device("cpu")


def loader(split: Split, batch: int, **kw) -> TorchLoader:
    zero, one = np.zeros((1, 1, 3), np.float32), np.ones((1, 1, 3), np.float32)
    return TorchLoader(split, batch, zero, one, device=CPU, **kw)


def test_offsets_cover_all_81_positions_and_half_flip() -> None:
    split = coordinate_images(8192)
    x, _ = next(loader(split, 8192, train=True, seed=3).epoch(0))
    dy, dx, flip = decode(x)
    assert dy.min() == -4 and dy.max() == 4 and dx.min() == -4 and dx.max() == 4
    counts = np.bincount((dy + 4) * 9 + (dx + 4), minlength=81)
    assert counts.min() > 8192 / 81 * 0.6  # every position, roughly uniformly
    assert 0.45 < flip.mean() < 0.55


def test_padding_is_exact_zero() -> None:
    x, _ = next(loader(coordinate_images(2048), 2048, train=True, seed=1).epoch(0))
    dy, dx, _ = decode(x)
    zero = x[:, 0] == 0  # real pixels are >= 100 / 255 in channel 0
    zero_rows, zero_cols = zero.all(2).sum(1).numpy(), zero.all(1).sum(1).numpy()
    assert np.array_equal(zero_rows, np.abs(dy)) and np.array_equal(zero_cols, np.abs(dx))
    assert torch.count_nonzero(x[:, 0][~zero]) == (~zero).sum()


def test_eval_is_the_single_original_view() -> None:
    split = coordinate_images(300)
    ld = loader(split, 128, train=False)
    batches = list(ld.epoch(0))
    assert [len(y) for _, y in batches] == [128, 128, 44]
    x = torch.cat([b for b, _ in batches])
    assert torch.equal(torch.round(x * 255).to(torch.uint8), torch.from_numpy(split.images).permute(0, 3, 1, 2))


def test_epochs_reshuffle_whole_set_with_static_batches() -> None:
    ld = loader(coordinate_images(1000), 128, train=True, seed=0)
    assert ld.steps_per_epoch == 7
    ids = []
    for epoch in (0, 1):
        batches = list(ld.epoch(epoch))
        assert all(b.shape == (128, 3, 32, 32) for b, _ in batches)
        ids.append(torch.cat([y for _, y in batches]))
    assert len(set(ids[0].tolist())) == 896 and set(ids[0].tolist()) != set(ids[1].tolist())
    # seeded: the same epoch replays exactly, also from the middle
    again = list(ld.epoch(1, start=3))
    assert torch.equal(again[0][0], list(ld.epoch(1))[3][0])
    assert torch.equal(torch.cat([y for _, y in again]), ids[1][3 * 128:])


def test_shards_partition_an_epoch() -> None:
    split = coordinate_images(1024)
    seen = [torch.cat([y for _, y in loader(split, 64, train=True, seed=5, shard_id=s, num_shards=4).epoch(2)])
            for s in range(4)]
    assert all(len(s) == 256 for s in seen)
    assert sorted(torch.cat(seen).tolist()) == list(range(1024))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_and_dtype(channels_last: bool, dtype: torch.dtype) -> None:
    x, y = next(loader(coordinate_images(64), 32, train=True, dtype=dtype, channels_last=channels_last).epoch(0))
    assert x.dtype == dtype and y.dtype == torch.int64 and x.shape == (32, 3, 32, 32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)


def test_channel_normalisation() -> None:
    split = Split(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), np.zeros(64, np.int64))
    mean, std = pixels.normalization_stats(split.images, "channel")
    x = torch.cat([b for b, _ in TorchLoader(split, 64, mean, std, device=CPU, train=False).epoch(0)])
    # Each value is (u * (1/255) - mean) * (1/std) in float32, mean and std float32 roundings
    # of the float64 statistics: four float32 roundings of |x| <= 4, under 1e-6 in all; averaged
    # in float64, the mean and std are off by no more than that, ten times inside these bounds.
    assert torch.allclose(x.double().mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.double().std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (torch.equal holds -0.0 equal to 0.0)."""
    return x.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()])


def same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype and xa.stride() == xb.stride()
        assert torch.equal(bits(xa), bits(xb)) and torch.equal(ya, yb) and ya.shape == yb.shape


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("seeds", [(4,), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_made_in_slabs_are_the_per_batch_ones_bit_for_bit(channels_last: bool, seeds: tuple,
                                                                   dtype: torch.dtype,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch of two epochs, and of an epoch resumed at batch 5, made in slabs of at
    most 400 images (1, 2, 4, 6 and 2 batches of 64; three fused runs: 1, then 2 at a
    time) and batch by batch: the same bits, shapes, strides and labels."""
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 1000))
    mean, std = pixels.normalization_stats(split.images, "channel")
    monkeypatch.setattr(torch_loader, "SLAB_IMAGES", 400)
    seed = seeds[0] if len(seeds) == 1 else seeds
    made = {slabs: TorchLoader(split, 64, mean, std, device=CPU, train=True, seed=seed, dtype=dtype,
                               channels_last=channels_last, slabs=slabs) for slabs in (True, False)}
    assert made[True].slabs and not made[False].slabs and made[True].steps_per_epoch == 15
    assert made[True].slab_batches == (6 if len(seeds) == 1 else 2)
    for epoch, start in ((0, 0), (1, 0), (1, 5)):
        same_batches(list(made[True].epoch(epoch, start)), list(made[False].epoch(epoch, start)))


def test_batches_of_a_shard_made_in_slabs_are_its_per_batch_ones() -> None:
    split = coordinate_images(1000)
    made = [loader(split, 32, train=True, seed=2, shard_id=1, num_shards=3, slabs=s) for s in (True, False)]
    same_batches(list(made[0].epoch(3)), list(made[1].epoch(3)))


class Ops(TorchDispatchMode):
    """The aten operations run while it is on."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seed", [0, (0, 1)])
def test_only_a_slabs_first_step_runs_kernels(seed: int | tuple) -> None:
    """8 batches in slabs of 1, 2, 4 and 1: steps 0, 1, 3 and 7 make their slab, every
    other step is views alone."""
    batches = loader(coordinate_images(512), 64, train=True, seed=seed, channels_last=True, slabs=True).epoch(0)
    makes = []
    for k in range(8):
        with Ops() as seen:
            next(batches)
        if not all(op.is_view for op in seen.ops):
            makes.append(k)
    assert makes == [0, 1, 3, 7]


def test_the_size_rule() -> None:
    """Two slabs and a slab's temporaries in a quarter of the free memory; unknown: no."""
    slab = 8192 * 3 * 32 * 32 * 4  # the largest slab in fp32
    assert torch_loader.fits_slabs(slab, 4 * (2 * slab + torch_loader.SLAB_BYTES))
    assert not torch_loader.fits_slabs(slab, 4 * (2 * slab + torch_loader.SLAB_BYTES) - 4)
    assert not torch_loader.fits_slabs(1, None)
    assert torch_loader.free_memory(CPU) > 0
    assert not loader(coordinate_images(300), 128, train=False, slabs=True).slabs  # evaluation: one at a time
