"""The package's one way to write a file and one way to read a tensor file back.

Writing (:func:`write_atomic`): the new content goes to an unnamed file in the target's folder
(Linux ``O_TMPFILE``; elsewhere a hidden temporary name), is ``fsync``-ed, and only then takes
the target's name with a rename, after which the folder is ``fsync``-ed too (best effort).
Readers see the old file or the new one, never half of one; a failed or interrupted write
(any exception, KeyboardInterrupt included) leaves nothing behind, and with ``O_TMPFILE`` not
even a ``SIGKILL`` does. New files get ``0o666 & ~umask``, as ``open()`` and HuggingFace's own
files do.

Paths (:func:`as_path`, :func:`file_in`): a file, or an existing folder with the writer's
default file name inside it.

Tensor files (:func:`save_tensors`, :func:`save_safetensors`, :func:`read_safetensors`,
:func:`check_tensors`, :func:`load_into`):
safetensors files whose metadata ``format`` says which writer made them. A writer replaces an
existing file only when it is one of its own format (never, e.g., the user's ``train.jsonl``);
a loader checks the format, then every expected key, shape, dtype and finiteness before it
copies anything, so a failed load leaves the model as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save

__all__ = ["write_atomic", "write_json", "save_safetensors", "save_tensors", "check_replaceable", "read_safetensors",
           "check_tensors", "load_into", "as_path", "file_in", "AdapterFileNotFoundError", "ADAPTERS", "EXPERTS", "TASK_ADAPTERS", "TRAINABLE", "LM_HEAD", "HEAD"]

ADAPTERS = "mixda_fast.adapters/1"
EXPERTS = "mixda_fast.mode/1"
TASK_ADAPTERS = "mixda_fast.task_adapters/1"
TRAINABLE = "mixda_fast.trainable/1"
LM_HEAD = "mixda_fast.lm_head/1"
HEAD = "mixda_fast.head/1"
_KNOWN = {ADAPTERS: ("MixDA adapter", "mixda_fast.load_adapters"),
          EXPERTS: ("MoDE expert", "mixda_fast.load_experts"),
          TASK_ADAPTERS: ("task adapter", "mixda_fast.load_task_adapters"),
          TRAINABLE: ("MixDATrainer checkpoint", "Trainer.train(resume_from_checkpoint=...)"),
          LM_HEAD: ("stage-1 LM head", "mixda_fast.training.load_run"),
          HEAD: ("stage-2 head", "mixda_fast.training.load_run")}

PathLike = Union[str, os.PathLike]


class AdapterFileNotFoundError(FileNotFoundError, ValueError):
    """The file to load does not exist (both a FileNotFoundError and a ValueError)."""


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass    # some file systems cannot sync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def _unlink(name: Optional[str]) -> None:
    if name is not None:
        try:
            os.unlink(name)
        except OSError:
            pass


def write_atomic(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """``write(f)`` writes the content to the binary file object ``f``; it then becomes
    ``path`` atomically (see the module docstring). Returns ``path``."""
    path = os.path.abspath(path)
    folder, base = os.path.split(path)

    def temp_name() -> str:
        return os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp")

    named = None                      # a name the content has in the folder, to remove on failure
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
    except (AttributeError, OSError):  # no O_TMPFILE (not Linux, or the file system lacks it)
        named = temp_name()
        fd = os.open(named, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if named is None:          # name the unnamed file in the folder
                named = temp_name()
                try:
                    os.link(f"/proc/self/fd/{f.fileno()}", named, follow_symlinks=True)
                except OSError:        # /proc may not link it (e.g. EXDEV in a container): copy it
                    with open(named, "xb") as g:
                        f.seek(0)
                        shutil.copyfileobj(f, g)
                        g.flush()
                        os.fsync(g.fileno())
        os.replace(named, path)
        named = None
    except BaseException:
        _unlink(named)
        raise
    _fsync_dir(folder)
    return Path(path)


def write_json(path: PathLike, data) -> Path:
    """``data`` as indented JSON (keys sorted) through :func:`write_atomic`."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode()))


def as_path(path, fn: str, name: str = "path", what: str = "file path") -> Path:
    """``path`` as a Path; a TypeError naming ``fn`` and the argument ``name`` when it is not a
    str or os.PathLike (``what``: the kind of path expected)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: {name}={path!r} is not accepted: expected a str or os.PathLike {what}")
    return Path(path)


def file_in(path, fn: str, name: str, *, existing: tuple[str, ...] = (), writing: bool = False) -> Path:
    """The file ``path`` names: ``path`` itself, or, when it is a folder, the first of
    ``existing`` that is in it, else ``name`` in it. ``writing``: its folder must exist."""
    path = as_path(path, fn)
    if path.is_dir():
        path = next((path / n for n in existing if (path / n).exists()), path / name)
    if writing and not path.parent.is_dir():
        raise ValueError(f"{fn}: path={str(path)!r} is not accepted: folder {str(path.parent)!r} does not exist")
    return path


def _format_of(path: Path) -> Optional[str]:
    """The ``format`` in a safetensors file's metadata, or None when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:   # safetensors raises its own error types for files that are not safetensors
        return None


def check_replaceable(path: Path, fmt: str, fn: str) -> None:
    """Refuse ``path`` when it exists and is not a file of format ``fmt`` (the writer's own)."""
    if path.exists() and (not path.is_file() or _format_of(path) != fmt):
        raise ValueError(f"{fn}: path={str(path)!r} is not accepted: it exists and is not a file this function "
                         f"wrote; expected a new file name, an existing folder, or a {fmt!r} safetensors file "
                         "to replace")


def save_safetensors(tensors: dict, path: PathLike, metadata: dict, fn: str = "save_safetensors") -> Path:
    """safetensors ``save`` through :func:`write_atomic`, after :func:`check_replaceable`
    for ``metadata["format"]``; returns ``path``."""
    path = Path(path)
    check_replaceable(path, metadata["format"], fn)
    return write_atomic(path, lambda f: f.write(save(tensors, metadata=metadata)))


def save_tensors(tensors: dict, path: PathLike, metadata: dict, fn: str) -> Path:
    """Live tensors (parameters) saved as detached, contiguous CPU copies with
    :func:`save_safetensors`; returns ``path``."""
    cpu = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    return save_safetensors(cpu, path, metadata, fn)


def read_safetensors(path: Path, fmt: str, fn: str, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of the safetensors file ``path``, which must have format ``fmt``."""
    what, reader = _KNOWN.get(fmt, (fmt, fn))
    if not path.is_file():
        raise AdapterFileNotFoundError(2, f"{fn}: path={str(path)!r} does not exist; expected a {what} file "
                                          f"(format={fmt!r})", str(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{fn}: path={str(path)!r} is not a readable safetensors file "
                         f"(truncated or not safetensors): {e}") from None
    if meta.get("format") != fmt:
        other = _KNOWN.get(meta.get("format"))
        hint = f" (a {other[0]} file: load it with {other[1]})" if other else ""
        raise ValueError(f"{fn}: path={str(path)!r} has format={meta.get('format')!r}; expected a {what} file "
                         f"with format={fmt!r}{hint}")
    return meta, data


def check_tensors(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str,
                  optional: frozenset = frozenset()) -> None:
    """Refuse unless ``tensors`` holds every key of ``targets`` (those in ``optional`` may be
    absent) and nothing else, each with the target's shape, a dtype that casts to it (floating
    to floating) and only finite values. ``where`` names the file; errors name the key."""
    missing = sorted(set(targets) - set(tensors) - set(optional))
    unexpected = sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise ValueError(f"{where}: tensor names differ from what the model expects; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, t in tensors.items():
        p = targets[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(t.shape)}; the model expects {tuple(p.shape)}")
        if t.is_floating_point() != p.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{where}: tensor {k!r} has dtype {t.dtype}; the model expects {p.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: tensor {k!r} holds non-finite values (NaN or Inf)")


def load_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str,
              optional: frozenset = frozenset()) -> None:
    """:func:`check_tensors`, then copy every tensor into its target (nothing is copied unless
    everything fits)."""
    check_tensors(targets, tensors, where, optional)
    with torch.no_grad():
        for k, t in tensors.items():
            targets[k].copy_(t)
