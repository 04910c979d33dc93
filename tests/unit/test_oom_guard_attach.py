"""Attaching the OOM Guard (pipeline/oom_guard.guard_model) to a real ComfyUI ModelPatcher."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.host


def test_a_second_oom_guard_replaces_the_first(tiny_parts):
    """OOM Guard twice on one model: one ladder, not two nested ones."""
    from comfy.patcher_extension import WrappersMP

    from pipeline import loader, oom_guard

    patcher, *_ = loader.build_model(tiny_parts, "fp32")
    once, _ = oom_guard.guard_model(patcher)
    twice, _ = oom_guard.guard_model(once)
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        assert len(twice.wrappers[kind][oom_guard.WRAPPER_KEY]) == 1, kind
        assert len(once.wrappers[kind][oom_guard.WRAPPER_KEY]) == 1, kind
