"""nextrec's Adam / AdamW on torch's fused kernel: the same hyper-parameters and state, one
kernel over all parameters instead of the single-tensor for-loop nextrec's default builds."""
from __future__ import annotations

import torch

__all__ = ["fuse_optimizer", "unfuse_optimizer"]

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def fuse_optimizer(optimizer) -> None:
    """Switch ``optimizer`` (if Adam/AdamW over plain CPU/CUDA float parameters) to ``fused=True``."""
    if not isinstance(optimizer, _FUSABLE) or getattr(optimizer, "_nextrec_fast_fused", False):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(group.get("differentiable") or group.get("capturable") for group in optimizer.param_groups):
        return
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return
    optimizer._nextrec_fast_saved = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    for p in params:  # the fused kernel keeps its step counters on the parameter's device
        state = optimizer.state.get(p)
        if state and "step" in state and torch.is_tensor(state["step"]):
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    optimizer._step_supports_amp_scaling = True
    optimizer._nextrec_fast_fused = True


def unfuse_optimizer(optimizer) -> None:
    """Undo ``fuse_optimizer``."""
    if not getattr(optimizer, "_nextrec_fast_fused", False):
        return
    for group, (fused, foreach) in zip(optimizer.param_groups, optimizer._nextrec_fast_saved):
        group["fused"], group["foreach"] = fused, foreach
    optimizer._nextrec_fast_fused = False
    optimizer._step_supports_amp_scaling = False
