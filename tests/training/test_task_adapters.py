"""Stage-2 task adapters: placement, identity at init, patch/unpatch in either order, saving."""

import copy

import pytest
import torch

import mixda_fast as mf
from mixda_fast.task_adapters import (add_task_adapters, load_task_adapters, remove_task_adapters,
                                 save_task_adapters, task_adapter_modules)
from tiny_models import FAMILIES, batch, tiny_model


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in task_adapter_modules(model).values():
            for p in mod.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
def test_identity_at_init_and_active_after_training(family, kind):
    model = tiny_model(family)
    inputs = batch(family)
    before = _out(model, inputs)
    add_task_adapters(model, kind)
    mods = task_adapter_modules(model)
    assert len(mods) == 3 * (2 if kind == "houlsby" else 1)
    assert all(m.down.out_features == 32 // 16 for m in mods.values())
    assert torch.equal(_out(model, inputs), before)          # zero up-projection: identity
    _randomize(model)
    assert not torch.allclose(_out(model, inputs), before)
    remove_task_adapters(model)
    assert torch.equal(_out(model, inputs), before)
    assert not any("mixda_task_adapter" in k for k in model.state_dict())


def _ffn_hook_fires(model, family):
    """Each FFN task adapter runs exactly once per layer per forward."""
    calls = []
    handles = [m.register_forward_hook(lambda *a, k=k: calls.append(k))
               for k, m in task_adapter_modules(model).items()]
    _out(model, batch(family))
    for h in handles:
        h.remove()
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_survives_patch_and_unpatch_in_either_order(family):
    """Adapters added before patching, after patching, then unpatching: the same function."""
    inputs = batch(family)
    model = tiny_model(family)
    add_task_adapters(model, "houlsby")
    _randomize(model)
    expected = _out(model, inputs)                            # unpatched model + task adapters
    cfg = mf.MixDAConfig(num_domains=2, mixing="residual", layers=[0, 2])
    mf.patch_model(model, cfg)                                # residual mixing at init = host FFN
    assert sorted(_ffn_hook_fires(model, family)) == sorted(task_adapter_modules(model))
    torch.testing.assert_close(_out(model, inputs), expected)
    mf.unpatch_model(model)
    torch.testing.assert_close(_out(model, inputs), expected)
    assert sorted(_ffn_hook_fires(model, family)) == sorted(task_adapter_modules(model))

    other = tiny_model(family)                                # added after patching
    mf.patch_model(other, cfg)
    add_task_adapters(other, "houlsby")
    other.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for (k, a), (_, b) in zip(task_adapter_modules(other).items(), task_adapter_modules(model).items()):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.copy_(pb)
    torch.testing.assert_close(_out(other, inputs), expected)
    mf.unpatch_model(other)
    torch.testing.assert_close(_out(other, inputs), expected)


def test_deepcopy_has_its_own_hooks():
    model = tiny_model("bert")
    mf.patch_model(model, mf.MixDAConfig(num_domains=1, layers=[1]))
    add_task_adapters(model)
    clone = copy.deepcopy(model)
    _randomize(clone)
    inputs = batch("bert")
    assert not torch.allclose(_out(clone, inputs), _out(model, inputs))
    remove_task_adapters(clone)
    mf.unpatch_model(clone)
    mf.unpatch_model(model)
    assert torch.equal(_out(clone, inputs), _out(tiny_model("bert"), inputs))
    assert len(task_adapter_modules(model)) == 3


def test_mark_trainable_task_unfreezes_task_adapters_and_head():
    model = tiny_model("bert", head="cls")
    mf.patch_model(model, mf.MixDAConfig(num_domains=2, layers=[1]))
    add_task_adapters(model, "pfeiffer")
    mf.mark_trainable(model, "task")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("mixda_task_adapter_ffn" in n for n in names)
    assert any(n.startswith("classifier.") for n in names)
    assert any(".gate." in n for n in names)
    assert not any(".adapters." in n for n in names)          # domain adapters frozen
    assert not any("attention.self" in n for n in names)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("roberta")
    add_task_adapters(model, "houlsby", reduction_factor=8)
    _randomize(model)
    inputs = batch("roberta")
    expected = _out(model, inputs)
    path = save_task_adapters(model, tmp_path)
    assert path.name == "task_adapters.safetensors" and not list(tmp_path.glob("*.tmp"))
    fresh = tiny_model("roberta")
    load_task_adapters(fresh, path)                           # adds them with the file's kind
    torch.testing.assert_close(_out(fresh, inputs), expected)
    other = tiny_model("roberta")
    add_task_adapters(other, "pfeiffer", reduction_factor=8)
    with pytest.raises(ValueError, match="kind='houlsby'"):
        load_task_adapters(other, path)
    with pytest.raises(ValueError, match="model_type='roberta'"):
        load_task_adapters(tiny_model("bert"), path)


def test_bad_arguments():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="kind='bottleneck'.*'pfeiffer' | 'houlsby'"):
        add_task_adapters(model, "bottleneck")
    with pytest.raises(TypeError, match="reduction_factor=2.5"):
        add_task_adapters(model, reduction_factor=2.5)
    with pytest.raises(ValueError, match="reduction_factor=64"):
        add_task_adapters(model, reduction_factor=64)
    add_task_adapters(model)
    with pytest.raises(ValueError, match="already has task adapters"):
        add_task_adapters(model)
    with pytest.raises(ValueError, match="no task adapters"):
        remove_task_adapters(tiny_model("gpt2"))
