"""CPU tensors on transparent huge pages (2 MiB), for large embedding tables and their gradients.

Pooling reads rows of large tables at random. With 4 KiB pages nearly every row read also
misses the TLB (a 256 MiB table spans 65,536 pages; the TLB holds a few thousand), and the page
walk costs about as much as the read. On 2 MiB pages the same table spans 128 pages. Measured on
this project's 2-core Xeon (benchmark features, fp32): the pooling op's forward ran 1.6-2x
faster on tables placed here, nextrec's own pooling about 1.1x.

PyTorch's CPU allocator only asks for huge pages when ``THP_MEM_ALLOC_ENABLE=1`` is set before
its first allocation, for every tensor of the process. Here they are asked for per tensor: an
anonymous private mapping, aligned to 2 MiB, advised ``MADV_HUGEPAGE`` before it is first
touched, wrapped by ``torch.frombuffer`` (the tensor owns the mapping; it is unmapped when the
last tensor on it goes). The kernel may still back it with small pages (THP set to ``never``,
or no free 2 MiB frames); the tensor is then an ordinary tensor.

Faulting in huge pages is slower than small ones on some VMs (here ~1.5 ms per MiB against
~0.4): it pays off for tensors allocated once and reused (tables, reused gradient buffers), not
for per-step temporaries. ``NEXTREC_FAST_HUGE_PAGES=0`` turns it off.
"""
from __future__ import annotations

import math
import mmap
import os
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
# Below this the TLB covers a table anyway, and rounding up to whole huge pages wastes memory.
MIN_BYTES = 4 << 20

_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _kernel_allows_thp() -> bool:
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


_SUPPORTED = (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
              and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS") and _kernel_allows_thp())


def enabled() -> bool:
    """Whether large CPU tensors are placed on huge pages (Linux with THP, not turned off)."""
    return _SUPPORTED and os.environ.get("NEXTREC_FAST_HUGE_PAGES", "1") != "0"


def eligible(shape, dtype: torch.dtype, device="cpu") -> bool:
    device = torch.device(device)
    return device.type == "cpu" and math.prod(shape) * dtype.itemsize >= MIN_BYTES and enabled()


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on huge pages when :func:`eligible`, else ``torch.empty``."""
    shape = tuple(int(s) for s in shape)
    if not eligible(shape, dtype):
        return torch.empty(shape, dtype=dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    # Whole huge pages, plus one for the alignment (the unused head is never touched, so it
    # costs address space only).
    length = -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES
    try:
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(shape, dtype=dtype)
    base = torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr()
    head = (-base) % HUGE_PAGE_BYTES
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, head, length - head)
    except OSError:
        pass  # still a valid (small-page) buffer
    # The storage starts at the aligned address and is exactly nbytes long; it keeps `buf` alive.
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=head).view(shape)


def is_placed(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage starts on a huge-page boundary of a mapping made by :func:`empty`
    (a heuristic: an aligned, non-resizable storage; enough to avoid moving a tensor twice)."""
    storage = t.untyped_storage()
    return (t.device.type == "cpu" and storage.data_ptr() % HUGE_PAGE_BYTES == 0
            and not storage.resizable())


def placed_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is not :func:`eligible` or already placed, else a contiguous copy on huge pages."""
    if not eligible(t.shape, t.dtype, t.device) or is_placed(t):
        return t
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


def place_parameters(params) -> int:
    """Moves the data of the given CPU parameters onto huge pages in place (``p.data = copy``:
    the Parameter objects, and so optimizer state keyed on them, are kept). Returns how many moved."""
    moved = 0
    with torch.no_grad():
        for p in params:
            data = p.data
            new = placed_copy(data)
            if new is not data:
                p.data = new
                moved += 1
    return moved
