"""Drop-in ESMM, MMOE, PLE with nextrec 0.3.1's API.

    from nextrec_fast.models.v03 import MMOE     # instead of nextrec.models.multi_task.mmoe.MMOE

With nextrec 0.3.x installed: nextrec's own classes, accelerated when built (``fit``,
``predict``, ``save_model``, ... as nextrec's). Without it: the plain ``nn.Module`` drop-ins of
``nextrec_fast.models.standalone`` (same constructor, ``state_dict`` keys and outputs).
"""
from nextrec_fast import compat
from nextrec_fast.models import standalone
from nextrec_fast.models.nextrec_backed import drop_in_classes

try:
    _classes = drop_in_classes(compat.V03, __name__)
except ImportError:
    _classes = {"ESMM": standalone.ESMM, "MMOE": standalone.MMOE, "PLE": standalone.PLE}
ESMM, MMOE, PLE = _classes["ESMM"], _classes["MMOE"], _classes["PLE"]

__all__ = ["ESMM", "MMOE", "PLE"]
