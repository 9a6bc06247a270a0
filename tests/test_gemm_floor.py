"""The bench's GEMM floor: every GEMM of a step is recorded (forward and autograd backward), its
FLOPs counted, and the replay runs the same shapes and strides."""
import random

import torch
import torch.nn as nn

from nextrec_fast.bench import gemm_floor


def test_records_forward_and_backward_gemms_with_their_flops():
    rng = random.Random()
    batch, k, n, m = (rng.randint(2, 40) for _ in range(4))
    first, second = nn.Linear(k, n), nn.Linear(n, m, bias=False)
    x = torch.randn(batch, k, requires_grad=True)
    eval_calls = gemm_floor.record_gemms(lambda: second(torch.relu(first(x))))
    assert len(eval_calls) == 2
    assert abs(gemm_floor.gemm_gflop(eval_calls) - 2 * batch * (k * n + n * m) / 1e9) < 1e-12

    calls = gemm_floor.record_gemms(lambda: second(torch.relu(first(x))).sum().backward())
    # each Linear: forward, grad of the input, grad of the weight
    assert len(calls) == 6
    assert abs(gemm_floor.gemm_gflop(calls) - 6 * batch * (k * n + n * m) / 1e9) < 1e-12
    ops = {str(c.op) for c in calls}
    assert ops <= {"aten.addmm.default", "aten.mm.default"}, ops


def test_bmm_and_out_variants_count_and_replay():
    rng = random.Random()
    e, b, k, n = (rng.randint(2, 12) for _ in range(4))
    x, w = torch.randn(e, b, k), torch.randn(e, n, k)
    out = torch.empty(b, n)

    def step():
        torch.baddbmm(torch.zeros(e, 1, n), x, w.transpose(1, 2))
        torch.mm(x[0], w[0].t(), out=out)
    calls = gemm_floor.record_gemms(step)
    assert [str(c.op) for c in calls] == ["aten.baddbmm.default", "aten.mm.out"]
    assert abs(gemm_floor.gemm_gflop(calls) - 2 * (e + 1) * b * k * n / 1e9) < 1e-12
    # The replay runs the same ops on same-shaped, same-strided inputs: recording it again gives
    # the same calls.
    replay = gemm_floor.replay(calls)
    assert gemm_floor.record_gemms(replay) == calls


def test_bench_rows_record_the_same_gemm_work_as_the_baseline():
    """The fast model's GEMMs have the reference's FLOPs (the floor is the fast path's own GEMMs,
    which must be the work nextrec does, not less)."""
    from nextrec_fast.bench import common, models
    features = common.default_features(**common.CONFIGS["small"])
    for name in models.MODEL_NAMES:
        ref, fast = models.build_models(name, "cpu", features=features)
        x, labels = common.make_batch(*features, batch=32, device="cpu")
        gflop = {}
        for key, module in (("reference", ref), ("fast", fast)):
            step = models._step_fn(module, "forward_backward", x, labels)
            step()
            gflop[key] = gemm_floor.gemm_gflop(gemm_floor.record_gemms(step))
        assert gflop["reference"] > 0 and abs(gflop["fast"] - gflop["reference"]) <= 0.02 * gflop["reference"], \
            (name, gflop)
