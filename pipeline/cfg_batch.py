"""One DiT call for the positive and the negative prompt, exactly, when their captions differ in length.

ComfyUI runs a sampling step's conditionings as one batch only where their model inputs concatenate. For
Lumina-2 and NewBie the caption (`c_crossattn`, a CONDRegular) and its length (`num_tokens`, a CONDConstant)
concatenate only between captions of the same length, and a positive prompt and a negative one almost never have
it: the bench's XML positive and tag negative (about 259 and 50 tokens) ran as two DiT calls of batch 1 every
step, where one call of batch 2 takes less time than two of batch 1 (bench/profile_sampling.py).

Padding the shorter caption changes nothing for the real tokens if two things hold, and this module makes them:
- the padding tokens are never attended to: the pack's attention (pipeline/precision.py, `_sdpa_call`) drops
  each sample's padding keys (SDPA per sample on the keys that are real; no mask, so the kernels stay the fast
  ones). Padding queries compute rows nobody reads: only the image tokens leave the DiT, and no real token
  attends to a padding one.
- the positions stay what they were: ComfyUI numbers caption tokens 1..L and gives every image token the caption
  length + 1 on RoPE's first axis, so a caption padded at its end would move the image away from its caption.
  Padding goes in front instead: the real tokens end at the padded length, as they did at their own, and RoPE
  sees only differences of positions. (Between image tokens the first axis is the same constant either way.)

The padding happens per step in a CALC_COND_BATCH wrapper (ComfyUI's hook around its batching), on copies of the
conditionings: the caption gets zeros in front, `num_tokens` the common length, and a `newbie_caption_pad` entry
(`CaptionPad`, a CONDConstant that concatenates into the per-sample padding) that reaches the DiT call as a
keyword; a DIFFUSION_MODEL wrapper moves it into the call's transformer_options for the attention. ComfyUI's own
batching then decides, as always, whether the batch fits in memory. Nothing is padded where the rule cannot be
kept: an attention override other than the pack's (another node's would attend to the padding), a DiT that pads
captions itself (`pad_tokens_multiple`), a caption attention mask, 'default' conditionings, or a padded caption
as long as the image (the attention could not tell the two apart).

When it pays (measured on an H200, bf16, 1024², bench/results/run27-29): batching halves what a *streamed* DiT
fetches per step, since each call fetches every weight again. At a 4 GiB budget (dynamic VRAM) the pack sampled
5.1-5.6 it/s with one call a step, against 3.7-4.1 it/s with two in earlier runs, and took 0.59x upstream's time.
With the weights *resident* one call of batch 2 was slower than two of batch 1 (6.85 it/s against 7.36 in the
same run: the per-sample attention and the padding's extra rows cost more than the larger GEMMs save, which are
already large enough to fill the GPU). So by default (`auto`) a step's prompts are batched where the DiT's
weights stream (a dynamic-VRAM patcher, or ComfyUI's lowvram partial load) and a quarter or more of them do
(`streams_enough`: at 8 GiB, where about 15 % of the bf16 DiT streams, two calls were faster, run33). The fp16
path used to be batched as well, because it read an overflow flag on the host after every call and one call a
step drained the GPU once instead of twice (run27, run33: fp16 batched took as long as fp16 on two calls, where
batching cost a resident bf16 DiT time); it now reads that flag once a step whatever the number of calls
(pipeline/precision.py `step_guard`), so it follows the same rule as bf16: resident, two calls took 4.43 s an
image against 4.56 s batched (run45).
NEWBIE_CFG_BATCH=always or =off in the server's environment overrides that, for comparisons.
"""
from __future__ import annotations

import functools

import torch

from . import compat, env_switch
from .oom.calls import PerRow

WRAPPER_KEY = "newbie_cfg_batch"
PAD_KEY = "newbie_caption_pad"
# Set on the pack's attention overrides (pipeline/precision.py), which drop the padding keys. Another node's
# override (a SageAttention patch, say) would attend to them: then nothing is padded.
PADDING_AWARE = "newbie_drops_caption_padding"


@functools.cache
def caption_pad_class():
    """CaptionPad: a CONDConstant holding one int per sample (the padding in front of its caption) that, unlike a
    CONDConstant, concatenates with any other: into the paddings of the call's rows, in batch order (a PerRow,
    which the OOM Guard cuts with the batch when it splits a call)."""
    import comfy.conds

    class CaptionPad(comfy.conds.CONDConstant):
        def process_cond(self, batch_size, **kwargs):
            return self._copy_with(tuple(self.cond) * (batch_size // len(self.cond)))

        def can_concat(self, other):
            return isinstance(other, CaptionPad)

        def concat(self, others):
            return PerRow(tuple(self.cond) + tuple(p for o in others for p in o.cond))

    return CaptionPad


def image_tokens(diffusion_model, x: torch.Tensor) -> int:
    """How many image tokens the DiT makes of a latent `x` [B, C, H, W] (padded up to whole patches)."""
    p = diffusion_model.patch_size
    return -(-x.shape[-2] // p) * -(-x.shape[-1] // p)


def pad_captions(conds: list, n_image_tokens: int) -> list | None:
    """Copies of a step's conditionings with every caption padded in front to the longest one (see the module
    docstring), or None where they already share one length or cannot be padded."""
    import comfy.conds

    entries = [c for group in conds if group is not None for c in group]
    if not entries or any("default" in c for c in entries):
        return None
    captions = [c.get("model_conds", {}).get("c_crossattn") for c in entries]
    if any(cap is None or getattr(cap, "cond", None) is None or cap.cond.ndim != 3 for cap in captions) or \
            any("attention_mask" in c["model_conds"] for c in entries):
        return None
    lengths = {cap.cond.shape[1] for cap in captions}
    longest = max(lengths)
    if len(lengths) == 1 or longest == n_image_tokens:
        return None
    pad_cls = caption_pad_class()

    def padded(entry):
        cap = entry["model_conds"]["c_crossattn"].cond
        pad = longest - cap.shape[1]
        model_conds = dict(entry["model_conds"])
        model_conds["c_crossattn"] = comfy.conds.CONDRegular(
            torch.cat([cap.new_zeros(cap.shape[0], pad, cap.shape[2]), cap], dim=1))
        if "num_tokens" in model_conds:
            model_conds["num_tokens"] = comfy.conds.CONDConstant(longest)
        model_conds[PAD_KEY] = pad_cls((pad,))
        return {**entry, "model_conds": model_conds}

    return [None if group is None else [padded(c) for c in group] for group in conds]


def mode() -> str:
    """'auto' (batch where a good share of the weights stream: `wanted`), 'always' or 'off', from
    NEWBIE_CFG_BATCH (default auto)."""
    value = env_switch.value("NEWBIE_CFG_BATCH", "auto")
    if value in env_switch.OFF:
        return "off"
    return "always" if value in env_switch.ON or value == "always" else "auto"


def weights_stream(model) -> bool:
    """Whether the BaseModel's weights are fetched per call: held by a dynamic-VRAM patcher (v0.33), or loaded
    partially by the legacy one (`model_lowvram`)."""
    patcher = getattr(model, "current_patcher", None)
    if patcher is not None and compat.is_dynamic(patcher):
        return True
    return bool(getattr(model, "model_lowvram", False))


# The share of the DiT's weights a streamed model fetches per call from which one batched call beats two (H200,
# bench/results/NOTES.md). Where the weights barely exceed the room (8 GiB, bf16: about 15 % streams by the
# loader's estimate) two calls ran 5.66 it/s against batched 5.44 in one call (run33), as for a resident DiT,
# where batching costs its padding and the per-sample attention: a small margin, calibrated on one comparison.
# Where most of it streams (4 GiB) batching fetches each weight once a step instead of twice and took the pack
# from 1.06x upstream's time to 0.59x (run20, run29).
BATCH_FROM_STREAMED_SHARE = 0.25
SHARE_ATTR = "newbie_streamed_share"


def streams_enough(model) -> bool:
    """Whether enough of a streaming DiT's weights stream for batching to pay: the loader's estimate of the share
    that does not fit (`SHARE_ATTR` on the BaseModel); unknown counts as enough."""
    share = getattr(model, SHARE_ATTR, None)
    return share is None or share >= BATCH_FROM_STREAMED_SHARE


def wanted(model) -> bool:
    m = mode()
    return m == "always" or (m == "auto" and weights_stream(model) and streams_enough(model))


def _calc_cond_batch(executor, model, conds, x_in, timestep, model_options):
    """CALC_COND_BATCH wrapper: the step's conditionings with their captions padded to one length, where that pays
    (`wanted`) and the attention in use is the pack's."""
    dm = model.diffusion_model
    override = (model_options.get("transformer_options") or {}).get("optimized_attention_override")
    if wanted(model) and getattr(override, PADDING_AWARE, False) \
            and getattr(dm, "pad_tokens_multiple", None) is None and hasattr(dm, "patch_size"):
        conds = pad_captions(conds, image_tokens(dm, x_in)) or conds
    return executor(model, conds, x_in, timestep, model_options)


# The paddings reach the compiled blocks as tensor sizes, not ints: Dynamo specialises an int it reads (a new
# prompt pair would compile the blocks again) but keeps a size marked dynamic symbolic. A size of 0 or 1 is
# always specialised, hence the offset.
_SIZE_OFFSET = 2


def _to_attention(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the per-sample padding (a keyword of the call) into a copy of the call's
    transformer_options, with the number of image tokens, for the attention (pipeline/precision.py); None there
    for a call without padding. The key is always there: where the attention inside the compiled blocks tested the
    dict for a key it lacked, Dynamo guarded on the dict's length, and the main layers (before which ComfyUI adds
    block_index and two more keys) compiled a graph of their own, the same as the noise refiner's (0.4 s of a
    restarted server's first image with the caches filled, run79)."""
    pads = kwargs.pop(PAD_KEY, None)
    entry = None
    if pads is not None and any(pads):
        markers = tuple(torch.empty(0, int(p) + _SIZE_OFFSET) for p in pads)
        for m in markers:
            torch._dynamo.maybe_mark_dynamic(m, 1)
        entry = (markers, image_tokens(executor.class_obj, args[0]))
    opts = dict(kwargs.get("transformer_options") or {})
    opts[PAD_KEY] = entry
    kwargs["transformer_options"] = opts
    return executor(*args, **kwargs)


def attach(patcher) -> None:
    """Batch a sampling step's prompts of different lengths into one DiT call (replaces an earlier attach)."""
    import comfy.patcher_extension as pe

    for kind, fn in ((pe.WrappersMP.CALC_COND_BATCH, _calc_cond_batch), (pe.WrappersMP.DIFFUSION_MODEL, _to_attention)):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patcher.add_wrapper_with_key(kind, WRAPPER_KEY, fn)


def split_by_padding(q, k, v, transformer_options, attention):
    """attention(q, k, v, None) ([B, H, N, D]) with each sample's padding keys dropped, or None where this call
    carries no padding or is the image-only attention of the noise refiner (every other attention of the call has
    the caption in front: pad_captions refuses a padded caption as long as the image)."""
    # A membership test, not .get(): inside compiled blocks Dynamo then guards on the key alone, not on the
    # dict's other entries (its block_index changes every block and would recompile each one). The key is there
    # in every call through _to_attention, None without padding (a missing key made Dynamo guard the dict's length).
    if transformer_options is None or PAD_KEY not in transformer_options or transformer_options[PAD_KEY] is None:
        return None
    markers, n_image = transformer_options[PAD_KEY]
    if len(markers) != q.shape[0] or q.shape[2] == n_image:
        return None
    return torch.cat([attention(q[b:b + 1], k[b:b + 1, :, m.shape[1] - _SIZE_OFFSET:],
                                v[b:b + 1, :, m.shape[1] - _SIZE_OFFSET:], None) for b, m in enumerate(markers)])
