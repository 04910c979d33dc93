"""pipeline/fa4_replay.py: a flash-attn-4 call of a signature met before launches the kernel that flash-attn-4's own
Python found, kept only when that launch is plain and its replay is bit-identical. flash-attn-4 needs a CUDA GPU
(tests/unit/test_grouped_attention_gpu.py runs the real one on the device machine); here a forward function shaped
like its `_flash_attn_fwd` (a kernel cache, the locals `compile_key` and `call_args`) drives the logic on the CPU."""
from __future__ import annotations

import sys
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from pipeline import fa4_replay


class Aux(NamedTuple):  # as flash-attn-4's AuxData of an unmasked call
    tensors: tuple | None = None
    scalars: tuple | None = None


class FakeFlashAttention:
    """`forward` has the shape of flash-attn-4's `_flash_attn_fwd`; `attention` that of `flash_attn_func`."""

    def __init__(self, extra_tensor=False, noisy=False, rename=False):
        self.kernel_calls = 0
        self.forward_calls = 0
        self.extra_tensor, self.noisy, self.rename = extra_tensor, noisy, rename
        fake = self

        def kernel(q, k, v, out, lse, scale, cu_q, workspace, aux, options):
            fake.kernel_calls += 1
            rep = q.shape[2] // k.shape[2]
            ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                                 v.transpose(1, 2).repeat_interleave(rep, 1), scale=scale)
            out.copy_(ref.transpose(1, 2) + (fake.kernel_calls * 1e-3 if fake.noisy else 0))

        def _flash_attn_fwd(q, k, v):
            fake.forward_calls += 1
            out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
            compile_key = (q.dtype, q.shape[-1], q.shape[2] // k.shape[2])
            workspace = torch.zeros(4) if fake.extra_tensor else None
            call_args = [q.detach(), k.detach(), v.detach(), out.detach(), None, q.shape[-1] ** -0.5, None,
                         workspace, Aux(), (None, None)]
            if fake.rename:
                launch_args, call_args = call_args, None
                _flash_attn_fwd.compile_cache[compile_key](*launch_args)
            else:
                _flash_attn_fwd.compile_cache[compile_key](*call_args)
            return out, None, None, None, None

        _flash_attn_fwd.compile_cache = {(torch.float32, 16, 3): kernel}
        self.forward = _flash_attn_fwd

    def attention(self, q, k, v):
        out, lse, *_ = self.forward(q, k, v)
        return out, lse


def _qkv(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, h, 16, generator=g) for h in (6, 2, 2))


def _calls(fake, replays, count, **kw):
    return [replays.call(fake.attention, *_qkv(**kw)) for _ in range(count)]


def test_the_second_call_is_watched_and_later_ones_launch_the_kernel_directly():
    fake = FakeFlashAttention()
    replays = fa4_replay.Replays(fake.forward)
    q, k, v = _qkv()
    expected = fake.attention(q, k, v)[0]
    fake.forward_calls = fake.kernel_calls = 0
    outs = [replays.call(fake.attention, q, k, v) for _ in range(5)]
    # calls 1 and 2 through the forward (2 watched, then replayed once to check it), 3-5 straight to the kernel
    assert fake.forward_calls == 2
    assert fake.kernel_calls == 2 + 1 + 3
    for out in outs:
        assert torch.equal(out, expected)
    (recorded,) = [r for r in replays.launches.values()]
    assert recorded is not None
    # the kept launch holds slots, not the watched call's tensors
    assert [a for a in recorded.args if isinstance(a, torch.Tensor)] == []
    assert sys.getprofile() is None


def test_each_signature_is_watched_on_its_own():
    fake = FakeFlashAttention()
    replays = fa4_replay.Replays(fake.forward)
    _calls(fake, replays, 3, n=10)
    _calls(fake, replays, 3, n=12)
    assert len(replays.launches) == 2
    assert fake.forward_calls == 4
    q, k, v = _qkv(n=12, seed=3)
    assert torch.equal(replays.call(fake.attention, q, k, v), fake.attention(q, k, v)[0])
    # a layout change (a transposed view) is another signature
    assert fa4_replay.signature(q, k, v) != fa4_replay.signature(q, k.transpose(1, 2).contiguous().transpose(1, 2), v)


@pytest.mark.parametrize("kind", ["extra_tensor", "noisy", "rename"])
def test_a_launch_that_is_not_plain_or_not_reproduced_keeps_the_ordinary_path(kind):
    fake = FakeFlashAttention(**{kind: True})
    replays = fa4_replay.Replays(fake.forward)
    _calls(fake, replays, 4)
    assert list(replays.launches.values()) == [None]
    assert fake.forward_calls == 4  # every call through flash-attn-4's own Python


def test_nothing_is_watched_under_another_profile_hook():
    fake = FakeFlashAttention()
    replays = fa4_replay.Replays(fake.forward)
    seen = []
    hook = lambda frame, event, arg: seen.append(event)  # noqa: E731 - a stand-in profiler
    sys.setprofile(hook)
    try:
        _calls(fake, replays, 3)
        assert sys.getprofile() is hook
    finally:
        sys.setprofile(None)
    assert replays.launches == {}
    assert fake.forward_calls == 3


def test_a_forward_without_a_kernel_cache_is_never_watched():
    replays = fa4_replay.Replays(None)
    fake = FakeFlashAttention()
    _calls(fake, replays, 3)
    assert replays.launches == {} and fake.forward_calls == 3


def test_plan_takes_each_call_tensor_once_and_only_plain_values():
    q, k, v = _qkv()
    out = torch.empty(1, 10, 6, 16)
    kernel = object()
    plain = [q, k, v, out, None, 0.25, Aux(), (None, (None,)), torch.bfloat16, "x"]
    assert fa4_replay.plan(kernel, plain, (q, k, v, out)) is not None
    assert fa4_replay.plan(kernel, [q, k, v], (q, k, v, out)) is None  # the output missing
    assert fa4_replay.plan(kernel, [q, k, k, out], (q, k, v, out)) is None  # a tensor twice
    assert fa4_replay.plan(kernel, [q, k, v, out, Aux((q,))], (q, k, v, out)) is None  # a tensor inside
    assert fa4_replay.plan(kernel, [q, k, v, out, object()], (q, k, v, out)) is None  # an unknown object
    assert fa4_replay.plan(kernel, [q, k, v, out.clone()], (q, k, v, out)) is None  # other memory


def test_a_call_that_needs_gradients_keeps_the_ordinary_path():
    fake = FakeFlashAttention()
    replays = fa4_replay.Replays(fake.forward)
    q, k, v = _qkv()
    q.requires_grad_(True)
    for _ in range(3):
        replays.call(fake.attention, q, k, v)
    assert replays.launches == {} and fake.forward_calls == 3
    with torch.no_grad():
        for _ in range(3):
            replays.call(fake.attention, q, k, v)
    assert fake.forward_calls == 3 + 2  # without gradients: watched on its second call, then launched directly


def test_new_signatures_past_the_cap_take_the_ordinary_path(monkeypatch):
    monkeypatch.setattr(fa4_replay, "MAX_SIGNATURES", 2)
    fake = FakeFlashAttention()
    replays = fa4_replay.Replays(fake.forward)
    for n in (10, 11, 12):
        _calls(fake, replays, 3, n=n)
    assert len(replays.seen) == 2 and len(replays.launches) == 2
    assert fake.forward_calls == 2 + 2 + 3  # the third length: every call through flash-attn-4's own Python


def test_the_switch_off_calls_flash_attn4_every_time(monkeypatch):
    monkeypatch.setenv("NEWBIE_FA4_REPLAY", "0")
    fake = FakeFlashAttention()
    replays = fa4_replay.Replays(fake.forward)
    _calls(fake, replays, 4)
    assert replays.launches == {} and fake.forward_calls == 4
