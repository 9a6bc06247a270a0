"""nextrec's math in plain, readable PyTorch, one module per generation: the oracle of every test
and the baseline of every benchmark (and the base the plain-module drop-ins are built on).

- ``v03``: nextrec 0.3.1's layers and ESMM / MMOE / PLE (models return probabilities).
- ``v06``: nextrec 0.6.x's (checked against 0.6.14: models return logits, a ``head`` makes them
  probabilities in ``call_model``, MLPs with ``norm_type``, dense projections, attention poolings).

Module names match nextrec's in both, so ``state_dict`` keys are nextrec's own. No nextrec import.
The names here (``reference.MMOE``, ``reference.EmbeddingLayer``, ...) are 0.3.1's, as before the
0.6 module existed.
"""
from nextrec_fast.reference.v03 import (CGCLayer, EmbeddingLayer, ESMM, MLP, MMOE, MultiTaskModel, PLE,
                                        PredictionLayer, get_initializer)

__all__ = ["CGCLayer", "EmbeddingLayer", "ESMM", "MLP", "MMOE", "MultiTaskModel", "PLE", "PredictionLayer",
           "get_initializer"]
