"""fp16 that cannot overflow: the building blocks (pure torch) and the whole tiny DiT inside ComfyUI's classes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from devkit.dit_calls import dit_call
from devkit import stress
from pipeline import precision


def test_scaled_linear_survives_inputs_far_beyond_fp16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * 1e6
    w = torch.randn(32, 64, generator=g) / 8
    b = torch.randn(32, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    naive = F.linear(x.half(), w.half(), b.half())
    assert not torch.isfinite(naive).all(), "the naive fp16 GEMM should overflow on this input"
    out = precision.scaled_fp16_linear(x, w.half(), b)
    assert out.dtype == torch.float32
    assert stress.relative_error(out, ref) < 1e-2


def test_scaled_sdpa_matches_fp32_with_huge_values():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 16, 48, generator=g) * 300
    k = torch.randn(1, 2, 16, 48, generator=g) * 300
    v = torch.randn(1, 2, 16, 48, generator=g) * 1e6
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    naive = F.scaled_dot_product_attention(q.half(), k.half(), v.half())
    assert not torch.isfinite(naive).all()
    out = precision.scaled_fp16_sdpa(q, k, v)
    assert stress.relative_error(out, ref) < 1e-2


def test_row_l1_bound_marks_layers_that_could_still_overflow():
    layer = torch.nn.Linear(4, 2)
    layer.newbie_fp32_fallback = False
    with torch.no_grad():
        layer.weight.fill_(1.0)
    model = torch.nn.Sequential(layer)
    assert precision.check_weights(model) == []
    with torch.no_grad():
        layer.weight.fill_(1e5)
    assert precision.check_weights(model) == ["0"]
    assert layer.newbie_fp32_fallback


# --- the whole tiny DiT, built with ComfyUI's own classes on the CPU ------------------------------------

def _build(parts, precision_name, safe=True):
    from pipeline import loader

    patcher, cfg, _, _ = loader.build_model(parts, precision_name, safe_fp16=safe)
    return patcher, cfg


def _forward(parts, precision_name, safe=True):
    patcher, cfg = _build(parts, precision_name, safe)
    return dit_call(patcher, cfg)


def _with_dit(parts, dit):
    p = copy.copy(parts)
    p.dit = dit
    return p


@pytest.mark.host
def test_tiny_dit_fp16_matches_fp32_on_random_weights(tiny_parts):
    ref = _forward(tiny_parts, "fp32")
    patcher, cfg = _build(tiny_parts, "fp16")
    out = dit_call(patcher, cfg)
    assert stress.relative_error(out, ref) < 1e-2
    assert precision.state_of(patcher).recomputed == 0, "ordinary weights should stay on the fast fp16 path"


@pytest.mark.host
def test_stress_set_overflows_plain_fp16_but_not_the_pack(tiny_parts):
    stressed = _with_dit(tiny_parts, stress.stress_state_dict(tiny_parts.dit))
    ref = _forward(stressed, "fp32")
    assert torch.isfinite(ref).all()
    naive = _forward(stressed, "fp16", safe=False)
    naive_err = stress.relative_error(naive, ref)
    assert naive_err > 1e-2, f"the stress set should break plain fp16 (error {naive_err})"
    patcher, cfg = _build(stressed, "fp16")
    out = dit_call(patcher, cfg)
    err = stress.relative_error(out, ref)
    assert err < 1e-2, f"pack fp16 relative error {err} (plain fp16: {naive_err})"
    assert precision.state_of(patcher).recomputed == 1, "the fast path must detect the overflow and recompute once"


@pytest.mark.host
def test_two_fp16_models_keep_their_own_state(tiny_parts):
    """The stressed model's recomputation is its own: an ordinary fp16 model in the same process is untouched."""
    plain, cfg = _build(tiny_parts, "fp16")
    stressed, _ = _build(_with_dit(tiny_parts, stress.stress_state_dict(tiny_parts.dit)), "fp16")
    dit_call(stressed, cfg)
    dit_call(plain, cfg)
    assert precision.state_of(stressed).recomputed == 1 and precision.state_of(plain).recomputed == 0
    assert precision.state_of(plain) is precision.state_of(plain.clone()), "a clone (LoRA, patches) shares it"


@pytest.mark.host
def test_an_overflow_upstream_would_clip_still_reaches_the_output(tiny_parts):
    """Upstream's clamp_fp16 turns an fp16 inf into 65504. On the fast path the tensors reaching it are fp32, so an
    overflow of one FFN's w2 output inside the first main block still makes the call's output non-finite."""
    import comfy.patcher_extension

    patcher, cfg = _build(tiny_parts, "fp16")
    w2 = patcher.model.diffusion_model.layers[0].feed_forward.w2
    with torch.no_grad():
        w2.weight.fill_(6e4)  # a finite fp16 weight whose products overflow
    # the bare fast call, without the guard that would recompute it
    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, precision.GUARD_KEY)
    fast = dit_call(patcher, cfg)
    assert not torch.isfinite(fast).all(), "the overflow was clipped away before the output"


@pytest.mark.parametrize("fails_in, expected_modes", [((), ["fast"]), (("fast",), ["fast", "scaled"]),
                                                       (("fast", "scaled"), ["fast", "scaled", "fp32"])])
def test_guard_recomputes_until_finite(fails_in, expected_modes):
    modes = []
    state = precision.FP16State()

    def executor(x):
        modes.append(state.mode)
        return x / 0.0 if state.mode in fails_in else x

    out = precision.nonfinite_guard(state)(executor, torch.ones(3))
    assert torch.equal(out, torch.ones(3))
    assert modes == expected_modes
    assert state.recomputed == len(expected_modes) - 1
    assert state.mode == "fast"


def test_a_step_reads_its_outputs_once_and_recomputes_as_a_whole():
    """Inside a step's check (CALC_COND_BATCH) the calls skip their own: an overflowing call is not recomputed on
    its own, the step is, in the scaled form; outside a step each call keeps its own check."""
    state = precision.FP16State()
    per_call, step = precision.nonfinite_guard(state), precision.step_guard(state)
    calls = []

    def dit(x):
        calls.append(state.mode)
        return x / 0.0 if state.mode == "fast" and x[0] < 0 else x

    def calc_cond_batch(xs):
        return [per_call(dit, x) for x in xs]

    out = step(calc_cond_batch, [torch.ones(2), -torch.ones(2)])
    assert calls == ["fast", "fast", "scaled", "scaled"], "both calls again, in the scaled form"
    assert torch.equal(out[1], -torch.ones(2)) and state.recomputed == 1
    assert state.mode == "fast" and not state.in_step
    calls.clear()
    assert torch.equal(per_call(dit, -torch.ones(2)), -torch.ones(2)) and calls == ["fast", "scaled"]


@pytest.mark.host
def test_sampling_checks_once_a_step_and_the_stress_set_stays_within_fp32(tiny_dit, monkeypatch):
    """ComfyUI's sampler on the fp16 model, the prompts on two calls a step: one host read a step (not one a call),
    and on the stress set each step recomputed once as a whole, the latent within 1e-2 of fp32's."""
    from devkit import cfg_batch_errors

    reads = {"step": 0, "call": 0}
    all_finite, finite = precision._all_finite, precision._finite
    monkeypatch.setattr(precision, "_all_finite", lambda o: reads.__setitem__("step", reads["step"] + 1) or
                        all_finite(o))
    monkeypatch.setattr(precision, "_finite", lambda o: reads.__setitem__("call", reads["call"] + 1) or finite(o))
    steps = cfg_batch_errors.STEPS

    def run(dit, name):
        patcher, cfg = cfg_batch_errors.model(dit, name)
        latent, calls = cfg_batch_errors.sample(patcher, *cfg_batch_errors.prompts(cfg, 12, 5), mode="off")
        return latent, calls, precision.state_of(patcher)

    _, calls, state = run(tiny_dit, "fp16")
    assert calls == [1] * (2 * steps) and reads == {"step": steps, "call": 0} and state.recomputed == 0
    stressed = stress.stress_state_dict(tiny_dit)
    ref, _, _ = run(stressed, "fp32")
    out, calls, state = run(stressed, "fp16")
    assert state.recomputed == steps and len(calls) == 4 * steps, "every step overflowed once and ran again"
    assert torch.isfinite(out).all() and stress.relative_error(out, ref) < 1e-2
