"""Forced domains on hosts other than a plain transformers model: through a PEFT ``PeftModel``
(``model(..., mixda_domains=...)`` and ``domain_forced``, LoRA on attention, either order of
patching), and on the non-fused ("folded") path of a LoRA-wrapped FFN and of quantized hosts
(bitsandbytes 8-bit and 4-bit where it runs, torch.ao dynamic int8).

Exact everywhere: a forced domain equals a gate whose logits put all weight there, and a mixed
batch equals the same batch under ``domain_forced``. Where the host computes each row on its own
(PEFT, LoRA on the FFN, bitsandbytes), a row of a mixed batch also equals that row of the batch forced whole to
its domain (the same shapes, so the same host GEMMs). A row run *alone* is not compared bit for
bit here: LoRA's own GEMMs (and the classification head's) round differently at batch 1 than at 4
even with MixDA off. torch.ao's dynamic int8 quantizes each Linear's input with one scale for the
whole batch, so its rows depend on each other (the unpatched int8 model's too: measured 1e-2 on
32-wide tiny models); there a mixed batch is checked against the block and the one-hot gates only.
"""

import pytest
import torch

import mixda_fast as mf
from quantized_models import BNB_MISSING, quantized
from tiny_models import batch, randomize_patch, tiny_model

peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
              pytest.mark.filterwarnings("ignore:.*quantize_per_tensor"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]

DOMAINS = ["bio", "law", "news"]
ROWS = ["bio", "law", None, "news"]
ATTENTION = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}


def _out(model, inputs, **kw):
    with torch.no_grad():
        out = model(**inputs, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _config():
    return mf.MixDAConfig(domains=DOMAINS, adapter_init="normal", gate_hidden=16)


def _lora(model, targets, task=None):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets,
                                                    task_type=task))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                                 # non-zero B: a LoRA that never ran would show
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def _rows_exact(model, inputs, rows_independent: bool = True):
    """The mixed batch ROWS equals itself under ``domain_forced``, and one domain per row equals
    that domain for the batch; where the host's rows are independent, each forced row equals
    that row of the batch forced whole to its domain, the gate's row that row unforced."""
    mixed = _out(model, inputs, mixda_domains=ROWS)
    with mf.domain_forced(model, ROWS):
        assert torch.equal(_out(model, inputs), mixed)
    assert torch.equal(_out(model, inputs, mixda_domains=["law"] * 4), _out(model, inputs, mixda_domains="law"))
    plain = _out(model, inputs)
    assert not torch.equal(mixed[0], plain[0])
    for b, d in enumerate(ROWS if rows_independent else ()):
        whole = plain if d is None else _out(model, inputs, mixda_domains=d)
        assert torch.equal(mixed[b], whole[b])


def _one_hot_exact(model, inputs, k: int):
    """Forcing domain k equals setting every gate, in place, to logits 0 at k and -inf elsewhere."""
    forced = _out(model, inputs, mixda_domains=DOMAINS[k])
    with torch.no_grad():
        for m in mf.mixda_modules(model).values():
            last = m.gate[-1]
            last.weight.zero_()
            last.bias.fill_(float("-inf"))
            last.bias[k] = 0.0
    assert torch.equal(_out(model, inputs), forced)


@pytest.mark.parametrize("family,head", [("bert", "cls"), ("llama", "lm")])
@pytest.mark.parametrize("order", ["mixda_first", "peft_first"])
def test_forced_domains_through_a_peft_model(family, head, order, fused_op_calls):
    task = {"cls": peft.TaskType.SEQ_CLS, "lm": peft.TaskType.CAUSAL_LM}[head]
    model = tiny_model(family, head=head)
    if order == "mixda_first":
        pm = _lora(mf.patch_model(model, _config()), ATTENTION[family], task)
    else:
        pm = _lora(model, ATTENTION[family], task)
        mf.patch_model(pm, _config())
    randomize_patch(pm, std=0.5)
    inputs = batch(family, B=4, T=8)
    _rows_exact(pm, inputs)
    assert fused_op_calls and len(fused_op_calls) % len(mf.mixda_modules(pm)) == 0     # the fused op served
    with mf.gate_weights(pm) as calls:
        _out(pm, inputs, mixda_domains={0: "law"})
    law = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert torch.equal(calls[0][0], law.expand_as(calls[0][0])) and not torch.equal(calls[0][1], calls[0][0])
    _one_hot_exact(pm, inputs, 1)


def _lora_ffn():
    model = mf.patch_model(tiny_model("llama", head="lm"), _config())
    return _lora(model, ["gate_proj", "up_proj", "down_proj"], peft.TaskType.CAUSAL_LM)


@pytest.mark.parametrize("host", ["lora_ffn", "int8_bert", "int8_llama", "bnb8_bert", "bnb4_llama"])
def test_forcing_is_exact_on_the_folded_path_of_wrapped_and_quantized_hosts(host, fused_op_calls, tmp_path):
    kind, family = host.split("_") if host != "lora_ffn" else ("lora", "llama")
    if kind.startswith("bnb") and BNB_MISSING:
        pytest.skip(BNB_MISSING)
    model = _lora_ffn() if kind == "lora" else mf.patch_model(
        quantized({"int8": "ao"}.get(kind, kind), family, tmp_path), _config())
    randomize_patch(model, std=0.5)
    assert not any(m.host.fusable() for m in mf.mixda_modules(model).values())
    inputs = batch(family, B=4, T=8)
    _rows_exact(model, inputs, rows_independent=kind != "int8")
    assert not fused_op_calls                                      # the folded path, not the fused op
    _one_hot_exact(model, inputs, 2)
