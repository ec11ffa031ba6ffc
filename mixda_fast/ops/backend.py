"""The one place that chooses between the compiled kernels and the pure-torch references.

The backend is process-wide:

- ``"auto"`` (default): the kernels where the extension has one for the tensors' device, else
  the reference.
- ``"cpp"``: the same, but asking for it without a built extension is an error.
- ``"torch"``: always the pure-torch reference (``mixda_fast.ops.reference``).

Initial value from the environment variable ``MIXDA_FAST_BACKEND``; change it with
``set_backend``. Every op wrapper asks ``runs_kernels_for`` and branches on the answer: a plain
Python branch on this module's globals, so ``torch.compile`` traces it, guards on it and
recompiles when it changes. Also here: the autocast handling shared by every op
(``autocast_inputs`` for the wrappers, ``autocast_off`` for the backwards) and
``check_devices``.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from . import _ext

__all__ = ["BACKENDS", "BACKEND_ENV", "set_backend", "get_backend", "kernels_available", "extension_status",
           "runs_kernels_for", "autocast_inputs", "autocast_off", "check_devices"]

BACKENDS = ("auto", "cpp", "torch")
BACKEND_ENV = "MIXDA_FAST_BACKEND"

# Device types with compiled kernels, fixed once the extension is loaded.
_KERNEL_DEVICES = frozenset(_ext.built_devices())


def _resolve(name: str, what: str) -> bool:
    """Validate a backend name (``what`` names where it came from); True if it selects the kernels."""
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    if name == "cpp" and not _ext.EXT_AVAILABLE:
        raise RuntimeError(f"{what}={name!r} needs the compiled extension mixda_fast._C, "
                           f"which is not available: {_ext.EXT_ERROR}")
    return name != "torch" and _ext.EXT_AVAILABLE


_backend: str = os.environ.get(BACKEND_ENV, "auto")                       # what was asked for
_use_kernels: bool = _resolve(_backend, f"environment variable {BACKEND_ENV}")  # what the ops read


def set_backend(name: str) -> None:
    """Choose the implementation of every op: "auto", "cpp" (compiled kernels) or "torch" (reference)."""
    global _backend, _use_kernels
    _use_kernels = _resolve(name, "set_backend(name)")
    _backend = name


def extension_status() -> dict:
    """What the compiled extension gives: ``available``, ``error`` (why not; None when
    available), ``cpu_isa`` (the vector ISA its CPU kernels were compiled for) and ``devices``
    (device types with kernels). ``python -m mixda_fast.info`` prints it."""
    return {"available": _ext.EXT_AVAILABLE, "error": _ext.EXT_ERROR, "cpu_isa": _ext.EXT_CPU_ISA,
            "devices": sorted(_KERNEL_DEVICES)}


def get_backend() -> str:
    """The backend name last set ("auto", "cpp" or "torch")."""
    return _backend


def kernels_available() -> bool:
    """True when the compiled extension is loaded and has kernels for at least one device."""
    return _ext.EXT_AVAILABLE and bool(_KERNEL_DEVICES)


def runs_kernels_for(t: Tensor) -> bool:
    """True when the ops, called with tensors on ``t``'s device, run the compiled kernels (the
    backend allows them and the extension has kernels for that device), not the references."""
    return _use_kernels and t.device.type in _KERNEL_DEVICES


def _autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype of ``t``'s device when autocast is on there, else None."""
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _cast(value, dtype: torch.dtype):
    """Floating tensors other than float64 (in lists too) to ``dtype``: what autocast does to the
    inputs of ``nn.Linear``."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != torch.float64 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def autocast_inputs(fn):
    """Under autocast the ops compute in its dtype, as ``nn.Linear`` does: floating inputs are
    cast to it and the op runs with autocast off (the kernels' own GEMMs must not be cast again)."""
    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs):
        dtype = _autocast_dtype(first)
        if dtype is None:
            return fn(first, *args, **kwargs)
        with torch.autocast(first.device.type, enabled=False):
            return fn(*_cast((first, *args), dtype), **{k: _cast(v, dtype) for k, v in kwargs.items()})
    return wrapper


def autocast_off(backward):
    """An autograd backward run with autocast off (a backward called inside an autocast region
    would otherwise cast the kernels' GEMMs)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        t = next((g for g in grads if isinstance(g, Tensor)), None)
        if t is None or _autocast_dtype(t) is None:
            return backward(ctx, *grads)
        with torch.autocast(t.device.type, enabled=False):
            return backward(ctx, *grads)
    return wrapper


def check_devices(op: str, **tensors) -> None:
    """Raise one clear RuntimeError when the tensor arguments (tensors, lists of tensors or None)
    are not all on one device, naming the first argument off the device of the others: a kernel
    given a meta tensor beside real ones would otherwise run the op's fake (uninitialised memory).
    All-meta inputs (``torch.compile`` tracing, a model on meta) pass."""
    named = [(f"{k}[{i}]" if isinstance(v, (list, tuple)) else k, t)
             for k, v in tensors.items() for i, t in enumerate(v if isinstance(v, (list, tuple)) else [v])
             if isinstance(t, Tensor)]
    devices = [t.device for _, t in named]
    if len(set(devices)) <= 1:
        return
    real = [d for d in devices if d.type != "meta"] or devices
    expected = max(set(real), key=real.count)
    name, t = next((n, t) for n, t in named if t.device != expected)
    raise RuntimeError(f"{op}: {name}.device={t.device} is not accepted: expected {expected}, the device of "
                       "the other tensor arguments (meta only when every input is on meta)")
