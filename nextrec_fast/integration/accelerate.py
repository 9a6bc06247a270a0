"""Accelerate a constructed nextrec ESMM / MMOE / PLE in place (nextrec 0.3.x and 0.6.x).

``accelerate(model)`` keeps the object, every parameter, buffer and optimiser, and nextrec's
``state_dict`` keys; it swaps the classes of the model and its embedding layer for subclasses
of nextrec's (so ``isinstance(model, nextrec's MMOE)`` still holds and ``fit`` / ``predict`` /
``evaluate`` / ``save_model`` / ``load_model`` work unchanged) whose forward is the fast one,
and speeds up the parts of nextrec's training step that are not layers, each with a switch:

- ``fast_regularization``: ``add_reg_loss`` returns the same value from chunked passes, with
  one autograd node whose backward gives each parameter one gradient tensor
  (``nextrec_fast.integration.regularization``).
- ``fused_optimizer``: nextrec's Adam/AdamW runs torch's fused kernel (same state).
- ``fast_data``: in-memory data is batched by whole columns (``nextrec_fast.integration.data``):
  the same batches in the same order.

Everything nextrec-specific comes from ``nextrec_fast.compat``; ``restore(model)`` undoes it all.
"""
from __future__ import annotations

from nextrec_fast import compat
from nextrec_fast.compat import UnsupportedModelError
from nextrec_fast.integration.optimizer import fuse_optimizer, unfuse_optimizer
from nextrec_fast.integration.regularization import regularization_loss
from nextrec_fast.layers.embedding import FastEmbeddingMixin
from nextrec_fast.models import FAST_FORWARDS

__all__ = ["accelerate", "restore", "is_accelerated", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = tuple(f"{package}{kind.lower()}.{kind}" for g in compat.GENERATIONS
                         for package in g.model_packages for kind in compat.MODEL_KINDS)
_accelerated_classes: dict[tuple, type] = {}


def is_accelerated(model) -> bool:
    """True for a nextrec model that ``accelerate`` changed (a nextrec-backed drop-in such as
    ``nextrec_fast.models.v03.MMOE`` is accelerated when built); False for plain nextrec models
    and for ``nextrec_fast.models.standalone`` ones, which have only the fast forward."""
    return getattr(type(model), "_nextrec_fast_original", None) is not None


class _Accelerated:
    """Mixed into the accelerated model class (after the fast forward, before nextrec's class)."""

    _nextrec_fast_original: type | None = None
    _nextrec_fast_options: dict = {}

    def __reduce_ex__(self, protocol):
        # Every copy (copy.deepcopy, copy.copy, AveragedModel / EMA copies, pickle and
        # torch.save(model)) is nextrec's class accelerated again with the same switches: the
        # pickle names nextrec's class (the accelerated one is made at run time) and this
        # module's rebuild function, so loading it needs nextrec_fast; restore() first, or save a
        # state_dict, for a pickle that loads with nextrec alone.
        state = self.__getstate__()
        options = state.pop("_nextrec_fast_options", {})
        state.pop("embedding_optimizer", None)  # not carried by copies (its tables are the original's)
        return _rebuild_accelerated, (type(self)._nextrec_fast_original, state, dict(options))

    def add_reg_loss(self):
        if not self._nextrec_fast_options.get("fast_regularization"):
            return super().add_reg_loss()
        return regularization_loss(self._compat.regularization_terms(self), self.device)

    def compile(self, *args, **kwargs):
        result = super().compile(*args, **kwargs)
        if self._nextrec_fast_options.get("fused_optimizer"):
            fuse_optimizer(getattr(self, "optimizer_fn", None))
        return result


class _AcceleratedEmbedding(FastEmbeddingMixin):
    _nextrec_fast_original: type | None = None

    def __reduce_ex__(self, protocol):
        state = self.__getstate__()
        for name in FastEmbeddingMixin.FAST_STATE:
            state.pop(name, None)
        return _rebuild, (type(self)._nextrec_fast_original, state)


def _rebuild(cls, state):
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _rebuild_accelerated(cls, state, options):
    return accelerate(_rebuild(cls, state), **options)


def _subclass(original: type, mixins: tuple, generation) -> type:
    key = (original, generation) + mixins
    if key not in _accelerated_classes:
        _accelerated_classes[key] = type(original.__name__, mixins + (original,), {
            "_nextrec_fast_original": original, "_compat": generation, "__module__": original.__module__,
            "__qualname__": original.__qualname__})
    return _accelerated_classes[key]


def accelerate(model, *, fast_regularization: bool = True, fused_optimizer: bool = True, fast_data: bool = True,
               embedding_optimizer: tuple | None = None):
    """Make a constructed nextrec ESMM / MMOE / PLE (0.3.x or 0.6.x) fast, in place.

    Args:
        model (nn.Module): one of nextrec's ESMM, MMOE, PLE, or a subclass.
        fast_regularization (bool = True), fused_optimizer (bool = True), fast_data (bool = True):
            the training-loop switches described in this module's docstring.
        embedding_optimizer ((optimizer_class, kwargs) or None): opt-in; the embedding tables
            are then updated inside the pooling backward with that rule
            (``nextrec_fast.optim.apply_optimizer_in_backward``: SGD, Adagrad, SparseAdam,
            RowWiseAdagrad, lazy semantics) and get no ``.grad``, so nextrec's own optimiser in
            ``fit`` updates the rest. The optimiser is ``model.embedding_optimizer`` (its
            ``state_dict`` is not in nextrec's checkpoints: save it beside them); copies of the
            model do not carry it; ``restore`` removes it. Tables under regularisation
            (``embedding_l1_reg`` / ``embedding_l2_reg`` > 0) cannot take it.

    Returns:
        The same object (accelerating twice with the same switches is a no-op).

    Raises:
        UnsupportedModelError (a TypeError): the model, one of its features or MLPs is not
            supported; the model is then exactly as it was before the call.
        ValueError: the model is already accelerated (a drop-in, ``patch_nextrec``, or an earlier
            call) and this call asks for other switches or an ``embedding_optimizer``, which it
            would otherwise ignore: ``restore(model)`` first, or ``optim.apply_optimizer_in_backward``.
    """
    if is_accelerated(model):
        current = getattr(model, "_nextrec_fast_options", None) or {}
        requested = {"fast_regularization": fast_regularization, "fused_optimizer": fused_optimizer,
                     "fast_data": fast_data}
        changed = sorted(k for k, v in requested.items() if k in current and current[k] != v)
        if embedding_optimizer is not None or changed:
            asked = ", ".join(changed + (["embedding_optimizer"] if embedding_optimizer is not None else []))
            raise ValueError(
                f"accelerate(): {type(model).__name__} is already accelerated, so {asked} would be ignored. "
                "Call nextrec_fast.restore(model) first and accelerate again with the options you want; or, for the "
                "tables only, nextrec_fast.optim.apply_optimizer_in_backward(optimizer_class, "
                "model.embedding.tables(), kwargs)")
        return model
    found = compat.nextrec_model_kind(model)
    if found is None:
        raise UnsupportedModelError(
            f"accelerate() supports nextrec's ESMM, MMOE and PLE ({', '.join(SUPPORTED_MODELS)}, and subclasses); "
            f"got {type(model).__module__}.{type(model).__qualname__}")
    generation, kind = found
    if embedding_optimizer is not None:  # refused before anything changes
        embedding_optimizer = _embedding_optimizer_spec(model, generation, embedding_optimizer)
    embedding = model.embedding
    model_class, embedding_class = type(model), type(embedding)
    # A shallow copy (copy.copy) shares the embedding layer, already accelerated with the original.
    shared_embedding = getattr(embedding_class, "_nextrec_fast_original", None) is not None
    try:
        if not shared_embedding:
            embedding.__class__ = _subclass(embedding_class, (_AcceleratedEmbedding,), generation)
            embedding._build_plan()
        model.__class__ = _subclass(model_class, (FAST_FORWARDS[kind], _Accelerated, generation.training_mixin),
                                    generation)
        model._nextrec_fast_options = {"fast_regularization": fast_regularization,
                                       "fused_optimizer": fused_optimizer, "fast_data": fast_data}
        model._check_fast_plan()
    except Exception as exc:  # leave the model exactly as it was
        _undo_classes(model, model_class, embedding, embedding_class, undo_embedding=not shared_embedding)
        raise UnsupportedModelError(f"accelerate(): {model_class.__name__} (nextrec {generation.name}) is not "
                                    f"supported and was left unchanged: {exc}") from exc
    embedding.place_tables_on_huge_pages()
    if fused_optimizer:
        fuse_optimizer(getattr(model, "optimizer_fn", None))
    if embedding_optimizer is not None:
        from nextrec_fast import optim
        try:  # its own options are checked here: undo everything on a bad one
            model.embedding_optimizer = optim.apply_optimizer_in_backward(params=model.embedding.tables(),
                                                                          **embedding_optimizer)
        except Exception:
            restore(model)
            raise
    return model


def _embedding_optimizer_spec(model, generation, spec) -> dict:
    """``(optimizer_class, kwargs)`` checked against the plain model: the arguments of
    ``apply_optimizer_in_backward`` but the tables."""
    try:
        optimizer_class, kwargs = spec
    except (TypeError, ValueError):
        raise TypeError("accelerate(embedding_optimizer=...) takes (optimizer_class, kwargs), e.g. "
                        "(nextrec_fast.optim.RowWiseAdagrad, {'lr': 0.05})") from None
    regularised = {id(p) for p, _, _ in generation.regularization_terms(model)}
    if any(id(t) in regularised for t in FastEmbeddingMixin.tables(model.embedding)):  # nextrec's embed_dict
        raise UnsupportedModelError("accelerate(embedding_optimizer=...): the embedding tables are regularised "
                                    "(embedding_l1_reg / embedding_l2_reg > 0), which needs their dense gradient; "
                                    "set those to 0 or leave embedding_optimizer unset. The model was left unchanged")
    return {"optimizer_class": optimizer_class, "optimizer_kwargs": kwargs}


def _undo_classes(model, model_class, embedding, embedding_class, undo_embedding: bool = True) -> None:
    model.__class__ = model_class
    model.__dict__.pop("_nextrec_fast_options", None)
    model.__dict__.pop("module_wise_max_batch", None)  # a per-model setting of the fast forward
    if not undo_embedding:
        return
    embedding.__class__ = embedding_class
    for name in FastEmbeddingMixin.FAST_STATE:
        embedding.__dict__.pop(name, None)


def restore(model):
    """Undo ``accelerate``: nextrec's classes and optimiser settings again, and tables cast to 16
    bits (``embedding.cast_tables``) back to the model's dtype; returns the model.
    A drop-in (``nextrec_fast.models.v03`` / ``v06``) becomes an instance of nextrec's own class,
    so that it pickles without any reference to nextrec_fast."""
    if not is_accelerated(model):
        return model
    if model.__dict__.pop("embedding_optimizer", None) is not None:
        from nextrec_fast import optim
        optim.remove_optimizer_in_backward(model.embedding.tables())
    unfuse_optimizer(getattr(model, "optimizer_fn", None))
    embedding = model.embedding
    if getattr(embedding, "table_output_dtype", None) is not None:  # nextrec's forward needs them in its dtype
        embedding.cast_tables(embedding.table_output_dtype)
    embedding_class = getattr(type(embedding), "_nextrec_fast_original", None) or type(embedding)
    original = type(model)._nextrec_fast_original
    _undo_classes(model, getattr(original, "_nextrec_fast_drop_in_base", original), embedding, embedding_class)
    return model
