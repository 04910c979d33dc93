"""FlashAttention-4 gets NewBie's grouped key/value heads once each (pipeline/kv_repeat.py): the check of ComfyUI's
repeat order on the host's own attention class, and a DiT call through the pack's attention with a CPU stand-in for
FlashAttention-4 (which needs a GPU), against the call that hands it ComfyUI's copies."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from devkit import dit_calls, tiny_models
from host_features import dynamic_vram_module

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("comfy_on_cpu")]

# The tiny DiT with two key/value heads (the standard tiny one has one, whose copies any order leaves equal).
GQA = dataclasses.replace(tiny_models.TINY, dit=dataclasses.replace(tiny_models.TINY.dit, dim=192, n_heads=4,
                                                                    n_kv_heads=2))


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    from pipeline import kv_repeat

    monkeypatch.setattr(kv_repeat, "_CHECKED", {})
    monkeypatch.delenv("NEWBIE_FA4_GQA", raising=False)
    monkeypatch.delenv("NEWBIE_SDPA_GQA", raising=False)


def _patcher(spec=GQA, precision="fp32"):
    sd = tiny_models.random_dit(torch.float32, spec)
    return tiny_models.dit_patcher(sd, precision, "tiny-gqa")


def test_side_by_side_copies_are_told_from_tiled_ones():
    from pipeline import kv_repeat

    heads = torch.randn(1, 2, 5, 8)
    assert kv_repeat.side_by_side(heads.repeat_interleave(3, dim=1), 3)
    assert not kv_repeat.side_by_side(heads.repeat(1, 3, 1, 1), 3), "tiled copies: h0 h1 h0 h1 h0 h1"
    assert not kv_repeat.side_by_side(heads.repeat_interleave(3, dim=1), 2)
    same = torch.randn(1, 1, 5, 8).expand(1, 2, 5, 8)
    assert not kv_repeat.side_by_side(same.repeat_interleave(3, dim=1), 3), "equal originals prove nothing"


def test_the_hosts_attention_passes_its_copies_side_by_side(comfy_import_path, monkeypatch):
    from pipeline import kv_repeat

    patcher, _ = _patcher()
    dm = patcher.model.diffusion_model
    assert kv_repeat.factor(dm) == 2
    assert patcher.model_options["transformer_options"][kv_repeat.KEY] == 2, "the loader sets it"
    plain, _ = _patcher(dataclasses.replace(GQA, dit=dataclasses.replace(GQA.dit, n_kv_heads=4)))
    assert kv_repeat.factor(plain.model.diffusion_model) == 1, "no grouped heads"
    assert plain.model_options["transformer_options"][kv_repeat.KEY] == 1, "the key is always there"
    monkeypatch.setenv("NEWBIE_FA4_GQA", "0")
    assert kv_repeat.factor(dm) == 1


def test_the_check_runs_where_comfys_layers_wait_for_their_weights(comfy_import_path, monkeypatch):
    """Under dynamic VRAM (aimdo) ComfyUI's layers are made without weights until a state dict loads; the check
    must not depend on them (the server's check failed so, run108). Hosts without dynamic VRAM (v0.8) have no
    such layers."""
    from pipeline import kv_repeat

    memory_management = dynamic_vram_module()

    dm = _patcher()[0].model.diffusion_model
    monkeypatch.setattr(kv_repeat, "_CHECKED", {})
    monkeypatch.setattr(memory_management, "aimdo_enabled", True)
    assert kv_repeat.factor(dm) == 2


def test_a_check_that_fails_or_finds_another_order_leaves_the_copies(comfy_import_path, monkeypatch):
    from pipeline import kv_repeat

    dm = _patcher()[0].model.diffusion_model

    def broken(*args):
        raise TypeError("another JointAttention")

    monkeypatch.setattr(kv_repeat, "_CHECKED", {})  # the loader checked already
    monkeypatch.setattr(kv_repeat, "_probe", broken)
    assert kv_repeat.factor(dm) == 1
    monkeypatch.setattr(kv_repeat, "_CHECKED", {})
    monkeypatch.setattr(kv_repeat, "side_by_side", lambda t, n: False)
    assert kv_repeat.factor(dm) == 1


@pytest.fixture
def fa4_stand_in(monkeypatch):
    """FlashAttention-4 as the chosen attention, computed on the CPU by SDPA with grouped heads; records the key
    heads it was given."""
    from pipeline import flash_attn4, sdpa

    given = []

    def attention(q, k, v):
        given.append(k.shape[1])
        grouped = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped) if grouped else \
            F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(sdpa, "_first_backend_constant", lambda device: "fa4")
    monkeypatch.setattr(flash_attn4, "takes", lambda q, k, v: q.shape[1] % k.shape[1] == 0)  # fp32 too, here
    monkeypatch.setattr(flash_attn4, "attention", attention)
    return given


def test_flash_attn4_gets_one_head_of_each_group_and_gives_the_same_call(comfy_import_path, fa4_stand_in,
                                                                         monkeypatch):
    from pipeline import flash_attn4, kv_repeat

    patcher, cfg = _patcher()
    grouped = dit_calls.dit_call(patcher, cfg)
    assert set(fa4_stand_in) == {2}, "every attention of the call took the 2 key/value heads"
    fa4_stand_in.clear()
    patcher.model_options["transformer_options"][kv_repeat.KEY] = 1
    copies = dit_calls.dit_call(patcher, cfg)
    assert set(fa4_stand_in) == {4}
    assert torch.allclose(grouped, copies, rtol=1e-5, atol=1e-5)
    # the control: the same heads in another order (h0 h1 h0 h1) change the call, so the test sees a wrong order
    monkeypatch.setattr(flash_attn4, "attention",
                        lambda q, k, v: F.scaled_dot_product_attention(q, k[:, ::2].repeat(1, 2, 1, 1),
                                                                       v[:, ::2].repeat(1, 2, 1, 1)))
    assert not torch.allclose(dit_calls.dit_call(patcher, cfg), copies, rtol=1e-3, atol=1e-3)


@pytest.fixture
def sdpa_heads(monkeypatch):
    """The key heads and keywords each PyTorch SDPA call of the pack's attention gets."""
    from pipeline import sdpa

    seen = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", recording)
    return seen


def test_pytorch_sdpa_gets_grouped_heads_where_its_backend_takes_them(comfy_import_path, sdpa_heads, monkeypatch):
    """PyTorch SDPA gets one of each with enable_gqa where the backend it runs with the copies takes grouped heads
    too (pipeline/sdpa.py `takes_grouped`, which says no on a CPU: the copies), and the same call;
    NEWBIE_SDPA_GQA=0 keeps the copies anyway."""
    from pipeline import kv_repeat, sdpa

    patcher, cfg = _patcher()
    assert kv_repeat.from_options(patcher.model_options["transformer_options"]) == (2, True), "allowed by default"
    copies = dit_calls.dit_call(patcher, cfg)
    assert sdpa_heads and set(sdpa_heads) == {(4, False)}, "the CPU's backends: the copies"
    sdpa_heads.clear()
    monkeypatch.setattr(sdpa, "_takes_grouped_constant", lambda *args: True)  # a GPU backend's answer
    grouped = dit_calls.dit_call(patcher, cfg)
    assert set(sdpa_heads) == {(2, True)}
    assert torch.allclose(grouped, copies, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("NEWBIE_SDPA_GQA", "0")
    sdpa_heads.clear()
    kept, _ = _patcher()
    assert kv_repeat.from_options(kept.model_options["transformer_options"]) == (2, False)
    dit_calls.dit_call(kept, cfg)
    assert set(sdpa_heads) == {(4, False)}
    plain, _ = _patcher(dataclasses.replace(GQA, dit=dataclasses.replace(GQA.dit, n_kv_heads=4)))
    assert kv_repeat.from_options(plain.model_options["transformer_options"]) == (1, False), "nothing grouped"


def test_grouped_heads_go_only_where_the_backend_run_with_copies_takes_them():
    """`grouped_keeps_the_backend` with stand-in capability checks: in a known order the first backend that runs
    the copies must take grouped heads; in PyTorch's own order (unknown) every one that runs the copies must."""
    from pipeline.sdpa import grouped_keeps_the_backend

    def backends(plain, grouped):
        return lambda name, g: name in (grouped if g else plain)

    cudnn_first = ["cudnn", "flash", "efficient"]
    assert grouped_keeps_the_backend(cudnn_first, backends({"cudnn", "flash"}, {"cudnn"}))
    assert not grouped_keeps_the_backend(cudnn_first, backends({"cudnn", "flash"}, {"flash"})), "cuDNN would drop"
    assert grouped_keeps_the_backend(cudnn_first, backends({"flash"}, {"flash"})), "cuDNN declines both: flash runs"
    assert not grouped_keeps_the_backend(cudnn_first, backends(set(), set())), "only math runs: nothing to win"
    assert not grouped_keeps_the_backend(None, backends({"cudnn", "flash"}, {"cudnn"}))
    assert grouped_keeps_the_backend(None, backends({"cudnn", "flash"}, {"cudnn", "flash", "efficient"}))


def test_pytorch_is_asked_once_a_kind_of_call_and_a_cpu_keeps_the_copies():
    from pipeline import sdpa

    sdpa.takes_grouped.cache_clear()
    assert not sdpa.takes_grouped("cudnn", torch.device("cpu"), torch.bfloat16, 24, 8, 96)
    assert sdpa.takes_grouped.cache_info().misses == 1
    sdpa.takes_grouped("cudnn", torch.device("cpu"), torch.bfloat16, 24, 8, 96)
    assert sdpa.takes_grouped.cache_info().hits == 1


def test_k_and_v_that_come_grouped_are_copied_for_sdpa_where_it_does_not_take_them(monkeypatch):
    """pipeline/qkv_rope.py's forward hands the pack's attention k and v with each group's head once: SDPA gets them
    grouped where it takes them, copied side by side where not (a mask, a backend that declines), the same call
    either way."""
    from pipeline import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 6, 8, generator=g) for h in (4, 2, 2))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    for takes in (False, True):
        monkeypatch.setattr(sdpa, "_takes_grouped_constant", lambda *args, t=takes: t)
        for grouped_sdpa in (False, True):
            assert torch.allclose(sdpa.sdpa(q, k, v, kv_repeat=2, grouped_sdpa=grouped_sdpa), want, atol=1e-6)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    assert torch.allclose(sdpa.sdpa(q, k, v, attn_mask=mask, kv_repeat=2, grouped_sdpa=True), want, atol=1e-6)


def test_compiled_blocks_give_pytorch_sdpa_grouped_heads_where_it_takes_them(comfy_import_path, monkeypatch):
    from pipeline import block_compile, sdpa

    patcher, cfg = _patcher()
    copies = dit_calls.dit_call(patcher, cfg)
    monkeypatch.setattr(sdpa, "_takes_grouped_constant", lambda *args: True)
    try:
        torch._dynamo.reset()
        compiled, _ = _patcher()
        block_compile.apply(compiled)
        out = dit_calls.dit_call(compiled, cfg)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out, copies, rtol=1e-4, atol=1e-4)


def test_compiled_blocks_give_the_op_one_head_of_each_group_and_the_same_call(comfy_import_path, monkeypatch):
    """Inside compiled blocks (Inductor on the CPU) the slices become buffers of their own, in FlashAttention's
    layout, for the pack's flash-attn-4 op (its SDPA fallback runs here); the call is the eager one with the copies,
    and the blocks compile no more graphs than with the copies."""
    from pipeline import block_compile, flash_attn4, kv_repeat, sdpa

    monkeypatch.setattr(sdpa, "_first_backend_constant", lambda device: "fa4")
    monkeypatch.setattr(flash_attn4, "takes", lambda q, k, v: q.shape[1] % k.shape[1] == 0)
    heads, body = [], flash_attn4._flash_layout_attention

    def recording(q, k, v):  # the op's body, [B, N, H, D]
        heads.append(k.shape[2])
        return body(q, k, v)

    monkeypatch.setattr(flash_attn4, "_flash_layout_attention", recording)
    patcher, cfg = _patcher()
    patcher.model_options["transformer_options"][kv_repeat.KEY] = 1
    copies = dit_calls.dit_call(patcher, cfg)
    graphs = {}
    try:
        for factor in (1, 2):
            torch._dynamo.reset()
            compiled, _ = _patcher()
            compiled.model_options["transformer_options"][kv_repeat.KEY] = factor
            before = block_compile.compiled_graph_count()
            block_compile.apply(compiled)
            heads.clear()
            out = dit_calls.dit_call(compiled, cfg)
            graphs[factor] = block_compile.compiled_graph_count() - before
            assert torch.allclose(out, copies, rtol=1e-4, atol=1e-4), factor
            assert heads and set(heads) == {4 // factor}, (factor, heads)
    finally:
        torch._dynamo.reset()
    assert graphs[2] == graphs[1] > 0, graphs


def test_the_loader_report_says_when_the_copies_go_as_one(comfy_import_path):
    from pipeline import sdpa

    cpu = torch.device("cpu")
    assert sdpa.describe(cpu, 3) == ("attention: PyTorch SDPA (PyTorch's own order; ComfyUI's 3 copies of each "
                                     "key/value head go to flash-attn-4 as one)")
    assert sdpa.describe(cpu, 3, True).endswith("go to flash-attn-4 as one, and to PyTorch SDPA so where its "
                                               "backend takes grouped heads)")
    assert sdpa.describe(cpu, 1) == sdpa.describe(cpu) == "attention: PyTorch SDPA (PyTorch's own order)"


def test_a_batched_prompt_pair_gives_flash_attn4_one_head_of_each_group_per_sample(comfy_import_path,
                                                                                    fa4_stand_in):
    """The pack's batching of a prompt pair (pipeline/cfg_batch.py) runs the attention per sample without the
    padding keys; each sample's keys then go to flash-attn-4 grouped, and the run is the two separate calls'."""
    from devkit import cfg_batch_errors

    sd = tiny_models.random_dit(torch.float32, GQA)
    r = cfg_batch_errors.batched_vs_separate(sd, "fp32")
    assert r["batched_calls"] == [2] * cfg_batch_errors.STEPS
    assert set(fa4_stand_in) == {2} and r["rel_error"] < 1e-5, (set(fa4_stand_in), r["rel_error"])
