"""What was built and why anything is missing: ``python -m mixda_fast.info``.

Prints the package and torch versions, torch's build and CPU capability, whether the compiled
extension loaded and for which devices, the current backend, and the reason behind every gap
(extension import error, CUDA skipped because torch is a CPU build or no GPU is visible).
"""

from __future__ import annotations

from typing import Any

import torch

from . import ops
from .version import __version__

__all__ = ["collect_info", "main"]


def collect_info() -> dict[str, Any]:
    """Everything ``python -m mixda_fast.info`` prints, as a dict."""
    ext = ops.extension_status()
    devices = ext["devices"]
    missing = []
    if not ext["available"]:
        missing.append(f"compiled extension: {ext['error']}")
    if torch.version.cuda is None:
        missing.append(f"CUDA kernels: torch {torch.__version__} is a CPU build (torch.version.cuda is None)")
    elif ext["available"] and "cuda" not in devices:
        missing.append("CUDA kernels: the extension was built without CUDA sources (no CUDA toolkit at build time?)")
    elif not torch.cuda.is_available():
        missing.append("CUDA kernels: no GPU visible (torch.cuda.is_available() is False)")
    return {
        "mixda_fast": __version__,
        "torch": torch.__version__,
        "torch build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU",
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "extension built": ext["available"],
        "extension CPU ISA": ext["cpu_isa"],
        "kernels for devices": devices,
        "backend": ops.get_backend(),
        "missing": missing,
    }


def main() -> None:
    info = collect_info()
    missing = info.pop("missing")
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) or "none"
        print(f"{key:<{width}}  {value}")
    for reason in missing:
        print(f"missing: {reason}")


if __name__ == "__main__":
    main()
