"""Small index tensors the layers need every forward."""
from __future__ import annotations

import torch

_index_cache: dict = {}


def index_tensor(values, device: torch.device) -> torch.Tensor:
    """A small int64 index tensor, made once per device: building it from a Python list every
    forward would mean a blocking host-to-device copy on CUDA."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, device=device)
    key = (str(device), repr(values))
    cached = _index_cache.get(key)
    if cached is None:
        # Never an inference tensor: one made by a first call under torch.inference_mode() could
        # not be saved for backward by a later training call (scatter and index_select save it).
        with torch.inference_mode(False):
            cached = _index_cache[key] = torch.tensor(values, device=device)
    return cached
