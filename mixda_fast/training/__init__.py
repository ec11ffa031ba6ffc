"""Training on HuggingFace ``Trainer``: what both methods share, and each method's stages.

Shared:
- :mod:`.data`: knowledge / general-text / task files via ``datasets``, whole-span masking,
  the k-shot sampler, collators;
- :mod:`.losses`: L_knowledge, L_old, the model wrappers the Trainer sees;
- :mod:`.trainer`: ``MixDATrainer`` (custom ``compute_loss``, gate learning rate,
  trainable-only checkpoints);
- :mod:`.runs`: run folders (the ``mixda_run.json`` manifest, base model loading, head files);
- :mod:`.lm_head`: fitting a missing masked-LM head before stage 1;
- :mod:`.evaluate`: fact exact-match, task accuracy / macro-F1, general drift, masked-LM loss;
- :mod:`.baselines`: LoRA and full fine-tuning trained like MixDA's stage 1 (demo, benchmarks);
- :mod:`.corpora`: invented names and Python-docs prose (demo and benchmark data).

The stages: :mod:`.mixda_stage1`, :mod:`.mixda_stage2` (MixDA, docs/design.md section 2) and
:mod:`.mode_stages` (MoDE, docs/design.md section 3).

Everything here loads transformers and datasets, so it is imported on first use
(``mixda_fast.training.run_stage1`` works).
"""

_LAZY = {
    "run_stage1": "mixda_stage1", "default_layers": "mixda_stage1",
    "run_stage2": "mixda_stage2", "build_stage2_model": "mixda_stage2", "load_run": "mixda_stage2",
    "read_run": "runs", "load_lm": "runs", "load_pretrained": "runs", "fit_mlm_head": "lm_head",
    "MixDATrainer": "trainer", "training_arguments": "trainer", "accuracy_and_macro_f1": "trainer",
    "Stage1Model": "losses", "knowledge_loss": "losses", "old_knowledge_loss": "losses",
    "fact_exact_match": "evaluate", "evaluate_task": "evaluate", "general_drift": "evaluate",
    "masked_lm_loss": "evaluate", "train_masked_lm": "baselines", "lora_config": "baselines",
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
