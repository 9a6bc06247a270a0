"""nextrec's own ESMM / MMOE / PLE classes, accelerated when built.

The drop-in a nextrec user expects: nextrec's constructor (its real signature and docstring),
and its whole model API (``compile``, ``fit``, ``predict``, ``evaluate``, ``save_model``,
``load_model``, ``call_model`` in 0.6), with ``nextrec_fast.accelerate`` applied at the end of
``__init__``. ``isinstance(model, nextrec's class)`` holds; ``nextrec_fast.restore(model)``
turns one into a plain nextrec model.
"""
from __future__ import annotations

import functools
from importlib import import_module

from nextrec_fast import compat

__all__ = ["drop_in_classes"]

_cache: dict[str, dict[str, type]] = {}


def drop_in_classes(generation: compat.NextrecGeneration, module_name: str) -> dict[str, type]:
    """{'ESMM': ..., 'MMOE': ..., 'PLE': ...} over ``generation``'s nextrec classes.

    Raises:
        ImportError: that generation of nextrec is not installed (the message says which is).
    """
    if generation.name in _cache:
        return _cache[generation.name]
    package = generation.model_packages[0]
    try:
        bases = {kind: getattr(import_module(f"{package}{kind.lower()}"), kind) for kind in compat.MODEL_KINDS}
    except ImportError:
        try:
            installed = getattr(import_module("nextrec"), "__version__", "?")
        except ImportError:
            installed = "not installed"
        raise ImportError(f"{module_name} needs nextrec {generation.name}.x ({package}* not found; nextrec: "
                          f"{installed}); see the README's install commands") from None
    classes = {}
    for kind, base in bases.items():
        classes[kind] = type(kind, (base,), {
            "__init__": _accelerating_init(base),
            "_nextrec_fast_drop_in_base": base,  # restore() goes back to nextrec's own class
            "__module__": module_name,
            "__qualname__": kind,
            "__doc__": f"nextrec {generation.name}'s {kind}, accelerated by nextrec_fast when built "
                       f"(nextrec's API and docs below).\n\n{base.__doc__ or ''}",
        })
    _cache[generation.name] = classes
    return classes


def _accelerating_init(base: type):
    @functools.wraps(base.__init__)  # nextrec's signature and docstring (inspect follows __wrapped__)
    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        from nextrec_fast.integration.accelerate import accelerate
        accelerate(self)
    return __init__
