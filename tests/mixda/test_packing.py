"""The fused path never computes with stale weights: after any change to a parameter (optimizer
step, in-place write through ``.data``, a new Parameter object, ``load_state_dict``, ``.to``)
the patched layer's output follows, in inference mode and under autograd alike.

Packed weights: ``MixDAFFN.pack_adapters`` (run at patch time and again by the first forward
after a parameter was replaced) makes the K down-projection weights and biases views of one
buffer each, like ``nn.LSTM.flatten_parameters``; the kernel then runs them as one GEMM. In-place
changes, even ``p.data.add_()`` (which bumps no version counter, so a cache keyed on
``Tensor._version`` would miss it), land in that buffer. Host weights and 16-bit -> float32
copies are read from the live parameters on every call. These tests cover all of it."""

import pytest
import torch

import mixda_fast as mf
from mixda_fast import ops
from tiny_models import tiny_model


def _layer(family="llama", dtype=torch.float32, **cfg):
    model = tiny_model(family).to(dtype)
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, adapter_init="normal", gate_dropout=0.0, **cfg))
    layer = mf.mixda_modules(model)[0]
    return model, layer


def _paper(layer, x):
    """The eager paper form on the layer's current parameters: the oracle."""
    before = layer.formulation
    layer.formulation = "paper"
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.formulation = before


def _fused(layer, x, mode):
    assert layer.formulation == "fused"
    if mode == "inference":
        with torch.inference_mode():
            return layer(x).clone()
    if mode == "no_grad":
        with torch.no_grad():
            return layer(x)
    return layer(x).detach()


def _check(layer, x, mode, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(_fused(layer, x, mode), _paper(layer, x), **tol)


MODES = ["inference", "no_grad", "grad"]


@pytest.mark.parametrize("family", ["llama", "bert"])    # bert: W2 and b2 packed with the adapters
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_changes_are_seen(mode, dtype, family):
    model, layer = _layer(family=family, dtype=dtype)
    x = torch.randn(2, 5, layer.hidden_size, dtype=dtype)
    _check(layer, x, mode, dtype)
    first = _fused(layer, x, mode)
    ad = layer.adapters["domain_1"]
    changes = [
        lambda: ad.down.weight.data.add_(0.5),                 # .data: no version bump
        lambda: ad.up.weight.data.mul_(-2.0),
        lambda: ad.up.bias.data.add_(1.0),
        lambda: ad.down.bias.data.add_(0.25),
        lambda: layer.host.down.weight.data.mul_(1.5),           # host W2
        lambda: layer.host.down.bias.data.add_(0.5) if layer.host.down.bias is not None else None,
        lambda: (layer.host.up if layer.host.up is not None else layer.host.first).weight.data.add_(0.1),  # host W_up
        lambda: layer.gate[-1].bias.data.add_(torch.arange(3.0, dtype=dtype)),
    ]
    for change in changes:
        change()
        _check(layer, x, mode, dtype)
    assert not torch.equal(first, _fused(layer, x, mode))
    assert layer.adapters_packed(host=True) and layer.adapters_packed()
    assert (family == "bert") == (len(layer._pack_members(host=True)[0]) == len(layer.adapters) + 1)


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_step_is_seen(mode):
    model, layer = _layer(gate="token")
    mf.mark_trainable(model, "domain")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 5, layer.hidden_size)
    for _ in range(3):
        _check(layer, x, mode, torch.float32)
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    _check(layer, x, mode, torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_replaced_parameters_and_load_state_dict_are_seen(mode):
    model, layer = _layer(family="bert")
    x = torch.randn(2, 5, layer.hidden_size)
    _check(layer, x, mode, torch.float32)
    ad = layer.adapters["domain_0"]
    ad.up.weight = torch.nn.Parameter(torch.randn_like(ad.up.weight))          # a new Parameter object
    _check(layer, x, mode, torch.float32)
    layer.adapters["domain_1"].down = torch.nn.Linear(layer.intermediate_size, layer.bottleneck)  # a new module
    _check(layer, x, mode, torch.float32)
    state = {k: torch.randn_like(v) * 0.1 for k, v in layer.adapters.state_dict().items()}
    layer.adapters.load_state_dict(state)
    _check(layer, x, mode, torch.float32)
    layer.host.down.weight = torch.nn.Parameter(layer.host.down.weight.detach() * 2)   # host W2 replaced
    _check(layer, x, mode, torch.float32)


def test_dtype_change_is_seen():
    model, layer = _layer()
    x = torch.randn(2, 5, layer.hidden_size)
    want = _fused(layer, x, "inference")
    model.to(torch.bfloat16)
    got = _fused(layer, x.bfloat16(), "inference")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
    model.to(torch.float32)
    torch.testing.assert_close(_fused(layer, x, "inference"), want, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not ops.kernels_available(), reason="no compiled kernels")
def test_same_result_as_the_torch_backend_after_changes():
    model, layer = _layer()
    x = torch.randn(3, 4, layer.hidden_size)
    before = ops.get_backend()
    try:
        for step in range(3):
            with torch.no_grad():
                for p in layer.adapters.parameters():
                    p.data.add_(0.1 * (step + 1))
            outs = []
            for name in ("cpp", "torch"):
                ops.set_backend(name)
                outs.append(_fused(layer, x, "inference"))
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    finally:
        ops.set_backend(before)


def _addmm_calls(layer, x) -> int:
    with torch.profiler.profile() as prof, torch.no_grad():
        layer(x)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::addmm")


@pytest.mark.skipif(not ops.kernels_available(), reason="no compiled kernels")
def test_a_replaced_parameter_runs_unpacked_until_packed_again():
    model, layer = _layer(family="bert")
    K = len(layer.adapters)
    x = torch.randn(2, 5, layer.hidden_size)
    assert layer.adapters_packed()
    flat = ops.packed_rows([a.down.weight for a in layer.adapters.values()])
    assert flat is not None and flat.shape == (K * layer.bottleneck, layer.intermediate_size)
    packed_calls = _addmm_calls(layer, x)
    ad = layer.adapters["domain_0"]
    ad.down.weight = torch.nn.Parameter(ad.down.weight.detach() + 0.5)   # not a view of the buffer
    assert not layer.adapters_packed()
    want = _paper(layer, x)
    torch.testing.assert_close(_fused(layer, x, "no_grad"), want, rtol=1e-5, atol=1e-5)
    assert not layer.adapters_packed()                        # a forward never repacks (threads share it)
    assert _addmm_calls(layer, x) > packed_calls
    assert layer.pack_for_forward()
    assert layer.adapters_packed() and _addmm_calls(layer, x) == packed_calls
    torch.testing.assert_close(_fused(layer, x, "no_grad"), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ops.kernels_available(), reason="no compiled kernels")
def test_op_takes_one_gemm_for_packed_and_k_for_separate_weights():
    torch.manual_seed(0)
    N, F, D, r, K = 6, 16, 8, 4, 3
    h, w2, b2 = torch.randn(N, F), torch.randn(D, F), torch.randn(D)
    flat_w, flat_b = torch.randn(K * r, F), torch.randn(K * r)
    wd, bd = list(flat_w.split(r)), list(flat_b.split(r))
    wu, bu = [torch.randn(D, r) for _ in range(K)], [torch.randn(D) for _ in range(K)]
    logits = torch.randn(2, K + 1)

    def run(wd, bd):
        with torch.profiler.profile() as prof:
            y, p = torch.ops.mixda_fast.mixda_out.default(h, h, w2, b2, wd, bd, wu, bu, logits)
        calls = sum(e.count for e in prof.key_averages() if e.key == "aten::addmm")
        return y, p, calls

    y1, p1, packed = run(wd, bd)
    y2, p2, separate = run([w.clone() for w in wd], [b.clone() for b in bd])
    assert separate - packed == K - 1
    # [w2 | wdown] in one buffer (the layer does this for BERT-style hosts): one GEMM for all of p
    W, Bv = torch.cat([w2, flat_w]), torch.cat([b2, flat_b])
    with torch.profiler.profile() as prof:
        y3, p3 = torch.ops.mixda_fast.mixda_out.default(h, h, W[:D], Bv[:D], list(W[D:].split(r)),
                                                        list(Bv[D:].split(r)), wu, bu, logits)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::addmm") == packed - 1 == 1
    torch.testing.assert_close(y3, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p3, p2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)
    want_y, want_p = ops.mixda_out_ref(h, h, w2, b2, wd, bd, wu, bu, logits)
    torch.testing.assert_close(y1, want_y, rtol=1e-5, atol=1e-5)
    assert ops.packed_rows(wd[::-1]) is None and ops.packed_rows(wd[:2]) is not None


def test_in_place_writes_land_in_the_packed_buffer():
    model, layer = _layer()
    ws = [a.down.weight for a in layer.adapters.values()]
    flat = ops.packed_rows(ws)
    ws[1].data.add_(1.0)                                      # no version bump, still seen
    torch.testing.assert_close(flat[layer.bottleneck:2 * layer.bottleneck], ws[1].detach())
    assert ops.packed_rows(ws).data_ptr() == flat.data_ptr()


@pytest.mark.parametrize("domain", [None, "domain_1"])
def test_gradients_with_packed_adapters_match_the_paper_form(domain):
    grads = {}
    for formulation in ("fused", "paper"):
        torch.manual_seed(0)
        model, layer = _layer(family="bert", gate="token")
        mf.mark_trainable(model, "domain", domain=domain) if domain else mf.mark_trainable(model, "domain")
        assert layer.adapters_packed()
        layer.formulation = formulation
        x = torch.randn(2, 5, layer.hidden_size, requires_grad=True)
        assert layer.adapters_packed(host=True)                  # packed at patch time: grad h is one GEMM
        layer(x).square().sum().backward()
        grads[formulation] = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
        grads[formulation]["x"] = x.grad
    assert grads["fused"].keys() == grads["paper"].keys()
    for name, g in grads["paper"].items():
        torch.testing.assert_close(grads["fused"][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_to_repacks_and_inference_mode_leaves_trainable_parameters():
    model, layer = _layer()
    model.to(torch.float64).to(torch.float32)                 # .to() replaces every parameter and repacks
    assert layer.adapters_packed(host=layer.host.fusable())
    x = torch.randn(2, 5, layer.hidden_size)
    with torch.inference_mode():
        layer(x)
    assert layer.adapters_packed()
    mf.mark_trainable(model, "domain")
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(x).square().sum().backward()                        # no inference tensors saved
    opt.step()
    _check(layer, x, "grad", torch.float32)


def _storage_is_own(p) -> bool:
    return p.untyped_storage().nbytes() == p.numel() * p.element_size()


@pytest.mark.skipif(not ops.kernels_available(), reason="no compiled kernels")
def test_host_w2_packed_at_patch_time_and_released_by_unpatch():
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, adapter_init="normal", gate_dropout=0.0))
    layer = mf.mixda_modules(model)[0]
    down = layer.host.down
    w2, b2 = down.weight.detach().clone(), down.bias.detach().clone()
    assert layer.adapters_packed(host=True) and not _storage_is_own(down.weight)   # W2 packed by the patch
    x = torch.randn(2, 5, layer.hidden_size)
    want = _paper(layer, x)
    torch.testing.assert_close(_fused(layer, x, "no_grad"), want, rtol=1e-5, atol=1e-5)
    flat = ops.packed_rows(layer._pack_members(host=True)[0])
    assert flat.shape == (layer.hidden_size + 2 * layer.bottleneck, layer.intermediate_size)
    assert torch.equal(down.weight, w2) and torch.equal(down.bias, b2)       # values never change
    layer.release_host_weights()                                             # what unpatch_model does
    assert not layer.adapters_packed(host=True) and layer.adapters_packed() and _storage_is_own(down.weight)
    torch.testing.assert_close(_fused(layer, x, "no_grad"), want, rtol=1e-5, atol=1e-5)   # unpacked: exact
    assert layer.pack_for_forward() and layer.adapters_packed(host=True)     # packed again
    mf.unpatch_model(model)
    assert _storage_is_own(down.weight) and _storage_is_own(down.bias)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in after.items():
        assert torch.equal(v, before[k]), k


def test_packed_model_saves_with_save_pretrained(tmp_path):
    model, layer = _layer(family="bert")
    x = torch.randn(2, 5, layer.hidden_size)
    _fused(layer, x, "no_grad")
    assert layer.adapters_packed(host=True)
    model.save_pretrained(tmp_path / "patched")                # shared, non-overlapping views save fine
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "patched" / "model.safetensors"))
    state = model.state_dict()
    assert saved.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(saved[k], v), k
    mf.unpatch_model(model)
    model.save_pretrained(tmp_path / "plain")
    again = type(model).from_pretrained(tmp_path / "plain")
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_release_after_a_replaced_adapter_still_frees_the_buffer():
    model, layer = _layer(family="bert")
    _fused(layer, torch.randn(2, 5, layer.hidden_size), "no_grad")        # W2 packed
    ad = layer.adapters["domain_0"]
    ad.down.weight = torch.nn.Parameter(ad.down.weight.detach().clone())
    down = layer.host.down
    mf.unpatch_model(model)
    assert _storage_is_own(down.weight) and _storage_is_own(down.bias)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_patched_under_inference_mode_runs_unpacked(family):
    with torch.inference_mode():
        model, layer = _layer(family=family)
        x = torch.randn(2, 5, layer.hidden_size)
        got = [layer(x).clone() for _ in range(2)]                          # the second would repack
        layer.formulation = "paper"
        want = layer(x)
    assert not layer.pack_adapters(host=True)                              # inference tensors stay as they are
    for g in got:
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate", ["sequence", "token"])
@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batches(gate, shape):
    model, layer = _layer(family="bert", gate=gate)
    model.eval()
    x = torch.randn(*shape, layer.hidden_size)
    with torch.no_grad():
        y = layer(x)
        layer.formulation = "paper"
        want = layer(x)
    assert y.shape == want.shape == x.shape
