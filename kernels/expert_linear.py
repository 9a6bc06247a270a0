"""Batched expert GEMMs: E independent nn.Linear layers run as one kernel.

Layouts: x is [B, K] (shared by all experts, group stride 0) or [G, B, K]; expert e reads
group g(e) (identity, or a gather index). weight is [E, N, K] (nn.Linear layout), outputs are
contiguous [E, B, N].

Forward epilogue (one kernel per layer):
- eval: y = dropout(act((acc + center) * scale + shift)) — bias and eval BatchNorm folded
  into per-channel center/scale/shift — optionally also z = acc + bias for backward;
- train BatchNorm: z = acc + bias plus per-row-block mean and M2 (sum of squared deviations
  from the block mean) of every channel, combined with Chan's formula by the caller. Block
  centring avoids the cancellation of sum/sum-of-squares when |mean| >> std.
Backward: dX (sums over every expert that reads a group, no per-expert copies) and dW (with
an optional split over the batch when there are too few output tiles to fill the GPU).
"""
import torch
import triton
import triton.language as tl

from nextrec_fast.kernels import activations as act_lib
from nextrec_fast.kernels.activations import activation_forward
from nextrec_fast.kernels.dropout import dropout_multiplier, dropout_scale
from nextrec_fast.kernels.utils import INTERPRET, accumulator_dtype, allow_tf32, dot_autotune_space, new_tensor

# Rows per block of the train-mode stats kernel: fixed (not autotuned) because the size of the
# partial-stats buffer depends on it.
STATS_BLOCK_M = 32 if INTERPRET else 128

# Tensor-core spaces (bf16/fp16, fp32 with TF32) and FMA spaces (fp32 ieee, fp64): see
# dot_autotune_space. The FMA tiles were chosen spill-free on sm_90. Spaces stay small: each
# config costs a compile.
_FWD_CONFIGS, _FWD_PRUNE = dot_autotune_space(
    [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
     dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
     dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
     dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
     dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)],
    [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=3) for m, n, k, w in
     ((64, 64, 32, 8), (32, 64, 32, 4), (64, 32, 32, 4), (64, 64, 16, 4), (128, 64, 16, 8), (64, 128, 16, 8))],
    dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2))
# Train-mode stats variant: BLOCK_M is STATS_BLOCK_M, passed by the launcher.
_STATS_CONFIGS, _STATS_PRUNE = dot_autotune_space(
    [dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
     dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
     dict(BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
     dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)],
    [dict(BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s) for n, k, w, s in
     ((32, 32, 8, 3), (64, 16, 8, 3), (32, 16, 4, 3), (64, 32, 8, 2))],
    dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2))
_DX_CONFIGS, _DX_PRUNE = dot_autotune_space(
    [dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=32, num_warps=4, num_stages=3),
     dict(BLOCK_M=128, BLOCK_K=128, BLOCK_N=64, num_warps=8, num_stages=3),
     dict(BLOCK_M=128, BLOCK_K=64, BLOCK_N=64, num_warps=4, num_stages=4),
     dict(BLOCK_M=64, BLOCK_K=128, BLOCK_N=64, num_warps=4, num_stages=4),
     dict(BLOCK_M=128, BLOCK_K=256, BLOCK_N=64, num_warps=8, num_stages=3)],
    [dict(BLOCK_M=m, BLOCK_K=k, BLOCK_N=n, num_warps=w, num_stages=3) for m, k, n, w in
     ((64, 64, 32, 8), (64, 64, 16, 4), (32, 64, 32, 4), (64, 32, 32, 4), (128, 64, 16, 8), (64, 128, 16, 8))],
    dict(BLOCK_M=32, BLOCK_K=16, BLOCK_N=16))
_DW_CONFIGS, _DW_PRUNE = dot_autotune_space(
    [dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=32, num_warps=4, num_stages=3),
     dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=64, num_warps=8, num_stages=3),
     dict(BLOCK_N=128, BLOCK_K=64, BLOCK_M=64, num_warps=4, num_stages=4),
     dict(BLOCK_N=64, BLOCK_K=128, BLOCK_M=64, num_warps=4, num_stages=4),
     dict(BLOCK_N=256, BLOCK_K=128, BLOCK_M=32, num_warps=8, num_stages=3)],
    [dict(BLOCK_N=n, BLOCK_K=k, BLOCK_M=m, num_warps=w, num_stages=3) for n, k, m, w in
     ((64, 64, 32, 8), (64, 64, 16, 4), (32, 64, 32, 4), (64, 32, 32, 4), (128, 64, 16, 8), (64, 128, 16, 8))],
    dict(BLOCK_N=16, BLOCK_K=16, BLOCK_M=16))


# The interpreter computes bf16 tl.dot wrongly (triton 3.x). Products of bf16 values are exact in
# fp32, so under the interpreter the tiles are upcast and multiplied in fp32: the same math as the
# GPU's tensor-core dot (exact products, fp32 accumulation), and the CPU tests then cover the bf16
# path end to end (loads, epilogue, statistics, stores). Compiled kernels never take this branch.
_UPCAST_BF16_DOT = tl.constexpr(INTERPRET)


@triton.jit
def _mma(a, b, acc, ALLOW_TF32: tl.constexpr):
    if _UPCAST_BF16_DOT and a.dtype == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif ALLOW_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row blocks share each weight tile while it is in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _expert_linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, x_group_ptr,
    center_ptr, scale_ptr, shift_ptr, prelu_ptr, seed_ptr,
    y_ptr, z_ptr, part_mean_ptr, part_m2_ptr,
    B, N, K, E,
    stride_xg, stride_xb, stride_xk,
    stride_we, stride_wn, stride_wk,
    dropout_p, keep_scale,
    X_INDEXED: tl.constexpr, HAS_BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_Z: tl.constexpr, WRITE_STATS: tl.constexpr,
    ALLOW_TF32: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    expert = tl.program_id(1)
    pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(B, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < B
    n_mask = offs_n < N

    if X_INDEXED:
        group = tl.load(x_group_ptr + expert).to(tl.int64)
    else:
        group = expert.to(tl.int64)  # stride_xg is 0 when x is shared
    x_rows = x_ptr + group * stride_xg + offs_m[:, None] * stride_xb
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a = tl.load(x_rows + kk[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, ALLOW_TF32)

    channel = expert * N + offs_n
    out_offs = expert.to(tl.int64) * B * N + offs_m[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    bias = tl.load(bias_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
    if WRITE_Z:
        z = (acc + bias[None, :]).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + out_offs, z, mask=out_mask)
        if WRITE_STATS:
            # Stats of the stored (rounded) z: what BatchNorm would see after nn.Linear.
            zr = tl.where(out_mask, z.to(ACC_DTYPE), 0.0)
            rows = tl.minimum(B - pid_m * BLOCK_M, BLOCK_M)
            block_mean = tl.sum(zr, axis=0) / rows
            dev = tl.where(out_mask, zr - block_mean[None, :], 0.0)
            part = pid_m.to(tl.int64) * E * N + channel
            tl.store(part_mean_ptr + part, block_mean, mask=n_mask)
            tl.store(part_m2_ptr + part, tl.sum(dev * dev, axis=0), mask=n_mask)
    if WRITE_Y:
        if HAS_BN:
            center = tl.load(center_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
            scale = tl.load(scale_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
            shift = tl.load(shift_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
            zb = (acc + center[None, :]) * scale[None, :] + shift[None, :]
        else:
            zb = acc + bias[None, :]
        slope = 0.0
        if ACT == act_lib.PRELU:
            slope = tl.load(prelu_ptr + expert).to(ACC_DTYPE)
        y = activation_forward(zb, slope, ACT)
        if DROPOUT:
            seed = tl.load(seed_ptr)
            y = y * dropout_multiplier(seed, expert, offs_m[:, None] * N + offs_n[None, :],
                                       dropout_p, keep_scale, y)
        tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=out_mask)


# ALLOW_TF32 in the keys: it picks the config space (and torch's TF32 switch can change).
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["N", "K", "ALLOW_TF32"], prune_configs_by=_FWD_PRUNE)(
    _expert_linear_fwd_kernel)
_fwd_stats_tuned = triton.autotune(_STATS_CONFIGS, key=["N", "K", "ALLOW_TF32"], prune_configs_by=_STATS_PRUNE)(
    _expert_linear_fwd_kernel)


@triton.jit
def _expert_linear_dx_kernel(
    dz_ptr, w_ptr, dx_ptr, group_start_ptr, group_experts_ptr,
    B, N, K, E,
    stride_we, stride_wn, stride_wk,
    X_MODE: tl.constexpr,  # 0: shared x (one group, every expert); 1: expert e reads group e; 2: CSR groups
    ALLOW_TF32: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx[g] = sum over experts e reading group g of dz[e] @ W[e]."""
    group = tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m = tl.program_id(0) // num_k
    pid_k = tl.program_id(0) % num_k
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < B
    k_mask = offs_k < K

    if X_MODE == 0:
        start = 0
        end = E
    elif X_MODE == 1:
        start = group
        end = group + 1
    else:
        start = tl.load(group_start_ptr + group)
        end = tl.load(group_start_ptr + group + 1)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for i in range(start, end):
        if X_MODE == 2:
            expert = tl.load(group_experts_ptr + i).to(tl.int64)
        else:
            expert = tl.cast(i, tl.int64)
        dz_rows = dz_ptr + expert * B * N + offs_m[:, None] * N
        w_rows = w_ptr + expert * stride_we + offs_k[None, :] * stride_wk
        for n0 in range(0, N, BLOCK_N):
            nn_ = n0 + offs_n
            n_mask = nn_ < N
            a = tl.load(dz_rows + nn_[None, :], mask=m_mask[:, None] & n_mask[None, :], other=0.0)
            b = tl.load(w_rows + nn_[:, None] * stride_wn, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, ALLOW_TF32)
    dx_offs = group.to(tl.int64) * B * K + offs_m[:, None] * K + offs_k[None, :]
    tl.store(dx_ptr + dx_offs, acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


_dx_tuned = triton.autotune(_DX_CONFIGS, key=["N", "K", "E", "ALLOW_TF32"], prune_configs_by=_DX_PRUNE)(
    _expert_linear_dx_kernel)


@triton.jit
def _expert_linear_dw_kernel(
    dz_ptr, x_ptr, x_group_ptr, dw_ptr,
    B, N, K, rows_per_split,
    stride_xg, stride_xb, stride_xk,
    X_INDEXED: tl.constexpr, ALLOW_TF32: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dw[split, e] = dz[e, rows of split]^T @ x[g(e), rows of split]."""
    expert = tl.program_id(1)
    split = tl.program_id(2)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n = tl.program_id(0) // num_k
    pid_k = tl.program_id(0) % num_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    k_mask = offs_k < K

    if X_INDEXED:
        group = tl.load(x_group_ptr + expert).to(tl.int64)
    else:
        group = expert.to(tl.int64)
    dz_cols = dz_ptr + expert.to(tl.int64) * B * N + offs_n[:, None]
    x_cols = x_ptr + group * stride_xg + offs_k[None, :] * stride_xk
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, B)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for m0 in range(row_begin, row_end, BLOCK_M):
        mm = m0 + offs_m
        m_mask = mm < row_end
        a = tl.load(dz_cols + mm[None, :] * N, mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        b = tl.load(x_cols + mm[:, None] * stride_xb, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, ALLOW_TF32)
    num_experts = tl.num_programs(1)
    dw_offs = (split * num_experts + expert).to(tl.int64) * N * K + offs_n[:, None] * K + offs_k[None, :]
    tl.store(dw_ptr + dw_offs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


_dw_tuned = triton.autotune(_DW_CONFIGS, key=["N", "K", "ALLOW_TF32"], prune_configs_by=_DW_PRUNE)(
    _expert_linear_dw_kernel)


def _x_strides(x: torch.Tensor):
    """(group stride, row stride, column stride); a shared 2-D x is one group of stride 0."""
    if x.dim() == 2:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _dummy(device):
    return torch.empty(1, device=device)


def expert_linear_forward(
    x, weight, bias, x_group=None, *, bn_center=None, bn_scale=None, bn_shift=None,
    prelu_weight=None, seed=None, activation=act_lib.IDENTITY.value, dropout_p=0.0,
    write_y=True, write_z=False, write_stats=False,
):
    """Launch the forward GEMM. Returns (y, z, part_mean, part_m2); unrequested ones are None.

    x: [B, K] shared or [G, B, K] (with x_group [E] int, or G == E); weight [E, N, K]; bias
    [E, N]. bn_center/scale/shift [E, N] (eval BatchNorm folded with the bias). write_stats
    (needs write_z) also returns per-block mean and M2 of z, [cdiv(B, STATS_BLOCK_M), E, N].
    """
    E, N, K = weight.shape
    B = x.shape[-2]
    device, dtype = x.device, x.dtype
    acc_dtype = accumulator_dtype(dtype)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    y = new_tensor((E, B, N), dtype, device) if write_y else None
    z = new_tensor((E, B, N), dtype, device) if write_z else None
    part_mean = part_m2 = None
    if write_stats:
        assert write_z, "stats are taken from the stored z"
        blocks = triton.cdiv(B, STATS_BLOCK_M)
        part_mean = new_tensor((blocks, E, N), stat_dtype, device)
        part_m2 = new_tensor((blocks, E, N), stat_dtype, device)
    dummy = _dummy(device)
    has_bn = bn_scale is not None
    dropout = seed is not None and dropout_p > 0.0
    args = (
        x, weight, bias, x_group if x_group is not None else dummy,
        bn_center if has_bn else dummy, bn_scale if has_bn else dummy, bn_shift if has_bn else dummy,
        prelu_weight if prelu_weight is not None else dummy, seed if dropout else dummy,
        y if write_y else dummy, z if write_z else dummy,
        part_mean if write_stats else dummy, part_m2 if write_stats else dummy,
        B, N, K, E, *_x_strides(x), *weight.stride(),
        float(dropout_p), dropout_scale(dropout_p),
    )
    meta = dict(X_INDEXED=x_group is not None, HAS_BN=has_bn, ACT=activation, DROPOUT=dropout,
                WRITE_Y=write_y, WRITE_Z=write_z, WRITE_STATS=write_stats,
                ALLOW_TF32=allow_tf32(dtype), ACC_DTYPE=acc_dtype)
    if write_stats:
        grid = lambda m: (triton.cdiv(B, STATS_BLOCK_M) * triton.cdiv(N, m["BLOCK_N"]), E)
        _fwd_stats_tuned[grid](*args, BLOCK_M=STATS_BLOCK_M, **meta)
    else:
        grid = lambda m: (triton.cdiv(B, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]), E)
        _fwd_tuned[grid](*args, **meta)
    return y, z, part_mean, part_m2



def expert_linear_backward_input(dz, weight, num_groups, batch, in_features, *, mode, group_start=None,
                                 group_experts=None, dtype=None):
    """dx [num_groups, B, K] (or [B, K] for mode 0). mode 0: shared x; 1: expert e reads group e;
    2: CSR (group_start [G + 1], group_experts [E]: experts sorted by group)."""
    E, N, K = weight.shape
    dtype = dtype or dz.dtype
    shape = (batch, in_features) if mode == 0 else (num_groups, batch, in_features)
    dx = new_tensor(shape, dtype, dz.device)
    dummy = _dummy(dz.device)
    grid = lambda m: (triton.cdiv(batch, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"]), 1 if mode == 0 else num_groups)
    _dx_tuned[grid](
        dz, weight, dx, group_start if mode == 2 else dummy, group_experts if mode == 2 else dummy,
        batch, N, K, E, *weight.stride(),
        X_MODE=mode, ALLOW_TF32=allow_tf32(dz.dtype), ACC_DTYPE=accumulator_dtype(dz.dtype))
    return dx


def _default_batch_splits(device, num_tiles_hint: int, batch: int) -> int:
    """Split the batch reduction of dW when the E * N-tiles * K-tiles grid is too small for the GPU."""
    if device.type != "cuda" or batch < 4096:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, (2 * sms) // max(num_tiles_hint, 1), batch // 2048))


def expert_linear_backward_weight(dz, x, x_group=None, *, weight_dtype=None, batch_splits=None):
    """dW [E, N, K] = dz[e]^T @ x[g(e)], fp32 partials over batch splits summed afterwards."""
    E, B, N = dz.shape
    K = x.shape[-1]
    weight_dtype = weight_dtype or dz.dtype
    if batch_splits is None:
        batch_splits = _default_batch_splits(dz.device, E * triton.cdiv(N, 128) * triton.cdiv(K, 128), B)
    batch_splits = max(1, min(int(batch_splits), B))
    rows_per_split = triton.cdiv(B, batch_splits)
    batch_splits = triton.cdiv(B, rows_per_split)
    if batch_splits == 1:
        dw = new_tensor((1, E, N, K), weight_dtype, dz.device)
    else:
        dw = new_tensor((batch_splits, E, N, K), torch.float64 if dz.dtype == torch.float64 else torch.float32,
                        dz.device)
    grid = lambda m: (triton.cdiv(N, m["BLOCK_N"]) * triton.cdiv(K, m["BLOCK_K"]), E, batch_splits)
    _dw_tuned[grid](
        dz, x, x_group if x_group is not None else _dummy(dz.device), dw,
        B, N, K, rows_per_split, *_x_strides(x),
        X_INDEXED=x_group is not None, ALLOW_TF32=allow_tf32(dz.dtype), ACC_DTYPE=accumulator_dtype(dz.dtype))
    if batch_splits == 1:
        return dw[0]
    return dw.sum(0).to(weight_dtype)
