"""Fast ESMM, MMOE and PLE.

- ``forwards``: the fast forward passes (mixins over nextrec's module layout).
- ``standalone`` / ``standalone_v06``: plain ``nn.Module`` drop-ins with nextrec 0.3.1's / 0.6's
  API (over ``nextrec_fast.reference.v03`` / ``v06``); no nextrec needed, no ``fit``.
- ``v03`` / ``v06``: version-pinned drop-ins: nextrec's own classes of that generation,
  accelerated when built (without any nextrec: ``standalone`` / ``standalone_v06``).
- ``default_drop_ins()``: what ``from nextrec_fast import MMOE`` gives: the installed nextrec's
  generation (``v06`` or ``v03``), else the newest generation's plain modules (``standalone_v06``).
"""
from __future__ import annotations

import importlib.util

from nextrec_fast.models.forwards import FAST_FORWARDS, FastESMMForward, FastMMOEForward, FastPLEForward

__all__ = ["FAST_FORWARDS", "FastESMMForward", "FastMMOEForward", "FastPLEForward", "default_drop_ins"]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package is missing
        return False


def default_drop_ins():
    """The module whose ESMM / MMOE / PLE ``nextrec_fast.ESMM`` / ``MMOE`` / ``PLE`` are: the
    installed nextrec's generation, the newest (0.6's API) when none is installed."""
    if _has_module("nextrec.models.multitask"):
        from nextrec_fast.models import v06
        return v06
    if _has_module("nextrec.models.multi_task"):
        from nextrec_fast.models import v03
        return v03
    from nextrec_fast.models import standalone_v06
    return standalone_v06
