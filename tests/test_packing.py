"""The fused path never computes with stale weights: after any change to a parameter (optimizer
step, in-place write through ``.data``, a new Parameter object, ``load_state_dict``, ``.to``)
the patched layer's output follows, in inference mode and under autograd alike.

The kernels pack [Wdown_1..K], [Wup_1..K] (and, for 16-bit inputs on CPUs without native bf16
GEMMs, float32 copies of every weight) once per call from the live parameters: nothing is kept
between calls. A cache keyed on ``Tensor._version`` would miss ``p.data.add_()``, which bumps
no version counter; these tests cover exactly those cases."""

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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_changes_are_seen(mode, dtype):
    model, layer = _layer(dtype=dtype)
    x = torch.randn(2, 5, layer.hidden_size, dtype=dtype)
    _check(layer, x, mode, dtype)
    first = _fused(layer, x, mode)
    ad = layer.adapters["domain_1"]
    changes = [
        lambda: ad.down.weight.data.add_(0.5),                 # .data: no version bump
        lambda: ad.up.weight.data.mul_(-2.0),
        lambda: ad.up.bias.data.add_(1.0),
        lambda: ad.down.bias.data.add_(0.25),
        lambda: layer._down().weight.data.mul_(1.5),           # host W2
        lambda: layer._sub(layer._spec.up).weight.data.add_(0.1),   # host W_up
        lambda: layer.gate[-1].bias.data.add_(torch.arange(3.0, dtype=dtype)),
    ]
    for change in changes:
        change()
        _check(layer, x, mode, dtype)
    assert not torch.equal(first, _fused(layer, x, mode))


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
    layer._down().weight = torch.nn.Parameter(layer._down().weight.detach() * 2)   # host W2 replaced
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
