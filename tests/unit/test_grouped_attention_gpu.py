"""NewBie's grouped key/value heads handed to the real kernels once each (pipeline/kv_repeat.py, pipeline/sdpa.py):
on a CUDA GPU, flash-attn-4 and PyTorch SDPA given one head of each of ComfyUI's side-by-side copies compute the
attention that the copies give, eager and in a compiled function. CI has no GPU: these run on the device machine
(bench/README.md), flash-attn-4's only where it is installed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import fa4_replay, flash_attn4, sdpa

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# NewBie's attention at 1024² (4096 image tokens and a caption; an odd total on purpose): 24 query heads, 8 key/value
# heads of 96, ComfyUI's K/V copied 3 times side by side
B, HQ, HKV, N, D = 2, 24, 8, 4096 + 77, 96
REP = HQ // HKV


@pytest.fixture
def qkv_copies():
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, N, D, generator=g, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    return q, k.repeat_interleave(REP, dim=1), v.repeat_interleave(REP, dim=1)


def _reference(q, k, v):
    """fp32 attention of the copies, by PyTorch's math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float())


def _close(out, ref):
    err = (out.float() - ref).abs().max().item()
    assert err < 2e-2, f"max abs error {err} against fp32 attention"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("route", ["fa4", "cudnn"])
def test_one_head_of_each_group_gives_the_attention_of_the_copies(qkv_copies, route, compiled, monkeypatch):
    if route == "fa4" and not flash_attn4.installed():
        pytest.skip("flash-attn-4 is not installed")
    monkeypatch.setenv("NEWBIE_SDPA", route)
    assert sdpa.first_backend(torch.device("cuda", 0)) == route
    q, k, v = qkv_copies

    def grouped(q, k, v):
        return sdpa.sdpa(q, k, v, kv_repeat=REP, grouped_sdpa=True)

    def copies(q, k, v):
        return sdpa.sdpa(q, k, v)

    if compiled:
        torch._dynamo.reset()  # the backend choice is baked into a compiled function (assume_constant_result)
        grouped, copies = torch.compile(grouped, fullgraph=True), torch.compile(copies, fullgraph=True)
    out, out_copies = grouped(q, k, v), copies(q, k, v)
    assert out.shape == (B, HQ, N, D)
    ref = _reference(q, k, v)
    _close(out, ref)
    _close(out_copies, ref)
    assert not flash_attn4._FAILED, f"flash-attn-4 fell back to SDPA: {flash_attn4._FAILED}"


@pytest.mark.parametrize("heads", ["grouped", "copies"])
def test_flash_attn4_launched_directly_gives_its_own_output_bit_for_bit(qkv_copies, heads):
    """pipeline/fa4_replay.py on the real flash-attn-4: NewBie's call (K/V as kv_repeat slices them from ComfyUI's
    copies, or the copies) is kept for direct launches, and every replay equals flash-attn-4's own call exactly."""
    if not flash_attn4.installed():
        pytest.skip("flash-attn-4 is not installed")
    q, k, v = (t.transpose(1, 2) for t in qkv_copies)  # flash-attn-4's [batch, tokens, heads, head size]
    if heads == "grouped":
        k, v = k[:, :, ::REP], v[:, :, ::REP]
    attention = flash_attn4.kernel()
    expected = attention(q, k, v)[0]
    replays = fa4_replay.for_flash_attn4()
    outs = [replays.call(attention, q, k, v) for _ in range(4)]
    (kept,) = replays.launches.values()
    assert kept is not None, "this flash-attn-4's launch was not kept (pipeline/fa4_replay.py's log says why)"
    for out in outs:
        assert torch.equal(out, expected)
    # a second signature (batch 1) is kept on its own and replays its own shape
    q1, k1, v1 = q[:1], k[:1], v[:1]
    outs1 = [replays.call(attention, q1, k1, v1) for _ in range(3)]
    assert len([r for r in replays.launches.values() if r is not None]) == 2
    assert torch.equal(outs1[-1], attention(q1, k1, v1)[0])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("route", ["fa4", "cudnn"])
def test_key_and_value_heads_that_come_grouped_give_the_attention_of_the_copies(qkv_copies, route, compiled,
                                                                                 monkeypatch):
    """k and v with each group's head once, in the layout pipeline/qkv_rope.py's kernel makes ([B, N, H, D]
    contiguous, seen as [B, H, N, D]): flash-attn-4 takes them as they are, and with cuDNN first PyTorch's own checks
    say it takes them grouped (`takes_grouped`; on this GPU it must, or the default would copy them again)."""
    if route == "fa4" and not flash_attn4.installed():
        pytest.skip("flash-attn-4 is not installed")
    monkeypatch.setenv("NEWBIE_SDPA", route)
    q, k, v = qkv_copies
    kg, vg = (t[:, ::REP].transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    if route == "cudnn":
        assert sdpa.takes_grouped("cudnn", q.device, q.dtype, HQ, HKV, D), "cuDNN's check refused grouped heads"
    sdpa.takes_grouped.cache_clear()

    def grouped(q, k, v):
        return sdpa.sdpa(q, k, v, kv_repeat=REP, grouped_sdpa=True)

    if compiled:
        torch._dynamo.reset()
        grouped = torch.compile(grouped, fullgraph=True)
    out = grouped(q, kg, vg)
    assert out.shape == (B, HQ, N, D)
    _close(out, _reference(q, k, v))
    assert not flash_attn4._FAILED, f"flash-attn-4 fell back to SDPA: {flash_attn4._FAILED}"
