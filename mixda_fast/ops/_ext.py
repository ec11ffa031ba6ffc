"""Guarded load of the compiled extension ``mixda_fast._C`` (the xformers ``_cpp_lib`` pattern).

Importing ``mixda_fast._C`` loads the shared library whose static initializers register the ops
under ``torch.ops.mixda_fast``. When it cannot be loaded the package still works on the
pure-torch references; this module remembers why, so ``mixda_fast.ops`` and
``python -m mixda_fast.info`` can say so instead of failing later with a bare AttributeError.

- ``EXT_AVAILABLE``: the ops are registered.
- ``EXT_ERROR``: why not (None when available).
- ``EXT_CPU_ISA``: vector ISA the CPU kernels were compiled for ("avx2", "avx512", "default").
- ``built_devices()``: torch device types ("cpu", "cuda") that have kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import re
from typing import Optional

import torch

__all__ = ["EXT_AVAILABLE", "EXT_ERROR", "EXT_CPU_ISA", "NO_EXT_ENV", "built_devices"]

NO_EXT_ENV = "MIXDA_FAST_NO_EXT"
_PROBE_OP = "mixda_fast::softmax_combine"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# /proc/cpuinfo flags an x86 CPU needs for each ISA the CPU kernels may be compiled for: setup.py
# builds "avx2" with -mavx2 -mfma -mf16c; "avx512" comes only from MIXDA_FAST_CPU_ARCH=native
# builds, which are meant for the build machine alone.
_ISA_CPU_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
}


def _compiled_isa(so_path: str) -> Optional[str]:
    """The ISA recorded in the library by csrc/cpu/combine.cpp, read without loading it."""
    try:
        with open(so_path, "rb") as f:
            m = re.search(rb"mixda_fast_cpu_isa=(\w+)", f.read())
    except OSError:
        return None
    return m.group(1).decode() if m else None


def _isa_problem(isa: Optional[str]) -> Optional[str]:
    """Why this CPU cannot run code compiled for ``isa`` (None if it can, or if we cannot tell)."""
    if isa not in _ISA_CPU_FLAGS or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags_line = next((line for line in f if line.startswith("flags")), "")
    except OSError:  # not Linux: trust torch's own detection instead
        have = torch.backends.cpu.get_cpu_capability()
        ok = have in ("AVX512", "AVX512_BF16", "AMX") if isa == "avx512" else have != "DEFAULT"
        return None if ok else f"the CPU kernels were compiled for {isa} but torch reports CPU capability {have}"
    flags = set(flags_line.split(":", 1)[-1].split())
    missing = [flag for flag in _ISA_CPU_FLAGS[isa] if flag not in flags]
    if not missing:
        return None
    return (f"the CPU kernels were compiled for {isa} but this CPU lacks {', '.join(missing)}; "
            f"rebuild with MIXDA_FAST_CPU_ARCH=baseline for a portable build")


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, dispatch_key)
    except RuntimeError:  # the op itself is not registered
        return False


def _load() -> tuple[Optional[str], Optional[str]]:
    """(compiled ISA, None) on success, (None, reason) on failure."""
    if os.environ.get(NO_EXT_ENV, "0") not in ("", "0"):
        return None, f"{NO_EXT_ENV}={os.environ[NO_EXT_ENV]} is set, so the compiled extension is not loaded"
    spec = importlib.util.find_spec("mixda_fast._C")
    if spec is None or spec.origin is None:
        return None, ("mixda_fast._C is not built (installed with MIXDA_FAST_NO_EXT=1, or from a source tree "
                      "without building it): run `pip install --no-build-isolation -e .`")
    isa = _compiled_isa(spec.origin)
    problem = _isa_problem(isa)
    if problem is not None:
        return None, problem
    try:
        importlib.import_module("mixda_fast._C")
    except (ImportError, OSError) as e:
        return None, (f"importing mixda_fast._C failed: {e} (the extension must be rebuilt for every torch "
                      f"version; this is torch {torch.__version__})")
    if not _has_kernel("CPU"):
        return None, f"mixda_fast._C loaded but registered no CPU kernel for {_PROBE_OP}"
    return isa or "unknown", None


EXT_CPU_ISA, EXT_ERROR = _load()
EXT_AVAILABLE: bool = EXT_ERROR is None


def built_devices() -> list[str]:
    """Device types ("cpu", "cuda") for which the dispatcher has a compiled kernel."""
    if not EXT_AVAILABLE:
        return []
    return [device for device, key in _DISPATCH_KEYS.items() if _has_kernel(key)]
