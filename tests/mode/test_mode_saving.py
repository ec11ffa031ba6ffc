"""MoDE experts: save/load round trips, composition of N stage-1 experts, and bad files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mixda_fast as mf
from tiny_models import batch, tiny_model


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _perturb(model, seed):
    """Make experts and gates differ from their initial values (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in mf.mode_blocks(model):
            for p in b.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _stage1(family, domain, seed, **kw):
    model = tiny_model(family, head="lm")
    mf.patch_model(model, mf.MoDEConfig(num_blocks=3, domains=[domain], expert_layers=1, **kw))
    _perturb(model, seed)
    return model


@pytest.mark.parametrize("family", ["roberta", "gpt2", "llama"])
def test_save_load_round_trip(tmp_path, family):
    src = tiny_model(family, head="lm")
    mf.patch_model(src, mf.MoDEConfig(num_blocks=3, domains=["bio", "law"], expert_init="random"))
    _perturb(src, 0)
    inputs = batch(family)
    path = mf.save_experts(src, tmp_path / "all.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    dst = mf.patch_model(tiny_model(family, head="lm"), mf.MoDEConfig(num_blocks=3, domains=["bio", "law"]))
    assert not torch.equal(_out(dst, inputs), _out(src, inputs))
    mf.load_experts(dst, path)
    assert torch.equal(_out(dst, inputs), _out(src, inputs))
    # one expert, saved on its own (with its gate rows), loaded into another slot
    one = mf.save_experts(src, tmp_path, domain="law")
    assert one.name == "mode_expert_law.safetensors"
    with safe_open(str(one), framework="pt") as f:
        assert f.get_tensor("blocks.0.gate.weight").shape[0] == 2
        assert json.loads(f.metadata()["config"])["domains"] == ["bio", "law"]
    mf.load_experts(dst, one, domain="bio")
    a, b = mf.mode_blocks(dst)[1].experts, mf.mode_blocks(src)[1].experts
    assert all(torch.equal(p, q) for p, q in zip(a["bio"].parameters(), b["law"].parameters()))
    # one expert out of a whole-patch file
    mf.load_experts(dst, path, domain="bio")
    assert all(torch.equal(p, q) for p, q in zip(a["bio"].parameters(), b["bio"].parameters()))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_stage1_expert_round_trip_is_the_stage1_model(tmp_path, family):
    src = _stage1(family, "bio", seed=1)
    path = mf.save_experts(src, tmp_path, domain="bio")
    inputs = batch(family)
    dst = mf.patch_model(tiny_model(family, head="lm"), mf.MoDEConfig(num_blocks=3, domains=["bio"],
                                                                      expert_layers=1))
    mf.load_experts(dst, path)
    assert torch.equal(_out(dst, inputs), _out(src, inputs))
    one = mf.compose_experts(tiny_model(family, head="lm"), [path])   # N = 1 composition: the same model
    assert torch.equal(_out(one, inputs), _out(src, inputs))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("freeze", [False, True])
def test_compose_n_experts(tmp_path, family, freeze):
    sources = {d: _stage1(family, d, seed=i) for i, d in enumerate(["bio", "law", "code"])}
    paths = [mf.save_experts(m, tmp_path, domain=d) for d, m in sources.items()]
    model = mf.compose_experts(tiny_model(family, head="lm"), paths, freeze_experts=freeze)
    cfg = mf.mode.patching.mode_state(model).config
    assert cfg.domains == ["bio", "law", "code"] and cfg.freeze_experts is freeze
    assert cfg.num_blocks == 3 and cfg.expert_layers == 1
    inputs = batch(family)
    for j, (d, src) in enumerate(sources.items()):
        block, sblock = mf.mode_blocks(model)[2], mf.mode_blocks(src)[2]
        assert block.gate.weight.shape == (4, sblock.gate.weight.shape[1])
        assert torch.equal(block.gate.weight[j], sblock.gate.weight[0])
        assert all(torch.equal(p, q) for p, q in zip(block.experts[d].parameters(), sblock.experts[d].parameters()))
        with mf.gate_forced(model, d), mf.gate_forced(src, d):   # expert j alone = stage-1 expert alone
            torch.testing.assert_close(_out(model, inputs), _out(src, inputs), rtol=1e-5, atol=1e-5)
    mean_bb = torch.stack([mf.mode_blocks(m)[0].gate.weight[1] for m in sources.values()]).mean(0)
    torch.testing.assert_close(mf.mode_blocks(model)[0].gate.weight[3], mean_bb)
    mf.mark_trainable(model, "compose")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".gate." in n for n in trainable)
    assert any(".experts." in n for n in trainable) is (not freeze)
    assert all(".gate." in n or ".experts." in n for n in trainable)
    uniform = mf.compose_experts(tiny_model(family, head="lm"), paths, gate_init="uniform",
                                 domains=["a", "b", "c"])
    assert not mf.mode_blocks(uniform)[0].gate.weight.any()


def test_bad_files_raise_clear_errors(tmp_path):
    llama = _stage1("llama", "bio", seed=0)
    gpt2 = _stage1("gpt2", "bio", seed=0)
    deeper = _stage1("llama", "law", seed=0, expert_init="copy")
    gpt2_file = mf.save_experts(gpt2, tmp_path / "gpt2.safetensors", domain="bio")
    llama_file = mf.save_experts(llama, tmp_path / "llama.safetensors", domain="bio")
    target = mf.patch_model(tiny_model("llama", head="lm"), mf.MoDEConfig(num_blocks=3, domains=["bio"],
                                                                          expert_layers=1))
    before = {n: p.clone() for n, p in target.named_parameters()}
    with pytest.raises(ValueError, match=r"family \(model_type\): file 'gpt2' vs model 'llama'.*layer class"):
        mf.load_experts(target, gpt2_file)
    # same family, other shape: two expert layers, one block
    other = mf.patch_model(tiny_model("llama", head="lm"), mf.MoDEConfig(num_blocks=1, domains=["bio"]))
    other_file = mf.save_experts(other, tmp_path / "other.safetensors", domain="bio")
    with pytest.raises(ValueError, match=r"num_blocks: file 1 vs model 3; expert_layers: file 2 vs model 1"):
        mf.load_experts(target, other_file)
    # same structure, a tensor of another width
    with safe_open(str(llama_file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "blocks.0.expert.0.mlp.up_proj.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(tmp_path / "wide.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \(81, 32\); the model expects \(80, 32\)"):
        mf.load_experts(target, tmp_path / "wide.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mf.load_experts(target, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        mf.load_experts(target, tmp_path / "junk.safetensors")
    mixda = mf.patch_model(tiny_model("llama"), mf.MixDAConfig(num_domains=1))
    mixda_file = mf.save_adapters(mixda, tmp_path / "mixda.safetensors")
    with pytest.raises(ValueError, match="MixDA adapter file"):
        mf.load_experts(target, mixda_file)
    with pytest.raises(ValueError, match="domain='law' is not accepted"):
        mf.load_experts(target, mf.save_experts(deeper, tmp_path, domain="law"))
    assert all(torch.equal(p, before[n]) for n, p in target.named_parameters())
    # composition: files must agree with each other and hold one expert each
    fresh = tiny_model("llama", head="lm")
    with pytest.raises(ValueError, match="does not fit"):
        mf.compose_experts(fresh, [llama_file, other_file])
    with pytest.raises(ValueError, match="are not unique; pass domains"):
        mf.compose_experts(fresh, [llama_file, llama_file])
    with pytest.raises(ValueError, match="kind='all'"):
        mf.compose_experts(fresh, [mf.save_experts(llama, tmp_path / "whole.safetensors")])
    with pytest.raises(ValueError, match=r"family \(model_type\)"):
        mf.compose_experts(fresh, [gpt2_file])
    assert not mf.is_patched(fresh)
    with pytest.raises(ValueError, match="already patched"):
        mf.compose_experts(target, [llama_file])
