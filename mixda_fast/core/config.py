"""The base of the method configs: the checks they share and their dict / JSON round trip.

A method's config is a dataclass deriving from :class:`MethodConfig`, validated in
``__post_init__`` (``ValueError``/``TypeError`` naming the field, the value and what is
accepted: :mod:`.validate`) and saved as JSON next to the weights it describes. Both methods
name their members (MixDA's K domain adapters, MoDE's N experts) in ``domains`` and give the
softmax width of their gates as ``gate_width``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from .validate import check_int, check_names, config_from_dict, config_from_json, fail

__all__ = ["MethodConfig"]


class MethodConfig:
    """Shared by :class:`~mixda_fast.MixDAConfig` and :class:`~mixda_fast.MoDEConfig`."""

    def _fail(self, name: str, value: Any, accepted: str, exc: type = ValueError):
        fail(f"{type(self).__name__}.{name}", value, accepted, exc)

    def _check_members(self, count_field: str, prefix: str, what: str) -> None:
        """``domains`` and the member count ``count_field`` (MixDA's ``num_domains``, MoDE's
        ``num_experts``): each checked, equal when both are given; without names the members are
        ``<prefix>_0 ..``. The count must be set (or ``domains`` given) before this is called."""
        cls = type(self).__name__
        count = getattr(self, count_field)
        if count is not None:
            check_int(f"{cls}.{count_field}", count, 1, cap="MAX_DOMAINS")
        if self.domains is not None:
            names = check_names(f"{cls}.domains", self.domains, what=what)
            if count is not None and count != len(names):
                self._fail(count_field, count, f"len(domains) = {len(names)} when both are given")
            self.domains = names
            setattr(self, count_field, len(names))
        else:
            self.domains = [f"{prefix}_{k}" for k in range(count)]

    def _check_flags(self, *names: str) -> None:
        """Each of ``names`` is a bool; ``extra`` (free-form user metadata) is a dict."""
        for name in names:
            if not isinstance(getattr(self, name), bool):
                self._fail(name, getattr(self, name), "True or False", TypeError)
        if not isinstance(self.extra, dict):
            self._fail("extra", self.extra, "a dict", TypeError)

    @property
    def gate_width(self) -> int:
        """Softmax width of every gate."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, source: Optional[str] = None):
        """The config of ``data``; ``source`` (e.g. the file it came from) starts every error."""
        return config_from_dict(cls, data, source)

    @classmethod
    def from_json(cls, text: str, source: Optional[str] = None):
        return config_from_json(cls, text, source)
