"""Gate weights chosen at run time, and the gate weights a call used (docs/design.md section 1).

What a caller chose for one forward call lives in the call's ``Frame.choices``
(:mod:`mixda_fast.core.call_state`: per call, so threads and asyncio tasks never see each
other's), under two keys:

- :data:`FORCED`: {layer index: :class:`Forced`}, the fixed gate weights of those layers;
- :data:`RECORDER`: a :class:`GateRecorder` that keeps the softmax weights every layer used.

:func:`parse` turns what the user wrote (a domain name, weights, one of those per batch row, or
a dict layer -> one of those) into the :data:`FORCED` dict, every check done before any forward
runs. :class:`KeywordHook` takes the ``mixda_domains=`` argument out of a forward call (before
HuggingFace's forward sees it) and opens a frame with it. The layer
(:meth:`~mixda_fast.mixda.layer.MixDAFFN.gate_logits`) reads both.

Forced weights w enter the fused op as logits log(w): softmax(log w) = w, and a domain forced
alone (w one-hot, logits 0 and -inf) gives a softmax that is exactly one-hot, so the output is
exactly that of a gate whose logits put all weight there. The gate itself does not run for a
forced layer (for rows given ``None``, it does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Optional

import torch

from ..core.call_state import CallState, Frame
from ..core.validate import is_int

__all__ = ["FORCED", "RECORDER", "KEYWORD", "Forced", "GateRecorder", "parse", "forced_for", "record",
           "KeywordHook", "forced_now"]

FORCED = "mixda_forced"
RECORDER = "mixda_gate_weights"
KEYWORD = "mixda_domains"
"""The forward keyword argument of a MixDA-patched model: ``model(**batch, mixda_domains=...)``."""

SUM_TOLERANCE = 1e-5
"""How far the forced weights' sum may be from 1."""

ACCEPTED = ("a domain name, weights (a dict domain -> weight, or a sequence of the gate's {E} weights in "
            "the order {order}; non-negative, finite, sum 1), a list of those (or None: the gate) with one "
            "per batch row, or a dict layer index -> one of those (or None: the gate)")


class Forced:
    """The fixed gate weights of one layer for one call: ``weights`` (E,) for every row or (B, E)
    per row (rows the gate decides are ignored); ``learned`` (B,) bool marks rows that the gate
    decides (None: no such row); ``given`` names what the caller wrote, for an error that only
    the batch reveals ("domain_forced: domains=[...]")."""

    def __init__(self, weights: torch.Tensor, learned: Optional[torch.Tensor] = None, given: str = KEYWORD):
        self.learned = learned
        self.given = given
        self.rows = None if weights.dim() == 1 else weights.shape[0]
        self._logits = torch.log(weights.float())      # log(0) = -inf: a zero weight stays exactly 0
        self._cast: dict = {}

    def logits(self, B: int, like: torch.Tensor, learned: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, E) logits of ``like``'s dtype and device, or (B, T, E) where ``learned`` (the gate's
        (B, T, E) logits, given for a :attr:`learned` row) is per token."""
        if self.rows is not None and self.rows != B:
            raise ValueError(f"{self.given} is not accepted for this batch: {self.rows} rows for a batch of {B}; "
                             "expected one choice per batch row")
        key = (like.dtype, like.device)
        logits = self._cast.get(key)
        if logits is None:
            logits = self._cast[key] = self._logits.to(dtype=like.dtype, device=like.device)
        logits = logits.expand(B, -1)
        if self.learned is None:
            return logits
        rows = self.learned.to(like.device)
        if learned.dim() == 3:
            return torch.where(rows[:, None, None], learned, logits[:, None, :])
        return torch.where(rows[:, None], learned, logits)


class GateRecorder:
    """Keeps the softmax gate weights of every MixDA layer, per forward call: ``calls`` is a
    list with one dict {layer index: weights (B, E) or (B, T, E), float32, detached} per call."""

    def __init__(self):
        self.calls: list[dict] = []
        self._frame = None

    def add(self, frame: Frame, layer: int, weights: torch.Tensor) -> None:
        if frame is not self._frame:          # a new call (each call has a frame of its own)
            self._frame = frame
            self.calls.append({})
        self.calls[-1][layer] = weights


def forced_for(frame: Optional[Frame], layer: int) -> Optional[Forced]:
    """The forced weights of ``layer`` in the call of ``frame``, or None (the gate decides)."""
    return None if frame is None else frame.choices.get(FORCED, {}).get(layer)


def forced_now(calls: CallState) -> dict:
    """The layers forced by the enclosing block or call ({} outside any), which a new choice
    overrides layer by layer."""
    frame = calls.current()
    return {} if frame is None else frame.choices.get(FORCED, {})


def record(frame: Optional[Frame], layer: int, logits: torch.Tensor, T: Optional[int]) -> None:
    """Keep softmax(logits) where the call records gate weights; (B, E) logits are spread to
    (B, T, E) for a per-token gate (``T`` given)."""
    recorder = None if frame is None else frame.choices.get(RECORDER)
    if recorder is None:
        return
    weights = torch.softmax(logits.detach().float(), dim=-1)
    if T is not None and weights.dim() == 2:
        weights = weights[:, None, :].expand(-1, T, -1)
    recorder.add(frame, layer, weights)


# -- parsing what the user wrote --------------------------------------------------------------
def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) or (
        isinstance(x, torch.Tensor) and x.dim() == 0)


def _is_weights(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) > 0 and all(_is_number(v) for v in x)


def _weights(choice, names: list, width: int, where: str, show) -> list[float]:
    """One choice as E weights (domains in order, then the FFN under paper mixing)."""
    def bad(why: str, exc=ValueError):
        raise exc(f"{where}={show!r} is not accepted: {why}; expected {ACCEPTED.format(E=width, order=order)}")

    order = f"{names + ['ffn'] if width > len(names) else names}"
    if isinstance(choice, str):
        if choice not in names:
            bad(f"{choice!r} is not one of the model's domains {names}")
        w = [0.0] * width
        w[names.index(choice)] = 1.0
        return w
    if isinstance(choice, Mapping):
        w = [0.0] * width
        for k, v in choice.items():
            if k not in names:
                bad(f"{k!r} is not one of the model's domains {names}")
            if not _is_number(v):
                bad(f"the weight of {k!r} is {v!r}, not a number", TypeError)
            w[names.index(k)] = float(v)
    elif _is_weights(choice):
        w = [float(v) for v in choice]
        if len(w) != width:
            bad(f"{len(w)} weights for a gate of {width}")
    else:
        bad(f"it is of type {type(choice).__name__}", TypeError)
    if not all(math.isfinite(v) and v >= 0 for v in w) or abs(math.fsum(w) - 1) > SUM_TOLERANCE:
        bad(f"weights {w} are not non-negative and finite with sum 1 (within {SUM_TOLERANCE:g})")
    return w


def _forced(spec, names: list, width: int, where: str, show) -> Forced:
    """One layer's choice: a choice for every row, or a list with one per row."""
    if isinstance(spec, (list, tuple)) and len(spec) > 0 and not _is_weights(spec):
        rows = [[0.0] * width if c is None else _weights(c, names, width, where, show) for c in spec]
        learned = [c is None for c in spec]
        return Forced(torch.tensor(rows, dtype=torch.float64),
                      torch.tensor(learned) if any(learned) else None, f"{where}={show!r}")
    return Forced(torch.tensor(_weights(spec, names, width, where, show), dtype=torch.float64))


def parse(spec, names: list, width: int, layers: list, where: str, only=None) -> dict:
    """{layer index: :class:`Forced`} for ``spec`` (see :data:`ACCEPTED`) on a model whose
    patched ``layers`` have gates of ``width`` over the domains ``names``; ``only`` (layer
    indices) limits a spec that is not per layer. Raises with ``where`` on bad input."""
    per_layer = isinstance(spec, Mapping) and len(spec) > 0 and all(is_int(k) for k in spec)
    if isinstance(spec, Mapping) and not per_layer and any(is_int(k) for k in spec):
        raise ValueError(f"{where}={spec!r} is not accepted: it mixes layer indices and domain names as keys; "
                         f"expected {ACCEPTED.format(E=width, order=names)}")
    if per_layer and only is not None:
        raise ValueError(f"{where}: layers={only!r} is not accepted with a dict of layers; give the layers "
                         "once, as the dict's keys")
    chosen = list(spec) if per_layer else (layers if only is None else only)
    if isinstance(chosen, (str, bytes)) or not isinstance(chosen, Sequence) or not all(is_int(i) for i in chosen):
        raise TypeError(f"{where}: layers={only!r} is not accepted: expected a list of layer indices from "
                        f"{layers} (the patched layers)")
    if not chosen:                            # forcing no layer is a mistake, not a no-op to allow
        raise ValueError(f"{where}: layers={only!r} is not accepted: expected a non-empty list of layer indices "
                         f"from {layers} (the patched layers)")
    wrong = [i for i in chosen if i not in layers]
    if wrong:
        raise ValueError(f"{where}: layer {wrong[0]} is not accepted: the patched layers are {layers}")
    if per_layer:
        return {i: None if v is None else _forced(v, names, width, f"{where}[{i}]", v) for i, v in spec.items()}
    forced = _forced(spec, names, width, where, spec)
    return {i: forced for i in chosen}


class KeywordHook:
    """Forward pre-hook (with kwargs) and forward hook of the model ``patch_model`` was given:
    takes ``mixda_domains=`` out of the call before HuggingFace's forward sees it and runs the
    call in a frame that forces it (:meth:`CallState.chosen`); the forward hook leaves it."""

    def __init__(self, calls: CallState, names: list, width: int, layers: list):
        self.calls, self.names, self.width, self.layers = calls, list(names), width, list(layers)

    def __call__(self, module, args, kwargs):
        if KEYWORD not in kwargs:
            return None
        kwargs = dict(kwargs)
        spec = kwargs.pop(KEYWORD)
        fn = f"{type(module).__name__}.forward"
        if spec is not None:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"{fn}: {KEYWORD}= is not accepted under torch.compile: force domains with "
                                   "the eager model")
            forced = parse(spec, self.names, self.width, self.layers, f"{fn}: {KEYWORD}")
            rows = {f.rows for f in forced.values() if f is not None} - {None}
            B = _batch_size(args, kwargs)
            if B is not None and rows - {B}:
                raise ValueError(f"{fn}: {KEYWORD}={spec!r} is not accepted: {min(rows - {B})} rows for a batch of "
                                 f"{B}; expected one choice per batch row")
            frame = self.calls.chosen({FORCED: {**forced_now(self.calls), **forced}})
            frame.opened_by = self                 # the forward hook leaves only a frame it opened
            self.calls.enter(frame)
        return args, kwargs

    def leave(self, module, args, kwargs, output):
        frame = self.calls.current()
        if frame is not None and frame.opened_by is self:
            self.calls.leave()


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    """B of the call's first tensor input (input_ids, inputs_embeds, ...), or None."""
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return x.shape[0]
    return None
