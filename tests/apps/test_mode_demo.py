"""The MoDE demo runs end to end on a few steps (its numbers are not checked here)."""

import mixda_fast.demo.mode as demo


def test_demo_runs_and_reports_every_method(tmp_path):
    results, stage_ms = demo.run(steps=1, pretrain_steps=1, n_train=32, n_eval=8, replay=0.2, timing_rounds=1)
    names = [r.method for r in results]
    assert names[0].startswith("backbone") and "full fine-tuning" in names and "MoDE composed (stage 2)" in names
    assert all(set(r.acc) == {"A", "B", "general"} and all(0 <= v <= 1 for v in r.acc.values()) for r in results)
    lora = next(r for r in results if r.method.startswith("LoRA"))
    full = next(r for r in results if r.method == "full fine-tuning")
    assert 0 < lora.trainable < full.trainable and lora.ms_per_step > 0
    assert set(stage_ms) == {"MoDE stage 2, execution='auto' (default)", "MoDE stage 2, execution='batched'",
                             "MoDE stage 2, execution='loop'"}
    text = demo.table(results, stage_ms)
    assert "MoDE composed" in text
    demo.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
