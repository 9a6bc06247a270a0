"""Whole ESMM / MMOE / PLE (the ``nextrec-fast bench`` configs): forward in eval mode, forward in
train mode (autograd graph built, no backward), a full Adam training step on BCE, and the same
step with Adam(fused=True) where the fast models' tables get row-wise Adagrad in the pooling
backward instead (train_step_fused_tables: the training step issue #16 compares), or lazy Adam
(train_step_lazy_adam: SparseAdam's rule, the one that keeps dense Adam's test AUC).
fast_torch = the fast model with the Triton kernels and the C++ pooling op off (backend ``torch``);
compiled_fast = ``torch.compile(fast, fullgraph=True)`` (with --bench-compile on CPU): it must not
be slower than fast. Where nextrec is installed also nextrec = its own model (either generation) and
accelerated = a copy after ``nextrec_fast.accelerate``: the summary's speed-ups are then over nextrec."""
import pytest
import torch
import torch.nn.functional as F

from nextrec_fast import optim
from nextrec_fast.bench.models import TABLES_IN_BACKWARD, table_optimizer

IMPLS = ("nextrec", "accelerated", "reference", "compiled_reference", "fast", "compiled_fast", "fast_torch")
MODELS = ("mmoe", "ple", "esmm")
MODES = ("forward_eval", "forward_train", "train_step", "train_step_fused_tables", "train_step_lazy_adam")


def step_fn(model, forward, mode, x, labels, tables_in_backward=False):
    """train_step: torch's default Adam on everything; train_step_fused_tables and
    train_step_lazy_adam: Adam(fused=True), the fast models' tables under row-wise Adagrad / lazy
    Adam in the pooling backward instead (nextrec_fast.bench.models.table_optimizer; the caller
    undoes that with nextrec_fast.optim.remove_optimizer_in_backward)."""
    if mode == "forward_eval":
        model.eval()

        def step():
            with torch.no_grad():
                forward(x)
        return step
    model.train()
    if mode == "forward_train":
        return lambda: forward(x)
    params = list(model.parameters())
    if tables_in_backward:
        tables = model.embedding.tables()
        cls, kwargs = table_optimizer(mode)
        optim.apply_optimizer_in_backward(cls, tables, kwargs)
        params = [p for p in params if all(p is not t for t in tables)]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=mode in TABLES_IN_BACKWARD)

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy(forward(x).clamp(1e-7, 1 - 1e-7), labels)
        loss.backward()
        optimizer.step()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_name", MODELS)
def test_model(run_case, compile_or_skip, torch_backend_or_skip, model_pair, nextrec_pair, features_and_batch,
               model_name, mode, impl):
    _, x, labels = features_and_batch
    if impl in ("nextrec", "accelerated"):
        plain, accelerated, forward_of = nextrec_pair(model_name)
        model = plain if impl == "nextrec" else accelerated
        _run_model_case(run_case, model, forward_of(model), mode, x, labels, model_name, impl)
        return
    ref, fast = model_pair(model_name)
    model = fast if impl.startswith("fast") else ref
    forward = model
    if impl == "compiled_reference":
        forward = compile_or_skip(model)
    elif impl == "compiled_fast":
        forward = compile_or_skip(model, fullgraph=True)  # no graph breaks in our forward
    elif impl == "fast_torch":
        forward = torch_backend_or_skip(model)
    _run_model_case(run_case, model, forward, mode, x, labels, model_name, impl)


def _run_model_case(run_case, model, forward, mode, x, labels, model_name, impl):
    fused = mode in TABLES_IN_BACKWARD and impl in ("fast", "compiled_fast", "fast_torch", "accelerated")
    if fused and impl != "fast" and impl != "accelerated":
        pytest.skip("tables in backward: eager fast models only (not under torch.compile or the torch backend)")
    try:
        run_case(step_fn(model, forward, mode, x, labels, tables_in_backward=fused), group=f"model:{model_name}:{mode}",
                 impl=impl)
    finally:
        if fused:
            optim.remove_optimizer_in_backward(model.embedding.tables())
