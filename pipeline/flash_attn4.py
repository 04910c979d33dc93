"""FlashAttention-4 (the optional `flash-attn-4` package) for NewBie's attention, where it is installed.

flash-attn-4 is Tri Dao's FlashAttention written in NVIDIA's CuTe DSL: pure Python, its kernels compiled on first
use for the GPU at hand (Ampere to Blackwell; on Hopper the forward kernel is FlashAttention-3's design, with a
tile tuned for NewBie's head size of 96). On an H200 the pack's warm bf16 image took 3.42 and 3.46 s with it against
3.57 and 3.68 s with PyTorch's cuDNN attention in the same calls (0.78x and 0.77x upstream's best against 0.81x and
0.82x; bench/results run42, run43), the same error against fp32 (5.6e-4 in bf16). The pack never requires it:
without it, or for an input it does not take (a mask, fp32, a CPU tensor, a head size that is not a multiple of 8
or is above 256), attention is PyTorch's SDPA (pipeline/sdpa.py decides which). An install that does not import,
or a kernel that fails at run time, is logged once and SDPA takes over; the job goes on.

The kernel is wrapped as the custom op `newbie::fa4_attention`, so a compiled block sees one opaque call with a
known output shape instead of tracing into the DSL's launcher. Inputs and output are in FlashAttention's layout,
[batch, tokens, heads, head size]; `attention` takes and returns SDPA's [batch, heads, tokens, head size] as
transposed views, which is the memory order ComfyUI's Next-DiT already has, so nothing is copied.

flash-attn-4 compiles its kernels in each new process. Its own on-disk cache of compiled kernels is off unless
FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1; the pack turns it on before the package is imported (a value the user
set is kept), as Inductor's caches are on by default, so a restarted server loads the kernels instead of compiling
them again. The cache lives where flash-attn-4 puts it (FLASH_ATTENTION_CUTE_DSL_CACHE_DIR, by default a
directory under the system's temporary directory, as Inductor's) and is keyed by the package's source.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import fa4_replay

log = logging.getLogger(__name__)

DTYPES = (torch.float16, torch.bfloat16)
OP_NAME = "newbie::fa4_attention"
# flash-attn-4's switch for its on-disk kernel cache (read when flash_attn.cute is imported).
CACHE_SWITCH = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"


_FAILED: list[BaseException] = []  # a runtime failure of the kernel: SDPA from then on, in this process


def _unloadable(e: BaseException) -> None:
    log.warning("flash-attn-4 is installed but does not load (%s: %s); NewBie's attention uses PyTorch SDPA",
                type(e).__name__, e)


@functools.cache
def kernel():
    """flash-attn-4's `flash_attn_func`, or None when the package is absent or does not import here (logged)."""
    import importlib.util

    try:
        if importlib.util.find_spec("flash_attn") is None:
            return None
    except (ImportError, ValueError):
        return None
    os.environ.setdefault(CACHE_SWITCH, "1")
    try:
        from flash_attn.cute.interface import flash_attn_func
    except ModuleNotFoundError as e:
        if e.name not in ("flash_attn.cute", "flash_attn.cute.interface"):  # else: FlashAttention-2 alone
            _unloadable(e)
        return None
    except Exception as e:  # noqa: BLE001 - an install that cannot load (a CUDA library or torch it does not match)
        _unloadable(e)
        return None
    return flash_attn_func


@functools.cache
def replays() -> fa4_replay.Replays:
    """This process's kept launches of flash-attn-4's kernel (pipeline/fa4_replay.py)."""
    return fa4_replay.for_flash_attn4()


def installed() -> bool:
    """flash-attn-4 imports here and has not failed in this process."""
    return not _FAILED and kernel() is not None


def version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("flash-attn-4")
    except Exception:  # noqa: BLE001 - metadata is informative only
        return None


def shapes_fit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FlashAttention-4 computes this [B, H, N, D] call: 16-bit tensors of one dtype, head sizes multiples
    of 8 up to 256, as many key as value tokens, as many query as key heads or a multiple of them."""
    return (q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == k.shape[-1] and q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and v.shape[-1] <= 256 and k.shape[-2] == v.shape[-2]
            and k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0)


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FlashAttention-4 runs this [B, H, N, D] call (unmasked): `shapes_fit`, on a CUDA GPU."""
    return q.is_cuda and shapes_fit(q, k, v)


def _flash_layout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The op's body. flash-attn-4 is beta software: should it fail (a kernel that does not compile for this GPU,
    say), the failure is logged once and this call and every later one computes PyTorch SDPA instead; running out
    of memory is not such a failure and goes to ComfyUI's own handling."""
    found = kernel() if not _FAILED else None
    if found is not None:
        try:
            out = replays().call(found, q, k, v)  # flash-attn-4's own call where no direct launch is kept
            return out.contiguous()  # the layout the op's fake promises a compiled block (a no-op for FA4's output)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of an optional kernel falls back to SDPA
            _FAILED.append(e)
            log.warning("flash-attn-4 failed (%s: %s); NewBie's attention uses PyTorch SDPA from now on in this "
                        "server", type(e).__name__, e)
    grouped = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           **grouped)
    return out.transpose(1, 2).contiguous()


def _define_op():
    """The custom op, defined once a process (a second import of the pack, as ComfyUI and the tests can do,
    finds it already registered)."""
    namespace, name = OP_NAME.split("::")
    existing = getattr(getattr(torch.ops, namespace), name, None)
    if existing is not None:
        return existing

    @torch.library.custom_op(OP_NAME, mutates_args=())
    def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _flash_layout_attention(q, k, v)

    @fa4_attention.register_fake
    def _(q, k, v):
        return q.new_empty(*q.shape[:-1], v.shape[-1])

    return getattr(getattr(torch.ops, namespace), name)


_OP = _define_op()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention of [B, H, N, D] tensors by FlashAttention-4, returned as [B, H, N, Dv]."""
    return _OP(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
