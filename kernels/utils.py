"""Small helpers shared by the launchers: interpreter detection, autotune spaces, output
allocation (optionally NaN-poisoned so tests catch elements a kernel forgot to write)."""
import os

import torch
import triton
import triton.language as tl

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so this is fixed at import.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# NEXTREC_FAST_AUTOTUNE=0: GPU kernels use the first config of each space (quick test runs:
# autotuning every shape a test suite touches would take minutes of compilation).
AUTOTUNE = os.environ.get("NEXTREC_FAST_AUTOTUNE", "1") != "0"


def _config(c: dict, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                         num_warps=c.get("num_warps", num_warps), num_stages=c.get("num_stages", num_stages))


def _interpreter_configs(interpret_config: dict) -> list[triton.Config]:
    """The interpreter fails with more than one autotune config: give it exactly one."""
    return [triton.Config(interpret_config, num_warps=1, num_stages=1)]


def autotune_configs(gpu_space: list[dict], interpret_config: dict, num_warps=4, num_stages=3):
    if INTERPRET:
        return _interpreter_configs(interpret_config)
    if not AUTOTUNE:
        gpu_space = gpu_space[:1]
    return [_config(c, num_warps, num_stages) for c in gpu_space]


def uses_tensor_cores(named_args: dict, kwargs: dict) -> bool:
    """Whether a kernel's tl.dot runs on tensor cores: bf16/fp16 inputs, or fp32 with TF32
    allowed. fp32 with input_precision="ieee" (torch's default for fp32 matmuls) and fp64 run
    on FMA units, where each thread holds far more of the accumulator tile."""
    if kwargs.get("ACC_DTYPE") == tl.float64:
        return False
    if kwargs.get("ALLOW_TF32"):
        return True
    first = next((a for a in named_args.values() if isinstance(a, torch.Tensor)), None)
    return first is not None and first.dtype in (torch.bfloat16, torch.float16)


def dot_autotune_space(tensor_core_space: list[dict], fma_space: list[dict], interpret_config: dict,
                       num_warps=4, num_stages=3):
    """(configs, prune_configs_by) for a tl.dot kernel, with one space per path (see
    ``uses_tensor_cores``). Compiled for sm_90 (benchmarks/triton_compile_check.py), the big
    tensor-core tiles spill on the FMA path (fp32 ieee: 0-2 of 5-7 configs spill-free; fp64: 15 of
    ~30 over the shared-memory limit), while the FMA space compiles without spills. The first
    config of each space is the one used with NEXTREC_FAST_AUTOTUNE=0."""
    if INTERPRET:
        return _interpreter_configs(interpret_config), None
    tensor_core = [_config(c, num_warps, num_stages) for c in tensor_core_space]
    fma = [_config(c, num_warps, num_stages) for c in fma_space]

    def prune(configs, named_args, **kwargs):
        space = tensor_core if uses_tensor_cores(named_args, kwargs) else fma
        return space if AUTOTUNE else space[:1]

    return tensor_core + fma, {"early_config_prune": prune}


def poison_outputs() -> bool:
    """NEXTREC_FAST_POISON=1 (tests): new outputs start as NaN instead of uninitialised memory."""
    return os.environ.get("NEXTREC_FAST_POISON") == "1"


def new_tensor(shape, dtype, device) -> torch.Tensor:
    if poison_outputs() and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def accumulator_dtype(dtype: torch.dtype):
    """fp32 accumulation for fp32/fp16/bf16; fp64 stays fp64 (interpreter tests)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def allow_tf32(dtype: torch.dtype) -> bool:
    """Mirror nn.Linear: TF32 only where torch itself allows it for fp32 matmuls."""
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET


def min_block(n: int, lo: int = 16) -> int:
    """Power-of-two block of at least `lo` (GPU tl.dot needs >= 16 per dimension)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))
