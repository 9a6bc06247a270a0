"""``DistributedModelParallel`` around a model with TorchRec tables: the planner (or the sharding
types you allow), a fused optimiser for the tables, DDP for the dense part."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from nextrec_fast.sharding.embedding import TorchRecEmbedding, use_torchrec_tables
from nextrec_fast.sharding.tables import _import_torchrec

__all__ = ["shard_model", "SHARDING_TYPES", "DEFAULT_TABLE_OPTIMIZER"]

# TorchRec's sharding types by their names (torchrec.distributed.types.ShardingType values).
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
# shard_model's table optimiser unless told otherwise: FBGEMM's fused row-wise Adagrad with
# TorchRec's defaults (lr 0.01, eps 1e-10), which its CPU kernels implement.
DEFAULT_TABLE_OPTIMIZER = "rowwise_adagrad"


def shard_model(model: nn.Module, *, sharding: str | dict[str, str] | None = None,
                table_optimizer=DEFAULT_TABLE_OPTIMIZER,
                compute_kernel: str | None = None, device: torch.device | None = None, process_group=None):
    """Shard ``model``'s tables over the ranks of the default process group.

    Args:
        model (nn.Module): a nextrec_fast model or ``accelerate()``d nextrec model (its tables are
            moved to TorchRec by ``use_torchrec_tables`` first if they are not yet).
        sharding (str or dict[str, str], optional): one of ``SHARDING_TYPES`` for every table, or
            per table name (tables left out: table-wise); None lets TorchRec's planner choose among what it allows on the
            device (on CPU: table-, column-wise, data-parallel). Table-wise places tables round
            robin; column-wise splits every table's columns over all ranks; data-parallel keeps a
            replica per rank (dense kernel only: the table then trains with the dense optimiser).
        table_optimizer ((optimizer_class, kwargs) or None): applied to the tables inside the
            backward (TorchRec's ``apply_optimizer_in_backward``; FBGEMM's fused kernels when
            sharded), e.g. ``(torchrec.optim.RowWiseAdagrad, {"lr": 0.05})``. Default:
            ``torchrec.optim.RowWiseAdagrad`` with TorchRec's defaults (lr 0.01), except when a
            table is data-parallel (that kernel is dense only: then None). None: the tables get
            gradients like the dense part (TorchRec's dense kernel).
        compute_kernel (str, optional): TorchRec's kernel name ("fused", "dense"); default "fused"
            with a table optimiser, else "dense".
        device (torch.device, optional): default: CPU, or this rank's CUDA device when CUDA is up.
        process_group: the group to shard over (default: the world).

    Returns:
        DistributedModelParallel holding the model's weights: call it like the model (its batch dict with ``KJTCollate``'s
        ``"kjt"``). ``dmp.fused_optimizer`` holds the table optimiser's state; give
        ``dense_parameters(dmp)`` your own optimiser. Table and dense gradients are both the
        mean over ranks (TorchRec divides the tables' by the world size in its backward,
        ``torchrec.distributed.comm_ops.GRADIENT_DIVISION``; DDP averages the dense ones).

    Raises:
        RuntimeError: torch.distributed is not initialised. ValueError: an unknown sharding type
            or table name, data-parallel with a fused kernel. TypeError: ``table_optimizer`` not a
            pair. The checks run before anything changes; if DMP itself fails, the table optimiser
            is taken off again.
    """
    import torch.distributed as dist
    _import_torchrec()
    from torchrec.distributed import sharding_plan as plans
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    data_parallel = sharding == "data_parallel" or (isinstance(sharding, dict) and "data_parallel" in sharding.values())
    if isinstance(table_optimizer, str) and table_optimizer == DEFAULT_TABLE_OPTIMIZER:
        from torchrec.optim import RowWiseAdagrad
        table_optimizer = None if data_parallel else (RowWiseAdagrad, {})
    if table_optimizer is not None:
        try:
            optimizer_class, optimizer_kwargs = table_optimizer
            optimizer_kwargs = dict(optimizer_kwargs)
        except (TypeError, ValueError):
            raise TypeError("shard_model(table_optimizer=...) takes (optimizer_class, kwargs), e.g. "
                            "(torchrec.optim.RowWiseAdagrad, {'lr': 0.05})") from None
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialised (torchrun, or init_process_group)")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    use_torchrec_tables(model)
    layer: TorchRecEmbedding = model.embedding
    tables = list(layer.ebc.embedding_bags)
    if sharding is None or isinstance(sharding, str):
        per_table = dict.fromkeys(tables, sharding) if sharding is not None else {}
    else:  # tables the dict leaves out are table-wise
        per_table = {**dict.fromkeys(tables, "table_wise"), **dict(sharding)}
    bad_tables = sorted(set(per_table) - set(tables))
    bad_types = {t: k for t, k in per_table.items() if k not in SHARDING_TYPES}
    if bad_tables or bad_types:
        raise ValueError("shard_model(sharding=...): " + "; ".join(
            ([f"no table(s) {bad_tables} (the tables: {tables})"] if bad_tables else [])
            + ([f"unknown sharding type(s) {bad_types} (choose from {list(SHARDING_TYPES)})"] if bad_types else [])))
    kernel = compute_kernel or ("fused" if table_optimizer is not None else "dense")
    if kernel != "dense" and "data_parallel" in per_table.values():
        raise ValueError("data_parallel tables run TorchRec's dense kernel only: no table_optimizer / compute_kernel "
                         "'fused' for them (they train with the dense optimiser)")
    group = process_group or dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    sharders = get_default_sharders()
    path = next(name for name, module in model.named_modules() if module is layer.ebc)
    if per_table:
        generators = {"data_parallel": lambda t, i: plans.data_parallel(),
                      "table_wise": lambda t, i: plans.table_wise(rank=i % world, compute_kernel=kernel),
                      "row_wise": lambda t, i: plans.row_wise(compute_kernel=kernel),
                      "column_wise": lambda t, i: plans.column_wise(ranks=list(range(world)), compute_kernel=kernel),
                      "table_row_wise": lambda t, i: plans.table_row_wise(host_index=0)}
        per_param = {t: generators[per_table[t]](t, i) for i, t in enumerate(tables)}
        plan = ShardingPlan({path: plans.construct_module_sharding_plan(
            layer.ebc, per_param, local_size=world, world_size=world, device_type=device.type)})
    else:  # the planner: what its sharder allows on this device
        # Data-parallel tables run the dense kernel only: not a candidate for a fused one (the
        # planner would warn about it for every table).
        free = [t for t in SHARDING_TYPES if t != "data_parallel"] if kernel != "dense" else None
        constraints = {t: ParameterConstraints(sharding_types=free, compute_kernels=[kernel]) for t in tables}
        planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device=device.type),
                                           constraints=constraints)
        plan = planner.collective_plan(model, sharders, group)
    # DMP builds the shards afresh (FBGEMM's own initialisation): the model's weights are loaded
    # into them after, from the unsharded tensors (freed once this returns).
    state = model.state_dict()
    params = list(layer.ebc.parameters())
    if table_optimizer is not None:
        apply_optimizer_in_backward(optimizer_class, params, optimizer_kwargs)
    try:
        dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    except Exception:
        # Unsharded, the optimiser would now step the tables in every backward: take it off, so
        # the model is as it was (DMP itself replaces modules only once it has sharded them all).
        _remove_optimizer_in_backward(params)
        raise
    dmp.load_state_dict(state)
    return dmp


def _remove_optimizer_in_backward(params) -> None:
    from torch.distributed.optim.apply_optimizer_in_backward import param_to_optim_hook_handle_map
    for param in params:
        for handle in param_to_optim_hook_handle_map.pop(param, []):
            handle.remove()
        for attr in ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs"):
            if hasattr(param, attr):
                delattr(param, attr)


def dense_parameters(dmp) -> dict[str, torch.Tensor]:
    """The parameters of ``dmp`` not updated by a fused table optimiser, by name: what the dense
    optimiser takes (``torch.optim.Adam(dense_parameters(dmp).values())``)."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    return dict(in_backward_optimizer_filter(dmp.named_parameters()))


def gathered_state_dict(dmp, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The sharded model's state_dict with every sharded table gathered whole, under nextrec's
    keys: what an unsharded model (or nextrec itself) loads. Collective: every rank must call it;
    rank ``dst`` gets the dict, the others None."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    import warnings

    rank = dist.get_rank()
    out = {}
    with warnings.catch_warnings():  # TorchRec's state_dict still hands out ShardedTensors, which warn on use
        warnings.simplefilter("ignore", FutureWarning)
        state = dmp.state_dict()
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
                value.gather(dst=dst, out=full)
            value = full
        elif hasattr(value, "full_tensor"):  # a DTensor
            value = value.full_tensor()
        if rank == dst:
            out[key] = value.detach().clone()
    return out if rank == dst else None


def save_sharded_checkpoint(dmp, path: str, dense_optimizer=None) -> None:
    """Write a checkpoint of ``dmp`` to the directory ``path``: the model (under nextrec's keys)
    and the fused table optimiser's state as each rank's own shards (``torch.distributed.checkpoint``),
    ``dense_optimizer``'s state (the same on every rank under DDP) and the tables' sharding types
    once, by rank 0. Collective."""
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    dcp.save(_sharded_state(dmp, tables_optimizer=True), checkpoint_id=path)
    if dist.get_rank() == 0:
        if dense_optimizer is not None:
            torch.save(dense_optimizer.state_dict(), os.path.join(path, _DENSE_OPTIMIZER_FILE))
        with open(os.path.join(path, _LAYOUT_FILE), "w") as fh:
            json.dump(_layout(dmp), fh)
    dist.barrier()


def load_sharded_checkpoint(dmp, path: str, dense_optimizer=None, tables_optimizer: bool = True) -> None:
    """Load what ``save_sharded_checkpoint`` wrote into ``dmp`` (and ``dense_optimizer``), in place.

    The weights load into any sharding (DCP reshards them). The table optimiser's state does where
    its shape does not depend on the layout: between table-, row- and table-row-wise. Column-wise
    sharding keeps row-wise optimiser state per column shard and data-parallel tables have none, so
    across those ``tables_optimizer=False`` loads the weights alone (the optimiser starts afresh).
    Collective.

    Raises:
        ValueError: the table optimiser's state cannot carry over between the two layouts (before
            anything is loaded; the message names the tables). FileNotFoundError: no checkpoint, or
            ``dense_optimizer`` given but none was saved.
    """
    import json

    import torch.distributed.checkpoint as dcp
    layout_file = os.path.join(path, _LAYOUT_FILE)
    if not os.path.exists(layout_file):
        raise FileNotFoundError(f"no checkpoint written by save_sharded_checkpoint in {path!r} (no {_LAYOUT_FILE})")
    with open(layout_file) as fh:
        saved = json.load(fh)
    if tables_optimizer:
        current = _layout(dmp)
        layout_bound = ("column_wise", "data_parallel")
        clash = {t: (saved.get(t), current[t]) for t in current
                 if saved.get(t) != current[t] and (saved.get(t) in layout_bound or current[t] in layout_bound)}
        if clash:
            raise ValueError(
                f"load_sharded_checkpoint: the table optimiser's state of {clash} (saved, now) does not carry over: "
                "column-wise keeps it per column shard, data-parallel has none. Load into the same sharding types, "
                "or pass tables_optimizer=False to load the weights (and the dense optimiser) alone")
    state = _sharded_state(dmp, tables_optimizer)
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    if tables_optimizer:
        dmp.fused_optimizer.load_state_dict(state["tables_optimizer"])
    if dense_optimizer is not None:
        # A torch optimiser creates its state at its first step: DCP, which loads into existing
        # tensors, would find none in a fresh one, so this part is a plain file.
        dense_optimizer.load_state_dict(torch.load(os.path.join(path, _DENSE_OPTIMIZER_FILE), weights_only=False))


def _layout(dmp) -> dict[str, str]:
    """Sharding type per table of the (one) sharded embedding collection in ``dmp``'s plan."""
    return {table: spec.sharding_type for module_plan in dmp.plan.plan.values() for table, spec in module_plan.items()}


_DENSE_OPTIMIZER_FILE, _LAYOUT_FILE = "dense_optimizer.pt", "layout.json"


def _sharded_state(dmp, tables_optimizer: bool) -> dict:
    import warnings
    with warnings.catch_warnings():  # ShardedTensors warn on use
        warnings.simplefilter("ignore", FutureWarning)
        state = {"model": dmp.state_dict()}
        if tables_optimizer:
            state["tables_optimizer"] = dmp.fused_optimizer.state_dict()
    return state
