"""Checkpoints published by other CIFAR ResNet reproductions, mapped exactly onto fastres'
modules, so a published model and one's own are evaluated on the same pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from fastres import checkpoint, weights
from fastres.errors import RunError
from fastres.models import CifarResNet, ModelSpec, ShortcutA

PEERS = ("akamaster",)
# akamaster/pytorch_resnet_cifar10 trains with torchvision's per-channel normalisation.
AKAMASTER_MEAN = (0.485, 0.456, 0.406)
AKAMASTER_STD = (0.229, 0.224, 0.225)


def akamaster(path: str | Path) -> tuple[CifarResNet, np.ndarray, np.ndarray]:
    """A `resnetN-*.th` of akamaster/pytorch_resnet_cifar10 (a dict whose `state_dict` has
    `module.`-prefixed keys; option A): the fastres model computing the peer's function, and
    the peer's mean and std (HWC, on the 0-1 scale). The peer's option A puts half of the new
    zero channels in front of the old ones and half behind; fastres appends them all, so the
    imported model's shortcuts are told to pad the peer's way."""
    state = checkpoint.load_file(Path(path), "checkpoint")
    raw = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise RunError(f"{path}: not an akamaster checkpoint (a dict with a state_dict of tensors)")
    mapped = {}
    for key, value in raw.items():
        key = key.removeprefix("module.").replace("compressible_", "")  # later versions renamed the layers
        key = re.sub(r"^layer(\d)\.", r"stage\1.", key).replace("linear.", "fc.")
        mapped[key] = value
    blocks = {int(m.group(1)) for k in mapped if (m := re.match(r"stage1\.(\d+)\.", k))}
    if not blocks or "fc.weight" not in mapped:
        raise RunError(f"{path}: no layer1 blocks or linear layer: not an akamaster CIFAR ResNet")
    model = ModelSpec("resnet", 6 * len(blocks) + 2, "A").build(num_classes=mapped["fc.weight"].shape[0])
    for module in model.modules():
        if isinstance(module, ShortcutA):
            module.front = (module.planes - module.in_planes) // 2
    for key, value in model.state_dict().items():  # the published files predate this BN counter
        if key.endswith("num_batches_tracked"):
            mapped.setdefault(key, torch.zeros_like(value))
    weights.load_into(model, mapped, str(path))
    return (model, np.array(AKAMASTER_MEAN, np.float32).reshape(1, 1, 3),
            np.array(AKAMASTER_STD, np.float32).reshape(1, 1, 3))
