"""The guard of one model (and its VAE): the recovery ladder applied to each diffusion-model call and each VAE
decode, per-sampling-run state (the batch split stays for the run), and the record of recoveries."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import NewBieError
from . import report
from .calls import CallSite, ModelCall, SplitImpossible
from .ladder import LadderExhausted, Rung, call_with_recovery
from .memory import ComfyMemory

log = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 6
MEMORY_RUNGS = ("empty_cache", "free_models", "offload_weights")


class OOMUnrecoverable(torch.OutOfMemoryError, NewBieError):
    """The recovery ladder is exhausted. An out-of-memory error, so ComfyUI's own OOM handling still runs."""


@dataclass
class _Run:
    guider: Any = None                  # the CFGGuider running this sampling (holds its extra models)
    calls: int = 0
    rows_per_piece: int | None = None   # set by a batch split; kept for the rest of the run
    recoveries: int = 0


@dataclass
class RecoveryEvent:
    where: str
    retries: int
    actions: list
    changed_computation: bool


class OOMGuard:
    """The wrappers of one guarded model and its recovery record (shared by the model's later clones).
    `memory` builds the rungs' adapter (ComfyMemory; tests hand in a stand-in)."""

    def __init__(self, max_retries: int = DEFAULT_MAX_RETRIES, allow_batch_split: bool = True,
                 node_id: str | None = None, memory: Callable[..., ComfyMemory] = ComfyMemory):
        self.max_retries = max(0, int(max_retries))
        self.allow_batch_split = bool(allow_batch_split)
        self.node_id = node_id
        self.memory = memory
        self.events: list[RecoveryEvent] = []
        self._run: _Run | None = None

    @property
    def recoveries(self) -> int:
        return len(self.events)

    # -- sampling ------------------------------------------------------------------------------------------
    def outer_sample(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper: one sampling run (a KSampler, a SamplerCustom...)."""
        self._run = _Run(guider=getattr(executor, "class_obj", None))
        try:
            return executor(*args, **kwargs)
        finally:
            run, self._run = self._run, None
            if run is not None and run.recoveries:
                log.warning("NewBie OOM guard: sampling finished after %d recovery(ies) in this run, %d in all for "
                            "this guarded model", run.recoveries, self.recoveries)

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        """APPLY_MODEL wrapper: one call of the diffusion model, retried on out-of-memory."""
        if self._run is None:  # a sampler that bypassed CFGGuider.outer_sample
            self._run = _Run()
        run = self._run
        index = run.calls
        run.calls += 1
        call = ModelCall(x, t, c_concat, c_crossattn, control,
                         transformer_options if transformer_options is not None else {}, kwargs)
        where = CallSite(index, call.transformer_options)
        base_model = getattr(executor, "class_obj", None)
        patcher = getattr(base_model, "current_patcher", None)
        # Built on the first failure only: nothing here should cost anything on the normal path.
        memory = functools.cache(lambda: self.memory(patcher, x.device,
                                                     list(getattr(run.guider, "loaded_models", None) or ())))

        def forward(piece: ModelCall):
            return executor(piece.x, piece.t, piece.c_concat, piece.c_crossattn, piece.control,
                            piece.transformer_options, **piece.kwargs)

        no_split = []

        def rungs():
            ladder = [Rung("empty_cache", memory().empty_cache), Rung("free_models", memory().free_other_models),
                      Rung("offload_weights",
                           lambda: memory().offload_weights(call.need_bytes(base_model, run.rows_per_piece)))]
            if self.allow_batch_split:
                try:
                    call.check_splittable()
                    sizes = call.split_sizes(run.rows_per_piece)
                    if not sizes:
                        raise SplitImpossible("the batch is already split as far as it goes")
                    ladder += [Rung("split", _splitter(run, call.batch, size)) for size in sizes]
                except SplitImpossible as why:
                    no_split.append(f"no batch split possible: {why}")
            return ladder

        split_before = run.rows_per_piece
        try:
            done = call_with_recovery(lambda retry: call.run(forward, run.rows_per_piece), rungs, self.max_retries,
                                      where)
        except LadderExhausted as e:
            raise self._unrecoverable(where, e, memory(), call.need_bytes(base_model, run.rows_per_piece),
                                      list(call.x.shape), no_split) from None
        if done.retries:
            run.recoveries += 1
            self._record(RecoveryEvent(str(where), done.retries, done.actions, run.rows_per_piece != split_before))
        return done.value

    # -- VAE -----------------------------------------------------------------------------------------------
    def decode(self, decode: Callable[[], Any], memory: ComfyMemory, need: int | None) -> Any:
        """One VAE decode, retried after rungs 1-2; still failing, the error goes on to ComfyUI's VAE.decode."""
        def rungs():
            return [Rung("empty_cache", memory.empty_cache), Rung("free_models", memory.free_other_models)]

        try:
            done = call_with_recovery(lambda retry: decode(), rungs, self.max_retries, "VAE decode")
        except LadderExhausted as e:
            log.warning("NewBie OOM guard: VAE decode still out of memory after %d retry(ies); handing the error "
                        "back to ComfyUI's VAE.decode, which falls back to tiled decoding for a whole-image decode "
                        "(tiles can differ slightly at their seams)", len(e.actions))
            raise self._unrecoverable("VAE decode", e, memory, need) from None
        if done.retries:
            self._record(RecoveryEvent("VAE decode", done.retries, done.actions, False))
        return done.value

    # -- reporting -----------------------------------------------------------------------------------------
    def _record(self, event: RecoveryEvent) -> None:
        self.events.append(event)
        result = ("the batch now runs split, so the result may differ by float rounding" if event.changed_computation
                  else "same computation, same result")
        text = (f"NewBie OOM guard: recovered {event.where} on retry {event.retries} after: "
                f"{'; '.join(event.actions)} ({result}). Recovery #{self.recoveries} for this guarded model.")
        log.warning(text)
        report.show_on_node(self.node_id, f"OOM Guard: {self.recoveries} recovery(ies); last: {event.where}, "
                                          f"{event.retries} retry(ies): {event.actions[-1]}")

    def _unrecoverable(self, where, e: LadderExhausted, memory: ComfyMemory, need: int | None,
                       batch_shape: list | None = None, notes: Sequence[str] = ()) -> OOMUnrecoverable:
        if need and batch_shape is not None:
            basis = f"ComfyUI's estimate for a batch of shape {batch_shape}"
        elif need:
            basis = "ComfyUI's estimate for this decode"
        else:
            basis = "the failed allocation alone"
        hints = []
        if self.max_retries < len(MEMORY_RUNGS) + 1:
            hints.append("a larger max_retries on the OOM Guard")
        if not self.allow_batch_split and batch_shape is not None:
            hints.append("allow_batch_split on the OOM Guard")
        return OOMUnrecoverable(report.unrecoverable_message(where, e.actions, e.last_error, memory, need, basis,
                                                             notes, hints))

    def describe(self, vae_guarded: bool, device) -> str:
        return report.describe(self.max_retries, self.allow_batch_split, vae_guarded, device)


def _splitter(run: _Run, batch: int, size: int) -> Callable[[], str]:
    def apply() -> str:
        run.rows_per_piece = size
        return f"split the batch of {batch} into {batch // size} pieces of {size}"
    return apply
