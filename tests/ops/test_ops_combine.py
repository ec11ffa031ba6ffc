"""mixda_fast::softmax_combine and its backward: kernel vs reference, gradcheck, opcheck,
torch.compile, argument errors and the backend switch (docs/design.md section 4, step 4)."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixda_fast.ops import _ext
from mixda_fast import ops
from mixda_fast.ops.reference import softmax_combine_ref

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason=f"no compiled kernels: {_ext.EXT_ERROR}")


def kernel(logits, experts):
    return torch.ops.mixda_fast.softmax_combine.default(logits, experts)


def kernel_backward(grad_out, logits, experts):
    return torch.ops.mixda_fast.softmax_combine_backward.default(grad_out, logits, experts)


def make_inputs(R, S, D, E, dtype=torch.float32, layout="contiguous", seed=0):
    """logits (R, E), experts (E, R, S, D); "transposed" and "sliced" give non-contiguous views."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        logits = torch.randn(R, E, generator=g)
        experts = torch.randn(E, R, S, D, generator=g)
    elif layout == "transposed":
        logits = torch.randn(E, R, generator=g).t()
        experts = torch.randn(R, E, S, D, generator=g).transpose(0, 1)
    elif layout == "sliced":
        logits = torch.randn(R, 2 * E + 1, generator=g)[:, 1::2]
        experts = torch.randn(E, R, S + 1, 2 * D + 1, generator=g)[:, :, 1:, ::2][..., :D]
    else:
        raise ValueError(layout)
    logits, experts = (3 * logits).to(dtype), experts.to(dtype)  # spread-out gate weights
    return logits, experts


@pytest.fixture
def backend():
    """Restores the backend after a test that changes it."""
    before = ops.get_backend()
    yield ops.set_backend
    ops.set_backend(before)


# (R, S, D, E): single row, single token, single expert, odd D (vector tails), D < one vector,
# D > two vectors, E up to 9, per-sequence (S > 1) and per-token (S = 1) gates.
SHAPES = [
    (1, 1, 1, 1), (1, 1, 7, 3), (1, 5, 17, 2), (3, 1, 33, 9), (2, 3, 64, 4), (5, 2, 8, 1),
    (4, 7, 1, 5), (6, 4, 100, 6), (2, 16, 768, 4), (64, 1, 40, 7), (3, 2, 15, 8),
]
LAYOUTS = ["contiguous", "transposed", "sliced"]


def _within_2x_reference_error(out, ref, oracle, atol=1e-3):
    """Kernel error vs the fp64 oracle at most 2x the reference's own (same dtype), plus atol."""
    err = (out.double() - oracle).abs().max().item()
    ref_err = (ref.double() - oracle).abs().max().item()
    assert err <= 2 * ref_err + atol, f"kernel error {err:.3g} vs reference error {ref_err:.3g}"


# ---- forward ---------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_fp32_matches_reference(shape, layout):
    logits, experts = make_inputs(*shape, layout=layout)
    out = kernel(logits, experts)
    assert out.shape == shape[:3] and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, softmax_combine_ref(logits, experts), rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES[:6], ids=str)
def test_forward_fp64_matches_reference(shape):
    logits, experts = make_inputs(*shape, dtype=torch.float64, layout="transposed")
    torch.testing.assert_close(kernel(logits, experts), softmax_combine_ref(logits, experts),
                               rtol=1e-12, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_16bit_within_2x_reference_error(shape, layout, dtype):
    logits, experts = make_inputs(*shape, dtype=dtype, layout=layout)
    out = kernel(logits, experts)
    assert out.dtype == dtype
    _within_2x_reference_error(out, softmax_combine_ref(logits, experts),
                 softmax_combine_ref(logits.double(), experts.double()))


@needs_kernels
@pytest.mark.parametrize("shape", [(0, 3, 8, 2), (2, 0, 8, 3), (2, 3, 0, 3)], ids=str)
def test_empty_shapes(shape):
    logits, experts = make_inputs(*shape)
    assert kernel(logits, experts).shape == shape[:3]
    grad_logits, grad_experts = kernel_backward(torch.ones(shape[:3]), logits, experts)
    assert grad_experts.shape == experts.shape
    torch.testing.assert_close(grad_logits, torch.zeros_like(logits))


@needs_kernels
@settings(max_examples=30, deadline=None)
@given(R=st.integers(1, 9), S=st.integers(1, 6), D=st.integers(1, 70), E=st.integers(1, 9),
       layout=st.sampled_from(LAYOUTS))
def test_forward_fp32_property(R, S, D, E, layout):
    logits, experts = make_inputs(R, S, D, E, layout=layout)
    torch.testing.assert_close(kernel(logits, experts), softmax_combine_ref(logits, experts),
                               rtol=1e-5, atol=1e-6)


# ---- backward --------------------------------------------------------------------------------

def _grads(fn, logits, experts, grad_out):
    logits = logits.detach().requires_grad_()
    experts = experts.detach().requires_grad_()
    out = fn(logits, experts)
    return torch.autograd.grad(out, (logits, experts), grad_out)


@needs_kernels
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_fp32_matches_reference_autograd(shape, layout):
    logits, experts = make_inputs(*shape, layout=layout)
    grad_out = torch.randn(shape[:3]).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
    (grad_logits, grad_experts) = _grads(kernel, logits, experts, grad_out)
    (ref_logits, ref_experts) = _grads(softmax_combine_ref, logits, experts, grad_out)
    assert grad_logits.dtype == torch.float32 and grad_experts.dtype == torch.float32
    torch.testing.assert_close(grad_experts, ref_experts, rtol=1e-5, atol=1e-6)
    # grad_logits sums S * D products in float32 on both sides (in different orders): allow the
    # sqrt(n) growth of rounding error, against the reference and against a float64 oracle.
    tol = dict(rtol=1e-5, atol=1e-6 * (shape[1] * shape[2]) ** 0.5)
    oracle = _grads(softmax_combine_ref, logits.double(), experts.double(), grad_out.double())[0]
    torch.testing.assert_close(grad_logits, ref_logits, **tol)
    torch.testing.assert_close(grad_logits.double(), oracle, **tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_16bit_within_2x_reference_error(shape, dtype):
    logits, experts = make_inputs(*shape, dtype=dtype, layout="sliced")
    grad_out = torch.randn(shape[:3]).to(dtype)
    got = _grads(kernel, logits, experts, grad_out)
    ref = _grads(softmax_combine_ref, logits, experts, grad_out)
    oracle = _grads(softmax_combine_ref, logits.double(), experts.double(), grad_out.double())
    for g, r, o in zip(got, ref, oracle):
        assert g.dtype == dtype
        _within_2x_reference_error(g, r, o)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 3), (3, 1, 9, 4)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_gradcheck_kernel(shape, layout):
    logits, experts = make_inputs(*shape, dtype=torch.float64, layout=layout)
    assert torch.autograd.gradcheck(kernel, (logits.requires_grad_(), experts.requires_grad_()))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 3)], ids=str)
def test_gradcheck_reference(shape):
    logits, experts = make_inputs(*shape, dtype=torch.float64, layout="sliced")
    assert torch.autograd.gradcheck(softmax_combine_ref, (logits.requires_grad_(), experts.requires_grad_()))


# ---- torch.library checks and torch.compile --------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [((2, 3, 5, 3), "contiguous"), ((4, 1, 17, 9), "sliced")], ids=str)
def test_opcheck(shape, layout, dtype):
    logits, experts = make_inputs(*shape, dtype=dtype, layout=layout)
    torch.library.opcheck(torch.ops.mixda_fast.softmax_combine.default,
                          (logits.requires_grad_(), experts.requires_grad_()))
    torch.library.opcheck(torch.ops.mixda_fast.softmax_combine.default, (logits.detach(), experts.detach()))
    grad_out = torch.randn(shape[:3]).to(dtype)
    torch.library.opcheck(torch.ops.mixda_fast.softmax_combine_backward.default,
                          (grad_out, logits.detach(), experts.detach()))


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_kernels), "torch"])
def test_compile_fullgraph(name, backend):
    backend(name)
    torch._dynamo.reset()

    def layer(logits, experts):
        return torch.tanh(ops.softmax_combine(logits, experts)).sum()

    compiled = torch.compile(layer, fullgraph=True)
    logits, experts = make_inputs(3, 4, 19, 5)
    got = _grads(compiled, logits, experts, torch.tensor(1.0))
    want = _grads(lambda l, x: torch.tanh(softmax_combine_ref(l, x)).sum(), logits, experts, torch.tensor(1.0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(logits, experts), layer(logits, experts), rtol=1e-5, atol=1e-5)


# ---- argument errors -------------------------------------------------------------------------

BAD_INPUTS = [
    # (logits shape, experts shape, dtypes, expected message part)
    ((2, 3, 1), (3, 2, 4, 5), (torch.float32,) * 2, r"logits must have shape \(R, E\), got a 3-d tensor"),
    ((2, 0), (0, 2, 4, 5), (torch.float32,) * 2, r"logits must have shape \(R, E\) with at least one expert"),
    ((2, 3), (3, 2, 5), (torch.float32,) * 2, r"experts must have shape \(E, R, S, D\), got a 3-d tensor"),
    ((2, 3), (4, 2, 4, 5), (torch.float32,) * 2,
     r"experts must have shape \(E, R, S, D\) with E = logits.size\(1\) = 3 and R = logits.size\(0\) = 2, "
     r"got \[4, 2, 4, 5\]"),
    ((2, 3), (3, 5, 4, 5), (torch.float32,) * 2, r"R = logits.size\(0\) = 2, got \[3, 5, 4, 5\]"),
    ((2, 3), (3, 2, 4, 5), (torch.float64, torch.float32), r"logits must have the same dtype as experts"),
    ((2, 3), (3, 2, 4, 5), (torch.int64,) * 2, r"experts must have dtype float32, float64, bfloat16 or float16"),
]


@pytest.mark.parametrize("name", [pytest.param("cpp", marks=needs_kernels), "torch"])
@pytest.mark.parametrize("logits_shape,experts_shape,dtypes,message", BAD_INPUTS,
                         ids=[m.split(" ")[0] + str(i) for i, (*_, m) in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_tensor(name, logits_shape, experts_shape, dtypes, message, backend):
    backend(name)
    logits = torch.zeros(logits_shape, dtype=dtypes[0])
    experts = torch.zeros(experts_shape, dtype=dtypes[1])
    with pytest.raises(RuntimeError, match=r"softmax_combine: .*" + message):
        ops.softmax_combine(logits, experts)


@needs_kernels
def test_backward_bad_grad_out():
    logits, experts = make_inputs(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match=r"softmax_combine_backward: grad_out must have shape \(R, S, D\) = "
                                           r"\[2, 3, 4\] \(experts.shape\[1:\]\), got \[2, 3, 5\]"):
        kernel_backward(torch.zeros(2, 3, 5), logits, experts)
    with pytest.raises(RuntimeError, match=r"grad_out must have the same dtype as experts"):
        kernel_backward(torch.zeros(2, 3, 4, dtype=torch.float64), logits, experts)


# ---- backend switch --------------------------------------------------------------------------

def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"set_backend\(name\) must be one of 'auto', 'cpp', 'torch', got 'nope'"):
        ops.set_backend("nope")


@pytest.mark.parametrize("name,expect_reference", [("torch", True), pytest.param("cpp", False, marks=needs_kernels),
                                                   pytest.param("auto", False, marks=needs_kernels)])
def test_backend_decides_kernel_or_reference(name, expect_reference, backend, monkeypatch):
    calls = []

    def counting_ref(logits, experts):
        calls.append(1)
        return softmax_combine_ref(logits, experts)

    monkeypatch.setattr(ops.combine, "softmax_combine_ref", counting_ref)   # where the wrapper looks it up
    backend(name)
    assert ops.get_backend() == name
    logits, experts = make_inputs(2, 3, 4, 5)
    torch.testing.assert_close(ops.softmax_combine(logits, experts), softmax_combine_ref(logits, experts),
                               rtol=1e-5, atol=1e-6)
    assert len(calls) == int(expect_reference)


def test_environment_variables():
    """MIXDA_FAST_BACKEND is validated at import; MIXDA_FAST_NO_EXT falls back to the reference."""
    env = dict(os.environ, MIXDA_FAST_BACKEND="bogus")
    run = subprocess.run([sys.executable, "-c", "import mixda_fast.ops"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "ValueError: environment variable MIXDA_FAST_BACKEND must be one of 'auto', 'cpp', 'torch', got 'bogus'" \
        in run.stderr

    script = """
import torch, pytest
from mixda_fast import ops; from mixda_fast.ops import _ext
from mixda_fast.ops.reference import softmax_combine_ref
assert not ops.kernels_available() and not _ext.EXT_AVAILABLE and _ext.built_devices() == []
assert "MIXDA_FAST_NO_EXT" in _ext.EXT_ERROR
with pytest.raises(RuntimeError, match="set_backend\\\\(name\\\\)='cpp' needs the compiled extension.*MIXDA_FAST_NO_EXT"):
    ops.set_backend("cpp")
l, x = torch.randn(2, 3), torch.randn(3, 2, 4, 5)
torch.testing.assert_close(ops.softmax_combine(l, x), softmax_combine_ref(l, x))
print("ok")
"""
    env = dict(os.environ, MIXDA_FAST_NO_EXT="1")
    env.pop("MIXDA_FAST_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_info_reports_extension():
    from mixda_fast.info import collect_info

    info = collect_info()
    assert info["extension built"] == _ext.EXT_AVAILABLE
    assert info["kernels for devices"] == _ext.built_devices()
    assert info["backend"] == ops.get_backend()
    if not _ext.EXT_AVAILABLE:
        assert any(_ext.EXT_ERROR in reason for reason in info["missing"])
    if torch.version.cuda is None:
        assert any("CPU build" in reason for reason in info["missing"])
