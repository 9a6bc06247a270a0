"""Softmax gates of a level computed together, and their weighted sums of expert outputs.

All gates reading the same input share one GEMM for their logits. The mixture runs as one
fused Triton op on CUDA (softmax + weighted sum, no ``[G, B, S, D]`` intermediate), else as one
batched product of ``[B, G, E]`` weights and ``[B, E, D]`` experts (PLE's gates that see a subset
of experts get zero weight on the others): on CPU the C++ ``gate_mixture`` op, else ``bmm``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from nextrec_fast.backend import get_backend, use_triton
from nextrec_fast.layers.experts import _cpu_autocast_enabled, _tracing, batched_matmul, linear_parts
from nextrec_fast.layers.hooks import needs_module_call
from nextrec_fast.layers.indexing import index_tensor
from nextrec_fast.ops._dispatch import forward_ad_active, functorch_transforms_active


def _gate_linear(gate: nn.Module) -> nn.Linear:
    linear = gate[0] if isinstance(gate, nn.Sequential) else None
    if (not isinstance(linear, nn.Linear) or len(gate) != 2 or not isinstance(gate[1], nn.Softmax)
            or gate[1].dim not in (1, -1)):
        raise ValueError("a gate must be nn.Sequential(nn.Linear, nn.Softmax(dim=1)) as nextrec builds it")
    return linear


def check_gates(gates: Sequence[nn.Module]) -> None:
    """Raise ValueError unless every gate is ``nn.Sequential(nn.Linear, nn.Softmax(dim=1))``."""
    for gate in gates:
        _gate_linear(gate)


def gate_logits(gates: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Logits ``[B, S_g]`` of every gate; consecutive gates reading the same tensor share one GEMM."""
    linears = [_gate_linear(g) for g in gates]
    parts, group_widths, logits, start = [], [], [], 0
    while start < len(linears):
        stop = start
        while stop < len(linears) and inputs[stop] is inputs[start]:
            stop += 1
        group = linears[start:stop]
        if len(group) == 1:
            parts.append((inputs[start], group[0].weight, group[0].bias))
        else:
            parts.append((inputs[start], torch.cat([l.weight for l in group]), torch.cat([l.bias for l in group])))
        group_widths.append([l.out_features for l in group])
        start = stop
    # One GEMM per input; on CPU into column blocks of one output, through oneDNN where it takes
    # the GEMM (a [2048, 477] @ [477, 14] logit GEMM: 0.09 ms against MKL's 0.36 ms).
    for joint, sizes in zip(linear_parts(parts), group_widths):
        logits += list(joint.split(sizes, dim=1)) if len(sizes) > 1 else [joint]
    return logits


def mix_experts(logits: Sequence[torch.Tensor], experts: torch.Tensor,
                expert_index: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``out[b, g] = sum_s softmax(logits[g][b])[s] * experts[b, expert_index[g][s]]``: ``[B, G, D]``.

    ``experts`` is ``[B, E, D]``; ``expert_index`` None means every gate sees all experts in order.
    """
    num_experts = experts.shape[1]
    index = [list(range(num_experts))] * len(logits) if expert_index is None else [list(i) for i in expert_index]
    if use_triton(experts):
        return _mix_triton(logits, experts, index)
    return mix_expert_weights([lg.softmax(dim=-1) for lg in logits], experts, index)


def mix_expert_weights(weights: Sequence[torch.Tensor], experts: torch.Tensor,
                       expert_index: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``mix_experts`` from each gate's softmax weights ``[B, S_g]`` instead of its logits."""
    batch, num_experts = experts.shape[0], experts.shape[1]
    index = [list(range(num_experts))] * len(weights) if expert_index is None else [list(i) for i in expert_index]
    rows = []
    for w, idx in zip(weights, index):
        if idx == list(range(num_experts)):
            rows.append(w)
        else:
            where = index_tensor(idx, w.device).expand(batch, -1)
            rows.append(w.new_zeros(batch, num_experts).scatter(1, where, w))
    stacked = torch.stack(rows, dim=1)
    if _mixture_op_usable(stacked, experts):
        return _gate_mixture_op().gate_mixture(stacked, experts)
    return batched_matmul(stacked, experts)


def _mixture_op_usable(weights: torch.Tensor, experts: torch.Tensor) -> bool:
    """The C++ ``gate_mixture`` op takes this product: CPU, eager (no tracing, functorch
    transform, forward-mode AD, which the op has no formula for, or autocast: traced graphs and
    bfloat16 GEMMs keep ``bmm``), one float32 / float64 dtype, the auto / triton backend and the
    extension built."""
    if (experts.device.type != "cpu" or _tracing() or functorch_transforms_active() or forward_ad_active()
            or _cpu_autocast_enabled() or get_backend() not in ("auto", "triton")):
        return False
    if experts.dtype not in (torch.float32, torch.float64) or weights.dtype != experts.dtype:
        return False
    return _gate_mixture_op().is_available()


def _gate_mixture_op():
    """The op module, imported on first use (importing it may build the extension, which
    ``import nextrec_fast`` must not wait for)."""
    from nextrec_fast.ops import gate_mixture
    return gate_mixture


def gated_mixture(gates: Sequence[nn.Module], inputs: Sequence[torch.Tensor], experts: torch.Tensor,
                  expert_index: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``[B, G, D]``: gate g (reading ``inputs[g]``) mixes ``experts[:, expert_index[g]]``.

    Gates with a hook or a parametrised weight (``nextrec_fast.layers.hooks``) are called as
    modules, so their hooks see the softmax weights they return in nextrec; the others' logits
    still share GEMMs."""
    called = [needs_module_call(g) for g in gates]
    if not any(called):
        return mix_experts(gate_logits(gates, inputs), experts, expert_index)
    weights: list = [gate(x) if call else None for gate, x, call in zip(gates, inputs, called)]
    rest = [g for g, call in enumerate(called) if not call]
    if rest:
        logits = gate_logits([gates[g] for g in rest], [inputs[g] for g in rest])
        for g, lg in zip(rest, logits):
            weights[g] = lg.softmax(dim=-1)
    return mix_expert_weights(weights, experts, expert_index)


def _mix_triton(logits, experts: torch.Tensor, index) -> torch.Tensor:
    from nextrec_fast.ops import triton_ops
    experts_ebd = experts.transpose(0, 1)  # the Triton expert bank's own [E, B, D] layout
    outputs: list[torch.Tensor | None] = [None] * len(logits)
    # One launch per gate width (MMOE: one; PLE: task gates, then the wider shared gate).
    for width in dict.fromkeys(lg.shape[1] for lg in logits):
        members = [g for g, lg in enumerate(logits) if lg.shape[1] == width]
        stacked = torch.stack([logits[g] for g in members])  # [G', B, S]
        where = index_tensor([index[g] for g in members], experts.device)
        mixed = triton_ops.gate_mixture(stacked, experts_ebd, where)  # [G', B, D]
        for slot, g in enumerate(members):
            outputs[g] = mixed[slot]
    return torch.stack(outputs, dim=1)
