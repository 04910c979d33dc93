"""The pack's operations for quantized DiTs (pipeline/quantized_ops.py), on the CPU: the plain-op fp8 layer computes
exactly what ComfyUI's fp8 layer computes (with fp8 matmuls and, dequantised, without), the plain-op int8 layer
exactly what ComfyUI's dequantised int8 layer computes, whole DiTs built with them equal those built with
ComfyUI's operations, and their blocks compile without graph breaks or recompiles on new prompt lengths (what
ComfyUI's layers could not: Dynamo failed on them on an H200, run19). torch._scaled_mm runs on the CPU, so
ComfyUI's fp8 path can be forced on here by reporting fp8 compute; the int8 one by reporting a Hopper GPU."""
from __future__ import annotations

import pytest
import torch

from devkit import stress, tiny_models
from devkit.dit_calls import dit_call, dit_inputs
from host_features import quantization_or_skip

pytestmark = pytest.mark.host


@pytest.fixture(autouse=True)
def comfy_on_cpu(comfy_import_path):
    tiny_models._comfy_cpu_safe()  # ComfyUI's model management imported on a machine without CUDA


@pytest.fixture(scope="module")
def dit16(comfy_import_path):
    return tiny_models.random_dit(torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_dit(dit16):
    from pipeline import quantize

    return quantize.quantize_state_dict(dit16, "fp8")


@pytest.fixture(scope="module")
def int8_dit(dit16):
    from pipeline import quantize

    quantization_or_skip("int8")
    return quantize.quantize_state_dict(dit16, "int8")


@pytest.fixture
def fp8_compute(monkeypatch):
    """ComfyUI's fp8 matmul path on the CPU (torch._scaled_mm has a CPU kernel)."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)


@pytest.fixture
def hopper(monkeypatch):
    """The loader's int8 choice for Hopper and newer (dequantised int8 layers) on the CPU."""
    from pipeline import quantized_ops

    monkeypatch.setattr(quantized_ops, "int8_matmuls_dequantised", lambda device: True)


def _build(sd, monkeypatch=None, comfy_ops=False, precision="fp8"):
    from pipeline import loader

    if comfy_ops:
        monkeypatch.setattr(loader, "quantized_ops_for", lambda fmt, device: None)
    return tiny_models.dit_patcher(sd, precision, f"tiny-{precision}")


@pytest.mark.parametrize("input_scale", [None, 0.5])
def test_fp8_linear_is_comfys_fp8_layer_in_plain_ops(comfy_import_path, input_scale):
    from comfy.quant_ops import QuantizedTensor
    from pipeline import quantize, quantized_ops

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g, dtype=torch.float32) * 0.05
    bias = torch.randn(64, generator=g)
    x = torch.randn(2, 7, 96, generator=g) * 300  # beyond e4m3's 448 after the scale: the clamp matters
    q, scale = quantize.quantize_weight(w, "fp8")
    layout = "TensorCoreFP8E4M3Layout"
    weight = QuantizedTensor.from_float(w, layout, scale=scale)
    assert torch.equal(weight._qdata.view(torch.uint8), q.view(torch.uint8))
    s = None if input_scale is None else torch.tensor(input_scale)
    theirs = torch.nn.functional.linear(QuantizedTensor.from_float(x.reshape(-1, 96), layout, scale=s), weight, bias)
    ours = quantized_ops.fp8_linear(x, q, scale, bias, s)
    assert ours.shape == (2, 7, 64)
    tolerance = 0 if _comfy_multiplies_as_we_do() else 1e-4
    torch.testing.assert_close(ours.reshape(-1, 64), theirs, rtol=tolerance, atol=tolerance)


def _comfy_multiplies_as_we_do() -> bool:
    """Whether ComfyUI's fp8 layer multiplies with torch._scaled_mm, as the pack's does. Where PyTorch has
    torch.nn.functional.scaled_mm (2.10 and newer), comfy_kitchen takes that, and its CPU result differs in the
    last bits: up to 5e-5 relative with torch 2.11 on the device machine (bench/results/run90-pytest.log)."""
    try:
        from comfy_kitchen import scaled_mm_v2
    except ImportError:
        return True
    return not scaled_mm_v2.has_scaled_mm_v2()


def _count_calls(monkeypatch, module, *names) -> dict:
    calls = {n: 0 for n in names}
    for name in names:
        real = getattr(module, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("fp8_matmuls", [True, False], ids=["fp8-matmul-gpu", "gpu-without-fp8-matmul"])
@pytest.mark.usefixtures("comfy_device_is_the_cpu")
def test_plain_fp8_dit_equals_comfys_fp8_dit(fp8_dit, fp8_matmuls, monkeypatch):
    """With fp8 matmuls (Ada, Hopper) every fp8 layer but w2 multiplies in fp8, w2 dequantised (its input is fp32
    here, the CPU's compute dtype; a bf16 one is scaled per row, see the row-wise tests); without them (Ampere,
    Turing: this CPU as it is) every layer is dequantised; either way exactly ComfyUI's arithmetic."""
    import comfy.model_management as mm

    from pipeline import quantized_ops

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: fp8_matmuls)
    ours, cfg = _build(fp8_dit)
    calls = _count_calls(monkeypatch, quantized_ops, "fp8_linear", "fp8_linear_dequantised")
    out = dit_call(ours, cfg)
    fp8_layers = [m for m in ours.model.diffusion_model.modules()
                  if getattr(m, "quant_format", None) == "float8_e4m3fn"]
    n_w2 = sum(1 for m in fp8_layers if m._full_precision_mm_config)
    assert n_w2 and fp8_layers
    expected_fp8 = len(fp8_layers) - n_w2 if fp8_matmuls else 0
    assert calls == {"fp8_linear": expected_fp8, "fp8_linear_dequantised": len(fp8_layers) - expected_fp8}, calls
    theirs, _ = _build(fp8_dit, monkeypatch, comfy_ops=True)
    assert "TraceableFp8Ops" in type(ours.model.diffusion_model.layers[0].attention.qkv).__qualname__
    assert "TraceableFp8Ops" not in type(theirs.model.diffusion_model.layers[0].attention.qkv).__qualname__
    ref = dit_call(theirs, cfg)
    assert stress.relative_error(out, ref) < (1e-6 if _comfy_multiplies_as_we_do() or not fp8_matmuls else 1e-4)


def test_rowwise_fp8_linear_keeps_every_row_to_e4m3_precision(comfy_import_path):
    """w2's input has no bound: rows far apart in size, and values beyond e4m3's 448, each keep the relative
    precision of e4m3 (3 mantissa bits) with a scale per row; an all-zero row gives zeros. The weight-only
    dequantised product is the reference, so what is measured is the input's quantization alone."""
    from pipeline import quantize, quantized_ops

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * 0.05
    q, scale = quantize.quantize_weight(w, "fp8")
    x = torch.randn(2, 5, 96, generator=g)
    x[0, 0] *= 1e-4
    x[0, 1] *= 1e4  # beyond 448: a unit scale would clip it
    x[1, 2] = 0
    x = x.to(torch.bfloat16)
    ours = quantized_ops.fp8_linear_rowwise(x, q, scale, None)
    ref = quantized_ops.fp8_linear_dequantised(x.float(), q, scale, None)
    assert ours.shape == (2, 5, 48) and ours.dtype == torch.bfloat16
    assert torch.count_nonzero(ours[1, 2]) == 0
    errors = (ours.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)
    errors[1, 2] = 0
    assert float(errors.max()) < 0.05, errors
    # the same call through a unit per-tensor scale, ComfyUI's fp8 layer without an input scale, clips the big row
    clipped = quantized_ops.fp8_linear(x.float(), q, scale, None)
    assert stress.relative_error(clipped[0, 1], ref[0, 1]) > 0.5


def test_rowwise_w2_is_the_default_with_fp8_matmuls_and_bf16_is_its_switch(fp8_dit, monkeypatch):
    """The w2 layers' bf16 input goes through fp8_linear_rowwise where the GPU multiplies fp8, unless
    NEWBIE_FP8_W2=bf16 (w2 dequantised and multiplied in bf16, as ComfyUI does); without fp8 matmuls every layer
    is dequantised. The row-wise output stays within e4m3's input precision of the bf16 one's."""
    import comfy.model_management as mm

    from pipeline import quantized_ops

    outputs = {}
    for fp8_matmuls, switch in ((True, None), (True, "bf16"), (False, None)):
        monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None, _v=fp8_matmuls: _v)
        monkeypatch.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: torch.bfloat16)  # a GPU's choice
        if switch is None:
            monkeypatch.delenv("NEWBIE_FP8_W2", raising=False)
        else:
            monkeypatch.setenv("NEWBIE_FP8_W2", switch)
        ours, cfg = _build(fp8_dit)
        calls = _count_calls(monkeypatch, quantized_ops, "fp8_linear_rowwise", "fp8_linear_dequantised")
        outputs[fp8_matmuls, switch] = dit_call(ours, cfg)
        n_w2 = sum(1 for m in ours.model.diffusion_model.modules() if getattr(m, "_full_precision_mm_config", False))
        rowwise = n_w2 if (fp8_matmuls, switch) == (True, None) else 0
        assert n_w2 and calls["fp8_linear_rowwise"] == rowwise, (fp8_matmuls, switch, calls)
        monkeypatch.undo()
        tiny_models._comfy_cpu_safe()
    rowwise, w2_bf16, without_fp8 = outputs[True, None], outputs[True, "bf16"], outputs[False, None]
    assert 0 < stress.relative_error(rowwise, w2_bf16) < 0.05
    assert stress.relative_error(without_fp8, w2_bf16) > 0, "without fp8 matmuls every layer is dequantised"


@pytest.mark.parametrize("w2", [None, "bf16"])
def test_the_loader_report_says_how_fp8_multiplies_w2(models_root, monkeypatch, w2):
    import comfy.model_management as mm

    from devkit import tiny_models
    from pipeline import loader

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    if w2 is None:
        monkeypatch.delenv("NEWBIE_FP8_W2", raising=False)
    else:
        monkeypatch.setenv("NEWBIE_FP8_W2", w2)
    paths = tiny_models.single_file_paths(models_root)
    report = loader.load_newbie(loader.read_single_files(paths), "fp8", compile="off").report
    expected = "feed_forward.w2 in bf16 (NEWBIE_FP8_W2=bf16)" if w2 else "feed_forward.w2's bf16 input scaled per row"
    assert "fp8 matmuls, " + expected in report, report
    assert "accumulating in the tensor cores" in report and "SwiGLU kernel" not in report, report


@pytest.mark.parametrize("accum", [None, "fp32"])
@pytest.mark.usefixtures("comfy_device_is_the_cpu")
def test_fast_accumulation_is_one_switch_for_every_fp8_gemm(fp8_dit, monkeypatch, accum):
    """By default every fp8 GEMM of the DiT (w2's row-scaled one too) has `use_fast_accum`; with
    NEWBIE_FP8_ACCUM=fp32 none has it, as comfy_kitchen's own fp8 matmul."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    monkeypatch.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: torch.bfloat16)
    if accum is None:
        monkeypatch.delenv("NEWBIE_FP8_ACCUM", raising=False)
    else:
        monkeypatch.setenv("NEWBIE_FP8_ACCUM", accum)
    fast = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm",
                        lambda *a, **k: fast.append(k.get("use_fast_accum", False)) or real(*a, **k))
    ours, cfg = _build(fp8_dit)
    dit_call(ours, cfg)
    n_fp8 = sum(1 for m in ours.model.diffusion_model.modules() if getattr(m, "quant_format", None) == "float8_e4m3fn")
    assert len(fast) == n_fp8 and set(fast) == {accum is None}, (n_fp8, fast)


@pytest.mark.usefixtures("comfy_device_is_the_cpu")
def test_fp8_layers_take_their_unit_scale_as_a_graph_input(fp8_dit, monkeypatch):
    """The fp8 GEMMs' unit scale is made once on the load device, so a compiled block takes it as an input rather
    than making it at every layer call (a kernel launch each on a GPU); a layer of operations built without a
    device makes its own, as before."""
    import comfy.model_management as mm

    from pipeline import quantized_ops

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    monkeypatch.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: torch.bfloat16)
    patcher, _ = _build(fp8_dit)
    ffn = patcher.model.diffusion_model.layers[0].feed_forward
    x = torch.randn(1, 7, ffn.w1.in_features, dtype=torch.bfloat16)

    def traced_calls(module):
        graphs = []
        torch._dynamo.reset()
        try:
            torch.compile(module, backend=lambda gm, example: graphs.append(gm) or gm.forward)(x)
        finally:
            torch._dynamo.reset()
        return [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]

    calls = traced_calls(ffn)
    assert calls.count(torch._scaled_mm) == 3, calls  # w1, w3, and w2 scaled per row
    assert torch.ones not in calls, calls
    without_device = quantized_ops.traceable_fp8_ops(patcher.model.model_config.quant_config, torch.bfloat16,
                                                     rowwise_w2=True)
    for name in ("w1", "w2", "w3"):
        getattr(ffn, name).__class__ = without_device.Linear
    assert torch.ones in traced_calls(ffn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rowwise_fp8_linear_on_a_gpu_is_the_cpus():
    """The row-wise fp8 product on CUDA (cuBLAS's fp8 GEMM, the row scales applied after it) keeps every row within
    e4m3's rounding of the dequantised product, and matches the same function on the CPU (PyTorch's reference
    fp8 kernel) but for the odd input rounded to the other neighbouring e4m3 value (one row of 96 at 1.8 % on an
    H100)."""
    from pipeline import quantize, quantized_ops

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no fp8 matmuls on this GPU")
    g = torch.Generator().manual_seed(0)
    q, scale = quantize.quantize_weight(torch.randn(64, 256, generator=g) * 0.05, "fp8")
    x = (torch.randn(96, 256, generator=g) * torch.logspace(-3, 3, 96).unsqueeze(1)).to(torch.bfloat16)
    cpu = quantized_ops.fp8_linear_rowwise(x, q, scale, None)
    gpu = quantized_ops.fp8_linear_rowwise(x.cuda(), q.cuda(), scale.cuda(), None)
    ref = quantized_ops.fp8_linear_dequantised(x.float(), q, scale, None)

    def row_errors(out):
        return (out.cpu().float() - ref).norm(dim=-1) / ref.norm(dim=-1)

    # e4m3's rounding bound (2^-4); the CPU's rows are within 3.3 % of the reference here
    assert float(row_errors(gpu).max()) < 2.0 ** -4, row_errors(gpu)
    assert float(((gpu.cpu().float() - cpu.float()).norm(dim=-1) / ref.norm(dim=-1)).mean()) < 5e-3


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_linear_dequantised_is_comfys_dequantisation(comfy_import_path, precision):
    """The plain-op dequantisation against ComfyUI's: fp8 as its cast path does it (cast to the compute dtype,
    then dequantise), int8 as the pack's dequantising layer does (dequantise, then cast)."""
    from comfy.quant_ops import QuantizedTensor
    from pipeline import quantize, quantized_ops

    quantization_or_skip(precision)

    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g) * 0.05
    bias = torch.randn(64, generator=g).to(torch.bfloat16)
    x = torch.randn(2, 7, 96, generator=g).to(torch.bfloat16)
    q, scale = quantize.quantize_weight(w, precision)
    if precision == "fp8":
        weight = QuantizedTensor.from_float(w, "TensorCoreFP8E4M3Layout", scale=scale).to(dtype=x.dtype).dequantize()
        ours = quantized_ops.fp8_linear_dequantised(x, q, scale, bias)
    else:
        params = quantize.compat.quant_layout("int8_tensorwise", "int8").Params(
            scale=scale, orig_dtype=torch.bfloat16, orig_shape=tuple(w.shape), is_weight=True)
        weight = QuantizedTensor(q, "TensorWiseINT8Layout", params).dequantize().to(x.dtype)
        ours = quantized_ops.int8_linear_dequantised(x, q, scale, bias)
    torch.testing.assert_close(ours, torch.nn.functional.linear(x, weight, bias), rtol=0, atol=0)


def test_plain_int8_dit_equals_the_dequantised_int8_dit(int8_dit, hopper, monkeypatch):
    from pipeline import quantized_ops

    ours, cfg = _build(int8_dit, precision="int8")
    calls = []
    plain = quantized_ops.int8_linear_dequantised
    monkeypatch.setattr(quantized_ops, "int8_linear_dequantised", lambda *a: calls.append(1) or plain(*a))
    out = dit_call(ours, cfg)
    n_int8 = sum(1 for m in ours.model.diffusion_model.modules()
                 if getattr(m, "quant_format", None) == "int8_tensorwise")
    assert n_int8 and len(calls) == n_int8, "every int8 layer takes the plain path"
    assert "TraceableInt8Ops" in type(ours.model.diffusion_model.layers[0].attention.qkv).__qualname__
    monkeypatch.setattr(quantized_ops, "int8_linear_dequantised", plain)
    from pipeline import loader

    monkeypatch.setattr(loader, "quantized_ops_for", lambda fmt, device: quantized_ops.dequantising_int8_ops)
    theirs, _ = _build(int8_dit, precision="int8")
    assert "TraceableInt8Ops" not in type(theirs.model.diffusion_model.layers[0].attention.qkv).__qualname__
    assert stress.relative_error(out, dit_call(theirs, cfg)) < 1e-6


def test_a_weight_function_goes_to_comfys_forward(fp8_dit, int8_dit, fp8_compute, hopper):
    """LoRA patches ComfyUI applies per call (weight_function, for offloaded layers) need its cast path."""
    for sd, precision, plain in ((fp8_dit, "fp8", "_plain_fp8"), (int8_dit, "int8", "_plain_int8")):
        patcher, _ = _build(sd, precision=precision)
        layer = patcher.model.diffusion_model.layers[0].attention.qkv
        x = torch.randn(1, 3, layer.weight.shape[1])
        assert getattr(layer, plain)(x), precision
        layer.weight_function = [lambda w: w]  # as ComfyUI sets it (the class attribute is a shared list)
        assert not getattr(layer, plain)(x), precision


@pytest.mark.parametrize("precision", ["fp8", "fp8-dequantised", "fp8-rowwise", "int8"])
def test_plain_quantized_blocks_compile_once_without_graph_breaks(precision, fp8_dit, hopper, monkeypatch, request):
    """fp8 with fp8 matmuls, fp8 on a GPU without them (every layer dequantised), fp8 computing in bf16 (w2's
    input scaled per row, the default), int8 on Hopper+."""
    import comfy.model_management as mm
    from torch._dynamo.utils import counters

    from pipeline import block_compile

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: precision in ("fp8", "fp8-rowwise"))
    if precision == "fp8-rowwise":
        monkeypatch.delenv("NEWBIE_FP8_W2", raising=False)
        monkeypatch.setattr(mm, "unet_manual_cast", lambda *args, **kwargs: torch.bfloat16)
    sd = request.getfixturevalue("int8_dit") if precision == "int8" else fp8_dit  # int8's only where the host has it
    patcher, cfg = _build(sd, precision=precision.split("-")[0])
    eager = {n: dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), n)) for n in (12, 20)}
    torch._dynamo.reset()
    counters.clear()
    try:
        blocks = block_compile.apply(patcher)
        compiled = {n: dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), n)) for n in (12, 20)}
        graphs = block_compile.compiled_graph_count()
        dit_call(patcher, cfg, dit_inputs(cfg, "cpu", (8, 8), 33))
        assert block_compile.compiled_graph_count() == graphs, "a new prompt length recompiled"
        assert not dict(counters["graph_break"]), dict(counters["graph_break"])
        assert 0 < graphs < 2 * blocks, (graphs, blocks)
    finally:
        torch._dynamo.reset()
    for n in (12, 20):
        assert stress.relative_error(compiled[n], eager[n]) < 1e-2, n


def test_a_lora_patches_plain_fp8_layers_as_comfys(fp8_compute, monkeypatch, tmp_path):
    """ComfyUI patches a quantized weight (dequantise, add, requantise into a new parameter); the plain path reads
    the patched parameter, so a LoRA changes its output exactly as it changes ComfyUI's fp8 model's."""
    import lora_files

    import comfy.model_management as mm

    from pipeline import lora

    dit = lora_files.tiny_dit()
    path, _ = lora_files.write_peft(tmp_path / "peft", dit)
    out = {}
    for comfy_ops in (False, True):
        patcher, cfg = _build(dit, monkeypatch, comfy_ops=comfy_ops)
        base = dit_call(patcher, cfg)
        patched = lora.apply_lora(patcher, path, 4.0).model
        mm.load_models_gpu([patched])
        out[comfy_ops] = (base, dit_call(patched, cfg))
        mm.unload_all_models()
    (ours_base, ours_lora), (theirs_base, theirs_lora) = out[False], out[True]
    assert stress.relative_error(ours_lora, ours_base) > 0.05, "the LoRA should change the output"
    assert stress.relative_error(ours_lora, theirs_lora) < 1e-6
