"""The CPU features lowbit's kernels detected, and the instruction set they use.

lowbit's C++ kernels come in an AVX-512, an AVX2 (+ FMA + F16C) and a portable version; the best
one the CPU supports is used unless the environment variable ``LOWBIT_ISA`` (read once, when the
first kernel runs) or :func:`set_isa` asks for a lower one. ``avxvnni`` is the AVX2 path with
AVX-VNNI's int8 dot product for the int8 GEMM (LLM.int8(), W8A8), on CPUs that have AVX-VNNI.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

from . import _C

ISAS = ("avx512", "avxvnni", "avx2", "generic")  # best first


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """What lowbit detected and uses: ``{"cpu", "detected", "active", "supported", "features",
    "vnni_int8_kernel", "bf16_gemm", "threads", "LOWBIT_ISA"}``. vnni_int8_kernel: the int8 GEMM
    uses VNNI's vpdpbusd (AVX-512 or AVX-VNNI); bf16_gemm: the many-token path of the weight-only
    linears multiplies bf16 inputs in bf16 (AVX512-BF16 / AMX)."""
    info = _C.cpu_info()
    return {
        "cpu": _cpu_model(),
        "detected": info["detected"],
        "active": info["active"],
        "supported": list(info["supported"]),
        "features": dict(info["features"]),
        "vnni_int8_kernel": info["vnni_int8_kernel"],
        "bf16_gemm": info["bf16_gemm"],
        "threads": torch.get_num_threads(),
        "LOWBIT_ISA": os.environ.get("LOWBIT_ISA"),
    }


def supported_isas() -> list[str]:
    """The ISA paths this CPU can run, best first (always ends with ``"generic"``)."""
    return cpu_info()["supported"]


def set_isa(name: str) -> None:
    """Run lowbit's kernels on ``name`` ("avx512", "avxvnni", "avx2" or "generic") from now on in
    this process; a path the CPU does not support raises ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"set_isa: name must be one of {', '.join(ISAS)}, got {type(name).__name__}")
    _C.set_isa(name)


@contextlib.contextmanager
def use_isa(name: str):
    """Context manager: the kernels use ``name`` inside the block, the previous ISA after it."""
    previous = _C.cpu_info()["active"]
    set_isa(name)
    try:
        yield
    finally:
        _C.set_isa(previous)
