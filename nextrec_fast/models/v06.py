"""Drop-in ESMM, MMOE, PLE with nextrec 0.6.x's API.

    from nextrec_fast.models.v06 import MMOE     # instead of nextrec.models.multitask.mmoe.MMOE

With nextrec 0.6.x installed: nextrec 0.6's own classes, accelerated when built (``fit``,
``predict``, ``call_model``, ``save_model``, ... as nextrec's). Without it: the plain
``nn.Module`` drop-ins of ``nextrec_fast.models.standalone_v06`` (same constructor, ``state_dict``
keys and outputs: logits from ``forward``, probabilities from ``call_model``; no ``fit``).
With nextrec 0.3.x installed instead, importing this module raises ImportError saying so (0.6's
classes are not there; ``nextrec_fast.models.standalone_v06`` still imports).
"""
from nextrec_fast import compat
from nextrec_fast.models.nextrec_backed import drop_in_classes

try:
    _classes = drop_in_classes(compat.V06, __name__)
except ImportError:
    if compat.V03.is_installed():
        raise
    from nextrec_fast.models import standalone_v06
    _classes = {"ESMM": standalone_v06.ESMM, "MMOE": standalone_v06.MMOE, "PLE": standalone_v06.PLE}
ESMM, MMOE, PLE = _classes["ESMM"], _classes["MMOE"], _classes["PLE"]

__all__ = ["ESMM", "MMOE", "PLE"]
