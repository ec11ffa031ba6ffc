"""MoDE on quantized base models is refused at patch time, in one line, leaving the model exactly
as it was: MoDE experts are trainable whole layers built from the backbone's (copies, or new ones
like them), which an int8 / 4-bit / torch.ao layer cannot give. MixDA supports such hosts
(tests/mixda/test_quantized_hosts.py). Quantized modules outside the layers (a head) do not matter.
"""

import pytest
import torch
import torch.nn as nn

import mixda_fast as mf
from mixda_fast.core.patch import CONFIG_KEY
from quantized_models import KINDS, quantized
from tiny_models import batch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
              pytest.mark.filterwarnings("ignore:.*quantize_per_tensor"),
              pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated")]

FIRST = {"bert": "bert.encoder.layer.0.attention.self.query", "llama": "model.layers.0.self_attn.q_proj"}
CLASS = {"bnb8": "bitsandbytes.nn.modules.Linear8bitLt", "bnb4": "bitsandbytes.nn.modules.Linear4bit",
         "ao": "torch.ao.nn.quantized.dynamic.modules.linear.Linear"}


def _snapshot(model):
    """Everything a patch could touch: modules (identity), tensors (storage and value), hooks, config."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    return ({n: id(m) for n, m in model.named_modules()},
            {n: (t.data_ptr(), t.dtype, t.detach().clone()) for n, t in tensors.items()},
            hooks, hasattr(model.config, CONFIG_KEY), hasattr(model.base_model, "mode_blocks"))


def _same(a, b):
    modules, tensors, hooks, recorded, blocks = a
    assert b[0] == modules and b[2] == hooks and (b[3], b[4]) == (recorded, blocks)
    assert b[1].keys() == tensors.keys()
    for n, (ptr, dtype, t) in b[1].items():
        assert (ptr, dtype) == tensors[n][:2] and torch.equal(t, tensors[n][2]), n


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("kind", KINDS)
def test_mode_on_a_quantized_model_is_refused_and_nothing_changes(tmp_path, kind, family):
    model = quantized(kind, family, tmp_path)
    inputs = batch(family)
    with torch.no_grad():
        ref = model(**inputs).logits          # (bitsandbytes 4-bit repacks its weights for the CPU here)
    before = _snapshot(model)
    for init in ("copy", "random"):
        with pytest.raises(ValueError) as e:
            mf.patch_model(model, mf.MoDEConfig(domains=["a"], num_blocks=1, expert_init=init))
        msg = str(e.value)
        assert msg.startswith("patch_model: MoDEConfig is not accepted for a model with quantized layers (") and \
            f"first: {FIRST[family]!r}, {CLASS[kind]})" in msg and "use MixDA (MixDAConfig)" in msg, msg
        assert "\n" not in msg
        assert not mf.is_patched(model)
        _same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    mf.patch_model(model, mf.MixDAConfig(domains=["a"]))    # what the message offers works on the same model
    assert mf.is_patched(model)


def test_quantized_modules_outside_the_layers_do_not_matter():
    """A torch.ao-quantized LM head: the layers are float, MoDE patches and the backbone is exact."""
    from tiny_models import tiny_model

    model = torch.ao.quantization.quantize_dynamic(tiny_model("llama", head="lm"), {"lm_head"}, dtype=torch.qint8)
    assert type(model.lm_head) is not nn.Linear and type(model.model.layers[0].mlp.down_proj) is nn.Linear
    inputs = batch("llama")
    with torch.no_grad():
        ref = model(**inputs).logits
    mf.patch_model(model, mf.MoDEConfig(domains=["a"], num_blocks=1))
    with torch.no_grad(), mf.gate_forced(model, "backbone"):
        assert torch.equal(model(**inputs).logits, ref)
