"""Device, precision and environment facts for a run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastres.errors import RunError


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


def memory_bytes(device: torch.device) -> int:
    """All the memory of a device: the GPU's, or the host's physical memory. What a model
    provably cannot fit in is refused against it (`models.ModelSpec.check_fits`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """cuDNN autotuning: batch shapes are static, so the fastest conv algorithms are found
    once and reused. `deterministic`: deterministic cuDNN and torch algorithms instead (and
    cuBLAS's fixed workspace), so a GPU run repeats bit for bit, at some speed; on a CPU
    fastres' runs repeat bit for bit either way."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": None}  # the autocast dtype
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which it has no bf16 instructions to use.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), as torch's own CPU
    probe reports it. Elsewhere oneDNN emulates bf16: measured 10x slower than fp32 for a
    ResNet-20 step on an AVX2-only machine of this project. A cap set with
    ONEDNN_MAX_CPU_ISA below those instruction sets counts as no native bf16."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISAS:
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def tensor_dtype(precision: str) -> torch.dtype:
    """The dtype of a run's batches: the autocast dtype under AMP, float64 for an fp64 run
    (weights and batches in float64, no autocast: rounding at 1e-16, a reference that
    agrees across processors where fp32's rounding, amplified by training, does not),
    else float32."""
    if precision == "fp64":
        return torch.float64
    return PRECISIONS[precision] or torch.float32


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of a run's weights: float64 for an fp64 run, else float32 (AMP keeps fp32 weights)."""
    return torch.float64 if precision == "fp64" else torch.float32


def requested_precision(amp: bool, amp_dtype: str) -> str:
    """What the command line asks for: fp32 without --amp, else auto, bf16 or fp16."""
    return amp_dtype if amp else "fp32"


def resolve_precision(device: torch.device, requested: str) -> tuple[str, str | None]:
    """The precision a run trains in (fp32, bf16, fp16, or fp64 when asked for) and, when it differs from what a
    user may expect, one line saying why. "auto" is bf16 (fp32's range: no loss scaling)
    where the device computes it natively; else fp16 on a GPU, and fp32 on a CPU, where
    fp16 autocast brings no speed. A resolved precision is saved in the config, so a run
    resumed on another processor keeps it."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16" if bf16_ok else "fp16"), None
        if requested == "bf16" and not bf16_ok:
            raise RunError("this GPU has no bf16 support: use --amp-dtype fp16")
        return requested, None
    native = cpu_bf16_native()
    if requested == "auto":
        if native:
            return "bf16", None
        return "fp32", ("note: AMP is off on this CPU: it has no native bf16 (AVX-512 BF16 or AMX), where bf16 "
                        "is emulated and about 10x slower; training in fp32 (--amp-dtype bf16 forces bf16)")
    if requested == "bf16" and not native:
        return "bf16", "warning: bf16 is emulated on this CPU (no AVX-512 BF16 or AMX) and about 10x slower than fp32"
    if requested == "fp16":
        return "fp16", ("warning: fp16 on a CPU runs ATen's reference convolutions, about 10x slower than fp32 "
                        "(measured here); it is for checking the fp16 path, not for speed")
    return requested, None


def dali_package() -> str:
    """The NVIDIA DALI wheel for this torch: DALI is built per CUDA major version, and the
    one of torch's CUDA is the one that shares its runtime (cuda120 for a CPU-only torch,
    whose CPU pipelines any build runs)."""
    major = (torch.version.cuda or "12").split(".")[0]
    return f"nvidia-dali-cuda{major}0"


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


def dali_version() -> str | None:
    """The installed DALI's version, or None, read from its wheel's metadata without importing
    it: an import costs about 0.9 core-seconds (measured on a 2-core AVX2 machine), paid by
    every run that writes its results, even one that reads its data without DALI. The wheel
    for this torch is looked up first, then any other nvidia-dali* one; a DALI with no wheel
    metadata (built from source) is asked itself."""
    try:
        if importlib.util.find_spec("nvidia.dali") is None:
            return None
    except ImportError:  # no nvidia namespace at all
        return None
    try:
        return metadata.version(dali_package())
    except metadata.PackageNotFoundError:
        pass
    for dist in metadata.distributions():
        if (dist.metadata["Name"] or "").lower().replace("_", "-").startswith("nvidia-dali"):
            return dist.version
    try:
        import nvidia.dali as dali
        return dali.__version__
    except ImportError:
        return None


def versions() -> dict[str, Any]:
    """Library versions that can change a result or a timing."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "dali": dali_version()}
