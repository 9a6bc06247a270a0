"""The fast forward passes of ESMM, MMOE and PLE, as mixins over a model with nextrec's module
layout: embeddings pooled in one call, experts and towers batched, all gates of a level in one
GEMM and their weighted sums in one bmm. Used by the drop-in models (``standalone``, ``v03``,
``v06``) and by ``nextrec_fast.accelerate``.
"""
from __future__ import annotations

import os

import torch
from torch.profiler import record_function

from nextrec_fast import compat
from nextrec_fast.backend import get_backend, use_backend
from nextrec_fast.layers.experts import _tracing, build_banks, run_experts
from nextrec_fast.layers.gates import check_gates, gated_mixture
from nextrec_fast.layers.hooks import global_module_hooks_active, needs_module_call
from nextrec_fast.ops._dispatch import forward_ad_active, functorch_transforms_active

__all__ = ["FastESMMForward", "FastMMOEForward", "FastPLEForward", "FAST_FORWARDS"]


class _FastForward:
    """The fast forward passes are mixins over a model with nextrec's module layout (``embedding``,
    ``experts`` / ``gates`` / ``towers``, ``cgc_layers``, ``ctr_tower`` / ``cvr_tower``): our
    drop-in models here, nextrec's own classes in ``nextrec_fast.integration``. What differs
    between nextrec generations (task count, what forward returns, when nextrec's own forward
    must run) comes from ``self._compat``, a ``nextrec_fast.compat.NextrecGeneration``."""

    _compat: compat.NextrecGeneration = compat.V03

    def _use_plain_forward(self) -> bool:
        """nextrec's own forward for this call: the ``reference`` backend, ONNX export, GradNorm,
        ``torch.func`` transforms and forward-mode AD (our ops and autograd Functions have neither
        batching rules nor tangent formulas), and global module hooks (they fire on every module
        nextrec calls). Hooks and parametrised weights on single modules are honoured part by
        part (``nextrec_fast.layers.hooks``)."""
        return (get_backend() == "reference" or global_module_hooks_active() or forward_ad_active()
                or functorch_transforms_active() or self._compat.plain_forward_needed(self))

    # Without autograd, CPU batches of at most this many rows run the model's own module-by-module
    # forward (nextrec's, or nextrec_fast.reference's for the drop-in models) with the pooling op
    # still pooling the embeddings. At such sizes the batched plan's per-call Python (banks of
    # experts, concatenated biases, per-part hook checks) costs more than batching its small GEMMs
    # saves. Eval forward at batch 64, 2 threads, nextrec 0.6.14 / 0.3.1, ms, module-wise vs
    # batched: PLE 1.85 vs 2.15 / 2.09 vs 2.21, MMOE 1.45 vs 1.57 / 1.64 vs 1.67, ESMM 0.60 vs
    # 0.84 / 0.85 vs 1.13; at batch 96 batching wins for MMOE (module-wise 2.59 vs batched 2.34),
    # and at one thread for PLE (3.88 vs 3.70). docs/benchmarks.md has the table. 0 turns it off:
    # per model (``model.module_wise_max_batch = 0``) or for all (NEXTREC_FAST_MODULE_WISE_MAX_BATCH=0).
    module_wise_max_batch: int = int(os.environ.get("NEXTREC_FAST_MODULE_WISE_MAX_BATCH", "64"))

    def _module_wise_call(self, x) -> bool:
        """Whether this call runs the module-wise forward (see ``module_wise_max_batch``): no
        autograd (``torch.no_grad``, inference mode), not traced (torch.compile, export, the JIT
        tracer), a dict batch on the CPU of at most ``module_wise_max_batch`` rows (read from its
        first tensor; the embedding layer checks the others)."""
        if torch.is_grad_enabled() or self.module_wise_max_batch <= 0 or not isinstance(x, dict) or _tracing():
            return False
        for value in x.values():
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.device.type == "cpu" and value.shape[0] <= self.module_wise_max_batch
        return False

    def _model_forward(self, x):
        """The model's own forward when this call takes it, else None: under ``_use_plain_forward``
        nextrec's whole forward (its embedding layer's too); for ``_module_wise_call`` its module
        calls with our embedding layer. ``super(_FastForward, ...)`` is the model class the fast
        forward mixes into (nextrec's, or the reference's for the drop-in models)."""
        if self._use_plain_forward():
            with use_backend("reference"):
                return super(_FastForward, self).forward(x)
        if self._module_wise_call(x):
            with record_function("nextrec_fast.module_wise"):
                return super(_FastForward, self).forward(x)
        return None

    def _embed(self, x) -> torch.Tensor:
        with record_function("nextrec_fast.embedding"):
            return self.embedding(x=x, features=self.all_features, squeeze_dim=True)

    def _check_fast_plan(self) -> None:
        """Raise (naming the module) if the fast forward cannot batch this model's MLPs and gates."""
        for mlps in self._mlp_groups():
            build_banks(list(mlps))

    def _mlp_groups(self):
        raise NotImplementedError


class FastESMMForward(_FastForward):
    def forward(self, x):
        own = self._model_forward(x)
        if own is not None:
            return own
        features = self._embed(x)
        with record_function("nextrec_fast.towers"):
            logits = run_experts([self.ctr_tower, self.cvr_tower], [features]).flatten(1)  # [B, 2]
        return self._compat.esmm_output(self, logits)

    def _mlp_groups(self):
        return [[self.ctr_tower, self.cvr_tower]]


class FastMMOEForward(_FastForward):
    def forward(self, x):
        own = self._model_forward(x)
        if own is not None:
            return own
        features = self._embed(x)
        with record_function("nextrec_fast.experts"):
            experts = run_experts(self.experts, [features])  # [B, E, D]
        with record_function("nextrec_fast.gates"):
            tasks = self._compat.num_tasks(self)
            gated = gated_mixture(self.gates, [features] * tasks, experts)  # [B, T, D]
        with record_function("nextrec_fast.towers"):
            logits = run_experts(self.towers, gated.transpose(0, 1)).flatten(1)  # [B, T]
        return self._compat.multitask_output(self, logits)

    def _check_fast_plan(self) -> None:
        super()._check_fast_plan()
        check_gates(self.gates)

    def _mlp_groups(self):
        return [self.experts, self.towers]


class FastPLEForward(_FastForward):
    def forward(self, x):
        own = self._model_forward(x)
        if own is not None:
            return own
        features = self._embed(x)
        tasks = self._compat.num_tasks(self)
        n_shared, n_specific = self.num_shared_experts, self.num_specific_experts
        # Expert order inside a level: shared experts, then task 0's specific ones, task 1's, ...
        task_gate_index = [list(range(n_shared)) + [n_shared + t * n_specific + j for j in range(n_specific)]
                           for t in range(tasks)]
        shared_gate_index = [list(range(n_shared, n_shared + tasks * n_specific)) + list(range(n_shared))]
        task_inputs, shared_input = [features] * tasks, features
        gated = None  # [B, G, D] from the last level, when it ran batched
        for level, layer in enumerate(self.cgc_layers):
            last = level == len(self.cgc_layers) - 1
            if needs_module_call(layer, recurse=False):  # hooks on the level itself: nextrec's level forward
                task_inputs, shared_input = layer(task_inputs, shared_input)
                gated = None
                continue
            mlps = _level_experts(layer)
            with record_function("nextrec_fast.experts"):
                if level == 0:
                    experts = run_experts(mlps, [features])
                else:
                    input_of = [0] * n_shared + [1 + t for t in range(tasks) for _ in range(n_specific)]
                    experts = run_experts(mlps, [shared_input] + task_inputs, input_of)
            # The last level's shared gate feeds nothing: nextrec computes it, we skip it unless
            # a hook or parametrisation wants it called.
            if last and needs_module_call(layer.shared_gate):
                layer.shared_gate(shared_input)
            gates = list(layer.task_gates) + ([] if last else [layer.shared_gate])
            gate_inputs = task_inputs + ([] if last else [shared_input])
            index = task_gate_index + ([] if last else shared_gate_index)
            with record_function("nextrec_fast.gates"):
                gated = gated_mixture(gates, gate_inputs, experts, index)  # [B, G, D]
            # One unbind, not a slice and a select: their backwards each zero-fill a [B, G, D]
            # gradient and add; unbind's stacks the parts' gradients in one pass.
            parts = gated.unbind(1)
            task_inputs = list(parts[:tasks])
            shared_input = None if last else parts[tasks]
        if gated is None:
            tower_inputs = torch.stack(task_inputs)
        else:  # the last level gates the tasks only: no slice (its backward zero-fills too)
            tower_inputs = (gated if gated.shape[1] == tasks else gated[:, :tasks]).transpose(0, 1)
        with record_function("nextrec_fast.towers"):
            logits = run_experts(self.towers, tower_inputs).flatten(1)  # [B, T]
        return self._compat.multitask_output(self, logits)

    def _check_fast_plan(self) -> None:
        super()._check_fast_plan()
        for layer in self.cgc_layers:
            check_gates(list(layer.task_gates) + [layer.shared_gate])

    def _mlp_groups(self):
        return [_level_experts(layer) for layer in self.cgc_layers] + [self.towers]


def _level_experts(layer) -> list:
    return list(layer.shared_experts) + [e for task_experts in layer.specific_experts for e in task_experts]


FAST_FORWARDS = {"ESMM": FastESMMForward, "MMOE": FastMMOEForward, "PLE": FastPLEForward}
