"""fp16 for NewBie that cannot overflow: fp16 weights and fp16 matrix multiplies, fp32 everything else.

Why upstream ComfyUI refuses fp16 for Lumina-2/NewBie (supported_inference_dtypes = [bf16, fp32]): fp16's
largest value is 65504. In Next-DiT three things exceed it: the residual stream (it only grows, 36 blocks of
additions), the SwiGLU product silu(w1 x) * (w3 x) feeding w2, and the raw outputs of the attention and FFN
projections before their sandwich RMSNorm. Upstream's own fp16 escape hatch (`clamp_fp16`) clips those
values to +-65504, which changes the result whenever it fires.

What this module does instead, by construction:
- Activations stay fp32 between operations (the model runs with compute dtype fp32): residual stream, norms,
  gates, RoPE and the SwiGLU product can never overflow.
- Every Linear runs its matrix multiply in fp16 on scaled input: s = max|x| (per tensor, a power of two), the
  GEMM sees x / s (all values in [-1, 1]) and fp16 weights; its fp32-accumulated result is multiplied back by
  s in fp32. An fp16 output element is then bounded by the largest row L1-norm of the weight, which the
  loader checks once (`check_weights`): a layer whose bound exceeds fp16 runs in fp32 instead.
- Attention runs PyTorch SDPA in fp16 on q*r, k/r (r balances their scales, leaving q.k unchanged) and v/s_v,
  the output multiplied by s_v: the same attention, every fp16 tensor within range.
- At run time the DiT's output is checked once per call; if anything non-finite appears anyway (a bound was
  too optimistic), that call is recomputed with fp32 matrix multiplies and the event is logged: the sampler
  never sees a NaN.
The large matrix multiplies (all but a few percent of the FLOPs) run in fp16 on tensor cores, so cards
without bf16 (T4, V100, RTX 20xx) get 16-bit speed and half of fp32's weight memory.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
# Safety margin below FP16_MAX for the a-priori bound (the GEMM accumulates in fp32 but rounds to fp16).
_BOUND_LIMIT = FP16_MAX / 4

_state = {"force_fp32": False}


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor power-of-two scale >= max|x| (exact to divide by); 1 where x is all zero. No host sync."""
    amax = x.detach().abs().amax().float().clamp(min=1e-30)
    return torch.exp2(torch.ceil(torch.log2(amax)))


def scaled_fp16_linear(x: torch.Tensor, weight16: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + b with the GEMM in fp16 on x/s (|x/s| <= 1) and the result rescaled in fp32."""
    s = _pow2_scale(x)
    y = F.linear((x / s).to(torch.float16), weight16).float() * s
    if bias is not None:
        y = y + bias.float()
    return y


def scaled_fp16_sdpa(q, k, v, attn_mask=None):
    """SDPA in fp16 (shapes [B, H, N, D]); the same attention as fp32 SDPA up to fp16 rounding.

    q and k are rescaled in opposite directions (q*r, k/r with r = sqrt(s_k/s_q)), which leaves every logit
    q.k unchanged and puts both within sqrt(s_q*s_k); v is divided by s_v and the output multiplied back
    (attention is linear in v). All scales stay on the GPU: no host synchronisation.
    """
    out_dtype = q.dtype
    sq, sk, sv = _pow2_scale(q), _pow2_scale(k), _pow2_scale(v)
    r = torch.sqrt(sk / sq)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(torch.float16)
    out = F.scaled_dot_product_attention((q * r).to(torch.float16), (k / r).to(torch.float16),
                                         (v / sv).to(torch.float16), attn_mask=attn_mask)
    return (out.float() * sv).to(out_dtype)


def make_ops():
    """A ComfyUI operations namespace (like comfy.ops.manual_cast) whose Linear is the scaled fp16 GEMM."""
    import comfy.ops

    base = comfy.ops.manual_cast

    class SafeFP16Ops(base):
        class Linear(base.Linear):
            newbie_fp32_fallback = False  # set per layer by check_weights

            def forward_comfy_cast_weights(self, input):
                fp32 = self.newbie_fp32_fallback or _state["force_fp32"]
                dtype = torch.float32 if fp32 else torch.float16
                result = comfy.ops.cast_bias_weight(self, input, dtype=dtype, bias_dtype=torch.float32,
                                                    offloadable=True)
                weight, bias = result[0], result[1]
                stream = result[2] if len(result) > 2 else None
                try:
                    if fp32:
                        return F.linear(input.float(), weight, bias)
                    return scaled_fp16_linear(input, weight, bias)
                finally:
                    if stream is not None:
                        comfy.ops.uncast_bias_weight(self, weight, bias, stream)

    return SafeFP16Ops


def row_l1_bound(weight: torch.Tensor) -> float:
    """Largest |W x| element possible for |x| <= 1: the largest row L1-norm."""
    return float(weight.detach().float().abs().sum(dim=1).max())


def check_weights(diffusion_model: torch.nn.Module) -> list[str]:
    """Mark Linear layers whose fp16 output could overflow even on scaled input; return their names."""
    risky = []
    for name, module in diffusion_model.named_modules():
        if hasattr(module, "newbie_fp32_fallback") and getattr(module, "weight", None) is not None:
            w = module.weight
            if w.device.type == "meta":
                continue
            if row_l1_bound(w) > _BOUND_LIMIT:
                module.newbie_fp32_fallback = True
                risky.append(name)
    if risky:
        log.info("fp16: %d layers can exceed fp16 even on scaled input and run in fp32: %s", len(risky), risky[:8])
    return risky


def _sdpa_call(args, kwargs, attention):
    """Unpack ComfyUI's attention call, run `attention(q, k, v, mask)` on [B, H, N, D], pack the result.

    ComfyUI calls func(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
    skip_output_reshape=False, ...) (comfy/ldm/modules/attention.py); Next-DiT passes skip_reshape=True.
    """
    q, k, v, heads = args[:4]
    mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
    if not kwargs.get("skip_reshape", False):
        b, n, _ = q.shape
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = attention(q, k, v, mask)
    if kwargs.get("skip_output_reshape", False):
        return out
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def attention_override(func, *args, **kwargs):
    """transformer_options['optimized_attention_override'] for fp16: scaled fp16 SDPA."""
    if _state["force_fp32"]:
        return _sdpa_call(args, kwargs, lambda q, k, v, m: F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=m if m is None or m.dtype == torch.bool else m.float()))
    return _sdpa_call(args, kwargs, lambda q, k, v, m: scaled_fp16_sdpa(q, k, v, attn_mask=m))


def sdpa_override(func, *args, **kwargs):
    """For bf16/fp32: PyTorch SDPA whatever attention ComfyUI was started with (never flash-attn or sage)."""
    def attention(q, k, v, m):
        if m is not None and m.dtype != torch.bool:
            m = m.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return _sdpa_call(args, kwargs, attention)


def nonfinite_guard(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: one finiteness check per call; recompute the call in fp32 GEMMs if needed."""
    out = executor(*args, **kwargs)
    if torch.isfinite(out).all():
        return out
    log.warning("fp16: non-finite values in the DiT output; recomputing this step with fp32 matrix multiplies")
    _state["force_fp32"] = True
    try:
        out = executor(*args, **kwargs)
    finally:
        _state["force_fp32"] = False
    _state["recomputed"] = _state.get("recomputed", 0) + 1
    return out


def recomputations() -> int:
    return _state.get("recomputed", 0)


def configure_model_config(model_config) -> None:
    """Before the model is built: fp16 weights, fp32 activations, the scaled-GEMM operations."""
    model_config.custom_operations = make_ops()


def attach(patcher, safe_fp16: bool) -> None:
    """After the model is built and loaded: SDPA attention always; for fp16 also the weight bounds and the
    non-finite guard."""
    import comfy.patcher_extension

    opts = patcher.model_options.setdefault("transformer_options", {})
    if not safe_fp16:
        opts["optimized_attention_override"] = sdpa_override
        return
    check_weights(patcher.model.diffusion_model)
    opts["optimized_attention_override"] = attention_override
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "newbie_fp16_guard",
                                 nonfinite_guard)
