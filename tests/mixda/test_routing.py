"""Choosing domains at run time (mixda_fast.domain_forced, model(..., mixda_domains=...)) and
reading the gate's weights (mixda_fast.gate_weights): forced outputs are bit-identical to a gate
whose logits put all weight there, each row of a mixed batch is bit-identical to that row run
with its domain forced, forcing stays per call (threads) and causal."""

import copy
import threading

import pytest
import torch

import mixda_fast as mf
from tiny_models import VOCAB, batch, randomize_patch, tiny_model

DOMAINS = ["bio", "law", "news"]


def _patched(family="bert", head="base", **kw):
    model = tiny_model(family, head=head)
    mf.patch_model(model, mf.MixDAConfig(domains=DOMAINS, adapter_init="normal", gate_hidden=16, **kw))
    return randomize_patch(model, std=0.5).eval()


def _out(model, inputs, **kw):
    with torch.no_grad():
        out = model(**inputs, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _one_hot_gates(model, k: int):
    """A copy whose every gate outputs logits 0 for entry k and -inf elsewhere (last Linear: weight 0)."""
    other = copy.deepcopy(model)
    for m in mf.mixda_modules(other).values():
        last = m.gate[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(float("-inf"))
            last.bias[k] = 0.0
    return other


@pytest.mark.parametrize("formulation", ["fused", "folded", "paper"])
@pytest.mark.parametrize("mixing", ["paper", "residual"])
@pytest.mark.parametrize("family,gate", [("bert", "sequence"), ("bert", "token"), ("llama", "token")])
def test_forcing_a_domain_is_exactly_a_gate_with_all_weight_there(formulation, mixing, family, gate):
    model = _patched(family, mixing=mixing, gate=gate)
    inputs = batch(family, B=3, T=8)
    for m in mf.mixda_modules(model).values():
        m.formulation = formulation
    one_hot = _one_hot_gates(model, 1)
    forced = _out(model, inputs, mixda_domains="law")
    assert torch.equal(forced, _out(one_hot, inputs))
    with mf.domain_forced(model, "law"):
        assert torch.equal(_out(model, inputs), forced)
    assert not torch.equal(_out(model, inputs), forced)           # outside the block: the gate again
    if formulation != "fused":                                     # the formulations agree when forced too
        for m in mf.mixda_modules(model).values():
            m.formulation = "fused"
        torch.testing.assert_close(_out(model, inputs, mixda_domains="law"), forced, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mixed_batch_rows_are_exactly_each_row_forced(family, backend, fused_op_calls):
    """Each row of a batch mixing four requests (three domains, one left to the gate) equals that
    row of the whole batch forced to its domain (the same GEMM shapes: exact by construction), and
    each forced row equals that row run alone with its domain forced, bit for bit on this CPU
    (MKL / oneDNN reduce a row in the same order at batch 1 and 4 for these shapes). The row left
    to the gate is compared alone within 1e-6: the sequence gate's MLP reads (B, F), and its GEMM
    rounds differently at 1 row than at 4 (unforced, the whole model does the same: measured
    5e-7), a GEMM's batch-size effect, not routing."""
    if backend == "cpp" and not mf.kernels_available():
        pytest.skip("kernels not built")
    before = mf.get_backend()
    mf.set_backend(backend)
    try:
        model = _patched(family)
        inputs = batch(family, B=4, T=8)
        rows = ["bio", "law", None, "news"]
        mixed = _out(model, inputs, mixda_domains=rows)
        # through the fused op in every layer, by the kernels where the backend asks for them
        assert fused_op_calls == [backend == "cpp"] * len(mf.mixda_modules(model))
        for b, d in enumerate(rows):
            whole = _out(model, inputs) if d is None else _out(model, inputs, mixda_domains=d)
            assert torch.equal(mixed[b], whole[b])
            alone = _out(model, {k: v[b:b + 1] for k, v in inputs.items()}, mixda_domains=d and [d])[0]
            if d is None:
                torch.testing.assert_close(mixed[b], alone, rtol=0, atol=1e-6)
            else:
                assert torch.equal(mixed[b], alone)
    finally:
        mf.set_backend(before)


def test_weights_per_layer_and_nesting():
    model = _patched(head="cls")
    inputs = batch("bert", B=2, T=8)
    w = {"bio": 0.25, "news": 0.75}
    seq = [0.25, 0.0, 0.75, 0.0]                                   # paper mixing: K + 1 entries, FFN last
    assert torch.equal(_out(model, inputs, mixda_domains=w), _out(model, inputs, mixda_domains=seq))
    assert torch.equal(_out(model, inputs, mixda_domains=torch.tensor(seq)), _out(model, inputs, mixda_domains=w))
    ffn = [0.0, 0.0, 0.0, 1.0]                                     # all on the FFN: the host model exactly
    with mf.adapters_disabled(model):
        assert torch.equal(_out(model, inputs, mixda_domains=ffn), _out(model, inputs))
    per_layer = _out(model, inputs, mixda_domains={0: "bio", 2: "law"})
    with mf.domain_forced(model, "bio", layers=[0]), mf.domain_forced(model, "law", layers=[2]):
        assert torch.equal(_out(model, inputs), per_layer)
    with mf.domain_forced(model, "news"):                         # the call's argument wins, layer by layer
        assert torch.equal(_out(model, inputs, mixda_domains={0: "bio", 2: "law"}),
                           _out(copy.deepcopy(model), inputs, mixda_domains={0: "bio", 1: "news", 2: "law"}))
        assert torch.equal(_out(model, inputs, mixda_domains=None), _out(model, inputs))
        assert torch.equal(_out(model, inputs, mixda_domains={1: None}),               # back to the gate
                           _out(copy.deepcopy(model), inputs, mixda_domains={0: "news", 2: "news"}))
    assert not torch.equal(per_layer, _out(model, inputs, mixda_domains="bio"))


@pytest.mark.parametrize("t", [2, 5])
def test_causal_lm_position_t_ignores_later_tokens_with_forcing(t):
    model = _patched("llama", head="lm")
    inputs = batch("llama", B=3, T=8)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][:, t] = (other["input_ids"][:, t] + 7) % (VOCAB - 3) + 3
    for spec in ("law", ["bio", None, {"news": 0.5, "law": 0.5}]):
        a, b = _out(model, inputs, mixda_domains=spec), _out(model, other, mixda_domains=spec)
        assert torch.equal(a[:, :t], b[:, :t]) and not torch.equal(a[:, t:], b[:, t:])


def test_two_threads_forcing_different_domains_get_their_own(one_thread):
    model = _patched()
    inputs = batch("bert", B=2, T=8)
    expected = {d: _out(model, inputs, mixda_domains=d) for d in ("bio", "news")}
    start = threading.Barrier(2)
    results, errors = {}, []

    def work(domain):
        try:
            start.wait()
            with mf.domain_forced(model, domain):
                results[domain] = [_out(model, inputs) for _ in range(5)]
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d,)) for d in expected]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert all(torch.equal(o, expected[d]) for d, outs in results.items() for o in outs)


@pytest.mark.parametrize("family,gate", [("bert", "sequence"), ("llama", "token")])
def test_gate_weights_are_the_softmax_of_the_gate_logits(family, gate):
    model = _patched(family, gate=gate)
    inputs = batch(family, B=3, T=8)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args[0]))
             for i, m in mf.mixda_modules(model).items()]
    with torch.no_grad(), mf.gate_weights(model) as calls:
        model(**inputs)
        model(**inputs, mixda_domains={1: "news"})
    for h in hooks:
        h.remove()
    assert len(calls) == 2 and sorted(calls[0]) == sorted(mf.mixda_modules(model))
    mask = inputs["attention_mask"]
    for i, m in mf.mixda_modules(model).items():
        with torch.no_grad():                                     # the gate by hand: eager MLP on h
            z = m.host_intermediate(seen[i])
            if gate == "sequence":
                last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
                z = z[torch.arange(z.shape[0]), last]
            manual = torch.softmax(m.gate(z), -1)
        assert calls[0][i].shape == manual.shape == ((3, 4) if gate == "sequence" else (3, 8, 4))
        torch.testing.assert_close(calls[0][i], manual, rtol=1e-5, atol=1e-6)
    news = torch.zeros(4)
    news[2] = 1
    assert torch.equal(calls[1][1], news.expand_as(calls[1][1]))
    assert torch.equal(calls[1][0], calls[0][0])


def test_training_through_a_forced_domain_reaches_only_its_adapters():
    model = _patched(head="cls", mixing="residual")
    mf.mark_trainable(model, "domain")
    model.train()
    out = model(**batch("bert", B=2, T=8), mixda_domains=["law", "law"])
    out.logits.sum().backward()
    layer = mf.mixda_modules(model)[1]
    grads = {d: layer.adapters[d].up.weight.grad for d in DOMAINS}
    assert grads["law"] is not None and torch.isfinite(grads["law"]).all() and grads["law"].abs().sum() > 0
    assert all(grads[d] is None or not grads[d].any() for d in ("bio", "news"))
    assert all(p.grad is None for p in layer.gate.parameters())    # a forced gate does not run


@pytest.mark.parametrize("spec,message", [
    ("math", "'math' is not one of the model's domains"),
    ({"bio": 0.5}, "sum 1"),
    ([0.5, 0.5], "2 weights for a gate of 4"),
    ([1.5, -0.5, 0.0, 0.0], "non-negative"),
    ([float("nan"), 0, 0, 1], "finite"),
    ({7: "bio"}, "layer 7 is not accepted"),
    ({0: "bio", "law": 1.0}, "mixes layer indices and domain names"),
    (["bio", "law"], "2 rows for a batch of 3"),
    (3, "it is of type int"),
])
def test_bad_choices_are_refused_in_one_line_before_any_work(spec, message):
    model = _patched()
    inputs = batch("bert", B=3, T=8)
    ran = []
    hook = mf.mixda_modules(model)[0].register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises((ValueError, TypeError)) as e:
        model(**inputs, mixda_domains=spec)
    assert message in str(e.value) and "\n" not in str(e.value) and "mixda_domains" in str(e.value)
    assert not ran                                                 # refused before the first layer
    hook.remove()
    if not isinstance(spec, list) or len(spec) == 4:
        with pytest.raises((ValueError, TypeError), match="domain_forced"):
            with mf.domain_forced(model, spec):
                pass
    assert torch.equal(_out(model, inputs), _out(copy.deepcopy(model), inputs))   # nothing left forced
    with pytest.raises(ValueError, match="layers=.* with a dict of layers"):
        with mf.domain_forced(model, {0: "bio"}, layers=[0]):
            pass


def test_rows_of_a_block_checked_at_the_first_layer_and_hooks_gone_after_unpatch():
    model = tiny_model("bert")
    pre, post = len(model._forward_pre_hooks), len(model._forward_hooks)
    mf.patch_model(model, mf.MixDAConfig(domains=DOMAINS))
    message = r"^domain_forced: domains=\['bio', 'law'\] is not accepted for this batch: 2 rows for a batch of 3;"
    with mf.domain_forced(model, ["bio", "law"]), pytest.raises(ValueError, match=message):
        _out(model, batch("bert", B=3, T=8))
    with mf.domain_forced(model, {1: ["bio", None]}), pytest.raises(ValueError, match=r"domains\[1\]=\['bio', None\]"):
        _out(model, batch("bert", B=3, T=8))
    copied = copy.deepcopy(model)                                  # a copy forces on its own
    inputs = batch("bert")
    assert torch.equal(_out(copied, inputs, mixda_domains="bio"), _out(model, inputs, mixda_domains="bio"))
    mf.unpatch_model(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == (pre, post)


def test_generate_under_domain_forced_gives_each_row_its_domain():
    """generate() refuses keywords the model's forward does not name, so it forces through the
    block; each row of a mixed batch generates what it generates alone with its domain."""
    model = _patched("llama", head="lm")
    inputs = batch("llama", B=2, T=6, pad=False)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with mf.domain_forced(model, ["bio", "news"]):
        mixed = model.generate(**inputs, **kw)
    for b, d in enumerate(["bio", "news"]):
        with mf.domain_forced(model, d):
            alone = model.generate(**{k: v[b:b + 1] for k, v in inputs.items()}, **kw)
        assert torch.equal(mixed[b], alone[0])
    with mf.domain_forced(model, "bio"), mf.domain_forced(model, "news"):
        other = model.generate(**inputs, **kw)
    assert not torch.equal(mixed, other)


def test_unpatched_or_mode_models_and_bad_layers_are_refused():
    model = tiny_model("bert")
    for fn in (lambda: mf.domain_forced(model, "bio"), lambda: mf.gate_weights(model)):
        with pytest.raises(ValueError, match="(domain_forced|gate_weights): model=BertModel is not patched with MixDA"):
            with fn():
                pass
    mf.patch_model(model, mf.MoDEConfig(num_blocks=1, num_experts=2, expert_layers=1))
    with pytest.raises(ValueError, match="domain_forced: .* is patched with MoDE, not MixDA"):
        with mf.domain_forced(model, "bio"):
            pass
    model = _patched()
    for layers, exc in (("0", TypeError), ([0, 9], ValueError), ([True], TypeError), ([], ValueError)):
        with pytest.raises(exc, match="domain_forced.*layer"):
            with mf.domain_forced(model, "bio", layers=layers):
                pass
