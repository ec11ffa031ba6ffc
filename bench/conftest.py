"""pytest-benchmark suites of the MixDA layer (run on purpose: ``pytest bench/``; never by CI).

Cases estimated to take more than half a second per call on this kind of machine (2 cores,
AVX2, no AVX-512/AMX: bf16 8x128 and every bf16 training step, the larger fp32 shapes) carry the
marker ``huge``, and the ``torch.compile`` contender at K != 4 (one ~25 s cold compile per case)
carries ``compile``. Both are skipped unless ``--bench-full`` is given or the run selects tests
itself with ``-k`` or ``-m`` (then it gets exactly what it asked for).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", default=False,
                     help="run every case of the grid, including the ones marked huge / compile")


def pytest_configure(config):
    config.addinivalue_line("markers", "huge: a benchmark case estimated at > 0.5 s per call")
    config.addinivalue_line("markers", "compile: the torch.compile contender at K != 4 (slow to compile)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-full") or config.option.keyword or config.option.markexpr:
        return
    skip = pytest.mark.skip(reason="slow case: run with --bench-full, or select it with -k / -m")
    for item in items:
        if "huge" in item.keywords or "compile" in item.keywords:
            item.add_marker(skip)
