import os
import random

# The Triton kernels run on the CPU through the interpreter; this must be set before any
# kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Test modules draw fresh random configurations at import (``SEEDS = [random.randrange(...)]``).
# One base seed, printed in the header, makes a whole run reproducible:
# ``NEXTREC_FAST_TEST_SEED=<seed> pytest`` draws the same configurations again.
BASE_SEED = int(os.environ.get("NEXTREC_FAST_TEST_SEED") or random.SystemRandom().randrange(2**31))
random.seed(BASE_SEED)


def pytest_report_header(config):
    return f"nextrec_fast test seed: NEXTREC_FAST_TEST_SEED={BASE_SEED}"


def pytest_terminal_summary(terminalreporter):
    # Also under -q, which hides the header: a red run can be replayed with this seed.
    terminalreporter.write_line(f"rerun these configurations with NEXTREC_FAST_TEST_SEED={BASE_SEED}")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    # The CLI sets torch's thread count for its run (lower under load); run in-process by a test
    # it must not leak: a float64 result compared bit for bit with another process's depends on
    # the GEMMs' thread split (one ulp, seen in test_copies under a loaded full run).
    import torch
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _batched_plan_at_every_batch_size(request):
    # Without autograd, small CPU batches run the model's own module-by-module forward
    # (_FastForward.module_wise_max_batch): nextrec's code, with our embedding layer. The tests
    # use small batches to check the batched plan itself, so it stays on for them; tests of the
    # small-batch dispatch are marked ``module_wise`` and keep the default.
    if request.node.get_closest_marker("module_wise") is not None:
        yield
        return
    from nextrec_fast.models.forwards import _FastForward
    saved = _FastForward.__dict__["module_wise_max_batch"]
    _FastForward.module_wise_max_batch = 0
    yield
    _FastForward.module_wise_max_batch = saved
