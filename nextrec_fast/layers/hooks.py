"""When the batched path must call a module instead of reading its parameters.

The fast layers read the weights of many ``nn.Module`` s (experts, towers, gates, embedding
tables) and compute them together, so those modules' ``__call__`` never runs. Anything that
lives in ``__call__`` would then be skipped silently:

- forward, forward-pre and (full) backward hooks, local or global
  (``torch.nn.modules.module.register_module_forward_hook`` and friends);
- weights that are functions of other tensors through a forward-pre hook:
  ``torch.nn.utils.prune``, old-style ``torch.nn.utils.weight_norm`` / ``spectral_norm``;
- ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm`` / ``spectral_norm`` /
  ``orthogonal``): reading ``.weight`` would evaluate it, but once per read rather than once per
  call (spectral_norm's power iteration), so such modules are called as well.

Callers check :func:`needs_module_call` per part (an expert, a gate, a level) and call that part's
modules as nextrec does; every other part stays batched. Global hooks fire for every module
call, so :func:`global_module_hooks_active` sends the whole forward down the per-module path.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn
from torch.nn.modules import module as _module

__all__ = ["needs_module_call", "global_module_hooks_active"]


def _intercepted(module: nn.Module) -> bool:
    # parametrize keeps its parametrisations in a "parametrizations" submodule; looking there
    # directly avoids is_parametrized's hasattr, which raises (slowly) inside Module.__getattr__.
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "parametrizations" in module._modules)


def _subtree_intercepted(module: nn.Module) -> bool:
    # A plain walk of _modules in one list: Module.modules() builds names and a memo set, and a
    # recursive generator a frame per module (1.6x this loop's time); either made this check a
    # tenth of a small batch's forward (it runs for every expert and tower per call).
    modules = [module]
    for current in modules:  # grows while it is walked (breadth first)
        if current is None:
            continue
        if _intercepted(current):
            return True
        modules.extend(current._modules.values())
    return False


def needs_module_call(modules: nn.Module | Iterable[nn.Module], recurse: bool = True) -> bool:
    """True if any of ``modules`` (or, with ``recurse``, their submodules) has a hook or a
    parametrised weight."""
    roots = [modules] if isinstance(modules, nn.Module) else modules
    check = _subtree_intercepted if recurse else _intercepted
    return any(check(root) for root in roots)


def global_module_hooks_active() -> bool:
    """True while a global module hook (``register_module_forward_hook`` etc.) is registered."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)
