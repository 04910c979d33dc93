"""One call of the diffusion model (`BaseModel.apply_model`): its arguments, how to cut it along the batch,
and which sampling step it belongs to. Pure logic on tensors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


class SplitImpossible(Exception):
    """This call's inputs cannot be cut along the batch (the reason is the message)."""


class PerRow(tuple):
    """A call argument that is not a tensor but holds one value per batch row (the caption paddings of
    pipeline/cfg_batch.py): cut with the batch like a tensor's rows."""


@dataclass
class ModelCall:
    """The arguments of one `BaseModel.apply_model` call. Rows of the batch are independent samples (cond and
    uncond, latent batch), so a slice of rows is a smaller call with the same per-row result."""
    x: torch.Tensor
    t: Any
    c_concat: Any = None
    c_crossattn: Any = None
    control: Any = None
    transformer_options: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    def _rows_per_chunk(self) -> int:
        chunks = len(self.transformer_options.get("cond_or_uncond") or ())
        return self.batch // chunks if chunks and self.batch % chunks == 0 else 1

    def check_splittable(self) -> None:
        if self.batch < 2:
            raise SplitImpossible("the batch has a single row")
        if self.control is not None:
            raise SplitImpossible("a ControlNet's outputs are batched with the call and are not cut here")
        for name, value in self._tensor_args():
            if value.ndim and value.shape[0] not in (1, self.batch):
                raise SplitImpossible(f"input {name!r} has {value.shape[0]} rows, the batch has {self.batch}")

    def _tensor_args(self):
        named = [("x", self.x), ("t", self.t), ("c_concat", self.c_concat), ("c_crossattn", self.c_crossattn)]
        named += list(self.kwargs.items())
        for name, value in named:
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if torch.is_tensor(item):
                    yield name, item

    def split_sizes(self, below: int | None = None) -> list[int]:
        """Rows per piece for successive splits (about halving each time), keeping every piece inside one
        cond/uncond chunk or made of whole chunks, so `cond_or_uncond` stays true for each piece."""
        b, rpc = self.batch, self._rows_per_chunk()
        current = min(below or b, b)
        sizes = []
        for s in range(b - 1, 0, -1):
            if b % s == 0 and (s % rpc == 0 or rpc % s == 0) and s <= current / 2:
                sizes.append(s)
                current = s
        return sizes

    def rows(self, start: int, stop: int) -> "ModelCall":
        b = self.batch

        def cut(value):
            if torch.is_tensor(value):
                return value[start:stop] if value.ndim and value.shape[0] == b else value
            if isinstance(value, PerRow):
                return PerRow(value[start:stop]) if len(value) == b else value
            if isinstance(value, list):
                return [cut(v) for v in value]
            if isinstance(value, tuple):
                return tuple(cut(v) for v in value)
            return value

        rpc = self._rows_per_chunk()
        chunks = range(start // rpc, -(-stop // rpc))
        opts = dict(self.transformer_options)
        for key in ("cond_or_uncond", "uuids"):
            if isinstance(opts.get(key), list) and len(opts[key]) * rpc == b:
                opts[key] = [opts[key][i] for i in chunks]
        return ModelCall(cut(self.x), cut(self.t), cut(self.c_concat), cut(self.c_crossattn), self.control, opts,
                         {k: cut(v) for k, v in self.kwargs.items()})

    def piece_size(self, limit: int | None) -> int:
        """The largest piece this call can be cut into with at most `limit` rows (the whole batch if none)."""
        if not limit or limit >= self.batch:
            return self.batch
        try:
            self.check_splittable()
        except SplitImpossible:
            return self.batch
        return max((s for s in self.split_sizes() if s <= limit), default=1)

    def run(self, fn: Callable[["ModelCall"], torch.Tensor], rows_per_piece: int | None = None) -> torch.Tensor:
        size = self.piece_size(rows_per_piece)
        if size >= self.batch:
            return fn(self)
        return torch.cat([fn(self.rows(a, a + size)) for a in range(0, self.batch, size)])

    def need_bytes(self, base_model, rows_per_piece: int | None = None) -> int | None:
        """ComfyUI's memory estimate for this call (for its pieces, once split), if the model has one."""
        estimate = getattr(base_model, "memory_required", None)
        if estimate is None:
            return None
        rows = min(self.batch, rows_per_piece or self.batch)
        return int(estimate([rows] + list(self.x.shape[1:])))


class CallSite:
    """Which model call this is, as "step 3/28 (model call 5)". The step is looked up only when needed (a
    failure, a test's fault plan): reading the sigma off the GPU would add a device sync to every call."""

    def __init__(self, index: int, transformer_options: dict):
        self.index = index
        self._options = transformer_options
        self._step = None

    def _lookup(self) -> tuple[int | None, int | None]:
        if self._step is None:
            self._step = step_of(self._options)
        return self._step

    @property
    def step(self) -> int | None:
        return self._lookup()[0]

    @property
    def n_steps(self) -> int | None:
        return self._lookup()[1]

    def __str__(self) -> str:
        step, n_steps = self._lookup()
        if step is None:
            return f"model call {self.index}"
        return f"step {step + 1}/{n_steps} (model call {self.index})"


def step_of(transformer_options: dict) -> tuple[int | None, int | None]:
    """(index of the current sigma in the run's schedule, number of steps), or (None, n) between steps."""
    schedule = transformer_options.get("sample_sigmas")
    sigma = transformer_options.get("sigmas")
    if schedule is None or sigma is None or not torch.is_tensor(schedule):
        return None, None
    n_steps = max(0, int(schedule.shape[0]) - 1)
    s = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
    diffs = (schedule[:-1].float().cpu() - s).abs()
    if diffs.numel() == 0:
        return None, n_steps
    i = int(diffs.argmin())
    return (i if float(diffs[i]) <= 1e-5 * max(1.0, abs(s)) else None), n_steps
