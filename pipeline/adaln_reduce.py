"""The blocks' adaLN modulation written, inside compiled blocks, as a product summed over its inputs, which
Inductor turns into one reduction kernel, instead of cuBLAS's matrix-vector product (NEWBIE_ADALN=reduce; opt-in,
not yet timed on a GPU).

Every NextDiT block but the context refiner's (NewBie: 36 layers and 2 noise refiners) turns the timestep-and-
caption vector, one row a sample, into its scales and gates through a Linear of min(dim, 1024) -> 4 * dim,
`adaLN_modulation.1`, which the quantized precisions keep 16-bit (pipeline/quantize.py). One row times a
1024 x 9216 bf16 weight reads 18.9 MB to do 19 MFLOP: the weight's bytes are the whole cost. On an H100 (run111, fp8
with the kept CUDA graphs) cuBLAS ran it as `nvjet_sm90_tst_128x8_64x12_4x1_v_bz_bias_TNT` in 12.0 us a call,
1.6 TB/s where the weight takes about 6 us at 3.35 TB/s: 38 a DiT call, 0.9 ms of the 83.8 ms step. (The step's
memsets are not this product's: they come from the fp8 GEMMs' cuBLASLt workspace and cuDNN's attention, run115.)

Written as `(x[:, None, :] * W).sum(-1) + b` in fp32, a compiled block's Inductor makes it a reduction kernel that
reads the weight once, with the SiLU before it fused into its loads. Only where Dynamo is tracing
(`torch.compiler.is_compiling()`): eagerly the product would be materialised, so an uncompiled block keeps
ComfyUI's forward, as does a layer that ComfyUI casts or patches at each call (`comfy_cast_weights`, a LoRA's weight
or bias function), a quantized or foreign-dtype weight, or more than MAX_ROWS samples, where a matrix product
reuses each weight it reads.
"""
from __future__ import annotations

import logging

import torch

from . import env_switch, forward_patches

log = logging.getLogger(__name__)

SWITCH = "NEWBIE_ADALN"
# Samples a call may hold for the reduction: it reads the weight once a row (the batch of a prompt pair is 2).
MAX_ROWS = 4
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def enabled() -> bool:
    """NEWBIE_ADALN=reduce."""
    return env_switch.value(SWITCH) == "reduce"


def takes_reduction(lin, x: torch.Tensor) -> bool:
    """Whether the modulation Linear `lin` multiplies `x` as the reduction: a plain weight (and bias) of x's dtype
    and device, no cast or weight function of ComfyUI's, and a 2-D input of at most MAX_ROWS rows."""
    w, b = getattr(lin, "weight", None), getattr(lin, "bias", None)
    return (type(w) in _PLAIN_TENSORS and w.dim() == 2 and w.dtype == x.dtype and w.device == x.device
            and (b is None or (type(b) in _PLAIN_TENSORS and b.dtype == x.dtype and b.device == x.device))
            and x.dim() == 2 and x.shape[-1] == w.shape[1] and x.shape[0] <= MAX_ROWS
            and not getattr(lin, "comfy_cast_weights", False)
            and not getattr(lin, "weight_function", None) and not getattr(lin, "bias_function", None))


def reduced(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias as a product summed over the inputs, in fp32 (as cuBLAS accumulates), in x's dtype."""
    y = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def reduced_forward(lin, x: torch.Tensor) -> torch.Tensor:
    """A modulation Linear's forward: `reduced` while Dynamo traces a compiled block and the layer `takes_reduction`,
    ComfyUI's forward otherwise. Bound to each Linear as a method (pipeline/forward_patches.py says why)."""
    if torch.compiler.is_compiling() and takes_reduction(lin, x):
        return reduced(x, lin.weight, lin.bias)
    return type(lin).forward(lin, x)


def _modulation_linears(diffusion_model: torch.nn.Module):
    """(name, layer) of each block's `adaLN_modulation.<last>`: a Sequential whose last module has a 2-D weight. Not
    only `torch.nn.Linear`s: the Linear of ComfyUI's mixed-precision operations, which the quantized precisions
    build (pipeline/quantized_ops.py), is a Module of its own."""
    for name, module in diffusion_model.named_modules():
        if name.endswith("adaLN_modulation") and isinstance(module, torch.nn.Sequential) and len(module):
            last = len(module) - 1
            weight = getattr(module[last], "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                yield f"{name}.{last}", module[last]


def attach(patcher) -> int:
    """Give each modulation Linear of the patcher's DiT `reduced_forward` (ComfyUI's object patches, undone when
    ComfyUI unpatches the model). Returns how many."""
    n = forward_patches.patch_forwards(patcher, _modulation_linears(patcher.model.diffusion_model), reduced_forward)
    if n:
        log.info("NewBie: %d adaLN modulations as a reduction in compiled blocks (%s=reduce)", n, SWITCH)
    else:
        log.warning("NewBie: %s=reduce, but this DiT has no adaLN modulation layer to patch", SWITCH)
    return n


def attached(patcher) -> bool:
    return any(k.startswith("diffusion_model.") and ".adaLN_modulation." in k and k.endswith(".forward")
               for k in patcher.object_patches)
