"""The MixDA ops: each runs the compiled kernel (``torch.ops.mixda_fast``, built into
``mixda_fast._C``) or its pure-torch reference. Layer code calls them through this package
(``ops.gate_mlp(...)``, so a test can replace one here) and never branches on the backend.

- ``backend``: the process-wide choice of kernels or references (``set_backend``, environment
  variable ``MIXDA_FAST_BACKEND``), autocast handling and ``check_devices``.
- ``combine`` (``softmax_combine``), ``ffn`` (``ffn_in``, ``mixda_out``), ``gate`` (``gate_mlp``,
  ``dropout_seed``): one module per op family, each wrapper beside the fake (meta) impl and
  autograd formula of its compiled op (the pytorch/extension-cpp layout), so
  ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` accept the ops. Importing
  this package registers them all, once, and only when the extension is loaded.
- ``packed``: ``packed_rows``, the mirror of csrc/packed_rows.h.
- ``activations``: the activation codes of ``ffn_in`` (the table of csrc/activations.h), the
  code of a host activation module (``activation_code``) and ``act_ref``.
- ``reference``: the pure-torch ``*_ref`` of every op; ``philox``: its dropout masks;
  ``_ext``: the guarded load of the extension.
"""

from __future__ import annotations

from . import _ext  # noqa: F401  (the loader; ``mixda_fast.ops._ext`` for tests)
from .backend import (BACKEND_ENV, BACKENDS, check_devices, extension_status, get_backend, kernels_available,
                      runs_kernels_for, set_backend)
from .combine import softmax_combine
from .ffn import ffn_in, mixda_out
from .gate import dropout_seed, gate_mlp
from .packed import packed_rows
from .reference import ffn_in_ref, gate_mlp_ref, mixda_out_ref, softmax_combine_ref

__all__ = ["BACKENDS", "BACKEND_ENV", "set_backend", "get_backend", "kernels_available", "extension_status",
           "runs_kernels_for", "check_devices", "softmax_combine", "ffn_in", "mixda_out", "gate_mlp",
           "dropout_seed", "packed_rows", "softmax_combine_ref", "ffn_in_ref", "mixda_out_ref", "gate_mlp_ref"]
