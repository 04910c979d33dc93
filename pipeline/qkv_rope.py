"""NextDiT's attention inputs in one kernel: the q/k RMSNorm and RoPE, and v, from the qkv projection's output
(on by default where it runs; NEWBIE_QKV_ROPE=0 turns it off).

ComfyUI's JointAttention (comfy/ldm/lumina/model.py) splits the qkv projection into q, k and v, normalises q and
k per head and rotates them (comfy-kitchen's `rms_rope1`, or RMSNorm and `apply_rope` on hosts without it), then
hands all three to the attention. In a compiled block Inductor made that four kernels a main layer; on an H100 (fp8,
cuDNN attention, run121) they took 43.3 + 15.5 + 10.9 + 7.2 us a call to move about 67 MB, under 1 TB/s where the
GPU moves some 3 TB/s.

This kernel gives each program one token: its q and k heads, the first (24 + 8) x 96 values of its row of the
projection, are loaded as one block, contiguous along each head, normalised, split into each pair's two values,
rotated by the token's frequencies (read once for all its heads), joined again and stored contiguously; its v
heads are copied. q, k and v come out as contiguous [B, N, heads, head_dim] tensors, the layout flash-attn-4 takes.
The arithmetic is comfy-kitchen's `rms_rope1` (the norm in fp32, its output rounded to the input's dtype, then
rotated in the frequencies' dtype), so the values are the host's op's but for the order of one sum: 2 in 100,000
a rounding apart at NewBie's size (Inductor's kernels, which skip the rounding, differ in a third of them).

Measured (H100; bench/qkv_rope_kernel.py, run123): 29.9 us a call at 4 warps, 2.2 TB/s, against 91.5 for Inductor's
kernels of the same function and 546 for PyTorch's eager ops. Two first forms were slower than Inductor: a program
a token reading each pair's values with stride-2 loads took 205-216 us (run122-123), a program a head 108.6 us. In
the sampled DiT with flash-attn-4 (in-process, 25 steps, medians of 5 warm runs, run125): fp8 with the kept CUDA
graphs 2.052 against 2.085 s a run (82.1 against 83.4 ms a step), bf16 compiled 2.920 against 2.972 s (its GPU
105.8 against 112.6 ms a step; its CPU bounds it); in the server (run124, medians of 3 warm images) fp8 2.33 against
2.39 s a warm image, sampling 2.04 against 2.08 s (12.24 against 12.05 steps a second), bf16 3.20 against 3.24 s.
With cuDNN's attention (no flash-attn-4) ComfyUI's forward copied the 8 key/value heads 3 times again after the
kernel (two copies of about 9 us a layer); the pack's own attention (pipeline/precision.py `sdpa_override`) now
gets them once each, and hands them to flash-attn-4 as they are, to PyTorch SDPA grouped where its backend takes
that (pipeline/sdpa.py `takes_grouped`), else copied there.

`attach` gives each JointAttention of a pack-loaded DiT `fused_forward` through ComfyUI's object patches. That
forward runs the kernel where it applies (`applies`: a 16-bit input on a CUDA GPU with Triton, q/k norm weights on
the GPU without a weight function, frequencies of NextDiT's layout) and the host's own forward otherwise; after the
kernel it calls the attention as the host's forward does, with k and v repeated for the grouped heads unless the
attention is the pack's own.
"""
from __future__ import annotations

import logging
import sys

import torch

from . import env_switch, forward_patches, precision, triton_ops

log = logging.getLogger(__name__)

SWITCH = "NEWBIE_QKV_ROPE"
OP_NAME = "newbie_lowvram::qkv_norm_rope"
# Warps a program (a token): 4 was fastest on an H100, 29.9 us a call against 33.8 with 2 and 55.5 with 8
# (bench/qkv_rope_kernel.py, run123).
NUM_WARPS = 4
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
OVERRIDE = "optimized_attention_override"  # ComfyUI's transformer_options key for an attention function


def enabled() -> bool:
    """On unless NEWBIE_QKV_ROPE=0."""
    return env_switch.switch(SWITCH, True)


def _kernel():
    """The Triton kernel, imported at first use (Triton is imported only where the kernel runs)."""
    from ._qkv_rope_kernel import qkv_norm_rope_kernel

    return qkv_norm_rope_kernel


def _freqs_strides(freqs: torch.Tensor) -> tuple[int, int]:
    """The sample and token strides of [B or 1, N, 1, D/2, 2, 2] frequencies (0 for a sample dimension of 1)."""
    return (0 if freqs.shape[0] == 1 else freqs.stride(0)), freqs.stride(1)


def _outputs(qkv: torch.Tensor, heads: int, kv_heads: int):
    b, n, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    return (qkv.new_empty(b, n, heads, d), qkv.new_empty(b, n, kv_heads, d), qkv.new_empty(b, n, kv_heads, d))


def _run(qkv, freqs, q_weight, k_weight, eps: float, heads: int, kv_heads: int, wrap=None,
         num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from the kernel on contiguous inputs, launched through `wrap` (torch.library.wrap_triton inside the
    op) where given."""
    from triton import next_power_of_2 as p2

    qkv, freqs = qkv.contiguous(), freqs.contiguous()
    outs = _outputs(qkv, heads, kv_heads)
    b, n, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    kernel = _kernel() if wrap is None else wrap(_kernel())
    stride_b, stride_n = _freqs_strides(freqs)
    kernel[(b * n,)](qkv, freqs, q_weight.contiguous(), k_weight.contiguous(), *outs, n, stride_b, stride_n, eps,
                     H=heads, HKV=kv_heads, D=d, QK_BLOCK=p2(heads + kv_heads), PAIRS_BLOCK=p2(d // 2),
                     V_BLOCK=p2(kv_heads * d), num_warps=num_warps)
    return outs


def launch(qkv: torch.Tensor, freqs: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
           heads: int, kv_heads: int, num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) as `reference` computes them, by the kernel launched directly: as the tests (under Triton's
    interpreter) and bench/qkv_rope_kernel.py run it (the pack calls `qkv_norm_rope`)."""
    if qkv.shape[0] * qkv.shape[1] == 0:
        return _outputs(qkv, heads, kv_heads)
    return _run(qkv, freqs, q_weight, k_weight, eps, heads, kv_heads, num_warps=num_warps)


@triton_ops.register(OP_NAME)
def qkv_norm_rope(qkv: torch.Tensor, freqs: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                  eps: float, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel as a `triton_op`, which compiled blocks launch from Inductor's own wrapper code
    (pipeline/swiglu_fp8.py says why not a `custom_op`): q, k, v ([B, N, heads or kv_heads, D], contiguous) from
    the projection `qkv` ([B, N, (heads + 2 kv_heads) D], contiguous) and the frequencies ([B or 1, N, 1, D/2, 2,
    2], contiguous)."""
    return _run(qkv, freqs, q_weight, k_weight, eps, heads, kv_heads, wrap=torch.library.wrap_triton)


def rms_rope(x: torch.Tensor, freqs: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """comfy-kitchen's `rms_rope1` in plain PyTorch, for x [B, N, heads, D]: per-head RMSNorm (fp32 statistics,
    output in x's dtype), then interleaved RoPE in the frequencies' dtype."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    pairs = normed.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)


def reference(qkv: torch.Tensor, freqs: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
              heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernel computes, in PyTorch: the host's split, view and `rms_rope1` of q and k, and v."""
    b, n, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    q, k, v = torch.split(qkv, [heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return (rms_rope(q.view(b, n, heads, d), freqs, q_weight, eps),
            rms_rope(k.view(b, n, kv_heads, d), freqs, k_weight, eps), v.reshape(b, n, kv_heads, d))


def _plain_norm(norm, device) -> bool:
    """A q/k norm layer whose weight the kernel can read: a plain tensor already on `device`, no weight function (a
    LoRA's, say) to apply first. (The host casts it to the input's dtype, as `_project` does.)"""
    w = getattr(norm, "weight", None)
    return (isinstance(w, torch.Tensor) and not hasattr(w, "__tensor_flatten__") and w.device == device
            and not getattr(norm, "weight_function", None))


def _frequencies_fit(freqs, x: torch.Tensor, head_dim: int) -> bool:
    """NextDiT's RoPE frequencies for x: [B or 1, N, 1, head_dim / 2, 2, 2], the last three contiguous."""
    return (isinstance(freqs, torch.Tensor) and freqs.dim() == 6 and freqs.device == x.device
            and freqs.shape[0] in (1, x.shape[0]) and freqs.shape[1] == x.shape[1] and freqs.shape[2] == 1
            and tuple(freqs.shape[3:]) == (head_dim // 2, 2, 2) and freqs.stride()[3:] == (4, 2, 1)
            and freqs.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _in_training() -> bool:
    import comfy.model_management as mm

    return bool(getattr(mm, "in_training", False))


def applies(attn, x: torch.Tensor, freqs) -> bool:
    """Whether `fused_forward` runs the kernel for this call of JointAttention `attn`."""
    return (qkv_norm_rope is not None and x.is_cuda and x.dtype in _KERNEL_DTYPES and x.dim() == 3
            and getattr(attn, "qk_norm", True) and attn.head_dim % 2 == 0
            and attn.n_local_heads % attn.n_local_kv_heads == 0
            and _plain_norm(attn.q_norm, x.device) and _plain_norm(attn.k_norm, x.device)
            and _frequencies_fit(freqs, x, attn.head_dim) and not _in_training())


def _epsilon(attn) -> float:
    """The norms' epsilon as the host's fused path takes it: the q norm's, for both."""
    eps = getattr(attn.q_norm, "eps", None)
    return eps if eps is not None else torch.finfo(torch.float32).eps


def _attention_of(attn):
    """The attention function the host's JointAttention calls, from the module that defines it."""
    return sys.modules[type(attn).__module__].optimized_attention_masked


def _project(attn, x, freqs):
    """q, k, v of the call, by the kernel where the projection came out as it expects, else by `reference`."""
    qkv = attn.qkv(x)
    # the norms' weights in the input's dtype, as the host's comfy.ops.cast_bias_weight hands them to rms_rope1
    args = (freqs, attn.q_norm.weight.to(x.dtype), attn.k_norm.weight.to(x.dtype), _epsilon(attn),
            attn.n_local_heads, attn.n_local_kv_heads)
    if qkv.dtype == x.dtype and qkv.is_contiguous():
        return qkv_norm_rope(qkv, *args)
    return reference(qkv, *args)


def _takes_grouped_heads(transformer_options) -> bool:
    """Whether the call's attention is the pack's own (pipeline/precision.py `sdpa_override`), which takes k and v
    with each group's head once (pipeline/sdpa.py); any other gets ComfyUI's copies. (A membership test and an
    identity: what Dynamo guards in a compiled block, pipeline/cfg_batch.py says why.)"""
    return (transformer_options is not None and OVERRIDE in transformer_options
            and transformer_options[OVERRIDE] is precision.sdpa_override)


def fused_forward(attn, x: torch.Tensor, x_mask, freqs_cis, transformer_options={}):  # noqa: B006 (the host's)
    """A JointAttention's forward: q, k and v by the kernel where it `applies`, then what the host's forward does
    with them (k and v repeated for the grouped heads, its attention function, the output projection); the host's
    forward otherwise; the pack's own attention gets k and v without the copies. Bound to each attention as a method
    (pipeline/forward_patches.py says why)."""
    if not applies(attn, x, freqs_cis):
        return type(attn).forward(attn, x, x_mask, freqs_cis, transformer_options=transformer_options)
    xq, xk, xv = _project(attn, x, freqs_cis)
    n_rep = attn.n_local_heads // attn.n_local_kv_heads
    if n_rep >= 1 and not _takes_grouped_heads(transformer_options):
        xk = xk.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        xv = xv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
    output = _attention_of(attn)(xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), attn.n_local_heads, x_mask,
                                 skip_reshape=True, transformer_options=transformer_options)
    return attn.out(output)


def _attentions(diffusion_model: torch.nn.Module):
    """(name, module) of every NextDiT JointAttention: the host's class, with the attributes its forward uses (v0.8's
    has no `qk_norm`; its norms without q/k norm are Identity layers, which `applies` refuses for their lack of a
    weight)."""
    for name, module in diffusion_model.named_modules():
        if (type(module).__name__ == "JointAttention"
                and all(hasattr(module, a) for a in ("qkv", "out", "q_norm", "k_norm", "n_local_heads",
                                                     "n_local_kv_heads", "head_dim"))
                and hasattr(sys.modules.get(type(module).__module__), "optimized_attention_masked")):
            yield name, module


def usable(device) -> bool:
    """Whether the kernel can run for a model on `device`: a CUDA device with Triton, and a PyTorch with
    `triton_op`."""
    return triton_ops.runs_on(device, qkv_norm_rope)


def attach(patcher) -> int:
    """Give each JointAttention of the patcher's DiT `fused_forward` (ComfyUI's object patches, undone when ComfyUI
    unpatches the model). Returns how many."""
    n = forward_patches.patch_forwards(patcher, _attentions(patcher.model.diffusion_model), fused_forward)
    if n:
        log.info("NewBie: %d attentions take q, k and v from one kernel (%s=1)", n, SWITCH)
    return n


def attached(patcher) -> bool:
    return any(k.startswith("diffusion_model.") and k.endswith(".attention.forward") for k in patcher.object_patches)


def describe(patcher) -> str:
    """The loader report's line."""
    if attached(patcher):
        return (f"attention inputs: q/k RMSNorm + RoPE and v by the pack's kernel, one launch a layer "
                f"({SWITCH}=0 for ComfyUI's)")
    why = (f"{SWITCH}=0" if not enabled() else "the fp16 path scales q and k itself"
           if getattr(patcher.model, "newbie_fp16", None) is not None
           else "the pack's kernel needs a CUDA GPU with Triton")
    return f"attention inputs: ComfyUI's q/k RMSNorm + RoPE ({why})"
