"""Whole ESMM / MMOE / PLE (the ``nextrec-fast bench`` configs): forward in eval mode, forward in
train mode (autograd graph built, no backward) and a full Adam training step on BCE.
fast_torch = the fast model with the Triton kernels and the C++ pooling op off (backend ``torch``);
compiled_fast = ``torch.compile(fast, fullgraph=True)`` (with --bench-compile on CPU): it must not
be slower than fast."""
import pytest
import torch
import torch.nn.functional as F

IMPLS = ("reference", "compiled_reference", "fast", "compiled_fast", "fast_torch")
MODELS = ("mmoe", "ple", "esmm")
MODES = ("forward_eval", "forward_train", "train_step")


def step_fn(model, forward, mode, x, labels):
    if mode == "forward_eval":
        model.eval()

        def step():
            with torch.no_grad():
                forward(x)
        return step
    model.train()
    if mode == "forward_train":
        return lambda: forward(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy(forward(x).clamp(1e-7, 1 - 1e-7), labels)
        loss.backward()
        optimizer.step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", MODELS)
def test_model(run_case, compile_or_skip, torch_backend_or_skip, model_pair, features_and_batch, model_name, mode,
               impl):
    _, x, labels = features_and_batch
    ref, fast = model_pair(model_name)
    model = fast if impl.startswith("fast") else ref
    forward = model
    if impl == "compiled_reference":
        forward = compile_or_skip(model)
    elif impl == "compiled_fast":
        forward = compile_or_skip(model, fullgraph=True)  # no graph breaks in our forward
    elif impl == "fast_torch":
        forward = torch_backend_or_skip(model)
    run_case(step_fn(model, forward, mode, x, labels), group=f"model:{model_name}:{mode}", impl=impl)
