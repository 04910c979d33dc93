"""NewBie's 8 key/value heads handed to FlashAttention-4 as 8, not as ComfyUI's 24 copies.

Next-DiT has 24 query heads and 8 key/value heads (grouped-query attention). ComfyUI's JointAttention
(comfy/ldm/lumina/model.py) repeats each key and value head 3 times, the copies side by side, before it calls the
attention, so whatever runs after it sees 24 of each. In a compiled block Inductor writes those copies in the q/k
norm + RoPE kernel (2 x 20 MB a main-layer call at 1024x1024 instead of 2 x 7 MB); that kernel takes 42 us a call,
3.2 ms of a resident fp8 step on an H100 (bench/results/run98). FlashAttention-4 takes grouped heads itself, so
where it runs a call (pipeline/sdpa.py) it gets every 3rd head, which is the original one; in a compiled block
Inductor then computes just those and the copies are never written.

That relies on the copies' order. `factor` checks it once a process on a small instance of the model's own
attention class (the host's code, called with the pack's kind of attention override) and returns 1, nothing taken
away, where the copies are not side by side, where the check cannot run, or where the model has no grouped heads.
`NEWBIE_FA4_GQA=0` turns it off. Measured (H100, in-process, a compiled 25-step run, run101): fp8 2.232 s against
2.290 s with the copies, bf16 2.971 against 3.000 s; the attention kernel's own time is the same either way. In
ComfyUI's server it did not run until the check was made of PyTorch's own layers: under dynamic VRAM ComfyUI's
layers have no weights until a state dict loads, the check failed, and every server run with flash-attn-4 up to
run108 kept the copies (its log: "checking ComfyUI's repeat failed").

PyTorch SDPA takes grouped heads too (`enable_gqa`; on PyTorch 2.8 and newer cuDNN's attention among its
backends). It gets them where the backend it runs with the copies takes them as well (pipeline/sdpa.py
`takes_grouped`, PyTorch's own capability checks; where a backend declined them PyTorch would pick a slower one:
cuDNN's attention was 35 against FlashAttention-2's 47 ms a step on an H200). Until run126 that was opt-in: cuDNN
took them on torch 2.11 and gained about 1 % (fp8 2.442 against 2.474 s, bf16 3.170 against 3.188 s, run99; in
the server bf16 3.48 against 3.49 s, run100), before the pack's q/k/v kernel (pipeline/qkv_rope.py) made k and v
with 8 heads, which ComfyUI's forward would copy 3 times again. NEWBIE_SDPA_GQA=0 keeps the copies for SDPA.
"""
from __future__ import annotations

import logging
import types

import torch

from . import env_switch

log = logging.getLogger(__name__)

# transformer_options key with the factor (always set on the pack's bf16, fp32 and quantized DiTs, 1 where nothing is
# taken away: inside compiled blocks a key that some calls lack makes Dynamo guard the dict's length; the fp16
# path's attention is its own and keeps the copies)
KEY = "newbie_kv_repeat"
# ... and whether PyTorch SDPA may get them grouped too (NEWBIE_SDPA_GQA=0: never), set with it
SDPA_KEY = "newbie_kv_repeat_sdpa"

_CHECKED: dict = {}


def enabled() -> bool:
    return env_switch.switch("NEWBIE_FA4_GQA", True)


# Whether this PyTorch's SDPA takes `enable_gqa` (its documented signature; the builtin has no inspectable one)
_SDPA_HAS_GQA = "enable_gqa" in (torch.nn.functional.scaled_dot_product_attention.__doc__ or "")


def sdpa_grouped() -> bool:
    """Whether PyTorch SDPA may get grouped heads (where its backend takes them, pipeline/sdpa.py): this PyTorch's
    SDPA has `enable_gqa`, and NEWBIE_SDPA_GQA is not 0."""
    return _SDPA_HAS_GQA and env_switch.switch("NEWBIE_SDPA_GQA", True)


def side_by_side(t: torch.Tensor, n_rep: int) -> bool:
    """Whether the heads of `t` ([B, H, N, D]) are each repeated `n_rep` times next to each other (what
    repeat_interleave makes), with at least two distinct originals (so that a tiled repeat cannot pass)."""
    if t.shape[1] % n_rep or t.shape[1] // n_rep < 2:
        return False
    originals = t[:, ::n_rep]
    return (torch.equal(t, originals.repeat_interleave(n_rep, dim=1))
            and not torch.equal(originals[:, 0], originals[:, 1]))


# the layers the check's small attention is made of (only Linear runs: it has no q/k norm)
_PLAIN_LAYERS = types.SimpleNamespace(Linear=torch.nn.Linear, RMSNorm=torch.nn.RMSNorm)


def _probe(attention_cls, n_rep: int, head_dim: int, rope_embedder) -> bool:
    """Run a small `attention_cls` (2 key/value heads, `n_rep` query heads each, random fp32 weights on the CPU)
    with an attention override that records what ComfyUI passes, and check that its keys and values come side by
    side. Its layers are PyTorch's own, which have their weights at once (the module docstring says why)."""
    seen = {}

    def record(func, *args, **kwargs):  # what ComfyUI passes: q, k, v as [B, H, N, D] (skip_reshape)
        q, k, v = args[:3]
        seen["kv"] = (k, v)
        # the output's shape, without running ComfyUI's attention (which may be a GPU-only kernel)
        return q.new_zeros(q.shape[0], q.shape[2], q.shape[1] * v.shape[-1])

    dim = 2 * n_rep * head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        settings = {"operations": _PLAIN_LAYERS, "device": "cpu", "dtype": torch.float32}
        module = attention_cls(dim, 2 * n_rep, 2, qk_norm=False, operation_settings=settings)
        for p in module.parameters():
            torch.nn.init.normal_(p)
        x = torch.randn(1, 3, dim)
        with torch.no_grad():
            freqs = rope_embedder(torch.zeros(1, 3, 3)).movedim(1, 2)
            module(x, None, freqs, transformer_options={"optimized_attention_override": record})
    return "kv" in seen and all(side_by_side(t, n_rep) for t in seen["kv"])


def factor(diffusion_model) -> int:
    """How many side-by-side copies of each key/value head the model's attention passes (1: none to take away)."""
    try:
        attention = diffusion_model.layers[0].attention
        n_heads, n_kv = attention.n_local_heads, attention.n_local_kv_heads
        head_dim, rope_embedder = attention.head_dim, diffusion_model.rope_embedder
    except (AttributeError, IndexError, TypeError):
        return 1
    if not enabled() or n_kv >= n_heads or n_heads % n_kv:
        return 1
    n_rep = n_heads // n_kv
    key = (type(attention), n_rep, head_dim)
    if key not in _CHECKED:
        try:
            _CHECKED[key] = _probe(type(attention), n_rep, head_dim, rope_embedder)
        except Exception as e:  # noqa: BLE001 - a host whose attention differs: the copies stay
            log.info("NewBie attention: key/value heads stay repeated (checking ComfyUI's repeat failed: %s: %s)",
                     type(e).__name__, e)
            _CHECKED[key] = False
        if not _CHECKED[key]:
            log.info("NewBie attention: ComfyUI's key/value copies are not side by side here; they stay repeated")
    return n_rep if _CHECKED[key] else 1


def options(diffusion_model) -> dict:
    """The transformer_options entries for a model: its factor, and whether SDPA gets the heads grouped too."""
    n = factor(diffusion_model)
    return {KEY: n, SDPA_KEY: n > 1 and sdpa_grouped()}


def from_options(transformer_options) -> tuple[int, bool]:
    """(factor, SDPA too) a DiT call carries ((1, False) without them)."""
    if transformer_options is None or KEY not in transformer_options:
        return 1, False
    return transformer_options[KEY], SDPA_KEY in transformer_options and transformer_options[SDPA_KEY]
