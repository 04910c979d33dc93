"""The pack's attention (pipeline/sdpa.py): the backend order it asks PyTorch for, that a CPU or an older GPU keeps
PyTorch's own order, that the order is a priority (the result is SDPA's), and that the choice compiles without a
graph break inside a block, as the pack's compiled blocks trace it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from pipeline import sdpa


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, 17, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("CUDNN", "cudnn"), ("flash", "flash"),
                                             ("torch", "torch"), ("bogus", "auto")])
def test_mode_from_the_environment(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("NEWBIE_SDPA", raising=False)
    else:
        monkeypatch.setenv("NEWBIE_SDPA", value)
    assert sdpa.mode() == expected


@pytest.mark.parametrize("value", ["auto", "cudnn", "flash", "torch"])
def test_cpu_tensors_keep_pytorchs_order(monkeypatch, value):
    monkeypatch.setenv("NEWBIE_SDPA", value)
    assert sdpa.first_backend(torch.device("cpu")) is None


@pytest.mark.parametrize("capability, value, expected", [
    ((9, 0), "auto", "cudnn"), ((10, 0), "auto", "cudnn"), ((8, 9), "auto", None), ((7, 5), "auto", None),
    ((8, 9), "cudnn", "cudnn"), ((9, 0), "flash", "flash"), ((9, 0), "torch", None)])
def test_cuda_order_by_capability_and_switch(monkeypatch, capability, value, expected):
    monkeypatch.setenv("NEWBIE_SDPA", value)
    monkeypatch.setattr(sdpa.torch.cuda, "get_device_capability", lambda index: capability)
    assert sdpa.first_backend(torch.device("cuda", 0)) == expected


def test_order_lists_every_backend_with_the_chosen_one_first():
    assert sdpa._order("cudnn")[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    assert sdpa._order("flash")[:2] == [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for first in ("cudnn", "flash"):
        assert set(sdpa._order(first)) >= {SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH}


@pytest.mark.parametrize("first", [None, "cudnn", "flash"])
def test_a_priority_not_a_restriction(monkeypatch, qkv, first):
    """On a CPU neither cuDNN nor flash-on-GPU can run: with either first, PyTorch falls through to a CPU
    backend and the result is plain SDPA's, bit for bit."""
    monkeypatch.setattr(sdpa, "first_backend", lambda device: first)
    q, k, v = qkv
    mask = torch.rand(2, 1, 17, 17) > 0.2
    assert torch.equal(sdpa.sdpa(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(sdpa.sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_the_order_is_set_only_around_the_call(monkeypatch, qkv):
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa, "first_backend", lambda device: "cudnn")
    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", spy)
    before = torch._C._get_sdp_priority_order()
    sdpa.sdpa(*qkv)
    assert seen == [[int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)]]
    assert torch._C._get_sdp_priority_order() == before


@pytest.mark.parametrize("first", ["cudnn", None])
def test_compiles_without_a_graph_break(monkeypatch, qkv, first):
    monkeypatch.setattr(sdpa, "first_backend", lambda device: first)

    def block(q, k, v):
        return sdpa.sdpa(q * 2, k, v) + 1

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(*qkv), block(*qkv))


def test_compiled_the_order_comes_from_around_the_call_and_aotautograd_caches_the_graph(monkeypatch, qkv):
    """A `sdpa_kernel` context inside a compiled graph makes AOTAutograd's on-disk cache refuse the graph (on an
    H200, run47: "4 bypass" for the blocks, traced again at every server start). Compiled, sdpa() leaves the order
    to around_call, which holds it around the whole DiT call: the graph is cacheable and gives SDPA's result."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(sdpa, "first_backend", lambda device: "cudnn")
    monkeypatch.setattr(sdpa, "sdpa_first", lambda device: "cudnn")

    def block(q, k, v):
        return sdpa.sdpa(q * 2, k, v) + 1

    orders = []

    def dit_call(x, q, k, v):  # a DIFFUSION_MODEL executor: the latent first
        orders.append(torch._C._get_sdp_priority_order()[:2])
        return compiled(q, k, v)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, backend="inductor")
    try:
        out = sdpa.around_call(dit_call, qkv[0], *qkv)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(out, block(*qkv), atol=1e-6)
    assert orders == [[int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.FLASH_ATTENTION)]]
    aot = counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0 and aot["autograd_cache_miss"] + aot["autograd_cache_hit"] == 1, aot


@pytest.mark.parametrize("user_tag, expected", [("", "newbie-attention-cudnn"), ("mine", "mine|newbie-attention-cudnn")])
def test_around_call_tags_the_compile_caches_with_the_attention(monkeypatch, qkv, user_tag, expected):
    """Two attention choices trace the same graph (plain SDPA; the order is outside it): the cache-key tag keeps a
    graph cached under one choice from being loaded for another, and a user's own tag is kept."""
    config = torch.compiler.config
    monkeypatch.setattr(sdpa, "first_backend", lambda device: "cudnn")
    monkeypatch.setattr(sdpa, "sdpa_first", lambda device: None)
    tags = []
    with config.patch(cache_key_tag=user_tag):
        sdpa.around_call(lambda x: tags.append(config.cache_key_tag), qkv[0])
        assert config.cache_key_tag == user_tag, "restored after the call"
    assert tags == [expected]


def test_the_choice_is_a_constant_inside_a_compiled_block(monkeypatch, qkv):
    """As a compiled block traces it, the choice is evaluated once: the capability check does not break the trace
    (a tuple comparison on it did, on the H200), and no guard watches the environment (a guard on os.environ
    would re-check it at every block call)."""
    monkeypatch.setenv("NEWBIE_SDPA", "auto")
    monkeypatch.setattr(sdpa.torch.cuda, "get_device_capability", lambda index: (9, 0))

    def decide(x):
        return x + 1 if sdpa._first_backend_constant(torch.device("cuda", 0)) == "cudnn" else x - 1

    torch._dynamo.reset()
    assert torch.equal(torch.compile(decide, fullgraph=True, backend="eager")(torch.zeros(2)), torch.ones(2))

    guards = []

    def keep_all(entries):
        guards.extend(e.name for e in entries)
        return [True] * len(entries)

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: sdpa.sdpa(q, k, v) * 2, fullgraph=True, backend="eager",
                             options={"guard_filter_fn": keep_all})
    assert torch.allclose(compiled(*qkv), F.scaled_dot_product_attention(*qkv) * 2)
    assert guards and not [g for g in guards if "environ" in g], guards


def test_the_pack_attention_goes_through_it(monkeypatch, qkv, comfy_import_path):
    """precision.sdpa_override (bf16, fp32, fp8, int8) and the fp16 path's attention both ask pipeline.sdpa."""
    from pipeline import precision

    asked = []
    monkeypatch.setattr(sdpa, "first_backend", lambda device: asked.append(device.type) or None)
    q, k, v = qkv
    precision.sdpa_override(None, q, k, v, 3, skip_reshape=True)
    precision.attention_override(precision.FP16State())(None, q, k, v, 3, skip_reshape=True)
    assert asked == ["cpu", "cpu"]
