"""Attaching the OOM Guard (pipeline/oom/attach.py) to a real ComfyUI ModelPatcher."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.host


def test_a_second_oom_guard_replaces_the_first(tiny_parts):
    """OOM Guard twice on one model: one ladder, not two nested ones."""
    from comfy.patcher_extension import WrappersMP

    from pipeline import loader
    from pipeline.oom import attach

    patcher, *_ = loader.build_model(tiny_parts, "fp32")
    once, _ = attach.guard_model(patcher)
    twice, _ = attach.guard_model(once)
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        assert len(twice.wrappers[kind][attach.WRAPPER_KEY]) == 1, kind
        assert len(once.wrappers[kind][attach.WRAPPER_KEY]) == 1, kind


def test_devkit_faults_reach_the_guard_through_comfyuis_wrappers(tiny_parts):
    """devkit's fault wrappers, added after the guard, run inside it (ComfyUI runs wrappers in the order their
    keys were added): an injected error meets the guard's ladder, the retry gives the same output."""
    import torch
    from comfy.patcher_extension import WrappersMP

    from devkit import faults
    from devkit.dit_calls import dit_call
    from pipeline import loader
    from pipeline.oom import attach

    patcher, *_ = loader.build_model(tiny_parts, "fp32")
    dit = patcher.model.diffusion_model
    cfg = {"cap_feat_dim": dit.cap_embedder[1].weight.shape[1],
           "clip_text_dim": dit.clip_text_pooled_proj[1].weight.shape[1]}
    guarded, guard = attach.guard_model(patcher)
    faulty = faults.inject_model_faults(guarded, faults.FaultPlan.parse('{"model_calls": [0], "times": 2}'))
    torch.testing.assert_close(dit_call(faulty, cfg), dit_call(patcher, cfg), rtol=0, atol=0)
    assert guard.recoveries == 1 and guard.events[0].retries == 2
    assert faults.WRAPPER_KEY not in guarded.wrappers[WrappersMP.APPLY_MODEL], "the guarded model is left as it was"
