"""MixDA two-stage training (DESIGN.md section 2), and MoDE's, on HuggingFace ``Trainer``.

- :mod:`.data`: knowledge / general-text / task files via ``datasets``, whole-span masking,
  the k-shot sampler, collators;
- :mod:`.losses`: L_knowledge, L_old (from ``MixDAFFN.capture``), the stage-1 model wrapper;
- :mod:`.task_adapters`: Pfeiffer / Houlsby task adapters;
- :mod:`.trainer`: ``MixDATrainer`` (custom ``compute_loss``, trainable-only checkpoints);
- :mod:`.stage1`, :mod:`.stage2`, :mod:`.evaluate`: the stages and their metrics;
- :mod:`.mode_stages`: MoDE's two stages (DESIGN.md section 3) on the same Trainer and data;
- :mod:`.model_bench`: model-level speed against LoRA and full fine-tuning.

The task-adapter functions are imported eagerly (torch only); the rest loads transformers and
datasets, so it is imported on first use (``mixda_fast.training.run_stage1`` works).
"""

_LAZY = {
    "run_stage1": "mixda_stage1", "load_lm": "mixda_stage1", "default_layers": "mixda_stage1",
    "run_stage2": "mixda_stage2", "build_stage2_model": "mixda_stage2", "load_run": "mixda_stage2", "read_run": "mixda_stage2",
    "MixDATrainer": "trainer", "training_arguments": "trainer", "accuracy_and_macro_f1": "trainer",
    "Stage1Model": "losses", "knowledge_loss": "losses", "old_knowledge_loss": "losses",
    "fact_exact_match": "evaluate", "evaluate_task": "evaluate", "general_drift": "evaluate",
    "DataFileError": "data", "load_knowledge": "data", "load_texts": "data", "load_task": "data",
    "kshot_sample": "data",
    "run_mode_stage1": "mode_stages", "run_mode_stage2": "mode_stages", "lm_metrics": "mode_stages",
    "load_mode_run": "mode_stages",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
