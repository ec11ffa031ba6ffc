"""One patched model serves several threads at once: every call's state (attention mask,
old-knowledge pairs, MoDE block inputs) is its own, and no forward repacks parameters."""

import threading

import pytest
import torch

import mixda_fast as mf
from mixda_fast.mixda.patching import mixda_state as patch_state
from tiny_models import batch, randomize_patch, tiny_model

THREADS = 3
ITERATIONS = 25


def _batches(family):
    """Different shapes and padding per thread: a mask read from another call changes the answer."""
    return [batch(family, B=2 + i, T=6 + 2 * i, seed=10 + i) for i in range(THREADS)]


def _hammer(fn, inputs: list) -> list:
    """Run fn(inputs[i]) ITERATIONS times in thread i, all threads at once; the outputs per thread."""
    results = [[] for _ in inputs]
    errors = []
    start = threading.Barrier(len(inputs))

    def work(i):
        try:
            start.wait()
            for _ in range(ITERATIONS):
                results[i].append(fn(inputs[i]))
        except BaseException as e:          # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _check_exact(fn, inputs):
    want = [fn(x) for x in inputs]                        # one thread, one call at a time
    for i, outs in enumerate(_hammer(fn, inputs)):
        assert len(outs) == ITERATIONS
        assert all(torch.equal(o, want[i]) for o in outs), f"thread {i}: an output differs from its lone run"
    # and the reference run changes when another batch's mask is used: the test can see a leak
    other = dict(inputs[0], attention_mask=torch.ones_like(inputs[0]["attention_mask"]))
    assert not torch.equal(fn(other), want[0])


@pytest.mark.parametrize("family,gate", [("bert", "sequence"), ("roberta", "sequence"), ("llama", "token"),
                                         ("gpt2", "token")])
@pytest.mark.parametrize("formulation", ["fused", "folded"])
def test_threads_share_a_patched_model(family, gate, formulation):
    torch.manual_seed(0)
    model = mf.patch_model(tiny_model(family), mf.MixDAConfig(num_domains=2, gate=gate, gate_hidden=16))
    randomize_patch(model)
    for m in mf.mixda_modules(model).values():
        m.formulation = formulation
    ptrs = [p.data_ptr() for p in model.parameters()]

    @torch.no_grad()
    def fn(x):
        return model(**x).last_hidden_state

    _check_exact(fn, _batches(family))
    assert [p.data_ptr() for p in model.parameters()] == ptrs      # no forward repacked a parameter


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_threads_share_a_mode_model(family):
    model = mf.patch_model(tiny_model(family), mf.MoDEConfig(num_blocks=1, num_experts=2, expert_layers=1))
    randomize_patch(model)

    @torch.no_grad()
    def fn(x):
        return model(**x).last_hidden_state

    _check_exact(fn, _batches(family))


def test_collecting_in_one_thread_leaves_other_threads_alone():
    """The old-knowledge pass (collecting (y, f) pairs, stopping early) in one thread while other
    threads run plain forwards: the pairs are that thread's only, the others' outputs exact."""
    model = mf.patch_model(tiny_model("bert"), mf.MixDAConfig(num_domains=2, gate_hidden=16))
    randomize_patch(model)
    calls = patch_state(model).calls
    inputs = _batches("bert")

    @torch.no_grad()
    def plain(x):
        return model(**x).last_hidden_state

    want = [plain(x) for x in inputs]
    pairs = []

    def collect(x):
        caps = []
        with torch.no_grad(), calls.collecting(caps):
            model(**x)
        pairs.append(len(caps))
        return caps[0][0]

    collected = collect(inputs[0])
    results = _hammer(lambda x: collect(x) if x is inputs[0] else plain(x), inputs)
    assert all(n == len(mf.mixda_modules(model)) for n in pairs)   # every layer once, none from other threads
    assert all(torch.equal(o, collected) for o in results[0])
    for i in range(1, THREADS):
        assert all(torch.equal(o, want[i]) for o in results[i])
