"""Shared checks of user input: safe names, finite and ranged numbers, size caps, run-folder files.

Every check raises ``TypeError`` (wrong type) or ``ValueError`` (right type, value not accepted)
with one line in the house style ``WHERE=VALUE is not accepted: expected WHAT`` (``WHERE`` is
e.g. ``MixDAConfig.domains`` or ``read_run: /x/mixda_run.json: stage``; without ``WHERE`` the
line starts with the value, as argparse prints it after ``argument --flag:``). The configs
(:class:`~mixda_fast.MixDAConfig`, :class:`~mixda_fast.MoDEConfig`), the manifest reader
(:func:`mixda_fast.training.read_run`), the task loader and the ``mixda-fast`` command all use
these, so one rule is written once.

The caps refuse sizes no real model has but that a corrupt or hostile file can ask for (a 2 KB
file whose metadata says ``num_domains=10**12`` would otherwise exhaust memory when patched).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence, Union

__all__ = [
    "MAX_NAME_LENGTH", "MAX_DOMAINS", "MAX_GATE_HIDDEN", "MAX_GATE_LAYERS", "MAX_REDUCTION_FACTOR",
    "MAX_LAYERS", "MAX_EXPERT_LAYERS", "MAX_CLASSES", "MAX_THREADS", "MAX_EPOCHS", "MAX_INT", "MAX_SEED",
    "NAME_RULE", "fail", "is_int", "check_int", "check_float", "check_name", "check_names", "check_choice",
    "check_labels", "config_from_dict", "config_from_json",
    "run_file",
]

MAX_NAME_LENGTH = 100
"""Longest domain / expert name (characters)."""
MAX_DOMAINS = 1024
"""Most domain adapters (MixDA K) or experts (MoDE N) per patch."""
MAX_GATE_HIDDEN = 65536
"""Widest MixDA gate MLP hidden layer."""
MAX_GATE_LAYERS = 64
"""Most Linear layers in a MixDA gate MLP."""
MAX_REDUCTION_FACTOR = 2 ** 20
"""Largest adapter reduction factor (MixDA domain adapters and task adapters)."""
MAX_LAYERS = 4096
"""Most transformer layers a model may have: layer indices lie in -MAX_LAYERS .. MAX_LAYERS - 1,
and a MoDE patch has at most this many blocks."""
MAX_EXPERT_LAYERS = 256
"""Most layers in one MoDE expert (L_e)."""
MAX_CLASSES = 100_000
"""Most classes of a stage-2 classification head."""
MAX_THREADS = 4096
"""Most torch threads (``--threads``)."""
MAX_EPOCHS = 1e6
"""Most training epochs (``--epochs``, ``--warmup-epochs``)."""
MAX_INT = 2 ** 31 - 1
"""Largest count the command accepts (batch sizes, steps, lengths): it must fit an int32."""
MAX_SEED = 2 ** 32 - 1
"""Largest seed (numpy's ``np.random.seed`` takes 0 .. 2**32 - 1)."""

NAME_RULE = (f"1..{MAX_NAME_LENGTH} characters from ASCII letters, digits, '_' and '-', not starting with '-' "
             "(a safe file name)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def fail(where: str, value: Any, accepted: str, exc: type = ValueError) -> NoReturn:
    """Raise ``exc("WHERE=VALUE is not accepted: expected ACCEPTED")`` (``VALUE is not ...`` without WHERE)."""
    raise exc(f"{where + '=' if where else ''}{value!r} is not accepted: expected {accepted}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (True as a width or an index is always a mistake)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _cap(cap: Optional[str]) -> Optional[Union[int, float]]:
    return None if cap is None else globals()[cap]


def _num(x) -> str:
    return str(x) if is_int(x) else f"{x:g}"


def _bounds(lo, hi, cap, lo_open=False, hi_open=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {_num(hi)}" + (f" (mixda_fast.core.validate.{cap})" if cap else ""))
    return " and ".join(parts)


def check_int(where: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None, *,
              cap: Optional[str] = None, shown: Any = None) -> int:
    """``value`` if it is an int (not bool) in ``lo .. hi``; ``cap`` names a constant of this module
    used as ``hi`` (and said in the error). ``shown``: what the error prints instead of ``value``."""
    hi = _cap(cap) if cap is not None else hi
    accepted = " ".join(filter(None, ("an int", _bounds(lo, hi, cap))))
    shown = value if shown is None else shown
    if not is_int(value):
        fail(where, shown, accepted, TypeError)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(where, shown, accepted)
    return value


def check_float(where: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None, *,
                lo_open: bool = False, hi_open: bool = False, cap: Optional[str] = None) -> float:
    """``float(value)`` if ``value`` is a finite number (int or float, not bool) within the bounds
    (``lo_open``/``hi_open``: strict); ``cap`` names a constant of this module used as ``hi``."""
    hi = _cap(cap) if cap is not None else hi
    accepted = " ".join(filter(None, ("a finite number", _bounds(lo, hi, cap, lo_open, hi_open))))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(where, value, accepted, TypeError)
    v = float(value) if not isinstance(value, int) or abs(value) < 2 ** 1000 else math.inf
    if (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
            or (hi is not None and (v >= hi if hi_open else v > hi))):
        fail(where, value, accepted)
    return v


def check_name(where: str, value: Any, shown: Any = None) -> str:
    """``value`` if it is a safe name (:data:`NAME_RULE`); ``shown``: what the error prints."""
    shown = value if shown is None else shown
    if not isinstance(value, str):
        fail(where, shown, f"names of {NAME_RULE}", TypeError)
    if len(value) > MAX_NAME_LENGTH or not _NAME.fullmatch(value):
        fail(where, shown, f"names of {NAME_RULE}")
    return value


def check_names(where: str, names: Any, *, what: str = "names") -> list[str]:
    """``list(names)``: a non-empty list or tuple of 1 .. MAX_DOMAINS unique safe names."""
    if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
        fail(where, names, f"a list of {what} (str)", TypeError)
    if not names:
        fail(where, names, f"at least one of the {what}")
    if len(names) > MAX_DOMAINS:
        fail(where, f"<{len(names)} {what}>", f"at most {MAX_DOMAINS} {what} (mixda_fast.core.validate.MAX_DOMAINS)")
    for n in names:
        check_name(where, n, shown=list(names))
    if len(set(names)) != len(names):
        fail(where, list(names), f"unique {what}")
    return list(names)


def run_file(where: str, folder: Union[str, os.PathLike], name: Any) -> Path:
    """``folder / name`` if ``name`` is a plain file name (no separator, not '.' or '..', not
    absolute) whose real path (symlinks followed) lies inside ``folder``."""
    accepted = "a plain file name inside the run folder (no '/', '\\\\', '..', NUL or absolute path)"
    if not isinstance(name, str):
        fail(where, name, accepted, TypeError)
    if (not name or name in (".", "..") or any(c in name for c in "/\\\0") or os.path.isabs(name)
            or len(name) > 255):
        fail(where, name, accepted)
    path = Path(folder) / name
    root = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or real == root:
        fail(where, name, f"{accepted}; it resolves to {real!r}, outside {root!r}")
    return path


def check_choice(where: str, value: Any, choices: Sequence) -> Any:
    """``value`` if it is one of ``choices`` (TypeError when it is not even of a choice's type)."""
    if value not in choices:
        fail(where, value, " | ".join(repr(c) for c in choices),
             ValueError if any(type(value) is type(c) for c in choices) else TypeError)
    return value


def _prefixed(source: Optional[str], e: Exception) -> Exception:
    return type(e)(f"{source}: {e}") if source else e


def config_from_dict(cls: type, data: Any, source: Optional[str] = None):
    """``cls(**data)`` for a config dataclass, refusing a non-dict and unknown fields; every error
    (the config's own checks included) starts with ``source`` when it is given."""
    import dataclasses

    try:
        if not isinstance(data, dict):
            fail(f"{cls.__name__}.from_dict: data", data, "a dict", TypeError)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}; accepted fields: {sorted(known)}")
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise _prefixed(source, e) from None


def config_from_json(cls: type, text: Any, source: Optional[str] = None):
    """:func:`config_from_dict` of the JSON object ``text``."""
    import json

    try:
        if not isinstance(text, (str, bytes)):
            fail(f"{cls.__name__}.from_json: text", text, "a JSON object (str)", TypeError)
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            shown = text if len(text) <= 80 else text[:77] + "..."
            fail(f"{cls.__name__}.from_json: text", shown, f"a JSON object (malformed JSON: {e})")
    except (TypeError, ValueError) as e:
        raise _prefixed(source, e) from None
    return config_from_dict(cls, data, source)


def check_labels(where: str, labels: Any) -> list:
    """``list(labels)``: 1 .. MAX_CLASSES unique class names (non-empty str, or int)."""
    accepted = f"a list of 1 .. {MAX_CLASSES} unique class names (non-empty str or int; mixda_fast.core.validate.MAX_CLASSES)"
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple)):
        fail(where, labels, accepted, TypeError)
    if not labels or len(labels) > MAX_CLASSES:
        fail(where, labels if len(labels) <= 10 else f"<{len(labels)} labels>", accepted)
    for x in labels:
        if isinstance(x, bool) or not isinstance(x, (str, int)):
            fail(where, list(labels), accepted, TypeError)
        if isinstance(x, str) and not x.strip():
            fail(where, list(labels), accepted)
    if len(set(labels)) != len(labels):
        fail(where, list(labels), accepted.replace("unique", "unique (no repeats)"))
    return list(labels)
