"""PEFT-style adapter folders for any method: :func:`save_pretrained` and :func:`from_pretrained`.

A folder holds, at its top level (what ``huggingface_hub.upload_folder`` uploads as it is):

- ``adapter_config.json``: ``library_name`` ("mixda_fast"), ``format_version``,
  ``mixda_fast_version``, ``method`` ("mixda", "mode"), ``base_model_name_or_path``,
  ``base_model_class``, ``model_type``, ``patch`` (what the patch covers, from the method's
  ``describe``: MixDA's layers, MoDE's blocks) and ``config`` (the method config's ``to_dict()``);
- ``adapter_model.safetensors``: the patch's tensors (``Method.tensors``: names that do not depend
  on the task head, so a stage-1 masked-LM folder loads into a classifier), with the metadata
  ``{"format": "pt"}`` that PEFT and transformers write (transformers' safetensors loader requires
  it); the folder's identity is ``adapter_config.json``;
- ``README.md``: a model card whose YAML front matter says ``library_name: mixda_fast``,
  ``base_model`` (a Hub id; a local path is left out) and ``tags``; written when the folder has no
  card or one this module wrote (a user's own card is left alone).

There is no ``peft_type``: the folder is not a PEFT adapter, and PEFT must not take it for one.

:func:`from_pretrained` patches an unpatched base model with the recorded config and loads every
tensor, each checked (name, shape, finiteness) before any is copied; on any error the patch is
undone and the model is exactly as it was. A folder holding the method's own whole-patch file
(``mixda_adapters.safetensors`` of ``save_adapters``, ``mode_experts.safetensors`` of
``save_experts``: ``Method.legacy_file``) loads too. The core names no method: everything
method-specific comes from :class:`~.patch.Method`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from ..version import __version__
from .io import AdapterFileNotFoundError, as_path, load_into, read_safetensors, save_tensors, write_atomic, write_json
from .patch import PatchState, is_patched, method_named, methods, patch_state, patching
from .wrappers import unwrap

__all__ = ["save_pretrained", "from_pretrained", "read_adapter_config", "check_writable", "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME",
           "FORMAT_VERSION", "LIBRARY"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
LIBRARY = "mixda_fast"
FORMAT_VERSION = 1
"""The layout version this package writes and the newest it reads."""
_WEIGHTS_FORMAT = "pt"


def _name_or_path(model: nn.Module) -> Optional[str]:
    """The checkpoint the model was loaded from (``config._name_or_path``, as PEFT records it)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _folder_state(model: nn.Module, fn: str) -> PatchState:
    """The model's patch state; its method must give the callables an adapter folder needs."""
    state = patch_state(model, fn)
    if state.method.tensors is None or state.method.describe is None:
        raise ValueError(f"{fn}: the {state.method.title} method registers no tensors/describe callables "
                         "(mixda_fast.core.patch.Method); adapter folders need both")
    return state


def check_writable(folder: Path, fn: str) -> None:
    """Refuse a file, and a folder holding another library's adapter files (a PEFT adapter), as
    :func:`save_pretrained` will: training stages call it before they train."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{fn}: save_directory={str(folder)!r} is not accepted: it is a file; expected a folder "
                         "(created when missing)")
    config, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if config.exists():
        read_adapter_config(folder, fn)         # refuses what is not ours (a PEFT adapter_config.json)
    elif weights.exists():
        raise ValueError(f"{fn}: save_directory={str(folder)!r} is not accepted: it holds {WEIGHTS_NAME} without "
                         f"{CONFIG_NAME}, a file this function did not write; expected a new or empty folder, or "
                         "an adapter folder to replace")


def _card(record: dict, title: str) -> str:
    """README.md: YAML front matter for the Hub, and how to load the folder."""
    name = record["base_model_name_or_path"]
    hub_id = name if name and not os.path.isabs(name) and not name.startswith((".", "~")) else None
    front = ["---", f"library_name: {LIBRARY}"]
    if hub_id:
        front.append(f"base_model: {json.dumps(hub_id)}")
    front += ["tags:", f"- {LIBRARY}", f"- {record['method']}", "---", ""]
    cls = record.get("base_model_class") or "AutoModel"
    body = [f"# {title} adapters" + (f" for {name}" if name else ""), "",
            f"A {title} patch saved by mixda_fast {record['mixda_fast_version']}: "
            f"{json.dumps(record['config'].get('domains'))}, {json.dumps(record['patch'])}.", "",
            "```python", "import mixda_fast, transformers", "",
            f"base = transformers.{cls}.from_pretrained({json.dumps(name or 'BASE_MODEL')})",
            "model = mixda_fast.from_pretrained(base, \"path/to/this/folder\")", "```", ""]
    return "\n".join(front + body)


def _ours(card: Path) -> bool:
    """Whether an existing README.md is a card this module wrote (its front matter says so)."""
    head = card.read_text(errors="replace").split("\n---", 1)[0]
    return head.startswith("---") and f"library_name: {LIBRARY}" in head


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], *,
                    base_model_name_or_path: Optional[str] = None, model_card: bool = True) -> Path:
    """Write the patch of ``model`` (any method) as a PEFT-style adapter folder (see the module
    docstring): ``adapter_config.json``, ``adapter_model.safetensors`` and, with ``model_card``,
    ``README.md``. The folder is created when missing; the adapter files of an earlier save are
    replaced (each atomically), another library's adapter files never.

    ``base_model_name_or_path``: recorded for the reader (default: ``model.config._name_or_path``,
    the checkpoint the base model was loaded from). Returns the folder.
    """
    fn = "save_pretrained"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model={type(model).__name__} is not accepted: expected a patched torch.nn.Module")
    folder = as_path(save_directory, fn, "save_directory", "folder path")
    state = _folder_state(model, fn)
    method = state.method
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"{fn}: base_model_name_or_path={base_model_name_or_path!r} is not accepted: expected a str "
                        "(a Hub id or a local path) or None")
    if not isinstance(model_card, bool):
        raise TypeError(f"{fn}: model_card={model_card!r} is not accepted: expected True or False")
    check_writable(folder, fn)
    inner = unwrap(model)                  # a PeftModel: the transformers model it wraps is the base
    record = {"library_name": LIBRARY, "format_version": FORMAT_VERSION, "mixda_fast_version": __version__,
              "method": method.name, "base_model_name_or_path": base_model_name_or_path or _name_or_path(inner),
              "base_model_class": type(inner).__name__, "model_type": state.model_type,
              "patch": method.describe(model), "config": state.config.to_dict()}
    tensors = method.tensors(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, folder / WEIGHTS_NAME, {"format": _WEIGHTS_FORMAT}, fn)
    write_json(folder / CONFIG_NAME, record)          # last: a folder with this file is complete
    card = folder / CARD_NAME
    if model_card and (not card.exists() or (card.is_file() and _ours(card))):
        text = _card(record, method.title)
        write_atomic(card, lambda f: f.write(text.encode()))
    return folder


def read_adapter_config(save_directory: Union[str, os.PathLike], fn: str = "read_adapter_config") -> dict:
    """The checked ``adapter_config.json`` of an adapter folder (``method`` a registered method,
    ``format_version`` one this package reads, ``config``, ``patch`` and ``model_type`` present).
    A missing file raises :class:`~.io.AdapterFileNotFoundError`; a PEFT adapter's config, another
    library's, a newer format or a missing field raise one-line ValueErrors (``fn`` starts them)."""
    path = as_path(save_directory, fn, "save_directory", "folder path") / CONFIG_NAME
    where = f"{fn}: {str(path)!r}"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterFileNotFoundError(2, f"{where} does not exist; expected an adapter folder that "
                                          "mixda_fast.save_pretrained wrote", str(path)) from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{where} is not readable JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} holds a JSON {type(record).__name__}; expected an object")
    if "peft_type" in record:
        raise ValueError(f"{where} belongs to a PEFT adapter (peft_type={record['peft_type']!r}), not a mixda_fast "
                         "one: load it with peft.PeftModel.from_pretrained")
    if record.get("library_name") != LIBRARY:
        raise ValueError(f"{where} has library_name={record.get('library_name')!r}; expected {LIBRARY!r} (a folder "
                         "that mixda_fast.save_pretrained wrote)")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{where} has format_version={version!r}; expected an int >= 1")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} has format_version={version}, newer than this mixda_fast {__version__} reads "
                         f"(<= {FORMAT_VERSION}; written by mixda_fast {record.get('mixda_fast_version')!r}): "
                         "upgrade mixda_fast")
    if method_named(record.get("method")) is None:
        names = " | ".join(repr(m.name) for m in methods())
        raise ValueError(f"{where} has method={record.get('method')!r}; expected {names}")
    for key, kind in (("config", dict), ("patch", dict), ("model_type", str)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{where} has {key}={record.get(key)!r}; expected a {kind.__name__}")
    return record


def _check_model_type(model: nn.Module, saved, where: str) -> None:
    have = getattr(getattr(model, "config", None), "model_type", None)
    if saved != have:
        raise ValueError(f"{where} was saved from model_type={saved!r}; base_model is model_type={have!r}")


def _from_legacy(model: nn.Module, folder: Path, fn: str) -> nn.Module:
    """A folder holding a method's whole-patch file (``Method.legacy_file``) and no adapter_config.json."""
    found = [m for m in methods() if m.legacy_file and (folder / m.legacy_file).is_file()]
    if len(found) != 1:
        files = ", ".join([CONFIG_NAME] + [m.legacy_file for m in methods() if m.legacy_file])
        what = f"holds several of {files}" if found else f"holds none of {files}"
        whole = ("; a folder of transformers' model.save_pretrained (config.json) is read by mixda_fast.load_patched"
                 if not found and (folder / "config.json").is_file() else "")
        raise AdapterFileNotFoundError(2, f"{fn}: save_directory={str(folder)!r} is not an adapter folder: it {what}; "
                                          f"expected a folder that mixda_fast.save_pretrained wrote{whole}", str(folder))
    method = found[0]
    path = folder / method.legacy_file
    meta, _ = read_safetensors(path, method.legacy_format, fn, tensors=False)
    where = f"{fn}: {str(path)!r}"
    if meta.get("kind") != "all":
        raise ValueError(f"{where} has kind={meta.get('kind')!r}; expected 'all' (a whole {method.title} patch)")
    _check_model_type(model, meta.get("model_type"), where)
    config = method.config_class.from_json(meta.get("config", "null"), source=f"{fn}: {str(path)!r}")
    with patching(model, config):
        method.load_legacy(model, path)
    return model


def from_pretrained(base_model: nn.Module, save_directory: Union[str, os.PathLike]) -> nn.Module:
    """Rebuild the patched model of an adapter folder (:func:`save_pretrained`, or the output
    folder of ``mixda-fast stage1`` / ``stage2``) on ``base_model``, the unpatched model the patch
    was trained on (any task head: the tensor names do not depend on it).

    Patches ``base_model`` in place with the recorded method and config and loads every tensor,
    all checked before any is copied; returns it. Outputs equal the saved model's bit for bit.
    The training mode and ``requires_grad`` flags are left as ``patch_model`` leaves them (use
    :func:`mixda_fast.mark_trainable`). Raises one line naming what is wrong (no folder, not an
    adapter folder, another model_type, an already patched model, different layers or shapes,
    a newer format); then the model is exactly as it was.
    """
    fn = "from_pretrained"
    if not isinstance(base_model, nn.Module):
        raise TypeError(f"{fn}: base_model={type(base_model).__name__} is not accepted: expected the unpatched "
                        "torch.nn.Module (a HuggingFace PreTrainedModel) the adapters were trained on")
    folder = as_path(save_directory, fn, "save_directory", "folder path")
    if not folder.is_dir():
        raise AdapterFileNotFoundError(2, f"{fn}: save_directory={str(folder)!r} is not an existing folder; expected "
                                          "a folder that mixda_fast.save_pretrained wrote", str(folder))
    if is_patched(base_model):
        raise ValueError(f"{fn}: base_model is already patched ({patch_state(base_model, fn).method.title}); pass the "
                         "unpatched base model, or call mixda_fast.unpatch_model(base_model) first")
    if not (folder / CONFIG_NAME).exists():
        return _from_legacy(base_model, folder, fn)
    record = read_adapter_config(folder, fn)
    where = f"{fn}: {str(folder)!r}"
    method = method_named(record["method"])
    _check_model_type(base_model, record["model_type"], where)
    config = method.config_class.from_dict(record["config"], source=f"{fn}: {str(folder / CONFIG_NAME)!r}")
    _, tensors = read_safetensors(folder / WEIGHTS_NAME, _WEIGHTS_FORMAT, fn)
    with patching(base_model, config):
        have = method.describe(base_model)
        if have != record["patch"]:
            raise ValueError(f"{where} does not fit base_model: patch {json.dumps(record['patch'])} in the folder, "
                             f"{json.dumps(have)} on this model")
        load_into(method.tensors(base_model), tensors, f"{fn}: {str(folder / WEIGHTS_NAME)!r}")
    return base_model
