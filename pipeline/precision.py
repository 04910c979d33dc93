"""fp16 for NewBie that cannot overflow: fp16 weights and fp16 matrix multiplies, fp32 everything else.

Why upstream ComfyUI refuses fp16 for Lumina-2/NewBie (supported_inference_dtypes = [bf16, fp32]): fp16's
largest value is 65504. In Next-DiT three things exceed it: the residual stream (it only grows, 36 blocks of
additions), the SwiGLU product silu(w1 x) * (w3 x) feeding w2, and the raw outputs of the attention and FFN
projections before their sandwich RMSNorm. Upstream's own fp16 escape hatch (`clamp_fp16`) clips those
values to +-65504, which changes the result whenever it fires.

What this module does instead:
- The residual stream stays fp32 (the model's compute dtype is fp32, and every block adds its branch output
  into the fp32 stream), so the quantity that only grows can never overflow; embeddings, modulation, the final
  layer and the norms of the stream run in fp32 too.
- Every matrix multiply runs in fp16 on fp16 inputs (the fast path). Its output is rounded to fp16, so a value
  beyond 65504 becomes inf there. Only the q/k/v projection hands fp16 on (to the q/k norm and attention); every
  other Linear returns fp32, so the tensors reaching upstream's `clamp_fp16` (attention output, SwiGLU product,
  FFN output) are fp32 and the clamp is a no-op: an overflow cannot be clipped away. An inf travels on as inf or
  NaN (RMSNorm of inf is NaN, NaN survives every later op) to the DiT's output, where one `isfinite` check sees
  it. Nothing is checked per layer: no extra passes over the activations, nothing that stops
  torch.compile from fusing the casts into the neighbouring elementwise work.
- If that check fails, the call (or the step, below) is recomputed in the scaled form, which cannot overflow by
  construction: activations fp32, each GEMM in fp16 on x / s with s = 2^ceil(log2 max|x|) (all inputs in [-1, 1])
  and the fp32-accumulated result multiplied back by s; attention in fp16 on q*r, k/r (r = sqrt(s_k/s_q), leaving q.k
  unchanged) and v/s_v, the output multiplied by s_v. An fp16 GEMM output is then bounded by the largest row
  L1-norm of the weight, checked once at load (`check_weights`): a layer whose bound exceeds fp16 runs in fp32.
  If even that call came out non-finite, it is recomputed with fp32 GEMMs. The sampler never sees a NaN, and
  each recomputation is logged and counted.
- The check reads one flag on the host per sampling step, not per call: a CALC_COND_BATCH wrapper (ComfyUI's hook
  around a step's DiT calls) checks the step's outputs together once its calls are issued, and recomputes the
  whole step in the scaled form if any is non-finite. A host read drains the GPU, and the GPU then waits while
  the CPU issues the next call's first, small kernels (embedders, refiner blocks); checking after each of a
  step's two calls (the positive and the negative prompt) paid that twice a step, checking once pays it where
  ComfyUI's sampler synchronises anyway (k-diffusion compares sigmas on the GPU every step). A DiT call made
  outside a sampling step (another node calling the model) is checked on its own, as before.
The state of the path (mode, recomputations) belongs to one model (`FP16State`, on the BaseModel as
`newbie_fp16`): two fp16 models in one server never share it.
The large matrix multiplies (all but a few percent of the FLOPs) run in fp16 on tensor cores, so cards
without bf16 (T4, V100, RTX 20xx) get 16-bit speed and half of fp32's weight memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cfg_batch, kv_repeat
from .sdpa import around_call as sdpa_order_around_call, sdpa

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
# Safety margin below FP16_MAX for the a-priori bound (the GEMM accumulates in fp32 but rounds to fp16).
_BOUND_LIMIT = FP16_MAX / 4
MODES = ("fast", "scaled", "fp32")


@dataclass
class FP16State:
    """One fp16 model's path: `mode` ("fast": fp16 GEMMs, checked once per step or call; "scaled": overflow-safe by
    construction; "fp32": last resort), how many steps or lone DiT calls had to be recomputed, and whether a
    step's check is under way (`in_step`: its calls skip their own)."""
    mode: str = "fast"
    recomputed: int = 0
    in_step: bool = False


def state_of(model) -> FP16State | None:
    """The fp16 state of a BaseModel (or a ModelPatcher's model); None for a model not on the pack's fp16 path."""
    return getattr(getattr(model, "model", model), "newbie_fp16", None)


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
    out = sdpa((q * r).to(torch.float16), (k / r).to(torch.float16), (v / sv).to(torch.float16),
               attn_mask=attn_mask)
    return (out.float() * sv).to(out_dtype)


def make_ops(state: FP16State):
    """A ComfyUI operations namespace (like comfy.ops.manual_cast) whose Linear follows `state.mode`."""
    import comfy.ops

    base = comfy.ops.manual_cast

    class SafeFP16Ops(base):
        class Linear(base.Linear):
            newbie_fp32_fallback = False  # set per layer by check_weights
            newbie_fp16_output = False  # True for the q/k/v projections of the blocks (mark_block_linears)

            def forward_comfy_cast_weights(self, input):
                mode = "fp32" if self.newbie_fp32_fallback else state.mode
                dtype = torch.float32 if mode == "fp32" else torch.float16
                bias_dtype = torch.float16 if mode == "fast" else torch.float32
                result = comfy.ops.cast_bias_weight(self, input, dtype=dtype, bias_dtype=bias_dtype,
                                                    offloadable=True)
                weight, bias = result[0], result[1]
                stream = result[2] if len(result) > 2 else None
                try:
                    if mode == "fp32":
                        return F.linear(input.float(), weight, bias)
                    if mode == "scaled":
                        return scaled_fp16_linear(input, weight, bias)
                    y = F.linear(input.to(torch.float16), weight, bias)
                    return y if self.newbie_fp16_output else y.float()
                finally:
                    if stream is not None:
                        comfy.ops.uncast_bias_weight(self, weight, bias, stream)

    return SafeFP16Ops


def row_l1_bound(weight: torch.Tensor) -> float:
    """Largest |W x| element possible for |x| <= 1: the largest row L1-norm."""
    return float(weight.detach().float().abs().sum(dim=1).max())


_BLOCK_BRANCH = ("layers.", "noise_refiner.", "context_refiner.")


def mark_block_linears(diffusion_model: torch.nn.Module) -> int:
    """The blocks' q/k/v projections hand fp16 to the q/k norm and attention (an overflow there is inf and
    reaches the output); every other Linear returns fp32, so upstream's clamp_fp16 never sees fp16."""
    n = 0
    for name, module in diffusion_model.named_modules():
        if hasattr(module, "newbie_fp16_output") and name.startswith(_BLOCK_BRANCH) and \
                name.endswith(".attention.qkv"):
            module.newbie_fp16_output = True
            n += 1
    return n


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
    """Unpack ComfyUI's attention call, run `attention(q, k, v, mask)` on [B, H, N, D], pack the result. A batch
    whose captions were padded to one length (pipeline/cfg_batch.py) runs it per sample without the padding keys.

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
    out = None if mask is not None else cfg_batch.split_by_padding(q, k, v, kwargs.get("transformer_options"),
                                                                   attention)
    if out is None:
        out = attention(q, k, v, mask)
    if kwargs.get("skip_output_reshape", False):
        return out
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _fp32_sdpa(q, k, v, m):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          attn_mask=m if m is None or m.dtype == torch.bool else m.float())


def _fast_fp16_sdpa(q, k, v, m):
    q, k, v = (t.to(torch.float16) for t in (q, k, v))  # an inf here turns the output NaN: the call check sees it
    if m is not None and m.dtype != torch.bool:
        m = m.to(torch.float16)
    return sdpa(q, k, v, attn_mask=m)


_SDPA_BY_MODE = {"fast": _fast_fp16_sdpa, "scaled": lambda q, k, v, m: scaled_fp16_sdpa(q, k, v, attn_mask=m),
                 "fp32": _fp32_sdpa}


def attention_override(state: FP16State):
    """transformer_options['optimized_attention_override'] for one fp16 model: SDPA by `state.mode`."""
    def override(func, *args, **kwargs):
        return _sdpa_call(args, kwargs, _SDPA_BY_MODE[state.mode])
    setattr(override, cfg_batch.PADDING_AWARE, True)
    return override


def sdpa_override(func, *args, **kwargs):
    """For bf16/fp32 (and the quantized DiTs): the pack's attention (pipeline/sdpa.py: FlashAttention-4 where it
    runs, else PyTorch SDPA in the pack's backend order) whatever attention ComfyUI was started with (never
    flash-attn or sage); FlashAttention-4 gets the grouped key/value heads once each (pipeline/kv_repeat.py)."""
    kv, grouped_sdpa = kv_repeat.from_options(kwargs.get("transformer_options"))

    def attention(q, k, v, m):
        if m is not None and m.dtype != torch.bool:
            m = m.to(q.dtype)
        return sdpa(q, k, v, attn_mask=m, kv_repeat=kv, grouped_sdpa=grouped_sdpa)
    return _sdpa_call(args, kwargs, attention)


setattr(sdpa_override, cfg_batch.PADDING_AWARE, True)


def _until_finite(state: FP16State, run, finite, what: str):
    """run() in the fast mode; while finite(result) is False, again in the scaled form, then in fp32. `what` names
    the work for the log ("this DiT call", "this sampling step")."""
    state.mode = "fast"
    try:
        out = run()
        if finite(out):
            return out
        for mode in ("scaled", "fp32"):
            log.warning("fp16: values beyond fp16's range in %s; recomputing it in %s form", what, mode)
            state.mode = mode
            state.recomputed += 1
            out = run()
            if finite(out):
                return out
        return out
    finally:
        state.mode = "fast"


def _finite(out: torch.Tensor) -> bool:
    return bool(torch.isfinite(out).all())  # the one host read


def _all_finite(outputs) -> bool:
    """Whether every tensor of a step's outputs is finite: one host read for all of them."""
    flags = [torch.isfinite(o).all() for o in outputs if isinstance(o, torch.Tensor)]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_guard(state: FP16State):
    """DIFFUSION_MODEL wrapper for one fp16 model: a call outside a sampling step's check gets its own (the fast
    call, one finiteness read; on overflow the scaled call, then fp32); inside a step it runs as it is."""
    def guard(executor, *args, **kwargs):
        if state.in_step:
            return executor(*args, **kwargs)
        return _until_finite(state, lambda: executor(*args, **kwargs), _finite, "this DiT call")
    return guard


def step_guard(state: FP16State):
    """CALC_COND_BATCH wrapper for one fp16 model: a sampling step's DiT calls (the positive and the negative
    prompt, batched or not) in the fast form, their outputs checked with one host read; on overflow the whole
    step again in the scaled form, then fp32."""
    def guard(executor, *args, **kwargs):
        if state.in_step:
            return executor(*args, **kwargs)
        state.in_step = True
        try:
            return _until_finite(state, lambda: executor(*args, **kwargs), _all_finite, "this sampling step")
        finally:
            state.in_step = False
    return guard


def configure_model_config(model_config, state: FP16State | None = None) -> FP16State:
    """Before the model is built: fp16 weights, fp32 activations, operations that follow the returned state
    (a new one, or `state` for a twin of an existing model that must share its path)."""
    state = state or FP16State()
    model_config.custom_operations = make_ops(state)
    return state


GUARD_KEY = "newbie_fp16_guard"
SDPA_ORDER_KEY = "newbie_sdpa_order"


def attach(patcher, state: FP16State | None) -> None:
    """After the model is built and loaded: SDPA attention always, with its backend order set around each DiT call
    (pipeline/sdpa.py `around_call`); for fp16 (state given) also the weight bounds and the non-finite guards (per
    step, and per call outside a step). The state goes onto the model, so clones share it."""
    import comfy.patcher_extension

    wrappers = comfy.patcher_extension.WrappersMP
    patcher.remove_wrappers_with_key(wrappers.DIFFUSION_MODEL, SDPA_ORDER_KEY)
    patcher.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, SDPA_ORDER_KEY, sdpa_order_around_call)
    opts = patcher.model_options.setdefault("transformer_options", {})
    if state is None:
        opts["optimized_attention_override"] = sdpa_override
        opts.update(kv_repeat.options(patcher.model.diffusion_model))
        return
    patcher.model.newbie_fp16 = state
    check_weights(patcher.model.diffusion_model)
    mark_block_linears(patcher.model.diffusion_model)
    opts["optimized_attention_override"] = attention_override(state)
    for kind, make in ((wrappers.DIFFUSION_MODEL, nonfinite_guard), (wrappers.CALC_COND_BATCH, step_guard)):
        patcher.remove_wrappers_with_key(kind, GUARD_KEY)
        patcher.add_wrapper_with_key(kind, GUARD_KEY, make(state))
