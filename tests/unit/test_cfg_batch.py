"""A positive and a negative prompt of different lengths run as one DiT call (pipeline/cfg_batch.py), and the result
is the one of two separate calls: through ComfyUI's own sampler on the tiny model, eager and with compiled blocks.
Without the per-sample attention the padding changes the result (the control that shows the test can fail)."""
from __future__ import annotations

import pytest
import torch

from devkit import cfg_batch_errors, stress

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu")]

STEPS = cfg_batch_errors.STEPS


def test_pad_captions_pads_in_front_to_the_longest(comfy_import_path):
    import comfy.conds

    from pipeline import cfg_batch

    def entry(n, fill):
        return {"uuid": n, "model_conds": {"c_crossattn": comfy.conds.CONDRegular(torch.full((1, n, 4), fill)),
                                           "num_tokens": comfy.conds.CONDConstant(n)}}

    conds = [[entry(6, 1.0)], [entry(2, 2.0), entry(4, 3.0)]]
    out = cfg_batch.pad_captions(conds, n_image_tokens=64)
    assert [[c["model_conds"]["c_crossattn"].cond.shape[1] for c in g] for g in out] == [[6], [6, 6]]
    short = out[1][0]["model_conds"]
    assert torch.equal(short["c_crossattn"].cond[0, :4], torch.zeros(4, 4)), "zeros in front"
    assert torch.equal(short["c_crossattn"].cond[0, 4:], torch.full((2, 4), 2.0)), "the caption at the end"
    assert short["num_tokens"].cond == 6 and short[cfg_batch.PAD_KEY].cond == (4,)
    assert conds[1][0]["model_conds"]["c_crossattn"].cond.shape[1] == 2, "the originals are left as they were"
    pads = [c["model_conds"][cfg_batch.PAD_KEY].process_cond(batch_size=2) for g in out for c in g]
    assert pads[0].can_concat(pads[1]) and pads[0].concat(pads[1:]) == (0, 0, 4, 4, 2, 2)
    # nothing to do, or not safe to do
    assert cfg_batch.pad_captions([[entry(3, 1.0)], [entry(3, 2.0)]], 64) is None
    assert cfg_batch.pad_captions(conds, n_image_tokens=6) is None, "a padded caption as long as the image"
    assert cfg_batch.pad_captions([[entry(6, 1.0)], [{**entry(2, 2.0), "default": True}]], 64) is None
    masked = entry(2, 2.0)
    masked["model_conds"]["attention_mask"] = comfy.conds.CONDRegular(torch.ones(1, 2))
    assert cfg_batch.pad_captions([[entry(6, 1.0)], [masked]], 64) is None


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("fp16", 1e-2)])
def test_a_prompt_pair_of_different_lengths_runs_as_one_call_with_the_same_result(tiny_dit, precision, tolerance):
    # Measured (bench/cfg_batch_cpu_errors.py): fp32 9.9e-7, fp16 1.7e-3.
    r = cfg_batch_errors.batched_vs_separate(tiny_dit, precision)
    assert r["batched_calls"] == [2] * STEPS and r["separate_calls"] == [1] * (2 * STEPS)
    assert r["rel_error"] < tolerance


def test_by_default_only_a_streamed_dit_batches_the_prompts(tiny_dit):
    """`auto`: a resident DiT keeps ComfyUI's two calls a step (one call of batch 2 was slower on an H200,
    run28); one whose weights stream (dynamic VRAM, or ComfyUI's lowvram partial load) batches them, fetching
    each weight once a step instead of twice. The fp16 path follows the same rule: it reads its overflow flag once a
    step whatever the number of calls (pipeline/precision.py step_guard)."""
    from types import SimpleNamespace

    from pipeline import cfg_batch

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    resident, calls = cfg_batch_errors.sample(patcher, cond, uncond, mode="auto")
    assert calls == [1] * (2 * STEPS), "the resident CPU model keeps the prompts apart"
    always, calls = cfg_batch_errors.sample(patcher, cond, uncond, mode="always")
    assert calls == [2] * STEPS and stress.relative_error(always, resident) < 1e-5
    _, calls = cfg_batch_errors.sample(patcher, cond, uncond, mode="off")
    assert calls == [1] * (2 * STEPS)
    fp16, fp16_cfg = cfg_batch_errors.model(tiny_dit, "fp16")
    _, calls = cfg_batch_errors.sample(fp16, *cfg_batch_errors.prompts(fp16_cfg, 12, 5), mode="auto")
    assert calls == [1] * (2 * STEPS), "the resident fp16 model keeps them apart, as bf16 does"

    def model(dynamic=None, lowvram=False, fp16=None):
        patcher_ = None if dynamic is None else SimpleNamespace(is_dynamic=lambda: dynamic)
        return SimpleNamespace(current_patcher=patcher_, model_lowvram=lowvram, newbie_fp16=fp16)

    assert cfg_batch.weights_stream(model(dynamic=True))
    assert cfg_batch.weights_stream(model(dynamic=False, lowvram=True))
    assert cfg_batch.weights_stream(model(lowvram=True)), "a host without dynamic VRAM (v0.8.0)"
    assert not cfg_batch.weights_stream(model(dynamic=False)) and not cfg_batch.weights_stream(model())
    with cfg_batch_errors.batching("auto"):
        assert cfg_batch.wanted(model(dynamic=True)) and not cfg_batch.wanted(model(dynamic=False))
        assert not cfg_batch.wanted(model(dynamic=False, fp16=object())), "a resident fp16 DiT keeps two calls"
    with cfg_batch_errors.batching("off"):
        assert not cfg_batch.wanted(model(dynamic=True))


def test_a_dit_that_barely_streams_keeps_the_two_calls(comfy_import_path):
    """`auto` batches a streaming DiT only where a good share of its weights streams: at 8 GiB the bf16 DiT
    barely exceeds its room and two calls ran faster (5.66 against 5.44 it/s, run33); at 4 GiB most of it
    streams and batching won (0.59x upstream, run29). The loader's estimate sits on the BaseModel."""
    from types import SimpleNamespace

    from pipeline import cfg_batch

    def model(share, dynamic=True, fp16=None):
        m = SimpleNamespace(current_patcher=SimpleNamespace(is_dynamic=lambda: dynamic), model_lowvram=False,
                            newbie_fp16=fp16)
        if share is not None:
            setattr(m, cfg_batch.SHARE_ATTR, share)
        return m

    with cfg_batch_errors.batching("auto"):
        assert not cfg_batch.wanted(model(0.1)) and not cfg_batch.wanted(model(0.0))
        assert cfg_batch.wanted(model(cfg_batch.BATCH_FROM_STREAMED_SHARE)) and cfg_batch.wanted(model(0.7))
        assert cfg_batch.wanted(model(None)), "no estimate (a model the loader did not build): batch as it streams"
        assert not cfg_batch.wanted(model(0.1, fp16=object())), "fp16 follows the same rule"
        assert not cfg_batch.wanted(model(0.7, dynamic=False)), "a resident DiT never counts as streaming"
    with cfg_batch_errors.batching("always"):
        assert cfg_batch.wanted(model(0.0))


def test_the_padding_keys_must_be_dropped(tiny_dit):
    """The control: attending to the padding (the per-sample attention switched off) changes the result
    (measured 0.14, bench/cfg_batch_cpu_errors.py)."""
    assert cfg_batch_errors.padding_attended_error(tiny_dit) > 1e-2


def test_compiled_blocks_take_new_prompt_pairs_without_compiling_again(tiny_dit):
    """The paddings reach the compiled blocks as dynamic sizes: after the first two prompt pairs (the second makes
    the caption length dynamic) new pairs compile nothing, and the result is the eager one."""
    from torch._dynamo.utils import counters

    from pipeline import block_compile

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    pairs = [(12, 5), (20, 7), (9, 30), (25, 3)]
    prompts = [cfg_batch_errors.prompts(cfg, *pair, seed=i) for i, pair in enumerate(pairs)]
    eager = [cfg_batch_errors.sample(patcher, *p)[0] for p in prompts]
    torch._dynamo.reset()
    counters.clear()
    try:
        block_compile.apply(patcher)
        compiled = [cfg_batch_errors.sample(patcher, *p)[0] for p in prompts[:2]]
        before = block_compile.compiled_graph_count()
        compiled += [cfg_batch_errors.sample(patcher, *p)[0] for p in prompts[2:]]
        assert block_compile.compiled_graph_count() == before, "a new prompt pair compiled the blocks again"
        assert not dict(counters["graph_break"]), dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    for pair, c, e in zip(pairs, compiled, eager):
        assert stress.relative_error(c, e) < 1e-5, pair


def test_a_batch_split_by_the_oom_guard_keeps_each_rows_padding(tiny_dit):
    """The OOM Guard's last rung cuts a call into rows (pipeline/oom/calls.py); the caption paddings go with their
    rows, so each one-row piece still drops its own padding keys."""
    import comfy.patcher_extension as pe

    from pipeline.oom.calls import ModelCall

    def one_row_at_a_time(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                          **kwargs):
        call = ModelCall(x, t, c_concat, c_crossattn, control, transformer_options or {}, kwargs)
        return call.run(lambda piece: executor(piece.x, piece.t, piece.c_concat, piece.c_crossattn, piece.control,
                                               piece.transformer_options, **piece.kwargs), rows_per_piece=1)

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    separate, _ = cfg_batch_errors.sample(cfg_batch_errors.unbatched(patcher), cond, uncond)
    patcher.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_split", one_row_at_a_time)
    split, batches = cfg_batch_errors.sample(patcher, cond, uncond)
    assert batches == [1] * (2 * STEPS), "every call cut into rows"
    assert stress.relative_error(split, separate) < 1e-5


def test_another_nodes_attention_override_keeps_the_prompts_apart(tiny_dit):
    """An attention override from another node (a SageAttention patch, say) would attend to the padding: the
    prompts then run as ComfyUI runs them, two calls, and the result is unchanged."""
    import torch.nn.functional as F

    patcher, cfg = cfg_batch_errors.model(tiny_dit)
    cond, uncond = cfg_batch_errors.prompts(cfg, 12, 5)
    reference, _ = cfg_batch_errors.sample(cfg_batch_errors.unbatched(patcher), cond, uncond)

    def foreign(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        b, _, n, d = q.shape
        out = F.scaled_dot_product_attention(q, k, v)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, n, heads * d)

    patched = patcher.clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = foreign
    out, batches = cfg_batch_errors.sample(patched, cond, uncond)
    assert batches == [1] * (2 * STEPS)
    assert stress.relative_error(out, reference) < 1e-5
