"""Trained weights in and out: read the weights of a run directory, a checkpoint or an
exported file (with the JSON that describes it), and wrap a model with its preprocessing.

An export is a plain `.pt` state dict (tensors only: `torch.load(..., weights_only=True)`
reads it) and a `.json` beside it with the model spec, dataset, class names and
normalisation: everything needed to use the model without fastres' checkpoint internals
or the training set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastres import checkpoint, rundir
from fastres.config import is_number
from fastres.data import pixels
from fastres.data.dataset import DATASETS
from fastres.errors import RunError
from fastres.models import ModelSpec
from fastres.recipe import NORMALIZATIONS
from fastres.runtime import PRECISIONS


def meta_path(weights: Path) -> Path:
    """The JSON that describes an exported weights file."""
    return weights.with_suffix(".json")


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and what describes it (model, shortcut, normalisation, ...) from a run
    directory, its checkpoint, or an exported `.pt` with its `.json`; one line if unreadable."""
    path = Path(path)
    file = rundir.checkpoint_file(path) if path.is_dir() else path
    if not file.is_file():
        raise RunError(f"{path}: no weights there (a run directory, its {rundir.CHECKPOINT}, or an exported .pt)")
    state = checkpoint.load_file(file, "weights")
    if checkpoint.is_checkpoint(state):
        ckpt = checkpoint.decode(state, file)
        meta = {"model": ckpt.config.model, "shortcut": ckpt.config.shortcut, "dataset": ckpt.config.dataset,
                "step": ckpt.step}
        if ckpt.normalization is not None:
            meta["normalization"] = {"mean": ckpt.normalization.mean.tolist(), "std": ckpt.normalization.std.tolist()}
        return ckpt.model, meta
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{file}: not a state dict of tensors")
    return state, read_meta(file)


def read_meta(weights: Path) -> dict[str, Any]:
    """The description of an exported weights file, checked for what loading it needs."""
    described = meta_path(weights)
    try:
        meta = json.loads(described.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{described}: the description of {weights.name} is missing or unreadable ({e})") from None
    norm = meta.get("normalization") if isinstance(meta, dict) else None
    ok = (isinstance(meta, dict) and isinstance(meta.get("model"), str) and meta.get("normalize") in NORMALIZATIONS
          and isinstance(norm, dict) and all(_numbers(norm.get(k)) for k in ("mean", "std"))
          and meta.get("dataset", "cifar10") in tuple(DATASETS) and meta.get("precision") in (None, *PRECISIONS))
    if not ok:
        raise RunError(f"{described}: not the description fastres.export writes (model, normalize, normalization, "
                       "dataset, precision)")
    try:
        ModelSpec.parse(meta["model"], meta.get("shortcut"))
    except (ValueError, TypeError) as e:
        raise RunError(f"{described}: {e}") from None
    return meta


def _numbers(v: Any) -> bool:
    """Nested lists of numbers (a mean or std as `tolist()` writes it)."""
    if isinstance(v, list):
        return bool(v) and all(_numbers(x) for x in v)
    return is_number(v)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Strict loading: every key present, none extra, every shape equal; else one line
    naming the first mismatch."""
    own = model.state_dict()
    for key in own:
        if key not in state:
            raise RunError(f"{source}: no weights for {key!r} (is it the same model and shortcut?)")
        if state[key].shape != own[key].shape:
            raise RunError(f"{source}: {key!r} has shape {tuple(state[key].shape)}, the model needs "
                           f"{tuple(own[key].shape)}")
    extra = sorted(set(state) - set(own))
    if extra:
        raise RunError(f"{source}: weights for {extra[0]!r}, which the model does not have")
    model.load_state_dict(state)
    return model


def load_model(path: str | Path, name: str | None = None, shortcut: str | None = None) -> nn.Module:
    """The model a run directory, a checkpoint or an exported `.pt` holds, built and loaded
    strictly (any missing, extra or misshapen tensor is one line naming the first). `name`
    (and `shortcut`): the model expected; another one in the file is refused."""
    state, meta = read(path)
    saved = ModelSpec.parse(meta["model"], meta.get("shortcut"))
    if name is not None and ModelSpec.parse(name, shortcut) != saved:
        raise RunError(f"{path}: holds {saved.tag} weights, not {ModelSpec.parse(name, shortcut).tag}")
    dataset = meta.get("dataset", "cifar10")
    if dataset not in DATASETS:
        raise RunError(f"{path}: dataset {dataset!r} is not one fastres knows ({', '.join(DATASETS)})")
    return load_into(saved.build(DATASETS[dataset].num_classes), state, str(path))


class WithPreprocessing(nn.Module):
    """A trained model that takes uint8 images (N, 32, 32, 3), as files decode, and applies
    the normalisation it was trained with, so nobody feeds it raw pixels by mistake."""

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.float())  # HWC, broadcastable: (32, 32, 3) per pixel or (1, 1, 3)
        self.register_buffer("std", std.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"expected uint8 images (N, 32, 32, 3), got {images.dtype} {tuple(images.shape)}")
        x = pixels.normalize(images, self.mean, 1.0 / self.std)  # the loaders' own arithmetic, bit for bit
        return self.model(x.permute(0, 3, 1, 2).contiguous())
