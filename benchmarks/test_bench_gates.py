"""Gate mixture of MMOE: per task a softmax gate over E experts and the weighted sum of the expert
outputs. reference = nextrec's loop over tasks; fast = ``gate_logits`` (all gates in one GEMM) +
``mix_experts`` (softmax and all weighted sums in one bmm; one fused Triton op on CUDA);
fast_torch = fast with the Triton kernels off (CUDA only: on CPU it is ``fast``)."""
import pytest
import torch
import torch.nn as nn

from nextrec_fast.backend import use_backend
from nextrec_fast.layers.gates import gate_logits, mix_experts

IMPLS = ("reference", "compiled_reference", "fast", "fast_torch")
MODES = ("forward_eval", "forward_backward")
NUM_EXPERTS, EXPERT_DIM, NUM_TASKS = 8, 128, 2  # MMOE's default config


@pytest.fixture
def gates_and_inputs(features_and_batch, size, device):
    (dense, sparse, sequence), _, _ = features_and_batch
    width = sum(f.embedding_dim for f in sparse + sequence) + len(dense)
    torch.manual_seed(0)
    gates = nn.ModuleList(nn.Sequential(nn.Linear(width, NUM_EXPERTS), nn.Softmax(dim=1))
                          for _ in range(NUM_TASKS)).to(device)
    x = torch.randn(size.batch, width, device=device)
    experts_bed = torch.randn(size.batch, NUM_EXPERTS, EXPERT_DIM, device=device)  # fast layout
    experts_ebd = experts_bed.transpose(0, 1).contiguous()                         # nextrec's stack
    return gates, x, experts_bed, experts_ebd


def loop_over_tasks(gates, x, experts_ebd):
    outputs = []
    for gate in gates:
        weights = gate(x).unsqueeze(2)  # [B, E, 1]
        outputs.append(torch.sum(weights * experts_ebd.permute(1, 0, 2), dim=1))
    return torch.stack(outputs, dim=1)  # [B, T, D]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gate_mixture(run_case, compile_or_skip, torch_backend_or_skip, gates_and_inputs, impl, mode):
    gates, x, experts_bed, experts_ebd = gates_and_inputs
    if impl == "fast":
        forward = lambda: mix_experts(gate_logits(gates, [x] * NUM_TASKS), experts_bed)
    elif impl == "fast_torch":
        forward = torch_backend_or_skip(lambda: mix_experts(gate_logits(gates, [x] * NUM_TASKS), experts_bed))
    else:
        loop = compile_or_skip(loop_over_tasks) if impl == "compiled_reference" else loop_over_tasks
        forward = lambda: loop(gates, x, experts_ebd)
    with torch.no_grad():
        torch.testing.assert_close(forward(), loop_over_tasks(gates, x, experts_ebd), rtol=1e-4, atol=1e-5)

    if mode == "forward_eval":
        def step():
            with torch.no_grad():
                forward()
    else:
        inputs = (x, experts_bed, experts_ebd)
        for t in inputs:
            t.requires_grad_(True)

        def step():
            gates.zero_grad(set_to_none=True)
            for t in inputs:
                t.grad = None
            forward().sum().backward()
    run_case(step, group=f"gates:{mode}", impl=impl, num_experts=NUM_EXPERTS, num_tasks=NUM_TASKS)
