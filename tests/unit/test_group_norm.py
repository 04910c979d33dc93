"""pipeline/group_norm.py: the FLUX VAE's GroupNorms by the pack's kernels (on where they run;
NEWBIE_VAE_GROUP_NORM=0). On the CPU the kernels run under Triton's interpreter (which decides at import, hence the
subprocess) against F.group_norm; the routing runs in the real host's VAE, through ComfyUI's object patches and
its own decode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline import group_norm

ROOT = Path(__file__).resolve().parents[2]

_INTERPRETED = r"""
import json, sys, torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from pipeline import group_norm as gn
# small tiles and few programs, so that a small group is cut into several chunks of several tiles with a short last
# tile and a short last chunk
gn.MOMENTS_BLOCK, gn.MOMENTS_TILES, gn.APPLY_BLOCK = 16, 3, 16
g = torch.Generator().manual_seed(0)
out = {{}}
cases = [((2, 6, 7, 9), 3, True, True, 0.0), ((1, 8, 5, 11), 4, False, True, 0.0), ((2, 4, 13), 2, True, False, 0.0),
         ((1, 4, 6, 10), 2, False, False, 0.0), ((1, 4, 6, 10), 1, True, True, 500.0)]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape, groups, has_w, has_b, offset in cases:
        x = (torch.randn(*shape, generator=g) * 3 + offset).to(dtype)
        w = torch.randn(shape[1], generator=g).to(dtype) if has_w else None
        b = torch.randn(shape[1], generator=g).to(dtype) if has_b else None
        got = gn.group_norm(x, groups, w, b, 1e-6)
        want = F.group_norm(x.float(), groups, None if w is None else w.float(), None if b is None else b.float(),
                            1e-6)
        out[f"{{dtype}} {{shape}} {{groups}} {{has_w}} {{has_b}} {{offset}}"] = {{
            "shape": list(got.shape) == list(x.shape), "dtype": got.dtype == dtype, "finite": bool(got.isfinite().all()),
            "rel": ((got.float() - want).abs().max() / want.abs().max()).item(),
            "splits": gn.split_plan(x.numel() // (shape[0] * groups), gn.MOMENTS_BLOCK, gn.MOMENTS_TILES)[0]}}
print(json.dumps(out))
"""


def test_the_kernels_compute_group_norm_under_the_interpreter():
    """Against fp32 GroupNorm, with and without weight and bias, 3-D and 4-D, groups split into several chunks with
    short tails, and values centred far from zero (the statistics keep deviations, not raw sums of squares): fp32
    to float rounding, bf16 and fp16 within their output rounding (the interpreter rounds toward zero)."""
    done = subprocess.run([sys.executable, "-c", _INTERPRETED.format(root=str(ROOT))], capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 15
    assert any(r["splits"] > 1 for r in results.values()), "no case split a group"
    for name, r in results.items():
        assert r["shape"] and r["dtype"] and r["finite"], name
        limit = 1e-5 if "float32" in name else 2 ** -7 if "bfloat16" in name else 2 ** -10
        assert r["rel"] < limit, (name, r["rel"])


@pytest.mark.parametrize("size,block,tiles", [(4 << 20, 2048, 8), (65536, 2048, 8), (100, 16, 3), (48, 16, 3),
                                             (7, 4, 1)])
def test_the_split_plan_covers_each_group_exactly_once(size, block, tiles):
    splits, chunk = group_norm.split_plan(size, block, tiles)
    assert chunk == block * tiles
    assert (splits - 1) * chunk < size <= splits * chunk, "every value in one chunk, no empty chunk"


def test_fits_takes_what_the_kernels_compute_and_leaves_the_rest():
    big = torch.zeros(1, 64, 64, 64)  # 2 groups of 32 x 4096 values
    w, b = torch.ones(64), torch.zeros(64)
    assert group_norm.fits(big, 2, w, b) and group_norm.fits(big, 2)
    assert group_norm.fits(big.to(torch.bfloat16), 2, w, b), "the parameters in another dtype, as fp32"
    assert not group_norm.fits(big, 32), "groups of 8192 values stay with PyTorch"
    assert not group_norm.fits(big, 3), "channels not divisible by the groups"
    assert not group_norm.fits(big.transpose(2, 3), 2), "not contiguous"
    assert not group_norm.fits(big.to(memory_format=torch.channels_last), 2), "channels-last"
    assert not group_norm.fits(big.double(), 2)
    assert not group_norm.fits(big.flatten(1), 2), "no spatial dimension"
    assert not group_norm.fits(big, 2, torch.ones(32)), "a weight of another size"
    assert not group_norm.fits(big, 2, torch.ones(128)[::2]), "a strided weight"
    assert not group_norm.fits(big, 2, None, torch.zeros(64, dtype=torch.float64))
    assert not group_norm.fits(big.requires_grad_(), 2), "training stays with PyTorch"
    with torch.no_grad():
        assert group_norm.fits(big, 2)
    assert not group_norm.takes(big.detach(), 2), "a CPU tensor goes to PyTorch"


def test_the_mode_sends_group_norm_to_the_kernels_and_nothing_else(monkeypatch):
    """However the call names its arguments, F.group_norm under FastGroupNorm reaches `group_norm` with them where
    `takes` says so; other calls and refused ones run as PyTorch's."""
    seen = []

    def fake(x, groups, weight, bias, eps):
        seen.append((groups, weight is not None, bias is not None, eps))
        return torch.full_like(x, 7.0)

    monkeypatch.setattr(group_norm, "group_norm", fake)
    monkeypatch.setattr(group_norm, "takes", lambda x, groups, w=None, b=None: x.shape[1] != 3)
    x = torch.randn(1, 4, 8, 8)
    module = torch.nn.GroupNorm(2, 4, eps=1e-3)
    refused = torch.randn(1, 3, 8, 8)
    expected = F.group_norm(refused, 3)
    with torch.no_grad(), group_norm.FastGroupNorm():
        assert (module(x) == 7).all()
        assert (F.group_norm(x, 2) == 7).all()
        assert (F.group_norm(x, num_groups=4, weight=module.weight, eps=0.5) == 7).all()
        assert torch.equal(F.group_norm(refused, 3), expected)
        conv = F.conv2d(x, torch.ones(1, 4, 1, 1))
    assert seen == [(2, True, True, 1e-3), (2, False, False, 1e-5), (4, True, False, 0.5)]
    assert torch.allclose(conv, x.sum(1, keepdim=True)), "other functions untouched"
    assert torch.equal(F.group_norm(x, 2), torch.nn.GroupNorm(2, 4, affine=False)(x)), "the mode ends with the block"


def _groupnorms(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))


def test_kernels_that_fail_leave_the_work_to_pytorch_once_and_for_all(monkeypatch, caplog):
    """A failure of the kernels (say, a Triton that cannot compile them) gives PyTorch's result with one warning, and
    later calls go straight to PyTorch; running out of memory is raised for ComfyUI's tiled retry."""
    attempts = []

    def broken(*args):
        attempts.append(1)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(group_norm, "_failed", [])
    monkeypatch.setattr(group_norm, "group_norm", broken)
    monkeypatch.setattr(group_norm, "takes", lambda *a: True)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), group_norm.FastGroupNorm():
        first, second = F.group_norm(x, 2), F.group_norm(x, 2)
    assert torch.equal(first, F.group_norm(x, 2)) and torch.equal(second, first)
    assert len(attempts) == 1, "tried once"
    warnings = [r for r in caplog.records if "GroupNorm kernels failed" in r.getMessage()]
    assert len(warnings) == 1 and "no compiler here" in warnings[0].getMessage()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(group_norm, "_failed", [])
    monkeypatch.setattr(group_norm, "group_norm", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError), torch.no_grad(), group_norm.FastGroupNorm():
        F.group_norm(x, 2)
    assert group_norm._failed == [], "running out of memory does not turn the kernels off"


@pytest.mark.host
def test_the_vae_decodes_and_encodes_through_the_mode_in_the_host(tiny_parts, monkeypatch):
    """The real host's VAE, given the patches: ComfyUI's own decode and encode (which load the VAE through its
    model management, applying the object patches) send every GroupNorm of the decoder and encoder to the fast form,
    and give what the unpatched VAE gives; unpatched (ComfyUI unpatches at unload), none."""
    import comfy.model_management as mm

    from pipeline import loader

    calls = []

    def counted(x, groups, weight, bias, eps):
        calls.append(x.shape)
        return F.group_norm(x, groups, weight, bias, eps)  # inside the mode's handler: PyTorch's own

    monkeypatch.setattr(group_norm, "group_norm", counted)
    monkeypatch.setattr(group_norm, "takes", lambda x, *a: True)
    monkeypatch.setattr(group_norm, "usable", lambda device: True)
    vae = loader.build_vae(tiny_parts)
    assert group_norm.attached(vae) and "GroupNorm statistics" in group_norm.describe(vae)
    monkeypatch.setattr(group_norm, "usable", lambda device: False)
    plain = loader.build_vae(tiny_parts)
    assert not group_norm.attached(plain) and "PyTorch's GroupNorm" in group_norm.describe(plain)
    latent = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    image = vae.decode(latent)
    n_decoder = _groupnorms(vae.first_stage_model.decoder)
    assert len(calls) == n_decoder > 0
    assert torch.equal(image, plain.decode(latent)), "the same image"
    assert len(calls) == n_decoder, "the plain VAE goes to PyTorch"
    calls.clear()
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    encoded = vae.encode(pixels)
    assert len(calls) == _groupnorms(vae.first_stage_model.encoder) > 0
    assert torch.equal(encoded, plain.encode(pixels))
    mm.unload_all_models()
    calls.clear()
    vae.first_stage_model.decode(latent.to(vae.vae_dtype))
    assert calls == [], "unpatched once ComfyUI unloads the VAE"


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(group_norm.SWITCH, "0")
    assert not group_norm.enabled()
    monkeypatch.setenv(group_norm.SWITCH, "1")
    assert group_norm.enabled()
    monkeypatch.delenv(group_norm.SWITCH)
    assert group_norm.enabled()
    assert not group_norm.usable("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_kernels_match_pytorch_at_the_vae_shapes_on_the_gpu(dtype):
    """The decoder's shapes at 1024² (and a 2-sample batch): against fp32 GroupNorm, no further than PyTorch's own
    GroupNorm in `dtype` is, plus one rounding of the output; in fp32 (where the reference is PyTorch's own) within
    what summing 4 M values in another order moves the statistics (run131: 1.4e-7 of the largest value)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((1, 512, 128, 128), (1, 256, 512, 512), (1, 128, 1024, 1024), (2, 512, 256, 256)):
        x = (torch.randn(*shape, device="cuda", generator=g) * 2 + 0.5).to(dtype)
        w = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
        b = torch.randn(shape[1], device="cuda", generator=g).to(dtype)
        assert group_norm.takes(x, 32, w, b)
        with torch.inference_mode():
            got = group_norm.group_norm(x, 32, w, b, 1e-6)
            theirs = F.group_norm(x, 32, w, b, 1e-6)
        want = F.group_norm(x.float(), 32, w.float(), b.float(), 1e-6)
        ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -16}[dtype]
        scale = want.abs().max()
        assert (got.float() - want).abs().max() <= (theirs.float() - want).abs().max() + ulp * scale, shape
