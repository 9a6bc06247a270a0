"""The GEMM floor of a model step: the matrix products the step runs, recorded once and then timed
alone (same shapes, strides, dtypes, device and threads), so a benchmark table shows how far a
model is from the time its GEMMs alone take.

A step's GEMMs are recorded at the ATen dispatch level (``TorchDispatchMode``): ``mm``,
``addmm``, ``bmm``, ``baddbmm`` (and matrix-vector products) and our oneDNN GEMM
(``nextrec_fast::onednn_gemm_out``), forward and autograd backward alike, whatever Python code
issued them; the floor replays each through the library the step used. GEMMs inside a fused kernel (the Triton expert layers on
CUDA) are not seen there; ``record_gemms`` then records fewer FLOPs than the model needs, which
``nextrec_fast.bench.models`` checks against nextrec's (or the reference's) own GEMM FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["GemmCall", "record_gemms", "gemm_gflop", "replay"]

_aten = torch.ops.aten
# op -> (index of the left operand, index of the right operand) among its tensor arguments
_GEMMS = {
    _aten.mm.default: (0, 1), _aten.mm.out: (0, 1),
    _aten.addmm.default: (1, 2), _aten.addmm.out: (1, 2),
    _aten.bmm.default: (0, 1), _aten.bmm.out: (0, 1),
    _aten.baddbmm.default: (1, 2), _aten.baddbmm.out: (1, 2),
    _aten.mv.default: (0, 1), _aten.addmv.default: (1, 2),
}


def _add_extension_gemms() -> None:
    """The experts' float32 GEMMs through oneDNN (``nextrec_fast.ops.dense_gemm``), once the
    extension that registers the op is loaded."""
    from nextrec_fast import _extension
    if _extension.is_available() and hasattr(torch.ops.nextrec_fast, "onednn_gemm_out"):
        _GEMMS[torch.ops.nextrec_fast.onednn_gemm_out.default] = (0, 1)


@dataclass(frozen=True)
class GemmCall:
    """One recorded GEMM: the ATen overload and (shape, stride, dtype) of each tensor argument
    (positional, then the keyword ones such as ``out``), other arguments as given."""
    op: object
    args: tuple
    kwargs: tuple

    @property
    def gflop(self) -> float:
        """2·m·k·n (times the batch for bmm) multiply-adds counted as 2 FLOPs, in GFLOP."""
        tensors = [a for a in self.args if isinstance(a, _TensorSpec)]
        left, right = (tensors[i].shape for i in _GEMMS[self.op])
        batch = left[0] if len(left) == 3 else 1
        left, right = left[-2:] if len(left) >= 2 else (1, left[0]), right[-2:] if len(right) >= 2 else (right[0], 1)
        return 2.0 * batch * left[0] * left[1] * right[1] / 1e9


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return t.uniform_(-1.0, 1.0) if t.dtype.is_floating_point else t.zero_()


def _spec(value):
    if isinstance(value, torch.Tensor):
        return _TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    return value


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[GemmCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GEMMS:
            self.calls.append(GemmCall(func, tuple(_spec(a) for a in args),
                                       tuple((k, _spec(v)) for k, v in kwargs.items())))
        return func(*args, **kwargs)


def record_gemms(step) -> list[GemmCall]:
    """The GEMMs one call of ``step()`` runs (it is called once, for real)."""
    _add_extension_gemms()
    recorder = _Recorder()
    with recorder:
        step()
    return recorder.calls


def gemm_gflop(calls) -> float:
    """Total GFLOP of recorded GEMMs."""
    return sum(c.gflop for c in calls)


def replay(calls):
    """A callable that runs the recorded GEMMs alone, in order, on inputs of the same shapes,
    strides and dtypes (made once, uniform in [-1, 1]); each allocates its output as the model's
    call did (``out=`` calls write into a buffer made once, as there)."""
    prepared = []
    for call in calls:
        args = tuple(a.make() if isinstance(a, _TensorSpec) else a for a in call.args)
        kwargs = {k: v.make() if isinstance(v, _TensorSpec) else v for k, v in call.kwargs}
        prepared.append((call.op, args, kwargs))

    def run():
        with torch.no_grad():
            for op, args, kwargs in prepared:
                op(*args, **kwargs)
    return run
