"""pipeline/qkv_rope.py: NextDiT's q/k RMSNorm + RoPE and v from one kernel (on where it runs; NEWBIE_QKV_ROPE=0).
On the CPU the kernel's arithmetic runs under Triton's interpreter (which decides at import, hence the subprocess)
against the pack's PyTorch form (`rms_rope`, which tests/unit/test_rope_fusion.py holds to comfy-kitchen's own
`rms_rope1`); the patched attention runs in the real host's DiT with that PyTorch form standing in for the kernel
(the interpreter cannot run a `triton_op`), and gives the host's output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devkit.rope_freqs import rotations
from pipeline import qkv_rope

ROOT = Path(__file__).resolve().parents[2]

_INTERPRETED = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from devkit.rope_freqs import rotations
from pipeline import qkv_rope
g = torch.Generator().manual_seed(0)
B, N, H, HKV, D = 2, 5, 3, 1, 10  # 3 heads (a block of 4), 5 pairs (a block of 8): masked lanes in both
out = {{}}
for dtype in (torch.float32, torch.bfloat16):
    for freqs_batch in (1, B):
        qkv = (torch.randn(B, N, (H + 2 * HKV) * D, generator=g) * 3).to(dtype)
        qkv[1, 2, :D] = 0  # a head of zeros: the epsilon keeps it finite
        freqs = rotations(torch.randn(freqs_batch, N, 1, D // 2, generator=g))
        qw, kw = (torch.randn(D, generator=g).to(dtype) for _ in range(2))
        got = qkv_rope.launch(qkv, freqs, qw, kw, 1e-6, H, HKV)
        want = qkv_rope.reference(qkv, freqs, qw, kw, 1e-6, H, HKV)
        out[f"{{dtype}} {{freqs_batch}}"] = {{
            "shapes": [list(t.shape) == list(w.shape) and t.is_contiguous() for t, w in zip(got, want)],
            "dtypes": [t.dtype == dtype for t in got],
            "finite": all(bool(t.isfinite().all()) for t in got),
            # the largest difference against the largest value, and the share of values not equal
            "rel": [((t.float() - w.float()).abs().max() / w.float().abs().max()).item() for t, w in zip(got, want)],
            "unequal": [(t != w).float().mean().item() for t, w in zip(got, want)],
        }}
print(json.dumps(out))
"""


def test_the_kernel_computes_the_pytorch_form_under_the_interpreter():
    """q and k normalised and rotated, v copied, each contiguous: in fp32 equal to the PyTorch form but for the
    order of one sum; in bf16 at most two roundings apart (the normalised value's and the output's, each 2**-8 of
    the largest value, the frequencies being at most 1), as Triton's interpreter rounds toward zero where a GPU
    rounds to nearest (the GPU test below holds the kernel closer); with the frequencies of one sample for all and
    of each sample."""
    script = _INTERPRETED.format(root=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for case, r in results.items():
        assert all(r["shapes"]) and all(r["dtypes"]) and r["finite"], (case, r)
        assert r["unequal"][2] == 0.0, ("v is copied", case, r)
        if "float32" in case:
            assert max(r["rel"]) < 1e-6, (case, r)
        else:
            assert max(r["rel"]) <= 2 ** -6, (case, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)")
def test_on_a_gpu_the_kernel_is_the_pytorch_form_at_newbies_shapes():
    """NewBie's attention (24 heads, 8 key/value heads of 96) over a 1024x1024 image and a caption, bf16: q and k a
    rounding apart in a few values (the order of one sum), v equal; as the op and as launched directly."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(1, 4356, 40 * 96, generator=g, device="cuda", dtype=torch.bfloat16) * 2
    freqs = _freqs(1, 4356, 96).cuda()
    qw, kw = (torch.rand(96, generator=g, device="cuda", dtype=torch.bfloat16) + 0.5 for _ in range(2))
    want = qkv_rope.reference(qkv, freqs, qw, kw, 1e-6, 24, 8)
    for got in (qkv_rope.qkv_norm_rope(qkv, freqs, qw, kw, 1e-6, 24, 8),
                qkv_rope.launch(qkv, freqs, qw, kw, 1e-6, 24, 8)):
        for t, w in zip(got[:2], want[:2]):
            assert t.shape == w.shape and t.is_contiguous()
            assert ((t.float() - w.float()).abs().max() / w.float().abs().max()).item() <= 2 ** -7
            assert (t != w).float().mean().item() < 0.01
        assert torch.equal(got[2], want[2])


def _freqs(batch, n, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return rotations(torch.randn(batch, n, 1, d // 2, generator=g))


def test_the_reference_splits_as_the_host_does():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 4, (4 + 2 * 2) * 8, generator=g)
    q, k, v = qkv_rope.reference(qkv, _freqs(1, 4, 8), torch.ones(8), torch.ones(8), 1e-6, 4, 2)
    assert (q.shape, k.shape, v.shape) == ((1, 4, 4, 8), (1, 4, 2, 8), (1, 4, 2, 8))
    assert torch.equal(v, qkv[..., 48:].reshape(1, 4, 2, 8))
    # without rotation (cos 1, sin 0) and unit weights, q is the RMS-normalised head
    unit = torch.zeros(1, 4, 1, 4, 2, 2)
    unit[..., 0, 0] = unit[..., 1, 1] = 1
    q, _, _ = qkv_rope.reference(qkv, unit, torch.ones(8), torch.ones(8), 1e-6, 4, 2)
    head = qkv[..., :32].reshape(1, 4, 4, 8)
    assert torch.allclose(q, head * torch.rsqrt(head.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)


def _tiny_patcher(precision="bf16"):
    from devkit import tiny_models

    return tiny_models.dit_patcher(tiny_models.random_dit(torch.bfloat16), precision, "tiny-qkv-rope")


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
def test_on_by_default_where_the_kernel_runs_and_off_on_a_cpu_or_by_the_switch(monkeypatch):
    monkeypatch.delenv(qkv_rope.SWITCH, raising=False)
    assert not qkv_rope.usable("cpu")
    patcher = _tiny_patcher()[0]
    assert not qkv_rope.attached(patcher), "no kernel on a CPU"
    assert qkv_rope.describe(patcher).endswith("(the pack's kernel needs a CUDA GPU with Triton)")
    monkeypatch.setattr(qkv_rope, "usable", lambda device: True)  # a GPU's answer
    patcher = _tiny_patcher()[0]
    assert qkv_rope.attached(patcher)
    assert qkv_rope.describe(patcher).startswith("attention inputs: q/k RMSNorm + RoPE and v by the pack's kernel")
    monkeypatch.setenv(qkv_rope.SWITCH, "0")
    patcher = _tiny_patcher()[0]
    assert not qkv_rope.attached(patcher)
    assert qkv_rope.describe(patcher) == "attention inputs: ComfyUI's q/k RMSNorm + RoPE (NEWBIE_QKV_ROPE=0)"


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_the_patched_attentions_give_the_hosts_output(monkeypatch, precision):
    """On a GPU (played on the CPU: the kernel's PyTorch form stands in for it), every attention of
    the host's DiT gets the forward, which hands the host's attention the same q, k and v and gives the DiT's
    output within rounding; where the kernel does not apply (here: the CPU) the host's forward runs, bit for bit.
    The fp16 path, which scales q and k itself, is left alone."""
    import comfy.model_management as mm

    from devkit import stress
    from devkit.dit_calls import dit_call, dit_inputs

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: False)  # a CPU's answer, on a GPU's machine
    monkeypatch.setattr(qkv_rope, "usable", lambda device: True)
    monkeypatch.setenv(qkv_rope.SWITCH, "0")
    plain, cfg = _tiny_patcher(precision)
    inputs = dit_inputs(cfg, "cpu", (8, 8), 12)
    plain.patch_model()
    try:
        want = dit_call(plain, cfg, inputs)
    finally:
        plain.unpatch_model()

    monkeypatch.delenv(qkv_rope.SWITCH)  # on by default
    patcher, cfg = _tiny_patcher(precision)
    attentions = [n for n, m in patcher.model.diffusion_model.named_modules() if type(m).__name__ == "JointAttention"]
    keys = [k for k in patcher.object_patches if k.endswith(".attention.forward")]
    assert attentions and len(keys) == len(attentions), (keys, attentions)
    assert qkv_rope.attached(patcher)
    patcher.patch_model()
    try:
        assert torch.equal(dit_call(patcher, cfg, inputs), want), "the host's forward where the kernel does not apply"
        used = []

        def kernel_stand_in(*args):
            used.append(args[0].shape)
            return qkv_rope.reference(*args)

        monkeypatch.setattr(qkv_rope, "applies", lambda attn, x, freqs: True)
        monkeypatch.setattr(qkv_rope, "qkv_norm_rope", kernel_stand_in)
        got = dit_call(patcher, cfg, inputs)
    finally:
        patcher.unpatch_model()
    assert len(used) == len(attentions), used
    assert stress.relative_error(got, want) < (1e-5 if precision == "fp32" else 1e-2)
    fp16 = _tiny_patcher("fp16")[0]
    assert not qkv_rope.attached(fp16), "the fp16 path keeps its own attention"
    assert qkv_rope.describe(fp16).endswith("(the fp16 path scales q and k itself)")


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
def test_the_packs_attention_gets_each_groups_key_and_value_head_once(monkeypatch):
    """After the kernel the pack's own attention gets k and v as the kernel made them, each group's head once (the
    tiny DiT: 2 query heads, 1 key/value head), where ComfyUI's forward copies them; another node's attention
    override gets the copies. The DiT's output is the same either way."""
    from devkit.dit_calls import dit_call, dit_inputs
    from pipeline import precision

    monkeypatch.setattr(qkv_rope, "usable", lambda device: True)
    monkeypatch.setattr(qkv_rope, "applies", lambda attn, x, freqs: True)
    monkeypatch.setattr(qkv_rope, "qkv_norm_rope", qkv_rope.reference)
    heads, real = [], precision.sdpa

    def recording(q, k, v, **kwargs):
        heads.append((q.shape[1], k.shape[1], v.shape[1]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(precision, "sdpa", recording)
    patcher, cfg = _tiny_patcher("fp32")
    inputs = dit_inputs(cfg, "cpu", (8, 8), 12)
    opts = patcher.model_options["transformer_options"]
    assert opts[qkv_rope.OVERRIDE] is precision.sdpa_override
    patcher.patch_model()
    try:
        grouped = dit_call(patcher, cfg, inputs)
        assert heads and set(heads) == {(2, 1, 1)}, heads
        heads.clear()
        opts[qkv_rope.OVERRIDE] = lambda func, *args, **kwargs: precision.sdpa_override(func, *args, **kwargs)
        copies = dit_call(patcher, cfg, inputs)
        assert heads and set(heads) == {(2, 2, 2)}, heads
    finally:
        patcher.unpatch_model()
    assert torch.allclose(grouped, copies, rtol=1e-5, atol=1e-5)


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
def test_flash_attn4_gets_the_kernels_key_and_value_heads_eager_and_compiled(monkeypatch):
    """With flash-attn-4 chosen (its op, whose SDPA fallback runs on a CPU), the kernel's k and v reach the op as the
    kernel made them (the tiny DiT's one key/value head), eager and in compiled blocks, and the DiT's output is the
    host forward's."""
    from devkit import stress
    from devkit.dit_calls import dit_call, dit_inputs
    from pipeline import block_compile, flash_attn4, sdpa

    monkeypatch.setattr(qkv_rope, "usable", lambda device: True)
    monkeypatch.setattr(sdpa, "_first_backend_constant", lambda device: "fa4")
    monkeypatch.setattr(flash_attn4, "takes", lambda q, k, v: q.shape[1] % k.shape[1] == 0)  # fp32 too, here
    heads, body = [], flash_attn4._flash_layout_attention

    def recording(q, k, v):  # the op's body, [B, N, H, D]
        heads.append((q.shape[2], k.shape[2], v.shape[2]))
        return body(q, k, v)

    monkeypatch.setattr(flash_attn4, "_flash_layout_attention", recording)
    monkeypatch.setenv(qkv_rope.SWITCH, "0")
    plain, cfg = _tiny_patcher("fp32")
    inputs = dit_inputs(cfg, "cpu", (8, 8), 12)
    want = dit_call(plain, cfg, inputs)
    monkeypatch.setenv(qkv_rope.SWITCH, "1")
    monkeypatch.setattr(qkv_rope, "applies", lambda attn, x, freqs: True)
    monkeypatch.setattr(qkv_rope, "qkv_norm_rope", qkv_rope.reference)
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            patcher, _ = _tiny_patcher("fp32")
            if compiled:
                block_compile.apply(patcher)
            heads.clear()
            before = block_compile.compiled_graph_count()
            patcher.patch_model()
            try:
                got = dit_call(patcher, cfg, inputs)
            finally:
                patcher.unpatch_model()
            assert (block_compile.compiled_graph_count() > before) == compiled
            assert heads and set(heads) == {(2, 1, 1)}, (compiled, heads)
            assert stress.relative_error(got, want) < 1e-5, compiled
    finally:
        torch._dynamo.reset()


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
def test_compiled_blocks_of_a_patched_dit_make_as_many_graphs_and_the_same_output(monkeypatch):
    """Compiled blocks (pipeline/block_compile.py, with a backend that records each traced graph and runs it) of a
    DiT whose attentions take the kernel (its PyTorch form standing in) trace as many graphs as the unpatched DiT
    over two caption lengths (one forward function for every attention: no graph per block, no graph break at the
    host's attention function) and give its output."""
    from devkit import stress
    from devkit.dit_calls import dit_call, dit_inputs
    from pipeline import block_compile

    monkeypatch.setattr(qkv_rope, "usable", lambda device: True)
    monkeypatch.setattr(qkv_rope, "applies", lambda attn, x, freqs: True)
    monkeypatch.setattr(qkv_rope, "qkv_norm_rope", qkv_rope.reference)

    def compiled_calls(patched: bool):
        monkeypatch.setenv(qkv_rope.SWITCH, "1" if patched else "0")
        patcher, cfg = _tiny_patcher("fp32")
        assert qkv_rope.attached(patcher) == patched
        graphs = []

        def recording(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        block_compile.apply(patcher, backend=recording)
        patcher.patch_model()
        try:
            outs = [dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), n)) for n in (12, 20)]
        finally:
            patcher.unpatch_model()
            torch._dynamo.reset()
        return outs, len(graphs)

    plain, plain_graphs = compiled_calls(False)
    fused, graphs = compiled_calls(True)
    assert graphs == plain_graphs and graphs > 0, (plain_graphs, graphs)
    for a, b in zip(fused, plain):
        assert stress.relative_error(a, b) < 1e-5


def test_the_kernel_takes_norm_weights_the_host_casts_but_not_those_a_weight_function_patches():
    norm = torch.nn.RMSNorm(8)
    norm.comfy_cast_weights, norm.weight_function = True, []
    assert qkv_rope._plain_norm(norm, torch.device("cpu")), "ComfyUI's cast layer: cast to the input's dtype"
    norm.weight_function = [lambda w: w]
    assert not qkv_rope._plain_norm(norm, torch.device("cpu")), "a LoRA's weight function"
    assert not qkv_rope._plain_norm(torch.nn.RMSNorm(8), torch.device("meta")), "a weight elsewhere"
    assert not qkv_rope._plain_norm(torch.nn.Identity(), torch.device("cpu")), "no q/k norm (ComfyUI v0.8's Identity)"


def test_only_nextdits_frequency_layout_takes_the_kernel():
    x = torch.zeros(2, 5, 4 * 8)
    assert qkv_rope._frequencies_fit(_freqs(1, 5, 8), x, 8) and qkv_rope._frequencies_fit(_freqs(2, 5, 8), x, 8)
    assert not qkv_rope._frequencies_fit(_freqs(1, 6, 8), x, 8), "more frequencies than tokens"
    assert not qkv_rope._frequencies_fit(_freqs(3, 5, 8), x, 8), "another batch"
    assert not qkv_rope._frequencies_fit(_freqs(1, 5, 8).transpose(-1, -2), x, 8), "pairs not contiguous"
    assert not qkv_rope._frequencies_fit(_freqs(1, 5, 8)[..., 0], x, 8), "not [.., D/2, 2, 2]"
