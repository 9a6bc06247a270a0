"""Per-channel (expert, n) BatchNorm + activation + dropout passes over contiguous [E, B, N]
tensors, and their backward.

Forward (train mode): z and the per-block stats come from the GEMM epilogue
(expert_linear.py); `combine_block_stats` merges them and `normalize_activate` is the single
fused pass y = dropout(act((z - mean) * scale + shift)), scale = gamma / sqrt(var + eps).

Backward, with zb = (z - center) * scale + shift recomputed from the saved z, and
g = dy * dropout_mask * act'(zb) (mask recomputed from the Philox seed):
- `channel_sums` pass: per-block sums of g and g * zhat (dbeta, dgamma, and the train-mode
  BatchNorm correction) and of dy_dropped * zb over zb <= 0 (PReLU slope gradient);
- `input_grad` pass: dz = g (no BN), g * scale (eval BN), or
  scale * (g - mean(g) - zhat * mean(g * zhat)) (train BN), plus per-block sums of dz (dbias).
Without train-mode BatchNorm both are one launch. Per-block partials ([blocks, E, N]) are summed
by the caller: no atomics, so results are deterministic and autotuning can rerun kernels.
"""
import torch
import triton
import triton.language as tl

from nextrec_fast.kernels import activations as act_lib
from nextrec_fast.kernels.activations import activation_derivative, activation_forward
from nextrec_fast.kernels.dropout import dropout_multiplier, dropout_scale
from nextrec_fast.kernels.utils import INTERPRET, accumulator_dtype, new_tensor

# Fixed (not autotuned) tile: the partial buffers are sized by BLOCK_M. 16 elements per thread:
# compiled for sm_90 (benchmarks/triton_compile_check.py), 64 x 128 tiles on 4 warps used 255
# registers and spilled up to 1.9 KB per thread in 57 of 78 variants (the Philox dropout and the
# transcendental activations); 32 x 128 on 8 warps: median 96 registers, one 8-byte spill.
BLOCK_M = 16 if INTERPRET else 32
BLOCK_N = 32 if INTERPRET else 128
NUM_WARPS = 8


def combine_block_stats(part_mean: torch.Tensor, part_m2: torch.Tensor, batch: int, block_m: int):
    """Chan et al.'s parallel merge of per-block (mean, M2) into the batch mean and biased var."""
    blocks = part_mean.shape[0]
    counts = torch.full((blocks, 1, 1), float(block_m), dtype=part_mean.dtype, device=part_mean.device)
    counts[-1] = batch - (blocks - 1) * block_m
    mean = (part_mean * counts).sum(0) / batch
    m2 = part_m2.sum(0) + (counts * (part_mean - mean).square()).sum(0)
    return mean, m2 / batch


@triton.jit
def _normalize_activate_kernel(
    z_ptr, center_ptr, scale_ptr, shift_ptr, prelu_ptr, seed_ptr, y_ptr,
    B, N, dropout_p, keep_scale,
    ACT: tl.constexpr, DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < B
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    channel = expert * N + offs_n
    offs = expert.to(tl.int64) * B * N + offs_m[:, None] * N + offs_n[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    center = tl.load(center_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
    scale = tl.load(scale_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
    shift = tl.load(shift_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
    zb = (z - center[None, :]) * scale[None, :] + shift[None, :]
    slope = 0.0
    if ACT == act_lib.PRELU:
        slope = tl.load(prelu_ptr + expert).to(ACC_DTYPE)
    y = activation_forward(zb, slope, ACT)
    if DROPOUT:
        seed = tl.load(seed_ptr)
        y = y * dropout_multiplier(seed, expert, offs_m[:, None] * N + offs_n[None, :], dropout_p, keep_scale, y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_activation_backward_kernel(
    dy_ptr, z_ptr, center_ptr, invstd_ptr, gamma_ptr, beta_ptr, prelu_ptr, seed_ptr,
    mean_g_ptr, mean_gzhat_ptr,
    dz_ptr, part_g_ptr, part_gzhat_ptr, part_prelu_ptr, part_dz_ptr,
    B, N, E, dropout_p, keep_scale,
    HAS_BN: tl.constexpr, TRAIN_BN: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    WRITE_CHANNEL_SUMS: tl.constexpr, WRITE_DZ: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    expert = tl.program_id(2)
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < B
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    channel = expert * N + offs_n
    offs = expert.to(tl.int64) * B * N + offs_m[:, None] * N + offs_n[None, :]

    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_BN:
        center = tl.load(center_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
        invstd = tl.load(invstd_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
        gamma = tl.load(gamma_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
        beta = tl.load(beta_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
        zhat = (z - center[None, :]) * invstd[None, :]
        zb = zhat * gamma[None, :] + beta[None, :]
    else:
        zhat = z
        zb = z
    if DROPOUT:
        seed = tl.load(seed_ptr)
        dy = dy * dropout_multiplier(seed, expert, offs_m[:, None] * N + offs_n[None, :], dropout_p, keep_scale, dy)
    slope = 0.0
    if ACT == act_lib.PRELU:
        slope = tl.load(prelu_ptr + expert).to(ACC_DTYPE)
    g = tl.where(mask, dy * activation_derivative(zb, slope, ACT), 0.0)

    part = pid_m.to(tl.int64) * E * N + channel
    if WRITE_CHANNEL_SUMS:
        if HAS_BN:
            tl.store(part_g_ptr + part, tl.sum(g, axis=0), mask=n_mask)
            tl.store(part_gzhat_ptr + part, tl.sum(g * zhat, axis=0), mask=n_mask)
        if ACT == act_lib.PRELU:
            prelu_terms = tl.where(mask & (zb <= 0), dy * zb, 0.0)
            tl.store(part_prelu_ptr + part, tl.sum(prelu_terms, axis=0), mask=n_mask)
    if WRITE_DZ:
        if TRAIN_BN:
            mean_g = tl.load(mean_g_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
            mean_gzhat = tl.load(mean_gzhat_ptr + channel, mask=n_mask, other=0.0).to(ACC_DTYPE)
            dz = (g - mean_g[None, :] - zhat * mean_gzhat[None, :]) * (gamma * invstd)[None, :]
        elif HAS_BN:
            dz = g * (gamma * invstd)[None, :]
        else:
            dz = g
        dz = dz.to(dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + offs, dz, mask=mask)
        # dbias sums the stored dz, as nn.Linear's backward would.
        tl.store(part_dz_ptr + part, tl.sum(tl.where(mask, dz.to(ACC_DTYPE), 0.0), axis=0), mask=n_mask)


def normalize_activate(z, center, scale, shift, *, prelu_weight=None, seed=None,
                       activation=act_lib.IDENTITY.value, dropout_p=0.0):
    """y = dropout(act((z - center) * scale + shift)) for z [E, B, N]; center/scale/shift [E, N]."""
    E, B, N = z.shape
    y = new_tensor((E, B, N), z.dtype, z.device)
    dropout = seed is not None and dropout_p > 0.0
    dummy = torch.empty(1, device=z.device)
    grid = (triton.cdiv(B, BLOCK_M), triton.cdiv(N, BLOCK_N), E)
    _normalize_activate_kernel[grid](
        z, center, scale, shift, prelu_weight if prelu_weight is not None else dummy,
        seed if dropout else dummy, y, B, N, float(dropout_p), dropout_scale(dropout_p),
        ACT=activation, DROPOUT=dropout, ACC_DTYPE=accumulator_dtype(z.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return y



def bn_activation_backward(dy, z, *, center=None, invstd=None, gamma=None, beta=None, bn_training=False,
                           prelu_weight=None, seed=None, activation=act_lib.IDENTITY.value, dropout_p=0.0):
    """Backward of y = dropout(act(BN(z))) (BN optional) for dy, z [E, B, N].

    Returns (dz [E, B, N], dbias [E, N], dgamma [E, N] | None, dbeta [E, N] | None,
    dprelu [E] | None); dbias is the sum of dz over the batch (the Linear bias gradient)."""
    E, B, N = z.shape
    device = z.device
    acc_dtype = accumulator_dtype(z.dtype)
    part_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    blocks = triton.cdiv(B, BLOCK_M)
    has_bn = gamma is not None
    is_prelu = activation == act_lib.PRELU.value
    dropout = seed is not None and dropout_p > 0.0
    dummy = torch.empty(1, device=device)

    def part():
        return new_tensor((blocks, E, N), part_dtype, device)

    part_g = part() if has_bn else dummy
    part_gzhat = part() if has_bn else dummy
    part_prelu = part() if is_prelu else dummy
    part_dz = part()
    dz = new_tensor((E, B, N), z.dtype, device)
    grid = (blocks, triton.cdiv(N, BLOCK_N), E)
    common = (
        dy, z, center if has_bn else dummy, invstd if has_bn else dummy, gamma if has_bn else dummy,
        beta if has_bn else dummy, prelu_weight if is_prelu else dummy, seed if dropout else dummy)
    meta = dict(HAS_BN=has_bn, ACT=activation, DROPOUT=dropout, ACC_DTYPE=acc_dtype,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    sizes = (B, N, E, float(dropout_p), dropout_scale(dropout_p))
    two_pass = has_bn and bn_training
    mean_g = mean_gzhat = dummy
    if two_pass:
        # Train-mode BatchNorm: dz needs the batch means of g and g * zhat first.
        _bn_activation_backward_kernel[grid](
            *common, dummy, dummy, dummy, part_g, part_gzhat, part_prelu, dummy, *sizes,
            TRAIN_BN=True, WRITE_CHANNEL_SUMS=True, WRITE_DZ=False, **meta)
        sum_g, sum_gzhat = part_g.sum(0), part_gzhat.sum(0)
        mean_g, mean_gzhat = sum_g / B, sum_gzhat / B
    _bn_activation_backward_kernel[grid](
        *common, mean_g, mean_gzhat, dz, part_g, part_gzhat, part_prelu, part_dz, *sizes,
        TRAIN_BN=two_pass, WRITE_CHANNEL_SUMS=not two_pass, WRITE_DZ=True, **meta)
    dbias = part_dz.sum(0)
    dgamma = dbeta = dprelu = None
    if has_bn:
        dbeta = sum_g if two_pass else part_g.sum(0)
        dgamma = sum_gzhat if two_pass else part_gzhat.sum(0)
    if is_prelu:
        dprelu = part_prelu.sum((0, 2))
    return dz, dbias, dgamma, dbeta, dprelu
