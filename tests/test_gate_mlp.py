"""The gate MLP op (mixda_fast::gate_mlp and its backward): the per-token gate's Linear/ReLU stack
in one op, computed in float32 for bf16 inputs on CPUs without native bf16 GEMMs. Kernel vs
reference over a property-based shape grid, gradcheck, opcheck, bad input, and the patched layer
using it exactly when the gate's dropout is inactive."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixda_fast as mf
from mixda_fast import _ext, ops
from mixda_fast.reference import gate_mlp_ref
from tiny_models import tiny_model

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason=f"no compiled kernels: {_ext.EXT_ERROR}")


def gate_inputs(N, widths, dtype=torch.float32, transposed=False, seed=0):
    """z (N, widths[0]) and the L = len(widths) - 1 layers' weights and biases."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, widths[0], generator=g, dtype=torch.float64)
    if transposed:
        z = z.t().contiguous().t()                         # same values, column-major storage
    ws = [torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5 for i, o in zip(widths, widths[1:])]
    bs = [torch.randn(o, generator=g, dtype=torch.float64) * 0.1 for o in widths[1:]]
    return z.to(dtype), [w.to(dtype) for w in ws], [b.to(dtype) for b in bs]


@needs_kernels
@settings(max_examples=120, deadline=None)
@given(N=st.integers(1, 40), widths=st.lists(st.integers(1, 33), min_size=2, max_size=5),
       transposed=st.booleans(), seed=st.integers(0, 3))
def test_fp32_kernel_matches_reference_property(N, widths, transposed, seed):
    z, ws, bs = gate_inputs(N, widths, transposed=transposed, seed=seed)
    logits, hidden = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs)
    want, want_hidden = gate_mlp_ref(z, ws, bs)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert len(hidden) == len(want_hidden)
    for a, b in zip(hidden, want_hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 24), widths=st.lists(st.integers(2, 40), min_size=2, max_size=5), seed=st.integers(0, 3))
def test_bf16_within_2x_reference_error_property(N, widths, seed):
    z, ws, bs = gate_inputs(N, widths, dtype=torch.bfloat16, seed=seed)
    oracle = gate_mlp_ref(z.double(), [w.double() for w in ws], [b.double() for b in bs])[0]
    out = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs)[0]
    ref = gate_mlp_ref(z, ws, bs)[0]
    assert out.dtype == torch.bfloat16
    err = (out.double() - oracle).abs().max().item()
    ref_err = (ref.double() - oracle).abs().max().item()
    assert err <= 2 * ref_err + 2 ** -8 * oracle.abs().max().item() + 1e-6, (err, ref_err)


@needs_kernels
@pytest.mark.parametrize("widths", [[5, 7, 3], [4, 2], [6, 5, 5, 5, 4]])
def test_gradcheck(widths):
    z, ws, bs = gate_inputs(3, widths, dtype=torch.float64)
    L = len(ws)
    params = [t.requires_grad_() for t in (z, *ws, *bs)]
    assert torch.autograd.gradcheck(lambda z, *p: ops.gate_mlp(z, list(p[:L]), list(p[L:])), params)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    z, ws, bs = gate_inputs(6, [8, 5, 5, 3], dtype=dtype)
    torch.library.opcheck(torch.ops.mixda_fast.gate_mlp.default,
                          (z.requires_grad_(), [w.requires_grad_() for w in ws], [b.requires_grad_() for b in bs]))
    logits, hidden = torch.ops.mixda_fast.gate_mlp.default(z.detach(), [w.detach() for w in ws], [b.detach() for b in bs])
    torch.library.opcheck(torch.ops.mixda_fast.gate_mlp_backward.default,
                          (torch.randn_like(logits), z.detach(), [w.detach() for w in ws], list(hidden)))


@needs_kernels
@pytest.mark.parametrize("change,message", [
    (lambda z, ws, bs: (z[0], ws, bs), "z must have shape (N, Din)"),
    (lambda z, ws, bs: (z, [], []), "L >= 1"),
    (lambda z, ws, bs: (z, ws, bs[:1]), "weights and biases must each hold"),
    (lambda z, ws, bs: (z, [ws[0][:, :3], ws[1]], bs), "weights[0] must have shape (out, 8)"),
    (lambda z, ws, bs: (z, [ws[0], ws[1].double()], bs), "weights[1] must have the dtype of z"),
    (lambda z, ws, bs: (z, ws, [bs[0][:2], bs[1]]), "biases[0] must have shape"),
    (lambda z, ws, bs: (z.int(), ws, bs), "z must have dtype"),
])
def test_bad_input_names_the_tensor(change, message):
    z, ws, bs = gate_inputs(4, [8, 5, 3])
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        torch.ops.mixda_fast.gate_mlp.default(*change(z, ws, bs))


@needs_kernels
def test_backward_bad_input_names_the_tensor():
    z, ws, bs = gate_inputs(4, [8, 5, 3])
    logits, hidden = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs)
    with pytest.raises(RuntimeError, match=r"hidden must hold L - 1 = 1 tensors"):
        torch.ops.mixda_fast.gate_mlp_backward.default(logits, z, ws, [])
    with pytest.raises(RuntimeError, match=r"grad_logits \(i = 1\) must have shape \(N, out\) = \[4, 3\]"):
        torch.ops.mixda_fast.gate_mlp_backward.default(logits[:, :2], z, ws, list(hidden))


def _token_layer(dropout):
    model = tiny_model("bert")
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, gate="token", gate_dropout=dropout))
    return model, mf.mixda_modules(model)[0]


def test_layer_uses_the_op_only_while_dropout_is_inactive(monkeypatch):
    model, layer = _token_layer(0.2)
    calls = []
    real = ops.gate_mlp
    monkeypatch.setattr(ops, "gate_mlp", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 4, layer.hidden_size)
    model.eval()
    layer(x)
    assert calls == [1]
    model.train()
    layer(x)
    assert calls == [1]                                 # dropout active: the eager gate ran
    model.eval()
    assert layer._fused_gate_params() is not None
    model.train()
    assert layer._fused_gate_params() is None           # dropout active: the eager gate
    layer.formulation = "paper"
    model.eval()
    assert layer._fused_gate_params() is None           # the eager reference stays eager
    model, layer = _token_layer(0.0)
    model.train()
    assert layer._fused_gate_params() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_gate_logits_match_the_eager_gate(dtype):
    model, layer = _token_layer(0.2)
    model.eval().to(dtype)
    z = torch.randn(2, 5, layer.intermediate_size, dtype=dtype)
    with torch.no_grad():
        got = layer.gate_logits(z)
        want = layer.gate(z)
    assert got.shape == (2, 5, 3) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
