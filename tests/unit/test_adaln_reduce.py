"""pipeline/adaln_reduce.py: the blocks' adaLN modulation as a product summed over its inputs inside compiled
blocks (NEWBIE_ADALN=reduce): the same numbers as the Linear, a sum and no matrix product in the traced graph,
ComfyUI's forward wherever the layer is cast, patched, quantized or the input is not one the reduction suits, and
the compiled blocks of a patched DiT sharing their graphs as before."""
from __future__ import annotations

import pytest
import torch

from pipeline import adaln_reduce


def _modulation(bias=True):
    """A block's `adaLN_modulation`: SiLU then a Linear of 64 -> 256, with ComfyUI's attributes of a plain layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 256, bias=bias)
    lin.comfy_cast_weights, lin.weight_function, lin.bias_function = False, [], []
    return torch.nn.Sequential(torch.nn.SiLU(), lin)


def _patched(seq):
    lin = seq[len(seq) - 1]
    lin.forward = adaln_reduce.reduced_forward.__get__(lin)
    return seq


@pytest.mark.parametrize("bias", [True, False])
def test_the_reduction_is_the_linear_in_fp32_and_as_close_to_it_as_bf16_allows(bias):
    seq = _modulation(bias=bias)
    lin = seq[1]
    x = torch.randn(2, 64)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.allclose(adaln_reduce.reduced(x, lin.weight, lin.bias), want, atol=1e-5, rtol=1e-5)
    xb, wb = x.bfloat16(), lin.weight.bfloat16()
    bb = lin.bias.bfloat16() if bias else None
    ours = adaln_reduce.reduced(xb, wb, bb)
    ref = torch.nn.functional.linear(xb.float(), wb.float(), bb.float() if bias else None)
    assert ours.dtype == torch.bfloat16
    # one bf16 rounding of the fp32 result: at most half an ulp (2**-8 relative)
    assert ((ours.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()


def test_only_a_plain_small_input_of_the_weights_dtype_and_device_takes_the_reduction():
    lin = _modulation()[1]
    x = torch.randn(2, 64)
    assert adaln_reduce.takes_reduction(lin, x)
    assert adaln_reduce.takes_reduction(lin, torch.randn(adaln_reduce.MAX_ROWS, 64))
    assert not adaln_reduce.takes_reduction(lin, torch.randn(adaln_reduce.MAX_ROWS + 1, 64)), "a big batch"
    assert not adaln_reduce.takes_reduction(lin, x.bfloat16()), "another dtype"
    assert not adaln_reduce.takes_reduction(lin, x[None]), "a 3-D input"
    lin.weight_function = [lambda w: w]
    assert not adaln_reduce.takes_reduction(lin, x), "a LoRA's weight function"
    lin.weight_function, lin.bias_function = [], [lambda b: b]
    assert not adaln_reduce.takes_reduction(lin, x), "a bias function"
    lin.bias_function, lin.comfy_cast_weights = [], True
    assert not adaln_reduce.takes_reduction(lin, x), "weights ComfyUI casts at each call"
    lin.comfy_cast_weights = False
    weight = lin.weight.detach()
    del lin.weight
    lin.weight = weight.as_subclass(_Packed)
    assert not adaln_reduce.takes_reduction(lin, x), "a weight of a tensor subclass (a quantized one, say)"


class _Packed(torch.Tensor):
    """A tensor subclass standing in for a quantized weight (ComfyUI's QuantizedTensor is one)."""


def test_eagerly_the_layer_keeps_its_own_forward():
    calls = []

    class Recording(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    lin = Recording(64, 256)
    lin.comfy_cast_weights, lin.weight_function, lin.bias_function = False, [], []
    _patched(torch.nn.Sequential(torch.nn.SiLU(), lin))
    x = torch.randn(2, 64)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias)) and calls == [(2, 64)]


def _traced_targets(seq, x) -> list[str]:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(seq, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    return [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_while_traced_the_modulation_is_a_sum_and_no_matrix_product():
    x = torch.randn(1, 64)
    plain = _traced_targets(_modulation(), x)
    assert any("linear" in t for t in plain), plain
    reduced = _traced_targets(_patched(_modulation()), x)
    assert not any("linear" in t or "matmul" in t or t.endswith("mm") for t in reduced), reduced
    assert any(t == "sum" or "sum" in t for t in reduced), reduced
    patched_lora = _patched(_modulation())
    patched_lora[1].weight_function = [lambda w: w]
    assert any("linear" in t for t in _traced_targets(patched_lora, x)), "ComfyUI's forward for a patched layer"


def test_inductors_kernel_gives_the_linears_numbers():
    """Compiled by Inductor for the CPU: the reduction with the SiLU before it gives F.linear's output."""
    seq = _patched(_modulation())
    x = torch.randn(2, 64)
    want = torch.nn.functional.linear(torch.nn.functional.silu(x), seq[1].weight, seq[1].bias)
    torch._dynamo.reset()
    try:
        got = torch.compile(seq)(x)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def _tiny_patcher(precision="bf16"):
    from devkit import tiny_models

    dit = tiny_models.random_dit(torch.bfloat16)
    return tiny_models.dit_patcher(dit, precision, "tiny-adaln")


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
def test_without_the_switch_no_modulation_is_patched(monkeypatch):
    monkeypatch.delenv(adaln_reduce.SWITCH, raising=False)
    patcher, _ = _tiny_patcher()
    assert not adaln_reduce.attached(patcher)


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
def test_the_fp8_layers_modulations_are_patched_and_take_the_reduction(monkeypatch):
    """With fp8 layers the modulation Linear is ComfyUI's mixed-precision Linear, not a torch.nn.Linear, and kept
    16-bit: it too gets the forward and, with an input of its weight's dtype, takes the reduction (run114's server
    run patched none of them)."""
    monkeypatch.setenv(adaln_reduce.SWITCH, "reduce")
    patcher, _ = _tiny_patcher("fp8")
    sequentials = [m for n, m in patcher.model.diffusion_model.named_modules() if n.endswith("adaLN_modulation")]
    keys = [k for k in patcher.object_patches if ".adaLN_modulation." in k]
    assert sequentials and len(keys) == len(sequentials), keys
    lin = sequentials[0][len(sequentials[0]) - 1]
    assert not isinstance(lin, torch.nn.Linear)
    assert adaln_reduce.takes_reduction(lin, torch.randn(2, lin.weight.shape[1], dtype=lin.weight.dtype))


@pytest.mark.host
@pytest.mark.usefixtures("comfy_on_cpu", "comfy_device_is_the_cpu")
@pytest.mark.parametrize("precision", ["fp32", "fp8"])
def test_the_switch_patches_every_modulation_and_compiled_blocks_trace_sums_with_the_same_graphs(monkeypatch,
                                                                                              precision):
    """NEWBIE_ADALN=reduce: every modulation Linear gets the forward through ComfyUI's object patches; the compiled
    blocks (pipeline/block_compile.py, here with a backend that records each traced graph and runs it) trace one
    matrix product fewer and a sum more in each modulated block, make as many graphs as the unpatched DiT over two
    caption lengths (the one function is guarded once for all blocks), and give its output within fp32's rounding;
    unpatched, ComfyUI's forward is back."""
    from devkit import stress
    from devkit.dit_calls import dit_call, dit_inputs
    from pipeline import block_compile

    def compiled_calls(patched: bool):
        if patched:
            monkeypatch.setenv(adaln_reduce.SWITCH, "reduce")
        else:
            monkeypatch.delenv(adaln_reduce.SWITCH, raising=False)
        patcher, cfg = _tiny_patcher(precision)
        linears = [m[len(m) - 1] for n, m in patcher.model.diffusion_model.named_modules()
                   if n.endswith("adaLN_modulation")]
        keys = [k for k in patcher.object_patches if ".adaLN_modulation." in k]
        assert linears and len(keys) == (len(linears) if patched else 0), (keys, len(linears))
        graphs = []

        def recording(gm, example_inputs):
            graphs.append([str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
            return gm.forward

        torch._dynamo.reset()
        block_compile.apply(patcher, backend=recording)
        patcher.patch_model()
        try:
            outs = [dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), n)) for n in (12, 20)]
        finally:
            patcher.unpatch_model()
            torch._dynamo.reset()
        assert not any(getattr(lin.forward, "__func__", None) is adaln_reduce.reduced_forward for lin in linears)
        ops = [t for g in graphs for t in g]
        return outs, len(graphs), sum("linear" in t for t in ops), sum(t == "sum" or t.endswith(".sum") for t in ops)

    plain, plain_graphs, plain_linears, plain_sums = compiled_calls(False)
    reduced, graphs, linears, sums = compiled_calls(True)
    assert graphs == plain_graphs and graphs > 0, (plain_graphs, graphs)
    assert linears < plain_linears and sums > plain_sums, (plain_linears, linears, plain_sums, sums)
    for a, b in zip(reduced, plain):
        assert stress.relative_error(a, b) < 1e-5
