"""A tensor on a device the others are not on (meta beside CPU) gets one clear error naming it,
never an op's fake result (uninitialised memory)."""

import re

import pytest
import torch

import mixda_fast as mf
from mixda_fast import ops
from tiny_models import batch, randomize_patch, tiny_model

N, d, F, D, r, K = 6, 8, 16, 8, 4, 2


def _args():
    g = torch.Generator().manual_seed(0)
    R = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h = R(N, F)
    return {
        "softmax_combine": (ops.softmax_combine, dict(logits=R(N, K + 1), experts=R(K + 1, N, 1, D))),
        "ffn_in": (ops.ffn_in, dict(x=R(N, d), w1=R(F, d), b1=R(F), w3=R(F, d), b3=R(F), act=4)),
        "mixda_out": (ops.mixda_out, dict(h=h, z=h, w2=R(D, F), b2=R(D), wdown=[R(r, F) for _ in range(K)],
                                          bdown=[R(r) for _ in range(K)], wup=[R(D, r) for _ in range(K)],
                                          bup=[R(D) for _ in range(K)], logits=R(N, K + 1))),
        "gate_mlp": (ops.gate_mlp, dict(z=R(N, d), weights=[R(5, d), R(K + 1, 5)], biases=[R(5), R(K + 1)])),
    }


CASES = [(op, name, i) for op, (_, kw) in _args().items() for name, v in kw.items()
         for i in (range(len(v)) if isinstance(v, list) else [None]) if isinstance(v, (torch.Tensor, list))]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("op,name,index", CASES)
def test_each_argument_on_meta_is_named(op, name, index, backend):
    if backend == "cpp" and not ops.kernels_available():
        pytest.skip("no compiled kernels")
    fn, kw = _args()[op]
    if index is None:
        kw[name] = kw[name].to("meta")
        shown = name
    else:
        kw[name][index] = kw[name][index].to("meta")
        shown = f"{name}[{index}]"
    before = ops.get_backend()
    ops.set_backend(backend)
    try:
        with pytest.raises(RuntimeError, match=rf"^{op}: {shown.replace('[', '.').replace(']', '.')}\.device=meta is "
                                               r"not accepted: expected cpu"):
            fn(*kw.values())
        if backend == "cpp":        # the op called directly: its fake checks too
            with pytest.raises(RuntimeError, match=rf"{op}: .*device=meta is not accepted"):
                getattr(torch.ops.mixda_fast, op).default(*kw.values(), *((0.0, None) if op == "gate_mlp" else ()))
    finally:
        ops.set_backend(before)


@pytest.mark.parametrize("op", list(_args()))
def test_all_meta_inputs_stay_a_meta_computation(op):
    fn, kw = _args()[op]
    meta = {k: ([t.to("meta") for t in v] if isinstance(v, list) else v.to("meta") if isinstance(v, torch.Tensor)
                else v) for k, v in kw.items()}
    out = fn(*meta.values())
    out = out if isinstance(out, tuple) else (out,)
    assert all(t.device.type == "meta" for t in out)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("formulation", ["fused", "folded", "paper"])
@pytest.mark.parametrize("where", ["adapters.domain_0.up.weight", "gate.1.weight", "host_ffn"])
def test_a_patched_model_with_one_parameter_on_meta_refuses_to_run(family, formulation, where):
    model = randomize_patch(mf.patch_model(tiny_model(family), mf.MixDAConfig(num_domains=2, gate_hidden=16)))
    layer = mf.mixda_modules(model)[1]
    layer.formulation = formulation
    if where == "host_ffn":
        name, p = next((n, p) for n, p in layer.named_parameters() if n.startswith("host_ffn"))
    else:
        name, p = where, layer.get_parameter(where)
    owner, _, leaf = name.rpartition(".")
    setattr(layer.get_submodule(owner), leaf, torch.nn.Parameter(torch.empty_like(p, device="meta")))
    with pytest.raises(RuntimeError, match=rf"^MixDAFFN: {re.escape(name)}\.device=meta is not accepted"):
        with torch.no_grad():
            model(**batch(family))
