"""MoDE block: the batched fast path against the eager per-expert loop (pytest-benchmark).

    python -m pytest bench/test_mode_bench.py --benchmark-only --benchmark-group-by=group

One group per (shape, N, tokens, mode): "loop" runs every expert layer on its own and mixes with
the plain-torch formula (the reference); "batched" runs the N experts' FFN GEMMs as one batched
GEMM over stacked weights and mixes with the fused softmax-combine op ("auto", the default, is
"batched" for inference and the per-expert layers with the fused mix for training). Only the block's expert
work and the mix are timed (the backbone slice is the same in both and runs once to capture the
block's input). Not collected by default (pyproject: testpaths = ["tests"]).
"""

import pytest
import torch
import transformers as tf

import mixda_fast as mf

SHAPES = {
    # Llama-style gated MLP, 8 heads; GPT-2-small-like width
    "llama-512": lambda: tf.LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                                        num_key_value_heads=8, num_hidden_layers=2, vocab_size=256),
    "gpt2-768": lambda: tf.GPT2Config(n_embd=768, n_layer=2, n_head=12, vocab_size=256),
}
TOKENS = {"16x1": (16, 1), "1x128": (1, 128), "4x128": (4, 128)}


def _block_setup(shape: str, n_experts: int, tokens: str, execution: str, train: bool):
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(SHAPES[shape]()).train(train)
    mf.patch_model(model, mf.MoDEConfig(num_blocks=1, num_experts=n_experts, expert_layers=2,
                                        expert_init="random", execution=execution))
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    mf.mark_trainable(model, "domain")
    block = mf.mode_blocks(model)[0]
    B, T = TOKENS[tokens]
    captured = {}
    layers = model.get_submodule(mf.FAMILIES[model.config.model_type].layers)
    hook = layers[0].register_forward_pre_hook(lambda m, a, k: captured.update(inputs=(a, k)), with_kwargs=True,
                                               prepend=True)
    with torch.no_grad(), mf.experts_disabled(model):
        backbone = model(input_ids=torch.randint(0, 256, (B, T)), use_cache=False).last_hidden_state
    hook.remove()
    args, kwargs = captured["inputs"]
    x = args[0].detach().requires_grad_(train)

    def step():
        block._inputs = ((x,) + tuple(args[1:]), kwargs)
        if not train:
            with torch.no_grad():
                return block.mix(backbone)
        block.zero_grad(set_to_none=True)
        block.mix(backbone).sum().backward()

    return step


@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("tokens", list(TOKENS))
@pytest.mark.parametrize("n_experts", [2, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("execution", ["loop", "batched"])
def test_mode_block(benchmark, execution, shape, n_experts, tokens, mode):
    step = _block_setup(shape, n_experts, tokens, execution, mode == "training")
    step()   # warm-up (and builds the stacked weights once, for inference)
    benchmark.group = f"mode {shape} N={n_experts} {tokens} {mode}"
    benchmark.pedantic(step, rounds=7, iterations=1, warmup_rounds=1)
