"""Embedding-table optimisers applied inside the pooling backward (FBGEMM / TorchRec style).

``apply_optimizer_in_backward(torch.optim.Adagrad, model.embedding.tables(), {"lr": 0.05})``
makes the pooling op's backward update those tables in place, row by row, for the rows the
batch touched, and give them no ``.grad`` at all: no dense ``[V, D]`` gradient is written,
zeroed or read by an optimiser over every row. The rest of the model keeps the user's own
optimiser (tables without ``.grad`` are skipped by every torch optimiser).

Semantics ("exact" in FBGEMM's sense): per step and table, the gradient rows of repeated ids
are summed first (one update per distinct row); padding ids (``grad_padding_idx``, masked ids)
give no row. Then, on the distinct rows ``r`` with summed gradient ``g_r``:

- ``torch.optim.SGD`` (``lr``; no momentum or weight decay, as torch's SGD on sparse
  gradients): ``w_r -= lr * g_r``.
- ``torch.optim.Adagrad`` (``lr``, ``lr_decay``, ``eps``, ``initial_accumulator_value``; as
  torch's Adagrad on a sparse gradient): ``step += 1``; ``S_r += g_r**2``;
  ``w_r -= lr / (1 + (step - 1) * lr_decay) * g_r / (sqrt(S_r) + eps)``.
- ``RowWiseAdagrad`` (ours; FBGEMM's EXACT_ROWWISE_ADAGRAD, ``lr``, ``eps``, ``weight_decay``
  as its L2 mode): one accumulator per row (fp32; fp64 for fp64 tables): ``g_r += weight_decay * w_r``;
  ``G_r += mean(g_r**2)``; ``w_r -= lr * g_r / (sqrt(G_r) + eps)``.
- ``torch.optim.SparseAdam`` (``lr``, ``betas``, ``eps``, ``maximize``; lazy Adam as torch's):
  ``step += 1`` per optimiser step; ``m_r += (1 - b1) * (g_r - m_r)``;
  ``v_r += (1 - b2) * (g_r**2 - v_r)``;
  ``w_r -= lr * sqrt(1 - b2**step) / (1 - b1**step) * m_r / (sqrt(v_r) + eps)``; untouched rows
  keep their moments.

The work is two C++/CUDA ops: ``pooled_embedding_backward_coalesced`` (each table's distinct
rows and their summed gradients, straight from the output gradient, plus a finite flag per table)
and ``embedding_rows_update_`` (every table's rule in one call, one pass per row). Both run on
CPU and CUDA tables with the same arithmetic in the same order (the CUDA code is tested on the
CPU through its emulated build, where it gives the CPU's bits; on a GPU, where nvcc may fuse a
multiply-add, by ``benchmarks/gpu_check.sh``). CUDA returns each table's rows in ascending order,
the CPU in first-appearance order; the update does not depend on it.

The returned ``EmbeddingOptimizerInBackward`` is a ``torch.optim.Optimizer``: its
``param_groups`` (learning-rate schedulers work on them), ``state_dict()`` /
``load_state_dict()`` (save it beside the model's ``state_dict``), while ``step()`` and
``zero_grad()`` do nothing (the updates happen in backward). A table registered here that gets
a gradient some other way (used outside the pooling op, or the C++ op not built) raises.
Gradients are summed and the rules computed in fp32 for half tables (their state is fp32 too),
in the table's dtype otherwise; the new weights are rounded to the table's dtype once. The
summed gradients are checked first: a non-finite one leaves every table of the step untouched and raises naming the
table's features.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

from nextrec_fast.ops.pooled_embedding import IN_BACKWARD_ATTR

__all__ = ["RowWiseAdagrad", "EmbeddingOptimizerInBackward", "apply_optimizer_in_backward",
           "remove_optimizer_in_backward", "in_backward_optimizer", "SUPPORTED"]


class RowWiseAdagrad(torch.optim.Optimizer):
    """FBGEMM's row-wise Adagrad (EXACT_ROWWISE_ADAGRAD) for ``[V, D]`` embedding tables: one
    accumulator per row, ``G_r += mean(g_r**2)``, ``w_r -= lr * g_r / (sqrt(G_r) + eps)``, with
    ``weight_decay`` added to the gradient first (FBGEMM's L2 mode). As a plain optimiser it
    updates every row of a dense ``.grad`` (rows with a zero gradient still move their
    accumulator by 0); its use is ``apply_optimizer_in_backward(RowWiseAdagrad, tables, ...)``,
    which updates only the touched rows. Source: FBGEMM ``split_embedding_codegen``
    (``rowwise_adagrad``) and TorchRec's ``RowWiseAdagrad``."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"RowWiseAdagrad: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad: expected [V, D] tables, got a parameter of shape {tuple(p.shape)}")
                # Every row, in torch ops (any device); the in-backward path runs the C++ op.
                state = self.state[p]
                if not state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=_state_dtype(p), device=p.device)
                g = p.grad.to_dense().to(state["sum"].dtype)
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p.to(g.dtype)
                state["sum"].add_(g.pow(2).mean(dim=1))
                multiplier = group["lr"] / (state["sum"].sqrt() + group["eps"])
                p.sub_((g * multiplier.unsqueeze(1)).to(p.dtype))
        return loss


SUPPORTED = {torch.optim.SGD: "sgd", torch.optim.Adagrad: "adagrad", torch.optim.SparseAdam: "sparse_adam",
             RowWiseAdagrad: "rowwise_adagrad"}
_DEFAULTS = {
    "sgd": dict(lr=1e-3),
    "adagrad": dict(lr=1e-2, lr_decay=0.0, eps=1e-10, initial_accumulator_value=0.0),
    "sparse_adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False),
    "rowwise_adagrad": dict(lr=1e-2, eps=1e-8, weight_decay=0.0),
}
# Options of the torch classes that have no sparse meaning (torch rejects them with sparse
# gradients too) or that we do not implement: accepted only at their neutral values.
_NEUTRAL = {
    "sgd": dict(momentum=0, dampening=0, weight_decay=0, nesterov=False, maximize=False, foreach=None,
                differentiable=False, fused=None),
    "adagrad": dict(weight_decay=0, foreach=None, maximize=False, differentiable=False, fused=None),
    "sparse_adam": dict(),
    "rowwise_adagrad": dict(),
}


class _Registration:
    """What a table under an in-backward optimiser carries (as ``param._nextrec_fast_in_backward``):
    the optimiser and its gradient hook. Pickled, it becomes None: a pickled or copied table
    (``torch.save(model)``) is a plain table again, with no optimiser that would lose its state."""

    def __init__(self, optimizer, hook):
        self.optimizer, self.hook = optimizer, hook

    def __reduce__(self):
        return (_dropped, ())


def _dropped():
    return None


class EmbeddingOptimizerInBackward(torch.optim.Optimizer):
    """The tables' optimiser, applied by the pooling backward (see the module docstring). Its
    ``step()`` and ``zero_grad()`` do nothing; ``param_groups`` and ``state_dict`` are live."""

    def __init__(self, params, rule: str, defaults: dict):
        self.rule = rule
        super().__init__(params, {**defaults, "rule": rule})  # "rule" is saved with the groups
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"apply_optimizer_in_backward: expected [V, D] embedding tables, got a "
                                     f"parameter of shape {tuple(p.shape)}")
                previous = getattr(p, IN_BACKWARD_ATTR, None)
                if previous is not None:  # moved from another in-backward optimiser
                    previous.hook.remove()
                hook = p.register_post_accumulate_grad_hook(_gradient_elsewhere)
                setattr(p, IN_BACKWARD_ATTR, _Registration(self, hook))
                # A gradient left from before (nextrec's fit, a dense step) would be taken at the
                # next backward for one that reached the table some other way.
                p.grad = None

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``, refusing a state saved by another rule (its keys would
        only fail at the next backward)."""
        saved = {g.get("rule") for g in state_dict.get("param_groups", [])}
        if saved != {self.rule}:
            raise ValueError(f"EmbeddingOptimizerInBackward.load_state_dict: the state was saved by rule(s) "
                             f"{sorted(map(str, saved))}, this optimiser's rule is {self.rule!r}; re-create it with "
                             f"the same optimizer_class (and the same tables, in the same order) before loading")
        super().load_state_dict(state_dict)

    def step(self, closure=None):  # the update ran in backward
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True):  # tables under this optimiser get no .grad
        pass

    @torch.no_grad()
    def apply(self, param: Tensor, rows: Tensor, grad: Tensor) -> None:
        """Update ``param``'s distinct ``rows`` (int64 ``[U]``) with their summed gradient
        ``grad`` (``[U, D]``), in place."""
        EmbeddingOptimizerInBackward.apply_many([(self, param, rows, grad)])

    @staticmethod
    @torch.no_grad()
    def apply_many(updates) -> None:
        """Several tables' updates, ``[(optimizer, table, rows, grad)]``, in one call of the C++
        op ``embedding_rows_update_`` (the pooling backward's updates of one step): ``rows``
        int64 ``[U]`` distinct, ``grad`` ``[U, D]`` their summed gradients."""
        torch.ops.nextrec_fast.embedding_rows_update_(*EmbeddingOptimizerInBackward.op_arguments(updates))

    @staticmethod
    def op_arguments(updates) -> tuple:
        """``embedding_rows_update_``'s arguments for ``[(optimizer, table, rows, grad)]``
        (``tables, state, rows, grads, rules, hyper``), each rule's state created on first use and
        its step counted: calling this is taking the step."""
        tables, states, rows, grads, rules, hyper = [], [], [], [], [], []
        # Looked up each call: load_state_dict replaces the group dicts (and schedulers edit them).
        # One map per optimiser, not a search per table (quadratic in the tables).
        groups = {}
        for optimizer, _, _, _ in updates:
            if id(optimizer) not in groups:
                groups[id(optimizer)] = {id(p): grp for grp in optimizer.param_groups for p in grp["params"]}
        found = [groups[id(optimizer)].get(id(param)) for optimizer, param, _, _ in updates]
        for (_, param, _, _), group in zip(updates, found):  # before any rule counts a step
            if group is None:
                raise RuntimeError(f"apply_optimizer_in_backward: a table of shape {tuple(param.shape)} is no longer in "
                                   "its optimiser's param_groups; remove_optimizer_in_backward it, or register it again")
        for (optimizer, param, r, g), group in zip(updates, found):
            rule, state, h = _RULES[optimizer.rule](param, optimizer.state[param], group)
            g = g.to(_state_dtype(param)).contiguous()
            if group.get("maximize", False):  # SparseAdam's option (the other rules refuse it)
                g = -g
            tables.append(param)
            states += state
            rows.append(r)
            grads.append(g)
            rules.append(rule)
            hyper += h
        return tables, states, rows, grads, rules, hyper


def _gradient_elsewhere(param: Tensor) -> None:
    # The hook also runs when the pooling backward gave no gradient, and it survives pickling
    # where the registration does not.
    if param.grad is None or getattr(param, IN_BACKWARD_ATTR, None) is None:
        return
    raise RuntimeError(
        f"a table of shape {tuple(param.shape)} under apply_optimizer_in_backward received a gradient outside the "
        "pooling op's backward (used by another module, or the C++ extension is not built): its optimiser would "
        "never see it. Use the table only through the fast embedding layer, or give it to a regular optimiser")


def _state_dtype(param: Tensor) -> torch.dtype:
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


# Per rule: (the op's rule number, its state tensors, its hyper-parameters), the state created on
# first use (fp32 for half tables, as FBGEMM keeps its momentum).
def _sgd(param, state, group):
    return 0, [], [group["lr"]]


def _adagrad(param, state, group):
    if not state:
        state["step"] = torch.tensor(0.0, dtype=_state_dtype(param))
        state["sum"] = torch.full(param.shape, float(group["initial_accumulator_value"]),
                                  dtype=_state_dtype(param), device=param.device)
    state["step"] += 1
    step = state["step"].item()
    return 1, [state["sum"]], [group["lr"] / (1 + (step - 1) * group["lr_decay"]), group["eps"]]


def _rowwise_adagrad(param, state, group):
    if not state:
        state["sum"] = torch.zeros(param.shape[0], dtype=_state_dtype(param), device=param.device)
    return 2, [state["sum"]], [group["lr"], group["eps"], group["weight_decay"]]


def _sparse_adam(param, state, group):
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros(param.shape, dtype=_state_dtype(param), device=param.device)
        state["exp_avg_sq"] = torch.zeros(param.shape, dtype=_state_dtype(param), device=param.device)
    state["step"] += 1
    beta1, beta2 = group["betas"]
    step = state["step"]
    step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    return 3, [state["exp_avg"], state["exp_avg_sq"]], [step_size, beta1, beta2, group["eps"]]


_RULES = {"sgd": _sgd, "adagrad": _adagrad, "rowwise_adagrad": _rowwise_adagrad, "sparse_adam": _sparse_adam}


def apply_optimizer_in_backward(optimizer_class: type, params: Iterable[Tensor],
                                optimizer_kwargs: dict | None = None) -> EmbeddingOptimizerInBackward:
    """Update ``params`` (``[V, D]`` embedding tables pooled by nextrec_fast's op, e.g.
    ``model.embedding.tables()``) inside the pooling backward with ``optimizer_class``'s rule.

    Args:
        optimizer_class: ``torch.optim.SGD``, ``torch.optim.Adagrad``, ``torch.optim.SparseAdam``
            or ``nextrec_fast.optim.RowWiseAdagrad`` (formulas: this module's docstring).
        params: the tables (a table already under such an optimiser is moved to this one; a
            ``.grad`` they hold, say from an earlier ``fit``, is dropped).
        optimizer_kwargs: that class's arguments (``lr`` etc.).

    Returns:
        An ``EmbeddingOptimizerInBackward`` (a ``torch.optim.Optimizer``: schedulers,
        ``state_dict``; ``step`` does nothing).

    Raises:
        TypeError: an optimiser class not listed above. ValueError: an option it does not
        support on sparse rows (SGD momentum or weight decay, Adagrad weight decay), or a
        parameter that is not 2-D.
    """
    rule = SUPPORTED.get(optimizer_class)
    if rule is None:
        raise TypeError(f"apply_optimizer_in_backward: {getattr(optimizer_class, '__name__', optimizer_class)!r} is not "
                        f"supported; use one of {', '.join(c.__module__ + '.' + c.__name__ for c in SUPPORTED)}")
    kwargs = dict(optimizer_kwargs or {})
    unknown = set(kwargs) - set(_DEFAULTS[rule]) - set(_NEUTRAL[rule])
    if unknown:
        raise ValueError(f"apply_optimizer_in_backward: {optimizer_class.__name__} has no option(s) {sorted(unknown)}")
    for key, neutral in _NEUTRAL[rule].items():
        if key in kwargs and kwargs.pop(key) != neutral:
            raise ValueError(f"apply_optimizer_in_backward: {optimizer_class.__name__}({key}=...) is not supported on "
                             f"the rows a batch touches (torch's sparse-gradient path rejects it too); "
                             f"leave it at {neutral!r}")
    defaults = {**_DEFAULTS[rule], **kwargs}
    if defaults["lr"] < 0:
        raise ValueError(f"apply_optimizer_in_backward: lr must be >= 0, got {defaults['lr']}")
    return EmbeddingOptimizerInBackward(list(params), rule, defaults)


def remove_optimizer_in_backward(params: Iterable[Tensor]) -> None:
    """Give ``params`` back to ordinary autograd: ``.grad`` again, no update in backward (their
    optimiser keeps its state)."""
    for p in params:
        entry = getattr(p, IN_BACKWARD_ATTR, None)
        if entry is not None:
            entry.hook.remove()
        if hasattr(p, IN_BACKWARD_ATTR):
            delattr(p, IN_BACKWARD_ATTR)


def in_backward_optimizer(param: Tensor) -> EmbeddingOptimizerInBackward | None:
    """The in-backward optimiser a table is under, or None."""
    entry = getattr(param, IN_BACKWARD_ATTR, None)
    return entry.optimizer if entry is not None else None
