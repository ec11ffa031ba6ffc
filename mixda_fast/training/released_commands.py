"""The ``mixda-fast import-released`` and ``export-released`` commands (:mod:`mixda_fast.mixda.released`).

- ``import-released --model CKPT --files F [F ...] --output DIR``: patch the base model with the
  config the files need (:func:`~mixda_fast.mixda.released.released_config`), load them
  (:func:`~mixda_fast.mixda.released.import_released`) and write ``DIR`` as an adapter folder
  (:func:`mixda_fast.save_pretrained`: ``adapter_config.json`` with the base model's path,
  ``adapter_model.safetensors``, ``README.md``), the layout of the stage folders, so
  ``mixda_fast.from_pretrained(base, DIR)`` rebuilds the patched model;
- ``export-released --model CKPT --adapters PATH --output PATH``: the way back, from such a folder
  (or a stage folder, or a whole-patch file of ``save_adapters`` or a folder holding one: any MixDA
  patch made like the released layer) to the released layout.

Both check everything before writing anything; a bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_parsers"]


def add_parsers(sub) -> None:
    """Add both subcommands to the ``mixda-fast`` subparsers ``sub``."""
    i = sub.add_parser("import-released", help="load checkpoints of the released MixDA code into a mixda_fast "
                                               "adapter folder",
                       description="Read torch.save checkpoint(s) of the released MixDA code ('{layer}-{j}-adapter', "
                                   "'{layer}-gating' or one-domain '{layer}-adapter' keys), patch the base model "
                                   "like the released layer (paper mixing, sequence gate at position -1) and write "
                                   "OUTPUT as an adapter folder (adapter_config.json, adapter_model.safetensors, "
                                   "README.md) that mixda_fast.from_pretrained(base, OUTPUT) loads. Prints one JSON "
                                   "line.")
    i.add_argument("--model", required=True, help="local checkpoint folder of the base model (the released code's: "
                                                   "RoBERTa)")
    i.add_argument("--files", required=True, nargs="+", help="released checkpoint file(s); their domains fill the "
                                                              "K domains in order")
    i.add_argument("--output", required=True, help="output folder (created if missing; an adapter folder written "
                                                    "before is replaced)")
    i.add_argument("--domains", nargs="+", help="names of the K domains (default domain_0 ...)")
    i.add_argument("--fix-gate-bug", action="store_true",
                   help="paper_gate_bug=False: the gate reads each sequence's last real token, not position -1 "
                        "(equal to the released layer on rows without padding at the end)")
    i.set_defaults(func=import_command)
    e = sub.add_parser("export-released", help="write mixda_fast adapters in the released MixDA code's layout",
                       description="Rebuild the patched model from an adapter folder (import-released, a stage "
                                   "folder, mixda_fast.save_pretrained) or a whole-patch file of save_adapters, and "
                                   "write the released code's torch.save layout. Prints one JSON line.")
    e.add_argument("--model", required=True, help="local checkpoint folder of the base model")
    e.add_argument("--adapters", required=True, help="adapter folder (adapter_config.json), or a whole-patch file of "
                                                      "save_adapters, or a folder holding mixda_adapters.safetensors")
    e.add_argument("--output", required=True, help="file, or an existing folder (then mixda_released.pt inside)")
    e.add_argument("--domain", help="write only this domain, under '{layer}-adapter' (what the released stage 2 reads)")
    e.set_defaults(func=export_command)


def _base_model(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # local files only; nothing is downloaded
    import transformers

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path!r} is not a folder; expected a local HuggingFace checkpoint "
                                "(config.json and weights); nothing is downloaded")
    from .runs import load_pretrained

    # transformers' load report held back; only the patch's shapes matter here (the commands read and
    # write adapters and gates), so no missing base weight (a pooler an MLM checkpoint lacks) is news
    return load_pretrained(transformers.AutoModel, path, expected=lambda model, missing: missing)[0].eval()


def _one_line(command: str, run) -> int:
    try:
        print(json.dumps(run()))
        return 0
    except (ValueError, TypeError, FileNotFoundError) as e:   # bad files, paths, names: one clear line
        print(f"mixda-fast {command}: error: {e}", file=sys.stderr)
        return 2


def import_command(args: argparse.Namespace) -> int:
    from ..core.adapter_folder import save_pretrained
    from ..core.patch import patch_model
    from ..mixda.released import import_released, released_config

    def run() -> dict:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise ValueError(f"--output {args.output!r} is not accepted: it is a file; expected a folder")
        config = released_config(args.files, args.domains, paper_gate_bug=not args.fix_gate_bug)
        model = patch_model(_base_model(args.model), config)
        import_released(model, args.files)
        folder = save_pretrained(model, args.output, base_model_name_or_path=os.path.abspath(args.model))
        return {"written": str(folder), "domains": list(config.domains), "layers": config.layers,
                "paper_gate_bug": config.paper_gate_bug}
    return _one_line("import-released", run)


def export_command(args: argparse.Namespace) -> int:
    from ..core.adapter_folder import CONFIG_NAME, from_pretrained, read_adapter_config
    from ..core.io import ADAPTERS, as_path, file_in, read_safetensors
    from ..core.patch import patch_model
    from ..mixda.config import MixDAConfig
    from ..mixda.released import export_released
    from ..mixda.saving import FILE_NAME, load_adapters

    def run() -> dict:
        folder = as_path(args.adapters, "export-released")
        if (folder / CONFIG_NAME).is_file():          # an adapter folder: import-released, a stage, save_pretrained
            method = read_adapter_config(folder, "export-released")["method"]
            if method != "mixda":
                raise ValueError(f"--adapters {str(folder)!r} holds a {method!r} patch; expected a MixDA one (the "
                                 "released layer is MixDA)")
            model = from_pretrained(_base_model(args.model), folder)
        else:                                         # a whole-patch file of save_adapters, or a folder holding one
            path = file_in(args.adapters, "export-released", FILE_NAME)
            meta, _ = read_safetensors(path, ADAPTERS, "export-released", tensors=False)
            if meta.get("kind") != "all":
                raise ValueError(f"--adapters {str(path)!r} holds one domain (kind={meta.get('kind')!r}); expected a "
                                 "whole-patch file (adapters and gates)")
            model = patch_model(_base_model(args.model), MixDAConfig.from_json(meta.get("config", "null"), source=str(path)))
            load_adapters(model, path)
        written = export_released(model, args.output, domain=args.domain)
        return {"written": str(written)}
    return _one_line("export-released", run)
