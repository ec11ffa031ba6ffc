"""The gate MLP op (mixda_fast::gate_mlp and its backward): the per-token gate's Linear/ReLU stack,
with its dropout, in one op, computed in float32 for bf16 inputs on CPUs without native bf16
GEMMs. Kernel vs reference (the same counter-based dropout masks, bit for bit) over a
property-based shape grid, the masks' statistics, gradcheck, opcheck, bad input, and the patched
layer using it in eval and in training."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixda_fast as mf
from mixda_fast.ops import _ext
from mixda_fast import ops
from mixda_fast.ops.philox import dropout_keep, philox4x32_10
from mixda_fast.ops.reference import gate_mlp_ref
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
       transposed=st.booleans(), seed=st.integers(0, 3), p=st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]),
       key=st.integers(-2 ** 63, 2 ** 63 - 1))
def test_fp32_kernel_matches_reference_property(N, widths, transposed, seed, p, key):
    z, ws, bs = gate_inputs(N, widths, transposed=transposed, seed=seed)
    key = torch.tensor(key)
    logits, hidden = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs, p, key)
    want, want_hidden = gate_mlp_ref(z, ws, bs, p, key)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert len(hidden) == len(want_hidden)
    for a, b in zip(hidden, want_hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 24), widths=st.lists(st.integers(2, 40), min_size=2, max_size=5), seed=st.integers(0, 3),
       p=st.sampled_from([0.0, 0.2]))
def test_bf16_within_2x_reference_error_property(N, widths, seed, p):
    z, ws, bs = gate_inputs(N, widths, dtype=torch.bfloat16, seed=seed)
    key = torch.tensor(seed + 7)
    oracle = gate_mlp_ref(z.double(), [w.double() for w in ws], [b.double() for b in bs], p, key)[0]
    out = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs, p, key)[0]
    ref = gate_mlp_ref(z, ws, bs, p, key)[0]
    assert out.dtype == torch.bfloat16
    err = (out.double() - oracle).abs().max().item()
    ref_err = (ref.double() - oracle).abs().max().item()
    assert err <= 2 * ref_err + 2 ** -8 * oracle.abs().max().item() + 1e-6, (err, ref_err)


@needs_kernels
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("widths", [[5, 7, 3], [4, 2], [6, 5, 5, 5, 4]])
def test_gradcheck(widths, p):
    z, ws, bs = gate_inputs(3, widths, dtype=torch.float64)
    L, key = len(ws), torch.tensor(11)
    params = [t.requires_grad_() for t in (z, *ws, *bs)]
    assert torch.autograd.gradcheck(lambda z, *w: ops.gate_mlp(z, list(w[:L]), list(w[L:]), p, key), params)
    # and without z's gradient (its GEMM skipped): the weights' gradients alone
    z.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda *w: ops.gate_mlp(z, list(w[:L]), list(w[L:]), p, key), params[1:])


@needs_kernels
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype, p):
    z, ws, bs = gate_inputs(6, [8, 5, 5, 3], dtype=dtype)
    key = torch.tensor(3) if p else None
    torch.library.opcheck(torch.ops.mixda_fast.gate_mlp.default,
                          (z.requires_grad_(), [w.requires_grad_() for w in ws], [b.requires_grad_() for b in bs], p, key))
    logits, hidden = torch.ops.mixda_fast.gate_mlp.default(z.detach(), [w.detach() for w in ws], [b.detach() for b in bs],
                                                           p, key)
    for grad_z in (True, False):
        torch.library.opcheck(torch.ops.mixda_fast.gate_mlp_backward.default,
                              (torch.randn_like(logits), z.detach(), [w.detach() for w in ws], list(hidden), p, key,
                               grad_z))


@needs_kernels
@pytest.mark.parametrize("change,message", [
    (lambda z, ws, bs: (z[0], ws, bs), "z must have shape (N, Din)"),
    (lambda z, ws, bs: (z, [], []), "L >= 1"),
    (lambda z, ws, bs: (z, ws, bs[:1]), "weights and biases must each hold"),
    (lambda z, ws, bs: (z, [ws[0][:, :3], ws[1]], bs), "weights[0] must have shape (out, 8)"),
    (lambda z, ws, bs: (z, [ws[0], ws[1].double()], bs), "weights[1] must have the dtype of z"),
    (lambda z, ws, bs: (z, ws, [bs[0][:2], bs[1]]), "biases[0] must have shape"),
    (lambda z, ws, bs: (z.int(), ws, bs), "z must have dtype"),
    (lambda z, ws, bs: (z, ws, bs, 1.0, torch.tensor(1)), "p (the dropout probability) must be in [0, 1), got 1"),
    (lambda z, ws, bs: (z, ws, bs, -0.1, torch.tensor(1)), "p (the dropout probability) must be in [0, 1), got -0.1"),
    (lambda z, ws, bs: (z, ws, bs, 0.2), "seed must be given when p > 0"),
    (lambda z, ws, bs: (z, ws, bs, 0.2, torch.tensor(1.0)), "seed must be one int64 on the CPU, got [] Float"),
    (lambda z, ws, bs: (z, ws, bs, 0.2, torch.tensor([1, 2])), "seed must be one int64 on the CPU, got [2] Long"),
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


@pytest.fixture
def backend():
    before = ops.get_backend()
    yield ops.set_backend
    ops.set_backend(before)


def _token_layer(dropout):
    model = tiny_model("bert")
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, gate="token", gate_dropout=dropout))
    return model, mf.mixda_modules(model)[0]


@needs_kernels
def test_layer_uses_the_op_in_eval_and_in_training(monkeypatch, backend):
    model, layer = _token_layer(0.2)
    calls = []
    real = ops.gate_mlp
    monkeypatch.setattr(ops, "gate_mlp", lambda *a: calls.append(a[3]) or real(*a))
    x = torch.randn(2, 4, layer.hidden_size)
    model.eval()
    layer(x)
    model.train()
    layer(x).sum().backward()
    assert calls == [0.0, 0.2]                          # dropout off in eval, the gate's p in training
    assert all(p.grad is not None for p in layer.gate.parameters())
    backend("torch")                                    # no kernels: nn.Dropout beats the reference's masks
    layer(x)
    assert len(calls) == 2
    model.eval()
    layer(x)
    assert calls[2:] == [0.0]
    layer.formulation = "paper"
    assert layer._fused_gate_params() is None           # the eager reference stays eager


def test_fused_gate_params_need_the_layout_and_one_p():
    model, layer = _token_layer(0.2)
    model.train()
    ws, bs, p = layer._fused_gate_params()
    assert p == 0.2 and len(ws) == len(bs) == 4
    layer.gate[3].p = 0.3                                # dropouts disagree: the eager gate
    assert layer._fused_gate_params() is None
    layer.gate[3].p = 0.2
    layer.gate[0].eval()                                # one dropout off, the others on
    assert layer._fused_gate_params() is None
    layer.gate[0].train()
    for d in list(layer.gate)[0::3]:
        d.p = 1.0                                        # nn.Dropout takes p = 1, the op does not
    assert layer._fused_gate_params() is None
    layer(torch.randn(2, 3, layer.hidden_size))          # the eager gate runs it
    layer.gate[2] = torch.nn.GELU()                      # not the layout the op computes
    assert layer._fused_gate_params() is None
    model, layer = _token_layer(0.0)
    model.train()
    assert layer._fused_gate_params()[2] == 0.0


@needs_kernels
def test_layer_training_gate_is_the_reference_with_the_drawn_seed():
    model, layer = _token_layer(0.3)
    model.train()
    z = torch.randn(3, 5, layer.intermediate_size)
    ws, bs, p = layer._fused_gate_params()
    torch.manual_seed(4)
    got = layer.gate_logits(z)
    again = (torch.manual_seed(4), layer.gate_logits(z))[1]
    torch.manual_seed(4)
    key = ops.dropout_seed()                             # what the layer drew
    want = gate_mlp_ref(z.reshape(15, -1), ws, bs, p, key)[0].view(3, 5, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)   # torch.manual_seed reproduces the masks
    assert not torch.allclose(layer.gate_logits(z), got)   # a new draw, new masks
    model.eval()
    assert not torch.allclose(layer.gate_logits(z), got)


def _kernel_masks(N, W, p, key):
    """The kernel's keep masks of z (layer 0) and of the first hidden activation (layer 1) for
    (N, W) activations, read through identity Linears on ones: logits are 1 / (1 - p) where kept,
    hidden[0] is nonzero where both masks keep."""
    z = torch.ones(N, W, dtype=torch.float64)
    eye, zero = torch.eye(W, dtype=torch.float64), torch.zeros(W, dtype=torch.float64)
    logits, hidden = torch.ops.mixda_fast.gate_mlp.default(z, [eye, eye], [zero, zero], p, torch.tensor(key))
    first = torch.ops.mixda_fast.gate_mlp.default(z, [eye], [zero], p, torch.tensor(key))[0]
    assert set(first.unique().tolist()) <= {0.0, 1 / (1 - p)}
    return first != 0, hidden[0] != 0


@needs_kernels
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_masks_are_the_reference_and_keep_one_minus_p_independently(p):
    N, W, key = 400, 500, 12345
    k0, k01 = _kernel_masks(N, W, p, key)
    ref0, ref1 = dropout_keep((N, W), p, key, 0), dropout_keep((N, W), p, key, 1)
    assert torch.equal(k0, ref0) and torch.equal(k01, ref0 & ref1)
    n, sigma = N * W, (p * (1 - p) / (N * W)) ** 0.5
    assert abs(ref0.double().mean().item() - (1 - p)) < 5 * sigma
    for other in (ref1, dropout_keep((N, W), p, key + 1, 0)):   # other layer, other seed: independent
        assert abs((ref0 & other).double().mean().item() - (1 - p) ** 2) < 5 * sigma
    # neighbours (within a Philox call and across calls) are uncorrelated too
    assert abs((ref0[:, 1:] & ref0[:, :-1]).double().mean().item() - (1 - p) ** 2) < 5 * sigma
    assert torch.equal(_kernel_masks(N, W, p, key)[0], k0)      # a function of the seed


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10 (kat_vectors)."""
    def words(ctr, key):
        return [int(w) for w in philox4x32_10(*(torch.tensor([c]) for c in ctr), *key)]
    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert words((ones,) * 4, (ones, ones)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@needs_kernels
def test_non_finite_activations_propagate_as_in_the_reference():
    """A dropped inf or nan gives nan (times 0, as nn.Dropout), ReLU keeps nan (as torch.relu)."""
    z, ws, bs = gate_inputs(6, [8, 8, 3])
    z[0, :4], z[1, :4] = float("inf"), float("nan")
    ws[0] = torch.eye(8)
    bs[0][:] = 0
    key = torch.tensor(5)
    for p in (0.0, 0.5):
        got = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs, p, key)
        want = gate_mlp_ref(z, ws, bs, p, key)
        torch.testing.assert_close(got[1][0], want[1][0], equal_nan=True)
        assert got[1][0][:2].isnan().any()
        torch.testing.assert_close(got[0], want[0], equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_with_dropout_on_two_threads_matches_the_reference(dtype):
    """Large enough for at::parallel_for to split the dropout passes off tile boundaries. bf16:
    the kernel's gradients (float32 compute) within twice the error of the bf16 reference
    against a float64 oracle on the same values (near-zero pre-activations flip ReLU's mask
    between precisions, so errors are compared, not values)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z, ws, bs = gate_inputs(701, [67, 45, 5], dtype=dtype)
        key, gy = torch.tensor(2 ** 40 + 3), torch.randn(701, 5, dtype=dtype)
        grads = []
        for fn, dt in ((ops.gate_mlp, dtype), (lambda *a: gate_mlp_ref(*a)[0], dtype),
                       (lambda *a: gate_mlp_ref(*a)[0], torch.float64)):
            leaves = [t.detach().to(dt).clone().requires_grad_() for t in (z, *ws, *bs)]
            fn(leaves[0], leaves[1:3], leaves[3:], 0.3, key).backward(gy.to(dt))
            grads.append([t.grad.double() for t in leaves])
    finally:
        torch.set_num_threads(before)
    for got, ref, oracle in zip(*grads):
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        else:
            assert (got - oracle).norm() <= 2 * (ref - oracle).norm() + 1e-3 * oracle.norm()


def test_dropout_seed_is_a_cpu_int64_whatever_the_default_device():
    with torch.device("meta"):
        key = ops.dropout_seed()
    assert key.device.type == "cpu" and key.dtype == torch.int64 and key.numel() == 1


@needs_kernels
def test_dropout_masks_do_not_depend_on_threads():
    before = torch.get_num_threads()
    try:
        z, ws, bs = gate_inputs(300, [400, 64, 5])
        key = torch.tensor(-99)
        torch.set_num_threads(1)
        one = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs, 0.5, key)
        torch.set_num_threads(2)
        two = torch.ops.mixda_fast.gate_mlp.default(z, ws, bs, 0.5, key)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one[1][0], two[1][0], rtol=0, atol=0)
    torch.testing.assert_close(one[0], two[0])


@needs_kernels
def test_compiled_training_step_matches_eager_without_graph_breaks():
    model, layer = _token_layer(0.2)
    model.train()
    x = torch.randn(2, 6, layer.hidden_size)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.manual_seed(9)
    want = layer(x)
    want.sum().backward()
    want_grads = [p.grad.clone() for p in layer.gate.parameters()]
    layer.zero_grad()
    torch.manual_seed(9)
    got = compiled(x)                                    # aot_eager draws the seed from torch's generator
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip((p.grad for p in layer.gate.parameters()), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


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
