"""Fixtures shared by the test files."""

import os
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fused_op_calls(monkeypatch) -> list:
    """Spies on ``mixda_fast.ops.mixda_out``, the fused op of every MixDA layer's fused path: a
    list that fills with, per call, whether the compiled kernels ran it (else the reference)."""
    from mixda_fast import ops

    seen, op = [], ops.mixda_out

    def spy(h, *args):
        seen.append(ops.runs_kernels_for(h))
        return op(h, *args)

    monkeypatch.setattr(ops, "mixda_out", spy)
    return seen

# Property tests draw the same examples on every run (CI must not fail by the luck of the draw);
# HYPOTHESIS_PROFILE=explore searches new ones, as a development session should.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("default", derandomize=True)
_hyp_settings.register_profile("explore", derandomize=False)
_hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
