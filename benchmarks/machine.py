"""Which machine a benchmark ran on, for its printed header and its JSON.

CPU figures depend on the processor far more than on anything else: the same 2-core slot has been an
Intel CPU with AMX (oneDNN's bf16 convolutions on the matrix units) and an AMD EPYC (Zen 4) with
AVX512-BF16 only, where bf16 can at most double fp32's arithmetic rate. Every script records this so
that a figure is never compared with one taken on another kind of machine.

It also measures peak resident memory per configuration: :func:`reset_peak_rss` before the
configuration runs, :func:`peak_rss_gib` after (Linux's ``VmHWM``, which ``/proc/self/clear_refs``
resets; elsewhere the process's lifetime peak, which cannot be reset: the scripts then print a note and store
``"peak_window_reset": false``).

    PYTHONPATH=. python benchmarks/machine.py      # prints the description
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import sys

import torch

from swav.cpu_features import cpu_flags, cpu_model

# the instruction-set flags that decide how fast bf16/fp32 convolutions and matrix products run
_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx512_vnni", "avx2")


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def describe() -> dict:
    """CPU model and ISA flags, threads, library versions, GPU name, date (UTC)."""
    info = _cpuinfo()
    flags = cpu_flags()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    try:
        import torchvision
        vision = torchvision.__version__
    except ImportError:
        vision = None
    return {
        "cpu_model": cpu_model(),
        "cpu_vendor": info.get("vendor_id"),
        "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}" if info else None,
        "isa_flags": [f for f in _FLAGS if f in flags],
        "torch_cpu_capability": capability,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": vision,
        # only where this process already uses CUDA: asking would start it (and add to the host memory measured)
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_initialized() else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def reset_peak_rss() -> bool:
    """Start a new peak-memory window (Linux); False where the peak cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_windows_supported() -> bool:
    """Whether :func:`reset_peak_rss` works here; where not, prints what the peaks then mean."""
    if reset_peak_rss():
        return True
    print("note: this system cannot reset the peak resident memory: every 'peak' below is the process's "
          "peak since it started")
    return False


def peak_rss_gib() -> float:
    """Peak resident memory (GiB) since the last :func:`reset_peak_rss` (else since the process started)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def header(machine: dict | None = None) -> str:
    """One line for a benchmark's printed output."""
    m = machine or describe()
    isa = ", ".join(m["isa_flags"]) or "no AVX2"
    gpu = f"; GPU {m['gpu']}" if m["gpu"] else ""
    return (f"machine: {m['cpu_model']} ({m['cpu_vendor']} {m['cpu_family_model']}; {isa}), "
            f"{m['cpu_count']} CPUs{gpu}; torch {m['torch']}; {m['date_utc']} UTC")


if __name__ == "__main__":
    description = describe()
    print(header(description))
    print(json.dumps(description, indent=2))
