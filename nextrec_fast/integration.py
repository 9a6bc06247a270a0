"""Accelerate nextrec 0.3.1 models in place.

``accelerate(model)`` keeps the object, every parameter, buffer and optimiser, and nextrec's
``state_dict`` keys; it swaps the classes of the model and its embedding layer for subclasses
whose forward is the fast one (so ``isinstance(model, nextrec's MMOE)`` still holds and
``fit``/``predict``/``evaluate``/``save_model``/``load_model`` work unchanged), and speeds up
the parts of nextrec's training step that are not layers:

- ``fast_regularization``: ``add_reg_loss`` returns the same value, but its gradient
  (``l1 * sign(p) + 2 * l2 * p``) is added straight into each ``.grad`` at the end of the
  backward pass, in place and in chunks, instead of an autograd graph with several full-size
  temporaries per embedding table. (``torch.autograd.grad(total_loss, params)`` therefore does
  not see the regularisation part; ``loss.backward()`` — what nextrec's ``fit`` does — does.)
- ``fused_optimizer``: nextrec's Adam/AdamW runs torch's fused kernel (same hyper-parameters,
  same state) instead of the single-tensor for-loop.

Each switch can be turned off; ``restore(model)`` undoes everything. nextrec is never imported
here: models are recognised by their class names and modules.
"""
from __future__ import annotations

import torch

from nextrec_fast.layers.embedding import FastEmbeddingMixin
from nextrec_fast.models import FastESMMForward, FastMMOEForward, FastPLEForward

__all__ = ["accelerate", "restore", "is_accelerated", "patch_nextrec", "unpatch_nextrec", "SUPPORTED_MODELS"]

_FORWARDS = {"ESMM": FastESMMForward, "MMOE": FastMMOEForward, "PLE": FastPLEForward}
SUPPORTED_MODELS = tuple(f"nextrec.models.multi_task.{name.lower()}.{name}" for name in _FORWARDS)
_accelerated_classes: dict[type, type] = {}


def _nextrec_kind(model) -> str | None:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("nextrec.models.multi_task.") and cls.__name__ in _FORWARDS:
            return cls.__name__
    return None


def is_accelerated(model) -> bool:
    return getattr(type(model), "_nextrec_fast_original", None) is not None


class _Accelerated:
    """Mixed into the accelerated model class (after the fast forward, before nextrec's class)."""

    _nextrec_fast_original: type | None = None
    _nextrec_fast_options: dict = {}

    def __reduce_ex__(self, protocol):
        # Pickling a whole model (torch.save(model)) stores nextrec's own class, which is what
        # the pickle can find again; accelerate the unpickled model again if wanted.
        state = self.__getstate__()
        state.pop("_nextrec_fast_options", None)
        return _rebuild, (type(self)._nextrec_fast_original, state)

    def add_reg_loss(self) -> torch.Tensor:
        if not self._nextrec_fast_options.get("fast_regularization"):
            return super().add_reg_loss()
        return regularization_loss(self)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        if self._nextrec_fast_options.get("fused_optimizer"):
            _fuse_optimizer(getattr(self, "optimizer_fn", None))


class _AcceleratedEmbedding(FastEmbeddingMixin):
    _nextrec_fast_original: type | None = None

    def __reduce_ex__(self, protocol):
        state = self.__getstate__()
        for name in ("slots", "dense_feature_list", "_check_spec"):
            state.pop(name, None)
        return _rebuild, (type(self)._nextrec_fast_original, state)


def _rebuild(cls, state):
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _subclass(original: type, mixins: tuple) -> type:
    key = (original,) + mixins
    if key not in _accelerated_classes:
        _accelerated_classes[key] = type(original.__name__, mixins + (original,), {
            "_nextrec_fast_original": original, "__module__": original.__module__,
            "__qualname__": original.__qualname__})
    return _accelerated_classes[key]


def accelerate(model, *, fast_regularization: bool = True, fused_optimizer: bool = True):
    """Make a constructed nextrec ESMM / MMOE / PLE fast, in place; returns the same object."""
    if is_accelerated(model):
        return model
    kind = _nextrec_kind(model)
    if kind is None:
        raise TypeError(f"accelerate() supports nextrec 0.3.1's {', '.join(SUPPORTED_MODELS)} (and subclasses); "
                        f"got {type(model).__module__}.{type(model).__qualname__}")
    embedding = model.embedding
    embedding.__class__ = _subclass(type(embedding), (_AcceleratedEmbedding,))
    embedding._build_plan()
    model.__class__ = _subclass(type(model), (_FORWARDS[kind], _Accelerated))
    model._nextrec_fast_options = {"fast_regularization": fast_regularization, "fused_optimizer": fused_optimizer}
    if fused_optimizer:
        _fuse_optimizer(getattr(model, "optimizer_fn", None))
    return model


def restore(model):
    """Undo ``accelerate``: nextrec's classes and optimiser settings again; returns the model."""
    if not is_accelerated(model):
        return model
    _unfuse_optimizer(getattr(model, "optimizer_fn", None))
    model.__class__ = type(model)._nextrec_fast_original
    model.__dict__.pop("_nextrec_fast_options", None)
    embedding = model.embedding
    if getattr(type(embedding), "_nextrec_fast_original", None) is not None:
        embedding.__class__ = type(embedding)._nextrec_fast_original
        for name in ("slots", "dense_feature_list", "_check_spec"):
            embedding.__dict__.pop(name, None)
    return model


# -- regularisation ------------------------------------------------------------------------
def _regularization_terms(model) -> list[tuple[torch.Tensor, float, float]]:
    """(param, l1, l2) as nextrec's add_reg_loss weighs them (duplicates count twice, as there)."""
    terms = []
    for params, l1, l2 in ((model._embedding_params, model._embedding_l1_reg, model._embedding_l2_reg),
                           (model._regularization_weights, model._dense_l1_reg, model._dense_l2_reg)):
        l1 = float(l1) if l1 > 0 else 0.0
        l2 = float(l2) if l2 > 0 else 0.0
        if params and (l1 or l2):
            terms += [(p, l1, l2) for p in params]
    return terms


def regularization_loss(model) -> torch.Tensor:
    """nextrec's ``add_reg_loss`` value, with its gradient added in place at the end of backward."""
    terms = _regularization_terms(model)
    if not terms:
        return torch.tensor(0.0, device=model.device)
    return _RegularizationLoss.apply(terms, *[p for p, _, _ in terms])


class _RegularizationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, terms, *params):
        ctx.terms = terms
        with torch.no_grad():
            l1 = [(p, c) for p, c, _ in terms if c]
            l2 = [(p, c) for p, _, c in terms if c]
            total = torch.zeros((), dtype=torch.float32, device=params[0].device)
            if l1:
                norms = torch._foreach_norm([p for p, _ in l1], 1)
                total = total + sum(c * n.float() for (_, c), n in zip(l1, norms))
            if l2:
                norms = torch._foreach_norm([p for p, _ in l2], 2)
                total = total + sum(c * n.float().square() for (_, c), n in zip(l2, norms))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        terms = ctx.terms
        # Run once the whole backward has accumulated the loss gradients into .grad, so the
        # regularisation is added in place rather than as one more full-size gradient.
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: _add_regularization_grads(terms, float(grad_output)))
        return (None,) + (None,) * len(terms)


_CHUNK = 1 << 20  # elements per in-place step: temporaries small enough to be reused, not faulted in


@torch.no_grad()
def _add_regularization_grads(terms, scale: float) -> None:
    for param, l1, l2 in terms:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad, flat = param.grad.view(-1), param.detach().view(-1)
        for start in range(0, flat.numel(), _CHUNK):
            p, g = flat[start:start + _CHUNK], grad[start:start + _CHUNK]
            if l2:
                g.add_(p, alpha=2.0 * l2 * scale)
            if l1:
                g.add_(p.sign(), alpha=l1 * scale)


# -- optimiser -----------------------------------------------------------------------------
_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def _fuse_optimizer(optimizer) -> None:
    if not isinstance(optimizer, _FUSABLE) or getattr(optimizer, "_nextrec_fast_fused", False):
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(group.get("differentiable") or group.get("capturable") for group in optimizer.param_groups):
        return
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return
    optimizer._nextrec_fast_saved = [(g.get("fused"), g.get("foreach")) for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    for p in params:  # the fused kernel keeps its step counters on the parameter's device
        state = optimizer.state.get(p)
        if state and "step" in state and torch.is_tensor(state["step"]):
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    optimizer._step_supports_amp_scaling = True
    optimizer._nextrec_fast_fused = True


def _unfuse_optimizer(optimizer) -> None:
    if not getattr(optimizer, "_nextrec_fast_fused", False):
        return
    for group, (fused, foreach) in zip(optimizer.param_groups, optimizer._nextrec_fast_saved):
        group["fused"], group["foreach"] = fused, foreach
    optimizer._nextrec_fast_fused = False
    optimizer._step_supports_amp_scaling = False


# -- class-level patch ---------------------------------------------------------------------
_patched_inits: dict[type, object] = {}


def patch_nextrec(**options) -> None:
    """Models of nextrec's ESMM / MMOE / PLE built after this call are accelerated (idempotent)."""
    from importlib import import_module
    for name in _FORWARDS:
        cls = getattr(import_module(f"nextrec.models.multi_task.{name.lower()}"), name)
        if cls in _patched_inits:
            continue
        original_init = cls.__init__

        def __init__(self, *args, _original_init=original_init, **kwargs):
            _original_init(self, *args, **kwargs)
            if _nextrec_kind(self) is not None:
                accelerate(self, **options)

        __init__.__wrapped__ = original_init
        _patched_inits[cls] = original_init
        cls.__init__ = __init__


def unpatch_nextrec() -> None:
    """Undo ``patch_nextrec``; models built afterwards are plain (existing ones keep their state)."""
    for cls, original_init in list(_patched_inits.items()):
        cls.__init__ = original_init
        del _patched_inits[cls]
