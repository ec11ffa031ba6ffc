"""Choosing domains at run time, and reading the gate's weights (README "Choosing domains at run time").

- :func:`domain_forced`: inside the block, the gates of the chosen layers are replaced by fixed
  weights: one domain, a mix, one choice per batch row, or a dict layer -> choice.
- ``model(**batch, mixda_domains=...)``: the same for one call (:class:`.forcing.KeywordHook`);
  it overrides, layer by layer, what an enclosing :func:`domain_forced` chose.
- :func:`gate_weights`: inside the block, the softmax weights every MixDA layer used are kept,
  one dict per forward call.

Both blocks act on the calls of the thread (or asyncio task) that opened them only: two threads
forcing different domains on one model at once each get their own (``Frame.choices``,
:mod:`mixda_fast.core.call_state`). Forcing runs through the same fused ops as the gate; see
:mod:`.forcing` for why a forced domain is exactly the output of a one-hot gate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch.nn as nn

from .forcing import FORCED, RECORDER, GateRecorder, forced_now, parse
from .patching import mixda_state

__all__ = ["domain_forced", "gate_weights"]


@contextlib.contextmanager
def domain_forced(model: nn.Module, domains, layers: Optional[Sequence[int]] = None) -> Iterator[nn.Module]:
    """Inside the block the gates of ``layers`` (default: every patched layer) use fixed weights.

    ``domains`` is
    - a domain name: all weight on that domain (under paper mixing the FFN's weight is 0 too:
      exactly what a gate whose logits put all weight there computes);
    - weights: a dict domain -> weight, or a sequence of the gate's E weights in its order (the
      K domains, then the FFN under paper mixing, E = K + 1): non-negative, finite, sum 1;
    - a list with one of those per batch row (or None: that row keeps the gate), so a batch
      mixing requests of several domains runs in one forward;
    - a dict layer index -> one of those, or None: that layer's gate decides, also where an
      enclosing block forced it (then ``layers`` must be None).

    Every check is made here, before the block runs (the row count against the batch at the
    first patched layer): a model not patched with MixDA, an unknown domain or layer, weights
    that are not a distribution over the gate's entries raise one line. Nested blocks and
    ``mixda_domains=`` override layer by layer."""
    state = mixda_state(model, "domain_forced")
    config = state.config
    forced = parse(domains, list(config.domains), config.gate_width, list(state.layers), "domain_forced: domains",
                   only=None if layers is None else layers)
    calls = state.calls
    with calls.choosing({FORCED: {**forced_now(calls), **forced}}):
        yield model


@contextlib.contextmanager
def gate_weights(model: nn.Module) -> Iterator[list]:
    """Yields a list that fills, one dict per forward call inside the block, with {layer index:
    softmax gate weights} of every patched layer: (B, E) for the sequence gate, (B, T, E) for
    the token gate, float32, detached; E in the gate's order (domains, then the FFN under paper
    mixing). Forced layers report the weights they were forced to. A model not patched with
    MixDA is refused (ValueError)."""
    state = mixda_state(model, "gate_weights")
    recorder = GateRecorder()
    with state.calls.choosing({RECORDER: recorder}):
        yield recorder.calls
