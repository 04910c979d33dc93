"""Operations classes for the quantized DiT (pipeline/quantize.py): ComfyUI's mixed-precision operations with
changes where ComfyUI's own path was measured slow. Each is a subclass of what `comfy.ops.pick_operations` gives a
quantized model (`mixed_precision_ops`), set as the model config's `custom_operations`; loading, the saved format,
LoRA patches and offloading stay ComfyUI's.

- int8 on Hopper and newer (`dequantising_int8_ops`): one full-size DiT call on an H200 took 0.64 s with int8
  matmuls against bf16's 0.147 s (bench/results/run19-profile.json). torch._int_mm ran CUTLASS's sm80 WMMA kernel
  (2.0 ms a GEMM, 395 ms of the call) and comfy_kitchen's eager int8_linear copies each weight transposed every
  call (84 ms). Dequantised and multiplied in bf16 the call took 0.167 s (run21). ComfyUI has no switch for that:
  its `full_precision_matrix_mult` leaves F.linear to TensorWiseINT8Layout, which quantizes the activations and
  runs int8_linear whatever the layer says. Older GPUs (Turing, Ampere, Ada, whose kernels CUTLASS's sm80 ones
  are) keep the int8 matmul: not measured here.
- fp8 (`traceable_fp8_ops`). Where the GPU multiplies fp8, ComfyUI's layer quantizes its input into a new
  QuantizedTensor each call and dispatches through comfy_kitchen's tensor subclass. Eager that is CPU-bound (an
  H200 call: 150 ms of CPU for 141 ms of kernels, 13 ms of them the input quantization, run19), and Dynamo fails
  on it (the activation subclass is rebuilt with dynamic sizes: "vr must not be None", run19), so compiled blocks
  could not fuse the quantization into the norm before it. The pack's layer does the same arithmetic with plain
  tensor ops -- input clamped to e4m3's range with scale 1 (ComfyUI's default without an `input_scale`), one
  torch._scaled_mm with the weight's fp8 data and scale -- for a resident weight without weight functions; every
  other case (weights streamed, cast or patched per call) goes to ComfyUI's forward. The GEMMs accumulate in the
  tensor cores (`use_fast_accum`, see `fast_accumulation`) where ComfyUI's promote their partial sums to fp32;
  NEWBIE_FP8_ACCUM=fp32 makes the arithmetic ComfyUI's exactly. The FFN's down projection
  (w2, `full_precision_matrix_mult`, see pipeline/quantize.py) takes an input without a bound, and ComfyUI
  multiplies it in the compute dtype. Scaling w2's input per tensor by its own amax instead (no host sync) and
  multiplying it in fp8 was measured and did not pay: compiled, its GEMMs took 6.6 ms less a call and the amax
  reduction and scaling 10.7 ms more (0.101 s a call against 0.102, bench/results/run24-profile.json). A scale per
  row (`fp8_linear_rowwise`) needs no reduction across the tensor, so Inductor fuses it into the SwiGLU kernel that
  makes w2's input. With _scaled_mm's row-wise form it gained nothing (H100, flash-attn-4, run86: w2's GEMM 12.3
  against 16.8 ms a step, the SwiGLU kernel that now finds each row's amax 10.1 against 5.6 ms); with the GEMM per
  tensor and the scales applied after it, the GPU's step fell from 90.1 to 85.9 ms and the image from 2.80 to
  2.74 s (run87), so that is the default for a bf16 input where the GPU multiplies fp8 (NEWBIE_FP8_W2=bf16 keeps
  ComfyUI's way; the error against fp32 0.0285 against 0.0278, run85). Where the GPU has no fp8 matmul (Ampere,
  Turing), and for w2 otherwise, the weight is dequantised with plain ops (data times scale in the
  compute dtype, what comfy_kitchen's dequantize computes) and multiplied with one F.linear: what ComfyUI computes
  there, in a form compiled blocks take (ComfyUI's own dequantisation is an opaque custom op, 4.9 ms a call for
  w2 alone on an H200, run22).
- int8 on Hopper and newer, resident and without weight functions (`traceable_int8_ops`): the dequantisation
  as plain tensor ops (int8 data times its per-channel scale, in fp32, to the compute dtype: what comfy_kitchen's
  dequantize computes) and one F.linear, so compiled blocks fuse the dequantisation into one kernel per weight.
"""
from __future__ import annotations

import torch

from . import env_switch

# Hopper (sm90) and newer: int8 layers multiply dequantised (see the module docstring).
DEQUANTISED_INT8_FROM_CAPABILITY = (9, 0)
FP8_FORMAT = "float8_e4m3fn"
INT8_FORMAT = "int8_tensorwise"
_E4M3_MAX = 448.0


def _plain(layer, input) -> bool:
    """Whether a quantized `layer` can multiply `input` with plain tensor ops: its weight a resident
    QuantizedTensor (not fetched per call by dynamic VRAM, not cast or patched per call) on the input's device."""
    from comfy.quant_ops import QuantizedTensor

    weight = layer.weight
    return (isinstance(weight, QuantizedTensor) and not isinstance(input, QuantizedTensor)
            and weight.device == input.device and not hasattr(layer, "_v")  # not dynamic VRAM's
            and not layer.weight_function and not layer.bias_function
            and not getattr(layer, "comfy_force_cast_weights", False)
            and getattr(layer, "pre_quant_scale", None) is None
            and (layer.bias is None or layer.bias.device == input.device))


def int8_matmuls_dequantised(device) -> bool:
    """Whether int8 layers on `device` multiply in the compute dtype (DEQUANTISED_INT8_FROM_CAPABILITY)."""
    return (getattr(device, "type", None) == "cuda"
            and torch.cuda.get_device_capability(device) >= DEQUANTISED_INT8_FROM_CAPABILITY)


def dequantising_int8_ops(quant_config: dict, compute_dtype):
    """ComfyUI's mixed-precision operations in which a quantized weight reaching the matmul is dequantised to the
    input's dtype first. The weights stay int8 in memory."""
    import comfy.ops
    from comfy.quant_ops import QuantizedTensor

    base = comfy.ops.mixed_precision_ops(quant_config, compute_dtype, full_precision_mm=True)

    class DequantisingInt8Ops(base):
        class Linear(base.Linear):
            def _forward(self, input, weight, bias):
                if isinstance(weight, QuantizedTensor):
                    weight = weight.dequantize().to(input.dtype)
                return super()._forward(input, weight, bias)

    return DequantisingInt8Ops


def traceable_int8_ops(quant_config: dict, compute_dtype):
    """`dequantising_int8_ops` whose resident layers dequantise with plain tensor ops (see the module docstring)."""
    base = dequantising_int8_ops(quant_config, compute_dtype)

    class TraceableInt8Ops(base):
        class Linear(base.Linear):
            def _plain_int8(self, input) -> bool:
                return (getattr(self, "quant_format", None) == INT8_FORMAT and _plain(self, input)
                        and not getattr(self.weight._params, "convrot", False))

            def forward(self, input, *args, **kwargs):
                if not self._plain_int8(input):
                    return super().forward(input, *args, **kwargs)
                return int8_linear_dequantised(input, self.weight._qdata, self.weight._params.scale, self.bias)

    return TraceableInt8Ops


def int8_linear_dequantised(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (weight_int8 * weight_scale).T + bias in x's dtype; the weight dequantised in fp32 and cast to x's dtype,
    as comfy_kitchen's dequantize does (a scale per output channel, shape (out, 1), or one per tensor)."""
    scale = weight_scale.to(torch.float32)
    if scale.numel() > 1:
        scale = scale.reshape(-1, 1)
    weight = (weight_int8.to(torch.float32) * scale).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def rowwise_w2() -> bool:
    """Whether fp8's w2 multiplies in fp8 with its input scaled per row (the default) rather than in bf16, as
    ComfyUI does (NEWBIE_FP8_W2=bf16)."""
    return env_switch.value("NEWBIE_FP8_W2") != "bf16"


def w2_kernel() -> bool:
    """Whether fp8's row-scaled w2 input comes from the pack's SwiGLU kernel (NEWBIE_FP8_W2=kernel, or kernel1 for
    its one-pass form; pipeline/swiglu_fp8.py) rather than from the kernel Inductor fuses."""
    return env_switch.value("NEWBIE_FP8_W2") in ("kernel", "kernel1")


def w2_kernel_one_pass() -> bool:
    """Whether that kernel is the one-pass form (NEWBIE_FP8_W2=kernel1; 75.2 against 105.8 us a call, run110)."""
    return env_switch.value("NEWBIE_FP8_W2") == "kernel1"


def fast_accumulation() -> bool:
    """Whether fp8 GEMMs accumulate in the tensor cores' own accumulator (`use_fast_accum`; the default) rather than
    promoting partial sums to fp32 as cuBLAS does unasked and comfy_kitchen asks (NEWBIE_FP8_ACCUM=fp32). On an
    H100 the promotion cost GEMM time: the fp8 GEMMs took 36.4 against 38.8 ms a step and a compiled sampling run
    2.454 against 2.537 s (bench/results/run94), for an error against fp32 of 0.02866 against 0.02853 (one
    full-size DiT call, run95; upstream's fp8 cast 0.0517)."""
    return env_switch.value("NEWBIE_FP8_ACCUM") != "fp32"


def fp8_matmuls(device) -> bool:
    """Whether `device` multiplies in fp8 (ComfyUI's own test, `supports_fp8_compute`: Ada, Hopper and newer)."""
    import comfy.model_management as mm

    return bool(mm.supports_fp8_compute(device))


def traceable_fp8_ops(quant_config: dict, compute_dtype, fp8_compute: bool = True, rowwise_w2: bool = False,
                      device=None, fast_accum: bool = False):
    """ComfyUI's mixed-precision operations whose fp8 layers multiply with plain tensor ops when their weight is
    resident (see the module docstring): with `fp8_compute` (the GPU multiplies fp8) the same arithmetic as
    ComfyUI's fp8 layer without an input scale; without it, and for layers marked full_precision_matrix_mult, the
    weight dequantised to the input's dtype and one F.linear, as ComfyUI's layer computes it on such a GPU. With
    `rowwise_w2` and `fp8_compute`, a bf16 input of a full_precision_matrix_mult layer is quantized with a scale per
    row instead (`fp8_linear_rowwise`).

    `fast_accum`: the fp8 GEMMs with `use_fast_accum` (see `fast_accumulation`; ComfyUI's arithmetic without it).

    `device`, the load device, gets the GEMMs' unit scale once: made inside a compiled block, each layer call made
    it again in a kernel of its own (`triton_poi_fused_ones`, about 300 launches a step, run87), where a tensor the
    layers close over is one more input of the compiled graph."""
    import comfy.ops

    unit = torch.ones((), dtype=torch.float32, device=device) if fp8_compute and device is not None else None

    # What comfy.ops.pick_operations disables on a GPU without fp8 matmuls (every fp8 layer then multiplies in the
    # compute dtype); the pack's operations replace pick_operations' choice, so they pass it on themselves.
    disabled = set() if fp8_compute else {FP8_FORMAT, "float8_e5m2"}
    base = comfy.ops.mixed_precision_ops(quant_config, compute_dtype, disabled=disabled)

    class TraceableFp8Ops(base):
        class Linear(base.Linear):
            def _plain_fp8(self, input) -> bool:
                return getattr(self, "quant_format", None) == FP8_FORMAT and _plain(self, input)

            def takes_rowwise_fp8(self, input) -> bool:
                """Whether this layer multiplies a bf16 `input` in fp8 with a scale per row (w2, see
                `fp8_linear_rowwise`), so that it can take that input quantized already (`forward_rowwise_fp8`)."""
                return (rowwise_w2 and fp8_compute and input.dtype == torch.bfloat16 and self._plain_fp8(input)
                        and self._full_precision_mm)

            def forward_rowwise_fp8(self, x8, scale_a):
                """The layer's output (bf16, 2-D) for an input quantized already: e4m3 rows `x8` and their float32
                scales (rows, 1)."""
                weight = self.weight
                return fp8_matmul_rowwise(x8, scale_a, weight._qdata, weight._params.scale, self.bias, unit,
                                          torch.bfloat16, fast_accum)

            def forward(self, input, *args, **kwargs):
                if not self._plain_fp8(input):
                    return super().forward(input, *args, **kwargs)
                weight = self.weight
                if self._full_precision_mm:
                    if self.takes_rowwise_fp8(input):
                        return fp8_linear_rowwise(input, weight._qdata, weight._params.scale, self.bias, unit,
                                                  fast_accum)
                    return fp8_linear_dequantised(input, weight._qdata, weight._params.scale, self.bias)
                return fp8_linear(input, weight._qdata, weight._params.scale, self.bias,
                                  getattr(self, "input_scale", None), unit, fast_accum)

    return TraceableFp8Ops


def fp8_linear_dequantised(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (weight_fp8 * weight_scale).T + bias in x's dtype, the weight dequantised in x's dtype as comfy_kitchen's
    dequantize_per_tensor_fp8 does."""
    weight = weight_fp8.to(x.dtype) * weight_scale.to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def unit_scale(x: torch.Tensor, unit: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 1 on x's device: `unit` where it is there already, else a new one."""
    if unit is not None and unit.device == x.device:
        return unit
    return torch.ones((), device=x.device, dtype=torch.float32)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor | None = None, unit: torch.Tensor | None = None,
               fast_accum: bool = False) -> torch.Tensor:
    """x @ (weight_fp8 * weight_scale).T + bias in x's dtype, x quantized to e4m3 per tensor (scale `input_scale`,
    or 1): comfy_kitchen's quantize_per_tensor_fp8 and its fp8 linear, as plain ops. `unit`: a float32 1 to use
    for the unit scale (see `traceable_fp8_ops`)."""
    rows = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        scale_a = unit_scale(x, unit)
    else:
        scale_a = input_scale.to(device=x.device, dtype=torch.float32)
        rows = rows * (1.0 / scale_a).to(rows.dtype)
    x8 = rows.clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x8, weight_fp8.t(), scale_a=scale_a, scale_b=weight_scale.to(torch.float32),
                           bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype,
                           use_fast_accum=fast_accum)
    return out.reshape(*x.shape[:-1], weight_fp8.shape[0])


# The smallest row amax a row-wise scale is taken from: an all-zero row then quantizes to zeros, never 0/0.
_MIN_ROW_AMAX = 2.0 ** -24


def rowwise_e4m3(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D `rows` quantized to e4m3 with one scale per row, the row's amax / 448: (the fp8 values, the scales
    (rows, 1) in float32)."""
    amax = rows.abs().amax(dim=-1, keepdim=True).to(torch.float32).clamp(min=_MIN_ROW_AMAX)
    scale = amax / _E4M3_MAX
    return (rows.to(torch.float32) / scale).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear_rowwise(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, unit: torch.Tensor | None = None,
                       fast_accum: bool = False) -> torch.Tensor:
    """x @ (weight_fp8 * weight_scale).T + bias in x's dtype (bf16), x quantized to e4m3 with one scale per row
    (the row's amax / 448, so no input is clamped): for an input without a bound, which a single unit scale would
    clip (w2's SwiGLU product, see pipeline/quantize.py). Inside compiled blocks the amax, the scaling and the cast
    are elementwise work Inductor fuses into the kernel that makes x.

    The GEMM itself runs with unit scales, in torch._scaled_mm's per-tensor form, and the row and weight scales
    multiply its output after: Inductor fuses that product into the elementwise kernel that consumes the output
    (the gate and the residual add). The row-wise form of _scaled_mm, which applies them in its epilogue, ran
    cuBLAS's slower outer-vector-scaled kernel on an H100 (153 against about 95 us a call for a per-tensor GEMM
    of the same size, bench/results/run86-profile_sampling.json). The unscaled product stays far inside bf16's
    range (at most 448 * 448 * K)."""
    x8, scale_a = rowwise_e4m3(x.reshape(-1, x.shape[-1]))
    out = fp8_matmul_rowwise(x8, scale_a, weight_fp8, weight_scale, bias, unit, x.dtype, fast_accum)
    return out.reshape(*x.shape[:-1], weight_fp8.shape[0])


def fp8_matmul_rowwise(x8: torch.Tensor, scale_a: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None, unit: torch.Tensor | None, out_dtype,
                       fast_accum: bool = False) -> torch.Tensor:
    """(x8 * scale_a) @ (weight_fp8 * weight_scale).T + bias in out_dtype, for 2-D e4m3 rows x8 with float32 scales
    (rows, 1): the GEMM of `fp8_linear_rowwise`."""
    unit = unit_scale(x8, unit)
    out = torch._scaled_mm(x8, weight_fp8.t(), scale_a=unit, scale_b=unit, out_dtype=out_dtype,
                           use_fast_accum=fast_accum)
    out = out.to(torch.float32) * (scale_a * weight_scale.to(torch.float32).reshape(1, -1))
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
