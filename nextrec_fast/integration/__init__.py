"""Integration with nextrec's own models and training loop: ``accelerate`` / ``restore`` one
model, ``patch_nextrec`` / ``unpatch_nextrec`` every model built afterwards."""
from nextrec_fast.integration.accelerate import SUPPORTED_MODELS, accelerate, is_accelerated, restore
from nextrec_fast.integration.patch import patch_nextrec, unpatch_nextrec

__all__ = ["accelerate", "restore", "is_accelerated", "patch_nextrec", "unpatch_nextrec", "SUPPORTED_MODELS"]
