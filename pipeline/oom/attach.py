"""The guard on a ModelPatcher: its OUTER_SAMPLE and APPLY_MODEL wrappers (`comfy.patcher_extension`) under
one key, so applying the node again replaces the guard instead of nesting a second ladder inside the first."""
from __future__ import annotations

from typing import Any, Callable

from .guard import DEFAULT_MAX_RETRIES, OOMGuard

WRAPPER_KEY = "newbie_oom_guard"


def with_wrappers(model, key: str, outer_sample: Callable, apply_model: Callable):
    """A clone of the ModelPatcher whose OUTER_SAMPLE and APPLY_MODEL wrappers under `key` are these two (any
    already under that key are removed first). Wrappers run in the order their keys were added, the first
    outermost: these become the innermost. The input model is left as it was."""
    from comfy.patcher_extension import WrappersMP

    wrapped = model.clone()
    for kind, wrapper in ((WrappersMP.OUTER_SAMPLE, outer_sample), (WrappersMP.APPLY_MODEL, apply_model)):
        wrapped.remove_wrappers_with_key(kind, key)
        wrapped.add_wrapper_with_key(kind, key, wrapper)
    return wrapped


def guard_model(model, max_retries: int = DEFAULT_MAX_RETRIES, allow_batch_split: bool = True,
                node_id: str | None = None) -> tuple[Any, OOMGuard]:
    """A clone of the ModelPatcher with the guard's wrappers attached (the input model is left as it was).
    A guard already on the model is replaced, not nested: two ladders would retry each other's retries."""
    guard = OOMGuard(max_retries, allow_batch_split, node_id)
    return with_wrappers(model, WRAPPER_KEY, guard.outer_sample, guard.apply_model), guard
