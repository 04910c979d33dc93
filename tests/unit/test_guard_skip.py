"""A compiled DiT's calls met before in a sampling run skip Dynamo's weight guards (pipeline/guard_skip.py): when
the stance is taken and when not, and a whole sampling run of the tiny compiled DiT through ComfyUI's sampler gives
the same latent with it as without it (on the CPU here, on the GPU too where there is one)."""
from __future__ import annotations

import logging

import pytest
import torch

from devkit import tiny_models

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu")]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _skipping_now() -> bool:
    return torch._dynamo.eval_frame._is_skip_guard_eval_unsafe_stance()


class _Executor:
    """A DIFFUSION_MODEL executor as ComfyUI's WrapperExecutor presents it: the model, the wrappers, the call."""

    def __init__(self, module, wrappers=(), idx=0):
        self.class_obj, self.wrappers, self.idx = module, list(wrappers), idx
        self.stances = []

    def __call__(self, *args, **kwargs):
        self.stances.append(_skipping_now())
        return args[0] * 2


class _Model:
    """What ComfyUI's ModelPatcher keeps on the model of where its weights are (`guard_skip.residency`)."""
    model_loaded_weight_memory = 1000
    model_lowvram = False


class _Patcher:
    load_device = torch.device("cpu")
    hook_patches = {}

    def __init__(self):
        self.model = _Model()

    def is_dynamic(self):
        return False


@pytest.fixture
def known(monkeypatch):
    from pipeline import guard_skip

    if not guard_skip.SUPPORTED:
        pytest.skip("this PyTorch has no skip_guard_eval_unsafe stance")
    return guard_skip


def _module():
    return torch.nn.Linear(3, 3)


def test_a_call_met_before_in_the_run_skips_and_a_new_one_does_not(known):
    run, ex = known.KnownCalls(_Patcher()), _Executor(_module())
    x, y = torch.ones(1, 4), torch.ones(2, 4)
    for t in (x, x, y, y, x):
        run.call(ex, (t,), {"transformer_options": {"cond_or_uncond": [0]}})
    assert ex.stances == [False, True, False, True, True]
    assert run.skipped == 3 and run.why_not() is None
    assert not _skipping_now(), "the stance ends with the call"
    run.call(ex, (x,), {"transformer_options": {"cond_or_uncond": [1]}})  # another argument by value
    assert ex.stances[-1] is False


def test_a_failed_first_call_is_not_known(known):
    run = known.KnownCalls(_Patcher())

    class Failing(_Executor):
        def __call__(self, *args, **kwargs):
            super().__call__(*args, **kwargs)
            raise torch.cuda.OutOfMemoryError("out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run.call(Failing(_module()), (torch.ones(1),), {})
    ex = _Executor(_module())
    run.call(ex, (torch.ones(1),), {})
    assert ex.stances == [False]


@pytest.mark.parametrize("setup, why", [
    (lambda p, m, kw, ex: setattr(p, "is_dynamic", lambda: True), "dynamic VRAM"),
    (lambda p, m, kw, ex: setattr(p, "hook_patches", {"hook": {}}), "hooks"),
    (lambda p, m, kw, ex: setattr(p, "load_device", torch.device("cuda", 0)), "not on the GPU"),
    (lambda p, m, kw, ex: kw["transformer_options"].update(patches={"attn1_patch": [print]}), "patches"),
    (lambda p, m, kw, ex: kw["transformer_options"].update(patches_replace={"dit": {("double_block", 0): print}}),
     "patches"),
    (lambda p, m, kw, ex: ex.wrappers.extend([None, print]), "wrapper runs inside"),
    (lambda p, m, kw, ex: kw.update(extra=object.__new__(type("Unhashable", (), {"__hash__": None}))),
     "Unhashable"),
])
def test_where_the_weights_or_other_nodes_code_may_change_it_never_skips(known, setup, why):
    p, m = _Patcher(), _module()
    kwargs = {"transformer_options": {}}
    ex = _Executor(m)
    setup(p, m, kwargs, ex)
    run = known.KnownCalls(p)
    for _ in range(3):
        run.call(ex, (torch.ones(1, 4),), kwargs)
    assert ex.stances == [False, False, False]
    assert why in run.why_not()


def test_weights_moved_during_the_run_forget_its_known_calls(known):
    """The OOM Guard's offload of part of the DiT, then the same call again: every guard is checked again, and with
    a weight off the device none is skipped any more."""
    p, m = _Patcher(), _module()
    run, ex = known.KnownCalls(p), _Executor(m)
    x = torch.ones(1, 4)
    run.call(ex, (x,), {})
    run.call(ex, (x,), {})
    p.model.model_loaded_weight_memory, p.model.model_lowvram = 600, True  # ComfyUI's partially_unload
    run.call(ex, (x,), {})
    run.call(ex, (x,), {})
    assert ex.stances == [False, True, False, True], "a change of residency starts the signatures anew"
    p.model.model_loaded_weight_memory = 0
    m.to("meta")  # a weight no longer on the model's device
    run.call(ex, (x,), {})
    run.call(ex, (x,), {})
    assert ex.stances[-2:] == [False, False]
    assert "not on the GPU" in run.why_not()


def test_the_packs_own_inner_wrappers_are_allowed(known):
    from pipeline import cuda_graphs

    graphs = object()
    kwargs = {"transformer_options": {"wrappers": {"diffusion_model": {cuda_graphs.WRAPPER_KEY: [graphs]}}}}
    ex = _Executor(_module(), wrappers=[None, graphs])
    run = known.KnownCalls(_Patcher())
    for _ in range(2):
        run.call(ex, (torch.ones(1, 4),), kwargs)
    assert ex.stances == [False, True]


def test_another_stance_is_left_alone(known):
    run, ex = known.KnownCalls(_Patcher()), _Executor(_module())
    with torch.compiler.set_stance("force_eager"):
        for _ in range(2):
            run.call(ex, (torch.ones(1),), {})
    assert ex.stances == [False, False]


def test_the_fp16_paths_form_is_part_of_the_signature(known):
    class State:
        mode = "fast"

    m = _module()
    m.newbie_fp16_state = State()
    run, ex = known.KnownCalls(_Patcher()), _Executor(m)
    run.call(ex, (torch.ones(1),), {})
    State.mode = "scaled"
    run.call(ex, (torch.ones(1),), {})
    run.call(ex, (torch.ones(1),), {})
    assert ex.stances == [False, False, True]


def _sample(patcher, cfg, device, steps=3):
    import comfy.sample

    g = torch.Generator().manual_seed(5)
    cond, uncond = ([[torch.randn(1, n, cfg["cap_feat_dim"], generator=g),
                      {"pooled_output": torch.randn(1, cfg["clip_text_dim"], generator=g)}]] for n in (12, 5))
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 7)
    return comfy.sample.sample(patcher, noise, steps, 5.0, "euler_ancestral", "simple", cond, uncond, latent,
                               seed=7, disable_pbar=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_a_compiled_sampling_run_skips_and_gives_the_same_latent(known, device, precision, monkeypatch, caplog):
    import comfy.model_management as mm

    from pipeline import block_compile

    if device == "cuda":
        monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device("cuda", 0))
    sd = tiny_models.random_dit(torch.float32)
    patcher, cfg = tiny_models.dit_patcher(sd, precision, f"tiny-{precision}")
    block_compile.apply(patcher)
    latents = {}
    with caplog.at_level(logging.INFO, logger=known.__name__):
        for switch in ("0", "1", "0", "1"):
            monkeypatch.setenv("NEWBIE_GUARD_SKIP", switch)
            caplog.clear()
            latents.setdefault(switch, []).append(_sample(patcher, cfg, device))
            lines = [r.getMessage() for r in caplog.records if "weight guards" in r.getMessage()]
            if switch == "1":
                assert lines == ["NewBie compiled blocks: 4 DiT calls of this run skipped Dynamo's weight guards"], \
                    lines
            else:
                assert lines == []
    assert torch.equal(latents["0"][1], latents["1"][1])
    assert torch.equal(latents["1"][0], latents["1"][1])


def test_a_block_past_dynamos_recompile_limit_makes_the_run_check_every_guard(known, monkeypatch, caplog):
    """A long-lived server that compiles several models can reach Dynamo's recompile limit for the block code: a
    block kind then runs eagerly at its full-guard call, and its next call under the skip stance has no compiled
    version to take (PyTorch raises). The call is run again with every guard, the run stops skipping, the latent
    is the one without skipping."""
    from pipeline import block_compile

    sd = tiny_models.random_dit(torch.float32)
    patcher, cfg = tiny_models.dit_patcher(sd, "bf16", "tiny-bf16")
    block_compile.apply(patcher)
    with torch._dynamo.config.patch(recompile_limit=1):
        torch._dynamo.reset()
        monkeypatch.setenv("NEWBIE_GUARD_SKIP", "0")
        reference = _sample(patcher, cfg, "cpu")
        torch._dynamo.reset()
        monkeypatch.setenv("NEWBIE_GUARD_SKIP", "1")
        with caplog.at_level(logging.INFO, logger=known.__name__):
            latent = _sample(patcher, cfg, "cpu")
    torch._dynamo.reset()
    messages = [r.getMessage() for r in caplog.records]
    assert any("reached Dynamo's recompile limit" in m for m in messages), messages
    assert torch.equal(latent, reference)
