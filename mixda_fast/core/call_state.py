"""Per-call state of a patched model: what one forward call tells its patched layers.

A patched layer needs a little state that is not among its inputs: the attention mask of the
call (the sequence gate reads the last real token), the list the old-knowledge loss collects
``(y, f)`` pairs into, what the caller chose for the call (``Frame.choices``: a method's keys,
e.g. gate weights forced at run time), and MoDE's block inputs between the hooks on a block's
first and last layer. That state belongs to one *call*, not to the model, so that

- two threads running one model at once never see each other's state (it lives in a
  :class:`contextvars.ContextVar`, one value per thread and per asyncio task);
- gradient checkpointing recomputes a layer with the state of the call that ran it: every
  ``_gradient_checkpointing_func`` that HuggingFace installs on a layer is wrapped so that the
  recomputation re-enters the frame of its forward (:class:`FrameCheckpoint`).

A forward pre-hook on the base model opens a :class:`Frame` and an always-called forward hook
closes it. Under ``torch.compile`` (dynamo cannot trace ``ContextVar``) the frame of the traced
call is kept on a plain attribute instead: a traced value, part of the compiled graph, never
seen by another thread's eager call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["Frame", "CallState", "FrameCheckpoint", "StopForward"]


class StopForward(Exception):
    """Raised by a patched layer to end a forward early (the old-knowledge pass needs nothing
    above the last patched layer); the caller that asked for it catches it."""


class Frame:
    """The state of one forward call."""

    def __init__(self, mask: Optional[torch.Tensor] = None):
        self.token = None                     # what ContextVar.set returned when it was entered
        self.mask = mask                      # (B, L) attention mask, 1 = real token, or None
        self.captures: Optional[list] = None  # (y, f) pairs of the old-knowledge loss, when collecting
        self.stop_after: Optional[int] = None  # layer index after which the forward stops (StopForward)
        self.blocks: dict = {}                # MoDE block index -> (args, kwargs) of its first layer
        self.choices: dict = {}               # what the caller chose for the call, keyed by the method;
                                              # read-only once set (calls within a call share it)
        self.opened_by: Any = None            # the hook that opened it, where a hook pair enters and leaves it

    def nested(self) -> "Frame":
        """A frame for a call made inside this one: it collects into the same list, stops at the
        same layer and sees the same choices."""
        frame = Frame()
        frame.captures, frame.stop_after, frame.choices = self.captures, self.stop_after, self.choices
        return frame


@torch.compiler.disable
def _eager_get(var: contextvars.ContextVar):
    return var.get()


def _attention_mask(position: Optional[int], args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    mask = kwargs.get("attention_mask")
    if mask is None and position is not None and len(args) > position:
        mask = args[position]
    return mask if isinstance(mask, torch.Tensor) else None


class CallState:
    """The frames of one patched model (one object per model; ``copy.deepcopy`` gives the copy
    its own). :meth:`register` hooks the base model; :meth:`current` is what layers read."""

    def __init__(self, base: nn.Module, layers: nn.Module):
        params = list(inspect.signature(base.forward).parameters)
        self._position = params.index("attention_mask") if "attention_mask" in params else None
        self._layers = layers
        self._var: contextvars.ContextVar = contextvars.ContextVar("mixda_fast_frame", default=None)
        self._traced: Optional[Frame] = None

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, ``torch.save`` of the whole model) get frames of their own."""
        return {"_position": self._position, "_layers": self._layers}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._var = contextvars.ContextVar("mixda_fast_frame", default=None)
        self._traced = None

    # -- reading ---------------------------------------------------------------------------
    def current(self, strict: bool = False) -> Optional[Frame]:
        """The frame of the forward call under way in this thread, or None outside one. Under
        ``torch.compile`` it is the traced call's frame; a module compiled on its own (the base
        model's hooks not traced) has none, and with ``strict`` reads the eager call's frame
        instead, at the cost of a graph break (an error with ``fullgraph=True``)."""
        if torch.compiler.is_compiling():
            return self._traced if self._traced is not None or not strict else _eager_get(self._var)
        return self._var.get()

    # -- opening and closing ---------------------------------------------------------------------
    def enter(self, frame: Frame) -> None:
        if torch.compiler.is_compiling():
            self._traced = frame
            return
        frame.token = self._var.set(frame)

    def leave(self) -> None:
        if torch.compiler.is_compiling():
            self._traced = None
            return
        frame = self._var.get()
        if frame is not None and frame.token is not None:
            self._var.reset(frame.token)           # back to the enclosing call's frame, if any

    @contextlib.contextmanager
    def collecting(self, captures: list, stop_after: Optional[int] = None) -> Iterator[Frame]:
        """Forward calls inside the block append each patched layer's (y, f) to ``captures``
        and, with ``stop_after``, raise :class:`StopForward` after that layer."""
        outer = self._enclosing().nested()
        outer.captures, outer.stop_after = captures, stop_after
        token = self._var.set(outer)
        try:
            yield outer
        finally:
            self._var.reset(token)

    @contextlib.contextmanager
    def choosing(self, choices: dict) -> Iterator[Frame]:
        """Forward calls inside the block see ``choices`` in ``Frame.choices``, over (key by key)
        the choices of an enclosing block; in this thread or asyncio task only."""
        token = self._var.set(self.chosen(choices))
        try:
            yield self._var.get()
        finally:
            self._var.reset(token)

    def chosen(self, choices: dict) -> Frame:
        """A frame nested in the enclosing one (:meth:`Frame.nested`), with ``choices`` over its
        own: what :meth:`choosing` sets, and what a pair of hooks passes to :meth:`enter` and
        :meth:`leave`."""
        outer = self._enclosing().nested()
        outer.choices = {**outer.choices, **choices}
        return outer

    def _enclosing(self) -> Frame:
        frame = self._var.get()
        return Frame() if frame is None else frame

    def run_in(self, frame: Optional[Frame], fn: Callable, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` with ``frame`` as the current frame (checkpoint recomputation)."""
        token = self._var.set(frame)
        try:
            return fn(*args, **kwargs)
        finally:
            self._var.reset(token)

    # -- hooks on the base model -------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        outer = None
        if not torch.compiler.is_compiling():
            self.wrap_checkpointing()
            outer = self._var.get()            # inside collecting() / choosing(), or a call within a call
        frame = Frame() if outer is None else outer.nested()
        frame.mask = _attention_mask(self._position, args, kwargs)
        self.enter(frame)

    def _post(self, module, args, kwargs, output):
        self.leave()

    def register(self, base: nn.Module) -> list:
        """Handles whose ``remove()`` takes the hooks and the checkpoint wrappers out again."""
        return [base.register_forward_pre_hook(self._pre, with_kwargs=True),
                base.register_forward_hook(self._post, with_kwargs=True, always_call=True), _Unwrap(self)]

    def wrap_checkpointing(self) -> None:
        """Wrap the ``_gradient_checkpointing_func`` HuggingFace set on a layer (at
        ``gradient_checkpointing_enable``, after the patch as often as before it) so that its
        recomputation runs in the frame of the forward call it recomputes."""
        for layer in self._layers:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if fn is not None and not isinstance(fn, FrameCheckpoint):
                layer._gradient_checkpointing_func = FrameCheckpoint(fn, self)


class FrameCheckpoint:
    """A checkpoint function (``torch.utils.checkpoint.checkpoint`` with HuggingFace's keyword
    arguments) whose recomputation sees the frame of the call it recomputes. A call that
    collects the old-knowledge pairs or stops early runs without checkpointing: recomputing it
    would collect twice and stop in the middle of the backward."""

    def __init__(self, inner: Callable, state: CallState):
        self.inner = inner
        self.state = state

    def __call__(self, function: Callable, *args, **kwargs):
        frame = self.state.current()
        if frame is not None and (frame.captures is not None or frame.stop_after is not None):
            return function(*args)
        return self.inner(functools.partial(self.state.run_in, frame, function), *args, **kwargs)


class _Unwrap:
    """Handle that gives each layer back the checkpoint function HuggingFace installed."""

    def __init__(self, state: CallState):
        self.state = state

    def remove(self) -> None:
        for layer in self.state._layers:
            fn = layer.__dict__.get("_gradient_checkpointing_func")
            if isinstance(fn, FrameCheckpoint):
                layer._gradient_checkpointing_func = fn.inner
