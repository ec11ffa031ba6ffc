"""Model-level training steps and inference: MixDA stage 1 / stage 2 against PEFT LoRA at equal
trainable parameters and full fine-tuning, on the same model and batch (pytest-benchmark).

One group per (model, tokens, stage), so each group's table reads as a speed-up. The contenders
and what a step is: :mod:`mixda_fast.benchmarks.model`. For the interleaved measurement with
peak memory and the targets (MixDA step <= 1.0x LoRA, <= 0.5x full fine-tuning), run

    python -m mixda_fast.benchmarks.model [--model bert-base --tokens 8x128]

    pytest bench/test_model_training.py                     # MiniLM (real weights), 16x64 tokens
    pytest bench/test_model_training.py --bench-full        # also BERT-base shapes (8x128), slow
"""

from __future__ import annotations

import pytest

from mixda_fast.benchmarks import model as mb

CASES = [("minilm", 16, 64, False), ("bert-base", 8, 128, True)]
_cache: dict = {}


def _params(stage: str, names):
    out = []
    for model, b, t, huge in CASES:
        for c in names:
            marks = [pytest.mark.huge] if huge else []
            out.append(pytest.param(stage, model, b, t, c, marks=marks,
                                    id=f"{model}-{b}x{t}-{stage}-{c.replace(' ', '_')}"))
    return out


def _steps(stage: str, model: str, b: int, t: int):
    key = (stage, model, b, t)
    if key not in _cache:
        _cache.clear()                       # one group in memory at a time
        build = mb.stage1_contenders if stage == "stage1" else mb.stage2_contenders
        _cache[key] = build(model, b, t)
    return _cache[key]


@pytest.mark.parametrize("stage, model, b, t, contender", _params("stage1", mb.STAGE1) + _params("stage2", mb.STAGE2))
def test_training_step(benchmark, stage, model, b, t, contender):
    step = _steps(stage, model, b, t)[contender]
    benchmark.group = f"{model}-{b}x{t}-{stage}-training-step"
    benchmark.extra_info.update(trainable=step.trainable, lora_rank=getattr(step, "rank", None))
    step()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("stage, model, b, t, contender",
                         _params("inference", ("plain model", "MixDA stage 2", "LoRA (rank 16, unmerged)")))
def test_inference_latency(benchmark, stage, model, b, t, contender):
    key = (stage, model, b, t)
    if key not in _cache:
        _cache.clear()
        _cache[key] = mb.inference_contenders(model, b, t)
    fwd = _cache[key][contender]
    benchmark.group = f"{model}-{b}x{t}-inference"
    benchmark.pedantic(fwd, rounds=10, iterations=1, warmup_rounds=2)
