"""The only code that knows nextrec's internals: one adapter per nextrec generation, chosen by
what a model or layer can do (``generation_of_model``, ``generation_of_layer``).

nextrec itself is never imported here at import time (``import nextrec_fast`` stays free of it);
an adapter imports nextrec's modules only when it handles one of nextrec's own objects.
"""
from __future__ import annotations

from nextrec_fast.compat.base import (MODEL_KINDS, DenseFeatureSpec, NextrecGeneration, PooledFeatureSpec,
                                      UnsupportedModelError)
from nextrec_fast.compat.nextrec_v03 import V03
from nextrec_fast.compat.nextrec_v06 import V06

__all__ = ["GENERATIONS", "MODEL_KINDS", "V03", "V06", "DenseFeatureSpec", "NextrecGeneration", "PooledFeatureSpec",
           "UnsupportedModelError", "generation_of_model", "generation_of_layer", "installed_generation",
           "nextrec_model_kind"]

# Newest first: the first adapter that recognises an object handles it.
GENERATIONS: tuple[NextrecGeneration, ...] = (V06, V03)


def generation_of_model(model) -> NextrecGeneration | None:
    return next((g for g in GENERATIONS if g.recognises_model(model)), None)


def generation_of_layer(layer) -> NextrecGeneration | None:
    return next((g for g in GENERATIONS if g.recognises_layer(layer)), None)


def nextrec_model_kind(model) -> tuple[NextrecGeneration, str] | None:
    """(generation, 'ESMM' | 'MMOE' | 'PLE') for one of nextrec's multi-task models, else None."""
    generation = generation_of_model(model)
    if generation is None:
        return None
    kind = generation.model_kind(model)
    return (generation, kind) if kind is not None else None


def installed_generation() -> NextrecGeneration:
    """The adapter of the installed nextrec. Raises ``ImportError`` (with how to install one) when
    no supported nextrec is installed."""
    for generation in GENERATIONS:
        if generation.is_installed():
            return generation
    raise ImportError("no supported nextrec installed (0.6.x or 0.3.x): see the README's install commands "
                      "(`pip install --no-deps nextrec==0.6.14` after its dependencies)")
