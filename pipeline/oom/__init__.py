"""Out-of-memory recovery for sampling and VAE decoding: retry the very call that ran out of memory.

A guarded model carries two ComfyUI wrappers (`comfy.patcher_extension`, present on every supported host):
- `OUTER_SAMPLE` marks the start and end of a sampling run (per-run state);
- `APPLY_MODEL` wraps one call of the diffusion model: `BaseModel.apply_model(x, t, c_concat, c_crossattn,
  control, transformer_options, **conds)`, i.e. one sampling step's batch (cond and uncond together when
  they fit). When that call raises an out-of-memory error, the wrapper climbs a recovery ladder and calls
  it again with the same inputs. The sampler's state (x, sigmas, the noise generator) lives outside that
  call, so a retry consumes no extra noise and the finished latent is the uninterrupted run's.

The ladder, one rung per retry (ComfyUI's own memory functions do the work):
1. empty the allocator cache (`soft_empty_cache`): the same computation runs again, bit-identical;
2. unload the other models from the device (`free_memory`, keeping this model and the sampling run's
   additional models such as ControlNets): bit-identical;
3. move part of this model's weights to the offload device (`partially_unload`, which both the legacy
   loader and dynamic VRAM implement): the same arithmetic, slower;
4. split the batch (cond/uncond, then latent rows) into halves and concatenate the results: the same
   model on fewer rows, equal up to float rounding. It stays split for the rest of that sampling run.
   NewBie's positive and negative prompts usually differ in token count; the pack pads them to one length so
   that ComfyUI batches them (pipeline/cfg_batch.py), and the caption paddings (`calls.PerRow`) are cut with
   the rows. A model without the pack's batching runs such prompts as two one-row calls, which this rung
   cannot split.
On the CPU rungs 1-3 have nothing to free; they still count as attempts so the ladder is the same everywhere.
Rungs 1-3 are written against both hosts' APIs but were exercised on the CPU only (bench/oom_recovery.py is
the GPU check). There is no "degrade" mode (smaller image, fewer steps): every recovery keeps the job as asked.
Only out-of-memory errors are caught. If the ladder is exhausted the call raises `OOMUnrecoverable` (an
out-of-memory error, so ComfyUI unloads its models and keeps serving) saying how much the step needs, what
is free, what to try.

A guarded VAE is a shallow copy of the VAE whose decoder retries after rungs 1-2, *before* ComfyUI's
`VAE.decode` sees the error (ComfyUI's own fallback, tiled decoding, gives a slightly different image).

The modules, one job each:
- `ladder`: call; after each out-of-memory error apply the next rung and call again (pure logic);
- `calls`: one diffusion-model call: which step it is, how to cut it along the batch (pure logic);
- `memory`: ComfyUI's memory functions as rungs 1-3, and what counts as out of memory on the host;
- `guard`: the guard of one model: the ladder on its model calls and VAE decodes, and its recovery record;
- `report`: byte counts, the message when nothing helped, the node's report and its text on the node;
- `attach`: the guard's wrappers on a ModelPatcher, keyed (a second guard replaces the first);
- `vae`: a VAE copy whose decoder goes through the guard.
"""
