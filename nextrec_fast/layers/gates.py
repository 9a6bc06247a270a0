"""Softmax gates of a level computed together, and their weighted sums as one batched matmul."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _gate_linear(gate: nn.Module) -> nn.Linear:
    linear = gate[0] if isinstance(gate, nn.Sequential) else None
    if not isinstance(linear, nn.Linear) or len(gate) != 2 or not isinstance(gate[1], nn.Softmax):
        raise ValueError("a gate must be nn.Sequential(nn.Linear, nn.Softmax(dim=1)) as nextrec builds it")
    return linear


def gate_weights(gates: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax weights ``[B, S_g]`` of every gate; gates reading the same tensor share one GEMM."""
    linears = [_gate_linear(g) for g in gates]
    weights, start = [], 0
    while start < len(linears):
        stop = start
        while stop < len(linears) and inputs[stop] is inputs[start]:
            stop += 1
        group = linears[start:stop]
        logits = F.linear(inputs[start], torch.cat([l.weight for l in group]), torch.cat([l.bias for l in group]))
        sizes = [l.out_features for l in group]
        if len(set(sizes)) == 1:
            probs = logits.view(logits.shape[0], len(group), sizes[0]).softmax(dim=-1)
            weights += list(probs.unbind(1))
        else:
            weights += [chunk.softmax(dim=-1) for chunk in logits.split(sizes, dim=1)]
        start = stop
    return weights


def gate_mixture(weights: Sequence[torch.Tensor], experts: torch.Tensor,
                 expert_index: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``out[b, g] = sum_s weights[g][b, s] * experts[b, expert_index[g][s]]`` as one bmm.

    ``experts`` is ``[B, E, D]``. Gates that see a subset of the experts (PLE) get zero weight
    on the others, so all gates of a level share one ``[B, G, E] @ [B, E, D]`` product.
    """
    batch, num_experts = experts.shape[0], experts.shape[1]
    if expert_index is None:
        mix = torch.stack(list(weights), dim=1)  # [B, G, E]
    else:
        rows = []
        for w, index in zip(weights, expert_index):
            if list(index) == list(range(num_experts)):
                rows.append(w)
            else:
                idx = torch.as_tensor(list(index), device=w.device).expand(batch, -1)
                rows.append(w.new_zeros(batch, num_experts).scatter(1, idx, w))
        mix = torch.stack(rows, dim=1)
    return torch.bmm(mix, experts)
