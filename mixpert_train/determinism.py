"""Reproducible CPU training: the same kernels on every x86-64 machine, a fixed thread count, deterministic
algorithms. Which kernels torch dispatches to (AVX2 vs AVX-512, MKL's code path) changes the rounding, so an
unpinned run is repeatable on one processor type but not across them; pinning happens before torch is imported."""

from __future__ import annotations

import os
import platform
import sys

# What every x86-64 machine this project runs on has (AVX2); set only where the user has not chosen otherwise.
PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels: the AVX2 build, not AVX-512 where present
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: its AVX2 code path on any processor
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, some matmuls): no AVX-512 / AMX kernels
}
THREADS = 2  # this project's machines; more threads would split reductions differently


def pin_kernels() -> dict:
    """Set the kernel pins in the environment (x86-64 only; ARM has one dispatch path). Must run before torch
    is imported, or it cannot take effect: then it says so rather than pretend."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    if "torch" in sys.modules:
        raise RuntimeError("pin_kernels() must run before torch is imported (ATen reads ATEN_CPU_CAPABILITY once)")
    chosen = {}
    for k, v in PINS.items():
        chosen[k] = os.environ.setdefault(k, v)
    return chosen


def deterministic(threads: int = THREADS) -> dict:
    """A fixed thread count and torch's deterministic algorithms; returns what a report should record."""
    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    return {"threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ.get(k) for k in PINS}, "torch": torch.__version__, "machine": platform.machine()}
