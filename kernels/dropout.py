"""Inverted dropout from a Philox stream: the keep-mask is a pure function of (seed, stream,
element offset), so backward recomputes it instead of storing it."""
import triton
import triton.language as tl


@triton.jit
def dropout_multiplier(seed, stream, offsets, p, scale, like):
    """1 / (1 - p) where the element is kept (uniform >= p), else 0, in `like`'s dtype.
    `stream` (the expert) selects an independent Philox key so per-expert offsets fit int32."""
    r = tl.rand(seed + stream, offsets)
    zero = tl.zeros_like(like)
    return tl.where(r >= p, zero + scale, zero)


def dropout_scale(p: float) -> float:
    """Kept elements are scaled by 1 / (1 - p); torch zeroes everything at p == 1 (no 1 / 0)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
