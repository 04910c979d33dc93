"""pipeline/swiglu_fp8.py: the hand-written kernel for fp8's w2 input (NEWBIE_FP8_W2=kernel), which
bench/swiglu_kernel.py times against Inductor's. On the CPU its arithmetic runs under Triton's interpreter, which
decides at import, hence the subprocess; on a GPU its fp8 output is held to the error of the pack's own formula.
The feed-forward's patch runs on the CPU with the kernel's formula standing in for it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import quantized_ops, swiglu_fp8

ROOT = Path(__file__).resolve().parents[2]

_INTERPRETED = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
from pipeline import quantized_ops, swiglu_fp8
g = torch.Generator().manual_seed(0)
rows, cols = 7, {cols}
a = torch.randn(rows, cols, generator=g, dtype=torch.bfloat16) * 3
b = torch.randn(rows, cols, generator=g, dtype=torch.bfloat16)
a[2], b[5] = 0, b[5] * 1e4  # an all-zero row; a row far beyond e4m3's 448
a[4, -3], b[4, -3] = 4, 100  # a row whose amax is in its last columns
out, scale = swiglu_fp8.launch(a, b, rows_per_program=3, block={block}, num_warps=4, out_dtype=torch.float32)
other = swiglu_fp8.launch(a, b, rows_per_program=2, block={other_block}, num_warps=4, out_dtype=torch.float32)
h = torch.nn.functional.silu(a.float()) * b.float()
want_scale = h.abs().amax(-1, keepdim=True).clamp(min=quantized_ops._MIN_ROW_AMAX) / quantized_ops._E4M3_MAX
want = (h / want_scale).clamp(-quantized_ops._E4M3_MAX, quantized_ops._E4M3_MAX)
print(json.dumps({{
    "scale_rel": ((scale - want_scale).abs() / want_scale).max().item(),
    "value_abs": (out - want).abs().max().item(),
    "row_max": out.abs().amax(-1).tolist(),
    "zero_row": out[2].abs().max().item(),
    "same_as_other_form": torch.equal(out, other[0]) and torch.equal(scale, other[1]),
}}))
"""


# (columns, block: 128 for the two-pass kernel, None for the one-pass kernel, the other form's block)
_FORMS = {
    "two passes, a tail of 44 columns past 2 blocks of 128": (300, 128, None),
    "one pass, 256 + a block of 64 with 20 masked": (300, None, 128),
    "one pass, a power of two: one block": (256, None, 128),
}


@pytest.mark.parametrize("cols, block, other_block", list(_FORMS.values()), ids=list(_FORMS))
def test_the_kernel_scales_each_row_by_its_amax_under_the_interpreter(cols, block, other_block):
    """silu(g) * u in fp32, each row's scale its amax / 448, the values divided by it: every live row then reaches
    448 exactly, a row of zeros stays zero, and the column tail and the rows past the last are masked (3 programs
    of 3 rows: 2 dead rows). Both kernels compute the same values, bit for bit."""
    script = _INTERPRETED.format(root=str(ROOT), cols=cols, block=block, other_block=other_block)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["scale_rel"] < 1e-6, r
    assert r["value_abs"] < 1e-3, r  # of values up to 448: fp32 rounding of the sigmoid and the division
    assert r["zero_row"] == 0.0
    assert [m for i, m in enumerate(r["row_max"]) if i != 2] == pytest.approx([448.0] * 6, rel=1e-6)
    assert r["same_as_other_form"], r


def test_the_one_pass_blocks_cover_a_row_with_two_powers_of_two():
    assert swiglu_fp8.one_pass_blocks(9216) == (8192, 1024), "NewBie's width: nothing masked"
    assert swiglu_fp8.one_pass_blocks(2304) == (2048, 256)
    assert swiglu_fp8.one_pass_blocks(300) == (256, 64)
    assert swiglu_fp8.one_pass_blocks(256) == (256, 0)
    assert swiglu_fp8.one_pass_blocks(1) == (1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device machine)")
def test_the_kernels_fp8_is_as_close_to_fp32_as_the_packs_formula():
    """On a GPU, the e4m3 output dequantised is as close to the fp32 product as the pack's formula (the kernel
    Inductor fuses today), whose product is rounded to bf16 first."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(300, 9216, generator=g, device="cuda", dtype=torch.bfloat16) * 2
    b = torch.randn(300, 9216, generator=g, device="cuda", dtype=torch.bfloat16)
    h = torch.nn.functional.silu(a.float()) * b.float()

    def error(q, scale):
        return ((q.float() * scale - h).norm() / h.norm()).item()

    ours = error(*swiglu_fp8.swiglu_rowwise_e4m3(a, b))
    theirs = error(*quantized_ops.rowwise_e4m3(torch.nn.functional.silu(a) * b))
    assert ours < 0.05 and ours <= theirs * 1.05 + 1e-3, (ours, theirs)
    one_pass, two_passes = swiglu_fp8.launch(a, b, 1, None, 8), swiglu_fp8.launch(a, b, 5, 2048, 4)
    assert torch.equal(one_pass[0].view(torch.uint8), two_passes[0].view(torch.uint8))
    assert torch.equal(one_pass[1], two_passes[1])


@pytest.fixture
def fp8_gpu(comfy_on_cpu, comfy_device_is_the_cpu, monkeypatch):
    """A GPU that multiplies fp8 and computes in bf16, with the kernel's requirements met, played on the CPU."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    monkeypatch.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: torch.bfloat16)  # a GPU's choice
    monkeypatch.setattr(swiglu_fp8, "usable", lambda device: True)


@pytest.fixture
def kernel_mode(fp8_gpu, monkeypatch):
    """NEWBIE_FP8_W2=kernel on that GPU: the kernel replaced by its formula in fp32 (what the interpreter test holds
    the kernel to), so that the feed-forward's patch runs here."""
    monkeypatch.setenv("NEWBIE_FP8_W2", "kernel")
    monkeypatch.setattr(swiglu_fp8, "_kernel_runs_on", lambda t: True)
    monkeypatch.setattr(swiglu_fp8, "swiglu_rowwise_e4m3", _formula_op)
    _FORMULA_CALLS.clear()
    return _FORMULA_CALLS


_FORMULA_CALLS = []


@torch.library.custom_op("newbie_lowvram_test::swiglu_formula", mutates_args=())
def _formula_op(g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's formula in fp32, an op as opaque to Dynamo as the kernel's (a Python stand-in would be traced,
    its call list guarded)."""
    _FORMULA_CALLS.append(tuple(g.shape))
    return quantized_ops.rowwise_e4m3(torch.nn.functional.silu(g.float()) * u.float())


@_formula_op.register_fake
def _(g, u):
    return (g.new_empty(g.shape, dtype=torch.float8_e4m3fn), g.new_empty((g.shape[0], 1), dtype=torch.float32))


def _tiny_fp8_patcher():
    from devkit import tiny_models
    from pipeline import quantize

    dit = tiny_models.random_dit(torch.bfloat16)
    return tiny_models.dit_patcher(quantize.quantize_state_dict(dit, "fp8"), "fp8", "tiny-fp8")


def _patched_call(patcher, cfg, ffs, forward) -> torch.Tensor:
    """One DiT call with ComfyUI's patches applied, each feed-forward's forward being `forward`."""
    from devkit.dit_calls import dit_call

    patcher.patch_model()
    try:
        assert all(getattr(ff.forward, '__func__', None) is forward for ff in ffs)
        return dit_call(patcher, cfg)
    finally:
        patcher.unpatch_model()


@pytest.mark.host
def test_kernel_mode_patches_every_feed_forward_and_keeps_the_rowwise_output(kernel_mode, monkeypatch):
    """With NEWBIE_FP8_W2=kernel every NextDiT feed-forward (refiners and main layers) gets the fused forward
    through ComfyUI's object patches: patched, each w2 input comes from the kernel and the DiT's output stays within
    the bf16 rounding of the product of the default row-wise path's; unpatched, ComfyUI's forward is back."""
    from devkit import stress
    from devkit.dit_calls import dit_call

    patcher, cfg = _tiny_fp8_patcher()
    ffs = [m for m in patcher.model.diffusion_model.modules() if type(m).__name__ == "FeedForward"]
    keys = [k for k in patcher.object_patches if k.endswith("feed_forward.forward")]
    assert ffs and len(keys) == len(ffs) and swiglu_fp8.attached(patcher), (len(ffs), keys)
    default = dit_call(patcher, cfg)  # object patches apply only when ComfyUI patches the model
    assert kernel_mode == []
    fused = _patched_call(patcher, cfg, ffs, swiglu_fp8.fused_forward)
    assert len(kernel_mode) == len(ffs), (len(ffs), kernel_mode)  # one DiT call: each feed-forward once
    assert 0 < stress.relative_error(fused, default) < 0.02
    assert not any(getattr(ff.forward, '__func__', None) is swiglu_fp8.fused_forward for ff in ffs)
    assert dit_call(patcher, cfg).equal(default)


@pytest.mark.host
def test_kernel1_mode_gives_every_feed_forward_the_one_pass_op(fp8_gpu, monkeypatch):
    """NEWBIE_FP8_W2=kernel1: the same patches, each w2 input from the one-pass kernel's op (the two-pass op is not
    called), and the log and the loader's report name the switch."""
    from devkit import stress
    from devkit.dit_calls import dit_call

    monkeypatch.setenv("NEWBIE_FP8_W2", "kernel1")
    monkeypatch.setattr(swiglu_fp8, "_kernel_runs_on", lambda t: True)
    monkeypatch.setattr(swiglu_fp8, "swiglu_rowwise_e4m3_one_pass", _formula_op)
    monkeypatch.setattr(swiglu_fp8, "swiglu_rowwise_e4m3", None)
    _FORMULA_CALLS.clear()
    patcher, cfg = _tiny_fp8_patcher()
    ffs = [m for m in patcher.model.diffusion_model.modules() if type(m).__name__ == "FeedForward"]
    default = dit_call(patcher, cfg)
    fused = _patched_call(patcher, cfg, ffs, swiglu_fp8.fused_forward_one_pass)
    assert len(_FORMULA_CALLS) == len(ffs), (len(ffs), _FORMULA_CALLS)
    assert 0 < stress.relative_error(fused, default) < 0.02
    assert swiglu_fp8.switch_words() == "NEWBIE_FP8_W2=kernel1, in one pass"
    monkeypatch.setenv("NEWBIE_FP8_W2", "kernel")
    assert swiglu_fp8.switch_words() == "NEWBIE_FP8_W2=kernel"


@pytest.mark.host
@pytest.mark.parametrize("switch", [None, "bf16"])
def test_without_kernel_mode_no_feed_forward_is_patched(fp8_gpu, monkeypatch, switch):
    if switch is None:
        monkeypatch.delenv("NEWBIE_FP8_W2", raising=False)
    else:
        monkeypatch.setenv("NEWBIE_FP8_W2", switch)
    patcher, _ = _tiny_fp8_patcher()
    assert not [k for k in patcher.object_patches if k.endswith("feed_forward.forward")]
    assert not swiglu_fp8.attached(patcher)


@pytest.mark.parametrize("op_attr, op_name", [("swiglu_rowwise_e4m3", swiglu_fp8.OP_NAME),
                                               ("swiglu_rowwise_e4m3_one_pass", swiglu_fp8.OP_NAME_ONE_PASS)])
def test_compiled_code_calls_the_kernel_as_one_op_and_new_row_counts_do_not_recompile(op_attr, op_name):
    """Dynamo traces the op with fake tensors (no graph break, the op in the graph), and a third row count reuses
    the dynamic graph made at the second: a caption of new length costs no compile. Traced only: the kernel's
    arithmetic is the interpreter test's, and Triton's interpreter cannot run a `triton_op` (its `wrap_triton`
    takes compiled kernels only)."""
    graphs = []
    op = getattr(swiglu_fp8, op_attr)

    def backend(gm, example_inputs):
        graphs.append(gm)

        def not_run(*args):
            raise _NotRun

        return not_run

    @torch.compile(backend=backend)
    def w2_input(g, u):
        return op(g * 1.0, u)

    torch._dynamo.reset()
    try:
        for rows in (5, 9, 13):  # static at 5, dynamic from 9
            with pytest.raises(_NotRun):
                w2_input(torch.randn(rows, 64, dtype=torch.bfloat16), torch.randn(rows, 64, dtype=torch.bfloat16))
    finally:
        torch._dynamo.reset()
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert len(graphs) == 2, [gm.code for gm in graphs]
    assert sum(t == op_name.replace("::", ".") + ".default" for t in targets) == 2, targets


class _NotRun(Exception):
    pass


@pytest.mark.host
def test_patched_feed_forwards_compile_no_more_graphs_than_comfys(kernel_mode, monkeypatch):
    """The compiled blocks of a DiT whose feed-forwards are patched make as many graphs as those of the same DiT
    unpatched, over two prompt lengths and a third: every block shares its graphs, as before. (A callable object per
    feed-forward was guarded by identity, so each block compiled its own graphs until Dynamo's recompile limit and
    then ran eagerly: run94.)"""
    from torch._dynamo.utils import counters

    from devkit.dit_calls import dit_call, dit_inputs
    from pipeline import block_compile

    def graphs(patched: bool) -> int:
        patcher, cfg = _tiny_fp8_patcher()
        torch._dynamo.reset()
        counters.clear()
        block_compile.apply(patcher)
        if patched:
            patcher.patch_model()
        try:
            for n in (12, 20, 33):
                dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), n))
            assert not dict(counters["graph_break"]), dict(counters["graph_break"])
            return block_compile.compiled_graph_count()
        finally:
            if patched:
                patcher.unpatch_model()
            torch._dynamo.reset()

    unpatched = graphs(False)
    assert kernel_mode == []
    assert graphs(True) == unpatched and kernel_mode, (unpatched, len(kernel_mode))


@pytest.mark.host
def test_a_w2_with_a_weight_function_takes_comfys_path(kernel_mode):
    """Where ComfyUI runs a weight function on a w2 (a LoRA applied at each call, say), that feed-forward
    multiplies through ComfyUI's forward, which calls the function, and the others still take the kernel."""
    from devkit.dit_calls import dit_call

    patcher, cfg = _tiny_fp8_patcher()
    ffs = [m for m in patcher.model.diffusion_model.modules() if type(m).__name__ == "FeedForward"]
    seen = []
    patcher.patch_model()  # sets each layer's weight functions from the patcher's patches (none): set one after
    try:
        ffs[0].w2.weight_function = [lambda weight: seen.append(1) or weight]
        dit_call(patcher, cfg)
    finally:
        patcher.unpatch_model()
    assert seen and len(kernel_mode) == len(ffs) - 1, (len(seen), len(kernel_mode), len(ffs))
