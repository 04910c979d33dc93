"""Let torch.compile fuse NextDiT's q/k RMSNorm + RoPE when comfy-kitchen would run it in plain PyTorch.

Upstream's JointAttention normalises q and k and applies RoPE through comfy-kitchen's custom op
`comfy_kitchen::rms_rope1`. With comfy-kitchen's CUDA backend (its binary wheel on a CUDA 13 PyTorch) that is
one fused kernel. Without it (PyTorch built for CUDA 12.x, where ComfyUI disables that backend, or the
pure-Python wheel) the op runs comfy-kitchen's eager implementation: an RMSNorm, a multiply, an addcmul and
copies per call, 80 calls per DiT step. A custom op is opaque to Inductor, so compiled blocks still ran those
kernels one by one: about 20 ms of a 134 ms step at 1024² on an H200 (bench/results/run13-profile.json, the
"other" kernels of the compiled variant).

`enable()` registers an Inductor decomposition of the op, so inside a compiled graph it becomes plain aten ops
that Inductor fuses with the neighbouring q/k split and GQA repeat. The decomposition is the op's definition
written out of place (Inductor decomposes after functionalization, so comfy-kitchen's eager code, which uses
in-place ops, cannot serve directly): RMSNorm over the head dimension as torch.nn.functional.rms_norm computes
it (fp32 statistics, output in the input's dtype), then interleaved RoPE in the frequencies' dtype; a test holds
it to comfy-kitchen's own eager backend. Nothing changes outside compiled graphs, and where comfy-kitchen's CUDA
kernel is active nothing is registered. The registration goes through torch's own
extension point (Inductor's decomposition table), which is process-wide: a TorchCompileModel graph of another
NextDiT model in the same server gets the same fusion. Inductor's on-disk graph cache does not key on
decompositions, so a cached graph may come from either form; both compute the same function.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

OP_NAME = "rms_rope1"


def _kitchen_cuda_kernel_active() -> bool:
    """Whether comfy-kitchen would run rms_rope1 on CUDA tensors with its own CUDA kernel."""
    import comfy_kitchen as ck

    cuda = ck.list_backends().get("cuda", {})
    return bool(cuda.get("available")) and not cuda.get("disabled") and OP_NAME in cuda.get("capabilities", ())


def rms_rope1(x, freqs_cis, scale, epsilon: float = 1e-6):
    """comfy_kitchen::rms_rope1, out of place: per-head RMSNorm (weight `scale`), then interleaved RoPE."""
    from comfy_kitchen._rope_utils import trim_rope_freqs

    from .qkv_rope import rms_rope

    return rms_rope(x, trim_rope_freqs(x, freqs_cis), scale, epsilon)


def enable() -> bool:
    """Register the decomposition (once per process); True if it is registered now."""
    try:
        import torch
        from comfy_kitchen._rope_utils import trim_rope_freqs  # noqa: F401  (used by rms_rope1)
        from torch._inductor.decomposition import decompositions, register_decomposition
    except ImportError as e:  # an older comfy-kitchen or PyTorch: keep the op as it is
        log.info("NewBie compile: q/k RMSNorm + RoPE not fused (%s)", e)
        return False
    op = getattr(getattr(torch.ops, "comfy_kitchen", None), OP_NAME, None)
    if op is None or _kitchen_cuda_kernel_active():
        return False
    if op.default not in decompositions:
        register_decomposition(op.default)(rms_rope1)
        log.info("NewBie compile: comfy-kitchen's %s is fused by Inductor (its CUDA kernel is not active here)",
                 OP_NAME)
    _refresh_inductor_table(op.default)
    return True


def _refresh_inductor_table(op) -> None:
    """Inductor reads its decompositions through a table cached at its first compile in the process
    (`fast_random_decomps`). A table cached before the registration (another node's compile ran first) lacks the
    op, and Inductor then refuses the graph ("both a fallback and a decomp for same op"): drop that cache."""
    from torch._inductor import decomposition

    if op not in decomposition.select_decomp_table():
        getattr(getattr(decomposition, "fast_random_decomps", None), "cache_clear", lambda: None)()
