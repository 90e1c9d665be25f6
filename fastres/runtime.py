"""Device, precision and environment facts for a run."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastres.cli import RunError


def pick_device(name: str) -> torch.device:
    """`auto` is cuda when present, else cpu; an unusable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: only cpu and cuda are supported")
    return device


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning: batch shapes are static, so the fastest conv algorithms are found
    once and reused."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def amp_dtype(device: torch.device, amp: bool, name: str) -> torch.dtype | None:
    """The autocast dtype, or None without AMP. "auto" is bf16 (fp32's range: no loss
    scaling) where the device supports it, else fp16."""
    if not amp:
        return None
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    if name == "auto":
        name = "bf16" if bf16_ok else "fp16"
    if name == "bf16" and not bf16_ok:
        raise RunError("this GPU has no bf16 support: use --amp-dtype fp16")
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def git_commit() -> str | None:
    """The fastres source commit, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> dict[str, Any]:
    """Library versions that can change a result or a timing."""
    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "cuda": torch.version.cuda,
                         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        import nvidia.dali as dali
        v["dali"] = dali.__version__
    except ImportError:
        v["dali"] = None
    return v
