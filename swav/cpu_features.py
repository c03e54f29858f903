"""What this CPU offers for bf16 work, read once per process.

Two choices depend on it: ``run.precision: auto`` (bf16 autocast only where the CPU computes in bf16
natively: AMX or AVX512-BF16, about 2x fp32's convolution speed) and :class:`swav.backbones.SmallMapConv2d`'s
rule (stride-1 3x3 convolutions as matrix products only with AMX, where oneDNN's kernels are slow on small
maps). The flags come from torch's own checks where it has them, else ``/proc/cpuinfo``; elsewhere (no such
file) the answers are False, which only means fp32 and oneDNN everywhere.
"""
from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["cpu_flags", "cpu_has_amx", "cpu_supports_bf16", "cpu_model", "describe_environment"]


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return frozenset(next((line for line in fh if line.startswith("flags")), "").partition(":")[2].split())
    except OSError:
        return frozenset()


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel's matrix units, which oneDNN's bf16 convolutions use)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return "amx_tile" in cpu_flags()


@lru_cache(maxsize=1)
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 (AMX or AVX512-BF16), where bf16 autocast is ~2x faster."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = ""
    return "AMX" in capability.upper() or bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_environment(device: torch.device) -> str:
    """One line for a run's log: library versions, the CPU and its bf16 abilities, the GPU if used; so that
    two runs' speed or numerics can be compared knowing what they ran on."""
    import os

    import torchvision

    bf16 = "AMX" if cpu_has_amx() else "AVX512-BF16" if cpu_supports_bf16() else "no native bf16"
    line = (f"torch {torch.__version__}, torchvision {torchvision.__version__}; CPU {cpu_model()} "
            f"({bf16}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    if device.type == "cuda":
        line += f"; GPU {torch.cuda.get_device_name(device)}"
    return line
