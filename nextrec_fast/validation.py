"""Input checks for the fast models: clear errors naming the feature, never a crash or an
out-of-bounds read further down."""
from __future__ import annotations

import torch

from nextrec_fast.features import DENSE, SEQUENCE, SPARSE

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class MissingFeatureError(KeyError, ValueError):
    """A feature the model was built with is absent from the input dict (a KeyError like
    nextrec's, and a ValueError like every other input problem)."""

    def __str__(self):  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def check_batch_inputs(x, features, device: torch.device, check_ranges: bool = True) -> int:
    """Validate the input dict against ``features``; return the batch size.

    ``features`` are (name, kind, vocab_size, dense_input_dim) tuples, kind in dense/sparse/sequence.
    """
    if not isinstance(x, dict):
        raise TypeError(f"the model input must be a dict of feature name -> tensor, got {type(x).__name__}")
    batch = None
    for name, kind, vocab, dense_dim in features:
        if name not in x:
            raise MissingFeatureError(
                f"input is missing feature {name!r} ({kind}); got keys {sorted(map(str, x))[:20]}")
        value = x[name]
        if not isinstance(value, torch.Tensor):
            hint = " (convert the batch with torch.as_tensor(...), or pass the data to nextrec's fit / predict, " \
                   "which convert it)" if hasattr(value, "__array__") or isinstance(value, (list, tuple)) else ""
            raise TypeError(f"feature {name!r}: expected a torch.Tensor, got {type(value).__name__}{hint}")
        if value.device != device:
            raise ValueError(f"feature {name!r} is on {value.device} but the model is on {device}; "
                             "move the inputs with .to(device) first")
        if value.dim() == 0:
            raise ValueError(f"feature {name!r}: expected a batch, got a 0-d tensor")
        rows = value.shape[0]
        if batch is None:
            batch = rows
        elif rows != batch:
            raise ValueError(f"feature {name!r} has batch size {rows}, but earlier features have {batch}")
        if kind == DENSE:
            if value.dtype == torch.bool or value.is_complex():
                raise TypeError(f"dense feature {name!r}: expected a real-valued tensor, got {value.dtype}")
            if rows and value[0].numel() != dense_dim:
                raise ValueError(f"dense feature {name!r} expects {dense_dim} value(s) per row, got shape {tuple(value.shape)}")
            continue
        if value.dtype not in _ID_DTYPES:
            raise TypeError(f"{kind} feature {name!r}: ids must be an integer tensor, got {value.dtype}")
        if kind == SPARSE and not (value.dim() == 1 or (value.dim() == 2 and value.shape[1] == 1)):
            raise ValueError(f"sparse feature {name!r}: expected ids of shape [B] or [B, 1], got {tuple(value.shape)}")
        if kind == SEQUENCE and value.dim() != 2:
            raise ValueError(f"sequence feature {name!r}: expected padded ids of shape [B, L], got {tuple(value.shape)}")
        if check_ranges and value.numel():
            low, high = torch.aminmax(value)
            low, high = int(low), int(high)
            if low < 0 or high >= vocab:
                bad = low if low < 0 else high
                raise ValueError(f"{kind} feature {name!r}: id {bad} is out of range [0, {vocab}) "
                                 f"(ids span [{low}, {high}]); raise the feature's vocab_size or map the id "
                                 "(e.g. unknown ids to the padding id)")
    if batch is None:
        raise ValueError("the model has no input features")
    if batch == 0:
        raise ValueError("empty batch: every feature has 0 rows")
    return batch
