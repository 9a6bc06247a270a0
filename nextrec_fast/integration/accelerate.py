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
- ``fast_data``: in-memory data (dict / DataFrame) is batched by indexing whole columns with each
  batch's indices instead of indexing and stacking one sample at a time; the batches, their
  order and the random number stream are nextrec's own (same samplers, same seeds).

Each switch can be turned off; ``restore(model)`` undoes everything. nextrec is never imported
here: models are recognised by their class names and modules.
"""
from __future__ import annotations

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

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

    def _prepare_data_loader(self, data, batch_size: int = 32, shuffle: bool = True):
        if not self._nextrec_fast_options.get("fast_data") or isinstance(data, DataLoader):
            return super()._prepare_data_loader(data, batch_size=batch_size, shuffle=shuffle)
        from nextrec.basic import model as nextrec_model  # nextrec is there: this is a nextrec model
        tensors = nextrec_model.build_tensors_from_data(data=data, raw_data=data, features=self.all_features,
                                                        target_columns=self.target, id_columns=self.id_columns)
        if tensors is None:
            raise ValueError("No data available to create DataLoader.")
        dataset = _ColumnBatchDataset(tensors)
        # The sampler nextrec's DataLoader(shuffle=...) builds, so the same batches come out in the
        # same order from the same random stream; only the collation differs.
        sampler = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                          collate_fn=_as_is)


class _ColumnBatchDataset(Dataset):
    """nextrec's TensorDictDataset, indexed with a whole batch of sample indices at once."""

    def __init__(self, tensors: dict):
        self.features = tensors.get("features") or {}
        self.labels = tensors.get("labels")
        self.ids = tensors.get("ids")
        if not self.features:
            raise ValueError("Dataset requires at least one feature tensor.")
        lengths = {t.shape[0] for t in self.features.values()}
        if len(lengths) != 1:
            raise ValueError("All feature tensors must have the same length.")
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, indices) -> dict:
        index = torch.as_tensor(indices, dtype=torch.long)

        def take(section):
            return {name: t[index] for name, t in section.items()} if section else None
        return {"features": take(self.features), "labels": take(self.labels), "ids": take(self.ids)}


def _as_is(batch):
    return batch


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


def accelerate(model, *, fast_regularization: bool = True, fused_optimizer: bool = True, fast_data: bool = True):
    """Make a constructed nextrec ESMM / MMOE / PLE fast, in place; returns the same object."""
    if is_accelerated(model):
        return model
    kind = _nextrec_kind(model)
    if kind is None:
        raise TypeError(f"accelerate() supports nextrec 0.3.1's {', '.join(SUPPORTED_MODELS)} (and subclasses); "
                        f"got {type(model).__module__}.{type(model).__qualname__}")
    embedding = model.embedding
    embedding.__class__ = _subclass(type(embedding), (_AcceleratedEmbedding,))
    embedding._prepare_fast_path()
    model.__class__ = _subclass(type(model), (_FORWARDS[kind], _Accelerated))
    model._nextrec_fast_options = {"fast_regularization": fast_regularization, "fused_optimizer": fused_optimizer,
                                   "fast_data": fast_data}
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
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        with torch.no_grad():
            for param, l1, l2 in terms:
                abs_sum, square_sum = _abs_and_square_sums(param)
                total += l1 * abs_sum + l2 * square_sum
        return total

    @staticmethod
    def backward(ctx, grad_output):
        terms = ctx.terms
        # Run once the whole backward has accumulated the loss gradients into .grad, so the
        # regularisation is added in place rather than as one more full-size gradient.
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: _add_regularization_grads(terms, float(grad_output)))
        return (None,) + (None,) * len(terms)


# Elements per step of the chunked passes: the chunk's temporaries stay in cache and are reused
# by the allocator instead of being faulted in as full-size tensors.
_CHUNK = 1 << 18


def _chunks(tensor: torch.Tensor):
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield start, flat[start:start + _CHUNK]


def _abs_and_square_sums(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(|p|) and sum(p * p) in one pass over p (fp32 accumulation, as nextrec's .sum())."""
    abs_sum = torch.zeros((), dtype=torch.float32, device=param.device)
    square_sum = torch.zeros((), dtype=torch.float32, device=param.device)
    for _, chunk in _chunks(param):
        abs_sum += chunk.abs().sum(dtype=torch.float32)
        square_sum += torch.dot(chunk, chunk).float() if chunk.dtype == torch.float32 else chunk.square().sum(dtype=torch.float32)
    return abs_sum, square_sum


@torch.no_grad()
def _add_regularization_grads(terms, scale: float) -> None:
    for param, l1, l2 in terms:
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad.view(-1)
        for start, p in _chunks(param):
            g = grad[start:start + p.numel()]
            if l1:
                g.add_(p.sign(), alpha=l1 * scale)
            if l2:
                g.add_(p, alpha=2.0 * l2 * scale)


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
