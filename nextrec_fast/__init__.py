"""nextrec_fast: fast drop-in ESMM / MMoE / PLE for nextrec 0.3.1.

    from nextrec_fast import MMOE, SparseFeature      # same arguments as nextrec's
    model = MMOE(...)                                  # same state_dict keys as nextrec's
    model.load_state_dict(nextrec_model.state_dict())  # strict

or, keeping a nextrec model and its training loop:

    nextrec_fast.accelerate(nextrec_model)             # in place; nextrec_fast.restore() undoes it
"""
from nextrec_fast.backend import get_backend, set_backend, use_backend
from nextrec_fast.features import DenseFeature, SequenceFeature, SparseFeature
from nextrec_fast.integration import accelerate, is_accelerated, patch_nextrec, restore, unpatch_nextrec
from nextrec_fast.models import ESMM, MMOE, PLE
from nextrec_fast.validation import MissingFeatureError

__version__ = "0.1.0"

__all__ = [
    "ESMM", "MMOE", "PLE",
    "DenseFeature", "SequenceFeature", "SparseFeature",
    "MissingFeatureError",
    "get_backend", "set_backend", "use_backend",
    "accelerate", "restore", "is_accelerated", "patch_nextrec", "unpatch_nextrec",
    "__version__",
]
