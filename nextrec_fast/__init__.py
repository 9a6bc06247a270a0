"""nextrec_fast: fast drop-in ESMM / MMoE / PLE for nextrec 0.3.1."""
from nextrec_fast.features import DenseFeature, SequenceFeature, SparseFeature

__version__ = "0.1.0"

__all__ = ["DenseFeature", "SequenceFeature", "SparseFeature", "__version__"]
