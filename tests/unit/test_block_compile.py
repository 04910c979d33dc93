"""Regional compilation (pipeline/block_compile.py) on the tiny DiT, on the CPU with inductor: the number of
compiled graphs does not grow with depth (one graph serves every block of a kind), and the output is the eager one."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from devkit.dit_calls import dit_call

pytestmark = pytest.mark.host


def _parts_with_layers(n_layers: int):
    from devkit import tiny_models
    from pipeline import loader

    spec = dataclasses.replace(tiny_models.TINY, dit=dataclasses.replace(tiny_models.TINY.dit, n_layers=n_layers))
    dit = tiny_models.random_dit(torch.float32, spec, seed=spec.seed)
    return loader.NewBieParts(dit, {}, {}, {}, None, None, {"dit": f"tiny-{n_layers}-layers"})


def _compiled_run(n_layers: int, precision: str = "fp32"):
    """(blocks, graphs compiled for them, relative error of the compiled call against the eager one)."""
    from pipeline import block_compile, loader

    parts = _parts_with_layers(n_layers)
    patcher, cfg, _, _ = loader.build_model(parts, precision, dynamic=False)
    eager = dit_call(patcher, cfg)
    torch._dynamo.reset()
    before = block_compile.compiled_graph_count()
    blocks = block_compile.apply(patcher)
    out = dit_call(patcher, cfg)
    graphs = block_compile.compiled_graph_count() - before
    again = block_compile.compiled_graph_count()
    dit_call(patcher, cfg)
    assert block_compile.compiled_graph_count() == again, "a second identical call compiled again"
    return blocks, graphs, float((out - eager).norm() / eager.norm())


def test_compiled_graphs_do_not_grow_with_depth_and_output_is_unchanged(comfy_import_path):
    try:
        shallow = _compiled_run(2)
        deep = _compiled_run(6)
    finally:
        torch._dynamo.reset()
    assert (shallow[0], deep[0]) == (4, 8), "context refiner + noise refiner + main layers"
    assert 0 < deep[1] == shallow[1] < deep[0], f"graphs compiled: {shallow[1]} for 4 blocks, {deep[1]} for 8"
    assert shallow[2] < 1e-5 and deep[2] < 1e-5, (shallow[2], deep[2])


def test_fp16_blocks_compile_once_and_match_eager(comfy_import_path):
    """The default precision: fp16 GEMMs with fp32 activations compile to one graph per block kind too (the
    per-model fp16 state is read inside the blocks without a recompile), within fp16 rounding of eager."""
    try:
        blocks, graphs, err = _compiled_run(2, "fp16")
    finally:
        torch._dynamo.reset()
    assert blocks == 4 and 0 < graphs < blocks, graphs
    assert err < 2e-3, err


def test_auto_compiles_only_on_cuda_with_triton():
    from pipeline import block_compile

    assert block_compile.resolve("auto", torch.device("cpu"))[0] == "off"
    assert block_compile.resolve("off", torch.device("cuda"))[0] == "off"
    assert block_compile.resolve("blocks", torch.device("cpu"))[0] == "blocks"
    assert block_compile.resolve("auto", torch.device("cuda"))[0] == ("blocks" if block_compile._triton_available()
                                                                      else "off")
    with pytest.raises(ValueError, match="compile='fast'"):
        block_compile.resolve("fast", torch.device("cpu"))


def test_auto_stays_eager_where_the_weights_cannot_stay_resident(monkeypatch):
    """At 4 GiB the streamed compiled DiT ran 1.7x slower than upstream's dynamic VRAM (run17): auto compiles only
    where the weights and a call's activations fit; an explicit 'blocks' is kept."""
    from pipeline import block_compile

    monkeypatch.setattr(block_compile, "_triton_available", lambda: True)
    cuda, gib = torch.device("cuda"), 2 ** 30
    weights = int(6.2 * gib)  # the bf16 DiT
    assert block_compile.resolve("auto", cuda, weights, 8 * gib)[0] == "blocks"
    mode, why = block_compile.resolve("auto", cuda, weights, 4 * gib)
    assert mode == "off" and "6.2 GiB" in why and "4.0 GiB" in why, why
    assert block_compile.resolve("auto", cuda, weights, weights + gib // 2)[0] == "off", "no room for activations"
    assert block_compile.resolve("blocks", cuda, weights, 4 * gib)[0] == "blocks"
    assert block_compile.resolve("auto", torch.device("cpu"), weights, 80 * gib)[0] == "off"
    for asked in ("auto", "blocks"):  # compiling ComfyUI's quantized layers failed on the H200 (run18): eager
        mode, why = block_compile.resolve(asked, cuda, weights // 2, 80 * gib, quantized=True)
        assert mode == "off" and "quantized" in why, (asked, why)
    # The pack's plain-op fp8/int8 layers compile like 16-bit ones (compiled fp8 sampled 8.45 it/s against 7.59 bf16,
    # run22): under auto where they fit, and not where they do not
    mode, why = block_compile.resolve("auto", cuda, weights // 2, 80 * gib, quantized=True, traceable=True)
    assert mode == "blocks" and "plain ops" in why, why
    assert block_compile.resolve("auto", cuda, weights // 2, 2 * gib, quantized=True, traceable=True)[0] == "off"
    assert block_compile.resolve("auto", torch.device("cpu"), weights // 2, None, quantized=True,
                                 traceable=True)[0] == "off"
    assert block_compile.resolve("blocks", cuda, weights // 2, 80 * gib, quantized=True, traceable=True)[0] == "blocks"
    assert block_compile.resolve("off", cuda, weights // 2, 80 * gib, quantized=True, traceable=True)[0] == "off"
    assert block_compile.weights_fit(weights, 8 * gib) and not block_compile.weights_fit(weights, weights)
    assert block_compile.weights_fit(weights, None) is None


def test_new_prompt_lengths_and_image_sizes_do_not_recompile_after_the_first_run(comfy_import_path):
    """NewBie's caption length is the prompt's token count: the first two lengths compile (Dynamo then marks the
    dimension dynamic) and later prompts and image sizes compile nothing. (A sampling step pads the positive and
    the negative prompt to one length, pipeline/cfg_batch.py; tests/unit/test_cfg_batch.py compiles through it.)"""
    from devkit.dit_calls import dit_inputs
    from pipeline import block_compile, loader

    parts = _parts_with_layers(2)
    patcher, cfg, _, _ = loader.build_model(parts, "fp32", dynamic=False)
    torch._dynamo.reset()
    try:
        block_compile.apply(patcher)
        for tokens in (12, 20):  # the first sampling run: positive and negative prompt
            dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), tokens))
        before = block_compile.compiled_graph_count()
        for tokens, hw in ((7, (8, 8)), (33, (8, 8)), (12, (16, 8))):
            dit_call(patcher, cfg, dit_inputs(cfg, "cpu", hw, tokens))
        assert block_compile.compiled_graph_count() == before, "a later prompt length or image size recompiled"
    finally:
        torch._dynamo.reset()


def test_lora_strengths_change_the_output_without_a_recompile(comfy_import_path):
    """LoRA patches are applied to the weights before a call (parameters are graph inputs, not constants): each
    strength gives the eager model's output at that strength, and a new strength compiles nothing."""
    from pipeline import block_compile, loader

    def patched_call(patcher, cfg, delta, strength):
        lora = patcher.clone()
        lora.add_patches({KEY: (delta,)}, strength)
        lora.patch_model()  # what ComfyUI's loading does with the patches
        try:
            return dit_call(lora, cfg)
        finally:
            lora.unpatch_model()

    KEY = "diffusion_model.layers.0.attention.qkv.weight"
    eager, cfg, _, _ = loader.build_model(_parts_with_layers(2), "fp32", dynamic=False)
    compiled, _, _, _ = loader.build_model(_parts_with_layers(2), "fp32", dynamic=False)
    delta = torch.randn_like(eager.model.get_parameter(KEY)) * 0.05
    torch._dynamo.reset()
    try:
        block_compile.apply(compiled)
        first = patched_call(compiled, cfg, delta, 0.0)
        before = block_compile.compiled_graph_count()
        outs = [first] + [patched_call(compiled, cfg, delta, s) for s in (0.5, 1.0)]
        assert block_compile.compiled_graph_count() == before, "a new LoRA strength recompiled"
    finally:
        torch._dynamo.reset()
    for out, strength in zip(outs, (0.0, 0.5, 1.0)):
        ref = patched_call(eager, cfg, delta, strength)
        assert float((out - ref).norm() / ref.norm()) < 1e-5, strength
    assert not torch.allclose(outs[0], outs[1], atol=1e-4) and not torch.allclose(outs[1], outs[2], atol=1e-4)


def test_the_cpp_wrapper_switch_compiles_blocks_that_match_eager(comfy_import_path, monkeypatch):
    """NEWBIE_CPP_WRAPPER=1 (a comparison switch, off by default) hands Inductor `cpp_wrapper`: the blocks still
    compile to one graph per kind, their launchers in C++, and the output is the eager one."""
    from pipeline import block_compile

    assert block_compile.inductor_options("inductor") is None, "off by default"
    monkeypatch.setenv("NEWBIE_CPP_WRAPPER", "1")
    assert block_compile.inductor_options("inductor") == {"cpp_wrapper": True}
    assert block_compile.inductor_options("eager") is None, "an Inductor option only"
    seen = []
    import comfy_api.torch_helpers as helpers

    real = helpers.set_torch_compile_wrapper
    monkeypatch.setattr(helpers, "set_torch_compile_wrapper", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    try:
        blocks, graphs, err = _compiled_run(2)
    finally:
        torch._dynamo.reset()
    assert seen and seen[0]["options"] == {"cpp_wrapper": True}
    assert blocks == 4 and 0 < graphs < blocks and err < 1e-5, (graphs, err)


def test_compile_time_is_described_by_phase():
    from pipeline import block_compile

    before = {"torch.compile": 1.0, "tracing": 0.5, "Inductor": 0.2, "cache loads": 0.1}
    after = {"torch.compile": 10.3, "tracing": 2.1, "Inductor": 7.3, "cache loads": 6.7}
    assert block_compile.describe_compile_time(before, after) == \
        "; 9.3 s in torch.compile (tracing 1.6 s, Inductor 7.1 s, cache loads 6.6 s)"
    assert block_compile.describe_compile_time({}, {"tracing": 1.0}) == ""


def test_a_sampling_run_that_compiles_logs_where_the_time_went(caplog):
    """The OUTER_SAMPLE wrapper around a run that compiles a graph: its log line gives the graphs and the seconds
    torch.compile's own timers counted in that run; a run that compiles nothing says so without times."""
    from pipeline import block_compile

    torch._dynamo.reset()

    def run(x):
        return torch.compile(lambda t: torch.sin(t) * 2, backend="eager")(x)

    try:
        with caplog.at_level("INFO", logger=block_compile.log.name):
            block_compile._log_compiles(run, torch.ones(3))
            block_compile._log_compiles(run, torch.ones(3))
    finally:
        torch._dynamo.reset()
    first, second = [r.getMessage() for r in caplog.records if "NewBie block compile" in r.getMessage()]
    assert "1 graph compiled in this sampling run" in first and "s in torch.compile (tracing" in first, first
    assert "0 graphs compiled in this sampling run" in second and "torch.compile" not in second, second
    assert "; FX graph cache 0 hit 0 miss 0 bypass, AOTAutograd cache" in first, "the eager backend uses no cache"


def test_the_compile_line_says_how_the_caches_served_the_graphs(caplog):
    """With Inductor, the same graph compiled again in a fresh Dynamo state is found in the FX graph cache."""
    from pipeline import block_compile

    assert block_compile.describe_cache_use({}, {f"{label} {o}": i for i, (label, o) in enumerate(
        (lab, o) for lab, _, _ in block_compile.CACHE_COUNTERS for o in block_compile.CACHE_OUTCOMES)}) == \
        "; FX graph cache 0 hit 1 miss 2 bypass, AOTAutograd cache 3 hit 4 miss 5 bypass"

    def run(x):
        return torch.compile(lambda t: torch.cos(t) * 3 + 1, backend="inductor")(x)

    lines = []
    try:
        for _ in range(2):
            torch._dynamo.reset()
            with caplog.at_level("INFO", logger=block_compile.log.name):
                block_compile._log_compiles(run, torch.ones(3))
            lines.append([r.getMessage() for r in caplog.records if "NewBie block compile" in r.getMessage()][-1])
    finally:
        torch._dynamo.reset()
    assert "FX graph cache 1 hit 0 miss 0 bypass" in lines[1], lines


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_partial_unload_and_reload_compiles_nothing(comfy_import_path, precision):
    """A VAE decode that pushes part of a resident compiled DiT out, and the next image loading it back (ComfyUI's
    own partially_unload and partially_load), must not recompile the blocks: run46 recompiled 3 graphs (6.6 s) on
    the image after the first such decode, for `comfy_cast_weights` having moved into the layers' __dict__."""
    from pipeline import block_compile, loader

    patcher, cfg, _, _ = loader.build_model(_parts_with_layers(2), precision, dynamic=False)
    cpu = torch.device("cpu")
    torch._dynamo.reset()
    try:
        block_compile.apply(patcher, backend="eager")
        patcher.load(cpu, full_load=True)
        dit_call(patcher, cfg)
        before = block_compile.compiled_graph_count()
        assert patcher.partially_unload(cpu, memory_to_free=patcher.model_size() // 3) > 0
        assert patcher.model.model_lowvram, "part of the DiT is offloaded"
        patcher.partially_load(cpu, extra_memory=1e32)
        assert not patcher.model.model_lowvram, "all of it is back"
        dit_call(patcher, cfg)
        assert block_compile.compiled_graph_count() == before, "the reload recompiled"
    finally:
        torch._dynamo.reset()


def test_cast_layers_own_their_cast_state(comfy_import_path):
    from pipeline import block_compile, loader

    patcher, _, _, _ = loader.build_model(_parts_with_layers(2), "fp32", dynamic=False)
    dm = patcher.model.diffusion_model
    n = block_compile.own_cast_state(dm)
    layers = [m for m in dm.modules() if hasattr(m, "comfy_cast_weights")]
    assert n == len(layers) > 0
    assert all(all(name in vars(m) for name in block_compile.CAST_STATE) for m in layers)
    assert layers[0].weight_function is not layers[1].weight_function, "each layer its own list"
    assert not any(m.comfy_cast_weights for m in layers)


@pytest.mark.parametrize("mode", ["off", "always"])
def test_a_first_sampling_run_compiles_three_graphs(tiny_dit, mode):
    """A resident DiT's first sampling run, a prompt pair of two lengths run apart (`off`, what `auto` does for a
    resident DiT) or padded into one call (`always`): the context refiner compiles for its first caption length
    and again with the length dynamic, and one graph serves the noise refiner and the main layers. ComfyUI adds
    keys to transformer_options before the main layers; while the attention tested that dict for a key it lacked,
    Dynamo guarded on the dict's length and compiled the main layers once more (4 graphs; runs 70-82's logs)."""
    from torch._dynamo.utils import counters

    from devkit import cfg_batch_errors
    from pipeline import block_compile

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    torch._dynamo.reset()
    counters.clear()
    try:
        block_compile.apply(patcher, backend="eager")  # the graphs Dynamo makes; Inductor's code is not the point
        cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
        _, batches = cfg_batch_errors.sample(patcher, cond, uncond, steps=2, mode=mode)
        assert set(batches) == ({1} if mode == "off" else {2})
        assert block_compile.compiled_graph_count() == 3, dict(counters["stats"])
        assert not dict(counters["graph_break"]), dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_room_for_the_compiled_versions_of_several_models():
    """Every Next-DiT block of the process shares one forward; the pack raises Dynamo's per-code-object limit of
    compiled versions where it is lower, and never lowers it."""
    import torch._dynamo

    from pipeline import block_compile

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: 8}):
        assert block_compile.make_room_for_versions() == block_compile.RECOMPILE_LIMIT
        assert getattr(torch._dynamo.config, name) == block_compile.RECOMPILE_LIMIT
    with torch._dynamo.config.patch(**{name: 500}):
        assert block_compile.make_room_for_versions() == 500
