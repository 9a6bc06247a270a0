"""Drop-in ESMM, MMOE, PLE for nextrec 0.6.x: nextrec 0.6's own classes, accelerated when built.

    from nextrec_fast.models.v06 import MMOE     # instead of nextrec.models.multitask.mmoe.MMOE

Same constructor arguments, outputs (logits; ``call_model`` applies the head), ``state_dict``
keys (0.6 checkpoints load with ``strict=True``) and training API as nextrec 0.6's.

Raises ImportError when nextrec 0.6.x is not installed (a plain-module 0.6 drop-in without
nextrec is not written yet; ``nextrec_fast.models.standalone`` has 0.3.1's API).
"""
from nextrec_fast import compat
from nextrec_fast.models.nextrec_backed import drop_in_classes

_classes = drop_in_classes(compat.V06, __name__)
ESMM, MMOE, PLE = _classes["ESMM"], _classes["MMOE"], _classes["PLE"]

__all__ = ["ESMM", "MMOE", "PLE"]
