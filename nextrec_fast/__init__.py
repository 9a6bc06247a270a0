"""nextrec_fast: fast ESMM / MMoE / PLE for nextrec 0.6.x and 0.3.x.

Keeping a nextrec model and its training loop:

    nextrec_fast.accelerate(nextrec_model)             # in place; nextrec_fast.restore() undoes it

or swapping the import (nextrec's classes of the installed generation, accelerated when built;
without nextrec, plain nn.Module drop-ins with nextrec 0.6's API):

    from nextrec_fast import MMOE, SparseFeature       # nextrec_fast.models.v06 / v03 / standalone_v06

``import nextrec_fast`` never imports nextrec; looking up ``ESMM`` / ``MMOE`` / ``PLE`` here checks
which nextrec is installed (``nextrec_fast.models.default_drop_ins``), and ``SparseFeature`` /
``SequenceFeature`` / ``DenseFeature`` are the features those models take: nextrec 0.6's own with
nextrec 0.6 installed (its EmbeddingLayer checks their class), ``nextrec_fast.features`` (0.3.1's
API) with nextrec 0.3, ``nextrec_fast.features.v06`` without nextrec. Version-pinned paths:
``nextrec_fast.models.v06`` / ``v03``, ``nextrec_fast.features.v06`` / ``nextrec_fast.features``.
"""
from nextrec_fast.backend import get_backend, set_backend, use_backend
from nextrec_fast.compat import UnsupportedModelError
from nextrec_fast.integration import accelerate, is_accelerated, patch_nextrec, restore, unpatch_nextrec
from nextrec_fast.ops import empty_cache
from nextrec_fast.ops import register_ops as _register_ops
from nextrec_fast.validation import MissingFeatureError

_register_ops()  # our torch.ops resolve after a plain import (export / compiled artifacts)

__version__ = "0.1.0"

__all__ = [
    "ESMM", "MMOE", "PLE",
    "DenseFeature", "SequenceFeature", "SparseFeature",
    "MissingFeatureError", "UnsupportedModelError",
    "get_backend", "set_backend", "use_backend",
    "accelerate", "restore", "is_accelerated", "patch_nextrec", "unpatch_nextrec",
    "empty_cache",
    "__version__",
]


def __getattr__(name: str):
    if name in ("ESMM", "MMOE", "PLE"):
        from nextrec_fast.models import default_drop_ins
        return getattr(default_drop_ins(), name)
    if name in ("DenseFeature", "SequenceFeature", "SparseFeature"):
        return getattr(_default_features(), name)
    raise AttributeError(f"module 'nextrec_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _default_features():
    """The feature module that goes with ``default_drop_ins()``."""
    from nextrec_fast.models import default_drop_ins, standalone_v06
    drop_ins = default_drop_ins()
    if drop_ins is standalone_v06:
        from nextrec_fast.features import v06
        return v06
    # The nextrec-backed models (0.3 and 0.6) build nextrec's EmbeddingLayer, which checks the
    # class: nextrec's own features (our 0.3.1 copies in nextrec_fast.features were refused).
    from nextrec.basic import features
    return features
