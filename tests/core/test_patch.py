"""The core's method registry and journal, with a third method the core has never seen."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import mixda_fast as mf
from mixda_fast.core import patch
from mixda_fast.core.config import MethodConfig
from mixda_fast.core.families import family_of
from mixda_fast.core.io import file_in
from mixda_fast.core.model import layer_list
from tiny_models import batch, tiny_model


@dataclass
class ScaleConfig(MethodConfig):
    """A toy method: every FFN output projection is multiplied by a trainable scalar (1 at init)."""

    domains: list = None
    fail_after_swaps: bool = False
    extra: dict = None

    def __post_init__(self):
        self.domains = ["only"]


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.inner(x) * self.scale


def _patch_scale(model, config, journal):
    model_type, spec = family_of(model)
    layers = layer_list(model, model_type, spec, "patch_model")
    parent, name = spec.down.rsplit(".", 1)
    for layer in layers:
        owner = layer.get_submodule(parent)
        journal.swap(owner, name, Scaled(getattr(owner, name)))
    journal.add_module(model, "scale_note", nn.Identity())
    if config.fail_after_swaps:
        raise RuntimeError("boom after the swaps")
    return patch.PatchState(config=config, model_type=model_type, spec=spec)


def _unfreeze(model, state, stage, domain):
    for m in model.modules():
        if isinstance(m, Scaled):
            m.scale.requires_grad_(True)


SCALE = patch.Method(name="scale", title="Scale", config_class=ScaleConfig, patch=_patch_scale,
                     stages=("scales", "none", "all"), unfreeze=_unfreeze, functions="none")


@pytest.fixture
def scale_method(monkeypatch):
    monkeypatch.setitem(patch._METHODS, ScaleConfig, SCALE)
    return SCALE


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def test_a_registered_method_is_patched_trained_and_undone_by_the_core(scale_method):
    model = tiny_model("bert")
    inputs = batch("bert")
    before = model(**inputs).last_hidden_state
    modules, state = _snapshot(model)
    mf.patch_model(model, ScaleConfig())
    assert mf.is_patched(model) and patch.patch_state(model, "t", "scale").method is SCALE
    assert model.config.mixda_fast["method"] == "scale"
    torch.testing.assert_close(model(**inputs).last_hidden_state, before,
                               rtol=0, atol=0)
    mf.mark_trainable(model, "scales")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"encoder.layer.{i}.output.dense.scale" for i in range(len(model.encoder.layer))}
    with pytest.raises(ValueError, match="stage='domain' is not accepted"):
        mf.mark_trainable(model, "domain")
    with pytest.raises(ValueError, match="patched with Scale, not MixDA"):
        mf.mixda_modules(model)
    mf.unpatch_model(model)
    assert not mf.is_patched(model) and not hasattr(model.config, "mixda_fast")
    assert _snapshot(model)[0] == modules
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_a_failing_patch_is_undone_by_its_journal(scale_method):
    model = tiny_model("bert")
    modules, _ = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom after the swaps"):
        mf.patch_model(model, ScaleConfig(fail_after_swaps=True))
    assert not mf.is_patched(model) and _snapshot(model)[0] == modules
    assert not hasattr(model, "scale_note") and not hasattr(model.config, "mixda_fast")


def test_a_copied_model_undoes_its_own_journal(scale_method):
    model = mf.patch_model(tiny_model("bert"), ScaleConfig())
    clone = copy.deepcopy(model)
    mf.unpatch_model(clone)
    assert not any(isinstance(m, Scaled) for m in clone.modules())
    assert sum(isinstance(m, Scaled) for m in model.modules()) == len(model.encoder.layer)
    mf.unpatch_model(model)
    assert not any(isinstance(m, Scaled) for m in model.modules())


def test_unknown_config_types_name_every_registered_method(scale_method):
    with pytest.raises(TypeError, match="MixDAConfig or a mixda_fast.MoDEConfig or a mixda_fast.ScaleConfig"):
        mf.patch_model(tiny_model("bert"), object())


def test_unpatched_models_train_all_or_nothing():
    model = tiny_model("bert")
    mf.mark_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    mf.mark_trainable(model, "none")
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="not patched"):
        mf.mark_trainable(model, "compose")


def test_both_configs_give_their_gate_width():
    assert mf.MixDAConfig(num_domains=3).gate_width == 4
    assert mf.MixDAConfig(num_domains=3, mixing="residual").gate_width == 3
    assert mf.MoDEConfig(num_experts=3).gate_width == 4
    with pytest.warns(DeprecationWarning, match="gate_width"):
        assert mf.MixDAConfig(num_domains=3).num_experts == 4


def test_file_in(tmp_path):
    (tmp_path / "b.st").write_bytes(b"")
    assert file_in(tmp_path / "x.st", "f", "a.st") == tmp_path / "x.st"
    assert file_in(tmp_path, "f", "a.st") == tmp_path / "a.st"
    assert file_in(tmp_path, "f", "a.st", existing=("c.st", "b.st")) == tmp_path / "b.st"
    with pytest.raises(ValueError, match="does not exist"):
        file_in(tmp_path / "no" / "x.st", "f", "a.st", writing=True)
    with pytest.raises(TypeError, match="f: path=3"):
        file_in(3, "f", "a.st")
