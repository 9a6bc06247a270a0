"""Class-level patch: every nextrec ESMM / MMOE / PLE built after ``patch_nextrec()`` is accelerated."""
from __future__ import annotations

from importlib import import_module

from nextrec_fast import compat
from nextrec_fast.integration.accelerate import accelerate

__all__ = ["patch_nextrec", "unpatch_nextrec"]

_patched_inits: dict[type, object] = {}


def _nextrec_model_classes() -> list[type]:
    """nextrec's ESMM / MMOE / PLE classes, from whichever generation's package layout is installed."""
    try:
        import_module("nextrec")
    except ImportError:
        raise ImportError("patch_nextrec(): nextrec is not installed (pip install nextrec)") from None
    for generation in compat.GENERATIONS:
        for package in generation.model_packages:
            try:
                return [getattr(import_module(f"{package}{kind.lower()}"), kind) for kind in compat.MODEL_KINDS]
            except ImportError:
                continue
    raise ImportError("patch_nextrec(): this nextrec has none of the multi-task model packages nextrec_fast knows "
                      f"({', '.join(p for g in compat.GENERATIONS for p in g.model_packages)})")


def patch_nextrec(**options) -> None:
    """Models of nextrec's ESMM / MMOE / PLE built after this call are accelerated with
    ``accelerate(model, **options)`` (idempotent)."""
    for cls in _nextrec_model_classes():
        if cls in _patched_inits:
            continue
        original_init = cls.__init__

        def __init__(self, *args, _original_init=original_init, **kwargs):
            _original_init(self, *args, **kwargs)
            if compat.nextrec_model_kind(self) is not None:
                accelerate(self, **options)

        __init__.__wrapped__ = original_init
        _patched_inits[cls] = original_init
        cls.__init__ = __init__


def unpatch_nextrec() -> None:
    """Undo ``patch_nextrec``; models built afterwards are plain (existing ones keep their state)."""
    for cls, original_init in list(_patched_inits.items()):
        cls.__init__ = original_init
        del _patched_inits[cls]
