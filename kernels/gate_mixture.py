"""Softmax gate mixture: out[t, b] = sum_s softmax(logits[t, b])[s] * experts[index[t, s], b].

The gate width S is small (number of experts a gate sees), so each program keeps a whole
[BLOCK_M, S] logits tile, takes the row max and denominator once (stable softmax), and streams
the S expert tiles it mixes. Backward never materialises [T, B, S, D]:
- d_logits[t, b, s] = p_s * (<dout[t, b], x_s[b]> - sum_s' p_s' <dout[t, b], x_s'[b]>);
- d_experts[e, b] = sum over (t, s) with index[t, s] == e of p[t, b, s] * dout[t, b], with
  the (t, s) pairs of each expert given in CSR form (softmax stats recomputed per pair).
"""
import torch
import triton
import triton.language as tl

from nextrec_fast.kernels.utils import accumulator_dtype, autotune_configs, new_tensor

_CONFIGS = autotune_configs(
    [dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w) for bm, bd, w in
     ((32, 128, 4), (64, 128, 4), (64, 64, 4), (128, 64, 8), (16, 256, 4), (128, 128, 8))],
    dict(BLOCK_M=16, BLOCK_D=16))
_LOGITS_GRAD_CONFIGS = autotune_configs(
    [dict(BLOCK_M=bm, BLOCK_D=bd, num_warps=w) for bm, bd, w in
     ((32, 128, 4), (64, 128, 4), (16, 128, 4), (64, 64, 4), (128, 64, 8))],
    dict(BLOCK_M=16, BLOCK_D=16))


@triton.jit
def _softmax_stats(logits_ptr, gate, offs_m, m_mask, B, S, BLOCK_S: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Row max and sum of exp(l - max) of gate `gate`'s logits for rows offs_m."""
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < S
    ptrs = logits_ptr + gate.to(tl.int64) * B * S + offs_m[:, None] * S + offs_s[None, :]
    logits = tl.load(ptrs, mask=m_mask[:, None] & s_mask[None, :], other=0.0).to(ACC_DTYPE)
    logits = tl.where(s_mask[None, :], logits, float("-inf"))
    row_max = tl.max(logits, axis=1)
    denom = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)
    return row_max, denom


@triton.jit
def _gate_prob(logits_ptr, gate, slot, offs_m, m_mask, row_max, denom, B, S, ACC_DTYPE: tl.constexpr):
    """softmax(logits[gate, rows])[slot], the same arithmetic as the full-row tile."""
    logit = tl.load(logits_ptr + gate.to(tl.int64) * B * S + offs_m * S + slot, mask=m_mask, other=0.0)
    return tl.exp(logit.to(ACC_DTYPE) - row_max) / denom


@triton.jit
def _gate_mixture_fwd_kernel(
    logits_ptr, experts_ptr, index_ptr, out_ptr,
    B, S, D,
    IDENTITY_INDEX: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    gate = tl.program_id(1)
    num_d = tl.cdiv(D, BLOCK_D)
    offs_m = (tl.program_id(0) // num_d) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (tl.program_id(0) % num_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = offs_m < B
    mask = m_mask[:, None] & (offs_d < D)[None, :]
    row_max, denom = _softmax_stats(logits_ptr, gate, offs_m, m_mask, B, S, BLOCK_S, ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    for slot in range(0, S):
        if IDENTITY_INDEX:
            expert = tl.cast(slot, tl.int64)
        else:
            expert = tl.load(index_ptr + gate * S + slot).to(tl.int64)
        prob = _gate_prob(logits_ptr, gate, slot, offs_m, m_mask, row_max, denom, B, S, ACC_DTYPE)
        x = tl.load(experts_ptr + expert * B * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        acc += prob[:, None] * x.to(ACC_DTYPE)
    out_offs = gate.to(tl.int64) * B * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_fwd_tuned = triton.autotune(_CONFIGS, key=["S", "D"])(_gate_mixture_fwd_kernel)


@triton.jit
def _gate_mixture_logits_grad_kernel(
    dout_ptr, logits_ptr, experts_ptr, index_ptr, dlogits_ptr,
    B, S, D,
    IDENTITY_INDEX: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    gate = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < B
    s_mask = offs_s < S
    dout_rows = dout_ptr + gate.to(tl.int64) * B * D + offs_m[:, None] * D
    # dots[b, s] = <dout[gate, b], experts[index[gate, s], b]>
    dots = tl.zeros((BLOCK_M, BLOCK_S), dtype=ACC_DTYPE)
    for slot in range(0, S):
        if IDENTITY_INDEX:
            expert = tl.cast(slot, tl.int64)
        else:
            expert = tl.load(index_ptr + gate * S + slot).to(tl.int64)
        x_rows = experts_ptr + expert * B * D + offs_m[:, None] * D
        dot = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            mask = m_mask[:, None] & (dd < D)[None, :]
            go = tl.load(dout_rows + dd[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            x = tl.load(x_rows + dd[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            dot += tl.sum(go * x, axis=1)
        dots = tl.where(offs_s[None, :] == slot, dot[:, None], dots)
    row_max, denom = _softmax_stats(logits_ptr, gate, offs_m, m_mask, B, S, BLOCK_S, ACC_DTYPE)
    offs = gate.to(tl.int64) * B * S + offs_m[:, None] * S + offs_s[None, :]
    mask = m_mask[:, None] & s_mask[None, :]
    logits = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    probs = tl.where(s_mask[None, :], tl.exp(logits - row_max[:, None]) / denom[:, None], 0.0)
    dlogits = probs * (dots - tl.sum(probs * dots, axis=1)[:, None])
    tl.store(dlogits_ptr + offs, dlogits.to(dlogits_ptr.dtype.element_ty), mask=mask)


_logits_grad_tuned = triton.autotune(_LOGITS_GRAD_CONFIGS, key=["S", "D"])(_gate_mixture_logits_grad_kernel)


@triton.jit
def _gate_mixture_experts_grad_kernel(
    dout_ptr, logits_ptr, pair_start_ptr, pairs_ptr, dexperts_ptr,
    B, S, D, T,
    IDENTITY_INDEX: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    expert = tl.program_id(1)
    num_d = tl.cdiv(D, BLOCK_D)
    offs_m = (tl.program_id(0) // num_d) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (tl.program_id(0) % num_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = offs_m < B
    mask = m_mask[:, None] & (offs_d < D)[None, :]
    if IDENTITY_INDEX:
        start = 0
        end = T
    else:
        start = tl.load(pair_start_ptr + expert)
        end = tl.load(pair_start_ptr + expert + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC_DTYPE)
    for i in range(start, end):
        if IDENTITY_INDEX:
            gate = i
            slot = expert
        else:
            pair = tl.load(pairs_ptr + i)
            gate = pair // S
            slot = pair % S
        row_max, denom = _softmax_stats(logits_ptr, gate, offs_m, m_mask, B, S, BLOCK_S, ACC_DTYPE)
        prob = _gate_prob(logits_ptr, gate, slot, offs_m, m_mask, row_max, denom, B, S, ACC_DTYPE)
        go = tl.load(dout_ptr + gate.to(tl.int64) * B * D + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        acc += prob[:, None] * go.to(ACC_DTYPE)
    offs = expert.to(tl.int64) * B * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(dexperts_ptr + offs, acc.to(dexperts_ptr.dtype.element_ty), mask=mask)


_experts_grad_tuned = triton.autotune(_CONFIGS, key=["S", "D"])(_gate_mixture_experts_grad_kernel)


def _block_s(S: int) -> int:
    return triton.next_power_of_2(max(S, 2))


def gate_mixture_forward(logits, experts, expert_index=None):
    """logits [T, B, S], experts [E, B, D] (contiguous), expert_index [T, S] int or None (S == E)."""
    T, B, S = logits.shape
    E, _, D = experts.shape
    out = new_tensor((T, B, D), experts.dtype, experts.device)
    identity = expert_index is None
    grid = lambda m: (triton.cdiv(B, m["BLOCK_M"]) * triton.cdiv(D, m["BLOCK_D"]), T)
    _fwd_tuned[grid](
        logits, experts, experts if identity else expert_index, out, B, S, D,
        IDENTITY_INDEX=identity, ACC_DTYPE=accumulator_dtype(experts.dtype), BLOCK_S=_block_s(S))
    return out


def pairs_by_expert(expert_index: torch.Tensor, num_experts: int):
    """CSR of the (gate, slot) pairs (flattened gate * S + slot) that read each expert."""
    flat = expert_index.reshape(-1)
    pairs = torch.argsort(flat, stable=True).to(torch.int32)
    counts = torch.bincount(flat, minlength=num_experts)
    start = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    start[1:] = torch.cumsum(counts, 0)
    return start, pairs


def gate_mixture_backward(dout, logits, experts, expert_index=None, *, need_logits=True, need_experts=True):
    """Returns (d_logits [T, B, S] | None, d_experts [E, B, D] | None)."""
    T, B, S = logits.shape
    E, _, D = experts.shape
    identity = expert_index is None
    acc_dtype = accumulator_dtype(experts.dtype)
    index_arg = experts if identity else expert_index
    d_logits = d_experts = None
    if need_logits:
        d_logits = new_tensor((T, B, S), logits.dtype, logits.device)
        grid = lambda m: (triton.cdiv(B, m["BLOCK_M"]), T)
        _logits_grad_tuned[grid](
            dout, logits, experts, index_arg, d_logits, B, S, D,
            IDENTITY_INDEX=identity, ACC_DTYPE=acc_dtype, BLOCK_S=_block_s(S))
    if need_experts:
        d_experts = new_tensor((E, B, D), experts.dtype, experts.device)
        if identity:
            pair_start = pairs = experts  # unused
        else:
            pair_start, pairs = pairs_by_expert(expert_index, E)
        grid = lambda m: (triton.cdiv(B, m["BLOCK_M"]) * triton.cdiv(D, m["BLOCK_D"]), E)
        _experts_grad_tuned[grid](
            dout, logits, pair_start, pairs, d_experts, B, S, D, T,
            IDENTITY_INDEX=identity, ACC_DTYPE=acc_dtype, BLOCK_S=_block_s(S))
    return d_logits, d_experts
