"""The paper's training recipe for CIFAR-10 (He et al. 2016, Sec. 4.2), in one place: the
config's defaults, the step's optimiser, the schedule, the augmentation, the benchmarks and
the reproduction all read it, so none of them can drift from the paper alone. Imports
nothing of fastres: anything may read it."""

from __future__ import annotations

LR = 0.1  # "We start with a learning rate of 0.1" (Sec. 4.2)
LR_DROP = 10.0  # "divide it by 10 at 32k and 48k iterations" (Sec. 4.2)
MILESTONES = (32_000, 48_000)  # the iterations of those two drops (Sec. 4.2)
ITERS = 64_000  # "terminate training at 64k iterations" (Sec. 4.2)
WARMUP_LR = 0.01  # ResNet-110: "we use 0.01 to warm up the training ... and then go back to 0.1" (Sec. 4.2)
WARMUP_ITERS = 400  # "until the training error is below 80% (about 400 iterations)" (Sec. 4.2)
WARMUP_MIN_DEPTH = 110  # the 110-layer net's warm-up; the 1202-layer one is "trained as described above" (Sec. 4.2)
MOMENTUM = 0.9  # "momentum of 0.9" (Sec. 4.2)
WEIGHT_DECAY = 1e-4  # "a weight decay of 0.0001" (Sec. 4.2)
BATCH_SIZE = 128  # "a mini-batch size of 128 on two GPUs": the global batch (Sec. 4.2)
PAD = 4  # "4 pixels are padded on each side" (Sec. 4.2); with zeros, after the mean subtraction
CROP = 32  # "a 32x32 crop is randomly sampled from the padded image" (Sec. 4.2): the original image size
NORMALIZE = "pixel"  # "32x32 images, with the per-pixel mean subtracted" (Sec. 4.2)
NORMALIZATIONS = (NORMALIZE, "channel")  # the paper's, and the per-channel mean/std most reimplementations use
SHORTCUTS = ("A", "B", "C")  # the projection options of Sec. 3.3 and 4.1: A (zero-padding, CIFAR's), B, C


def default_warmup_iters(depth: int) -> int:
    """Warm-up length the paper used for a given depth: 400 for 110 layers and deeper."""
    return WARMUP_ITERS if depth >= WARMUP_MIN_DEPTH else 0
