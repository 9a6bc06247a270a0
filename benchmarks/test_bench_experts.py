"""Expert layer: E nextrec MLPs (Linear -> BatchNorm1d -> ReLU -> Dropout per layer) on one input.
reference = nextrec's loop over experts then stack; fast = ``run_experts`` (one GEMM for the first
layer of all experts, one bmm per deeper layer, BatchNorm/activation once over all experts; fused
Triton ops on CUDA); fast_torch = fast with the Triton kernels off (CUDA only: on CPU it is ``fast``)."""
import pytest
import torch

from nextrec_fast import reference
from nextrec_fast.layers.experts import run_experts

IMPLS = ("reference", "compiled_reference", "fast", "fast_torch")
MODES = ("forward_eval", "forward_backward")
NUM_EXPERTS, EXPERT_DIMS = 8, [256, 128]  # MMOE's default config


def input_width(features) -> int:
    dense, sparse, sequence = features
    return sum(f.embedding_dim for f in sparse + sequence) + len(dense)


@pytest.fixture
def experts_and_input(features_and_batch, size, device):
    features, _, _ = features_and_batch
    torch.manual_seed(0)
    width = input_width(features)
    experts = torch.nn.ModuleList(reference.MLP(width, output_layer=False, dims=EXPERT_DIMS)
                                  for _ in range(NUM_EXPERTS)).to(device)
    x = torch.randn(size.batch, width, device=device)
    return experts, x


def loop_over_experts(experts, x):
    return torch.stack([expert(x) for expert in experts], dim=0)  # [E, B, D], as nextrec's MMOE


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
def test_expert_layer(run_case, compile_or_skip, torch_backend_or_skip, experts_and_input, impl, mode):
    experts, x = experts_and_input
    if impl in ("fast", "fast_torch"):
        batch = x.shape[0]
        # [B, E, N] (or [B, E * N]) -> nextrec's [E, B, N]
        forward = lambda inp: run_experts(experts, [inp]).reshape(batch, NUM_EXPERTS, -1).transpose(0, 1)
        if impl == "fast_torch":
            forward = torch_backend_or_skip(forward)
    else:
        forward = loop_over_experts
        if impl == "compiled_reference":
            forward = compile_or_skip(loop_over_experts)
        forward = (lambda f: (lambda inp: f(experts, inp)))(forward)
    experts.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(x), loop_over_experts(experts, x), rtol=1e-4, atol=1e-5)

    if mode == "forward_eval":
        experts.eval()

        def step():
            with torch.no_grad():
                forward(x)
    else:
        experts.train()
        x.requires_grad_(True)

        def step():
            experts.zero_grad(set_to_none=True)
            x.grad = None
            forward(x).sum().backward()
    run_case(step, group=f"experts:{mode}", impl=impl, num_experts=NUM_EXPERTS, dims=EXPERT_DIMS)
