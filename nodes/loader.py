"""NewBie Loader: MODEL, CLIP and VAE from ComfyUI's single files or the official folder layout."""
from __future__ import annotations

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..pipeline import block_compile, loader, model_files
from ..pipeline.errors import require_finite


def _dit_choices() -> list[str]:
    folders = model_files.newbie_folders(folder_paths.get_folder_paths("diffusers"))
    return [model_files.FOLDER_PREFIX + f for f in folders] + folder_paths.get_filename_list("diffusion_models")


class NewBieLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NewBieLoader",
            display_name="NewBie Loader",
            category="NewBie",
            description="Loads NewBie-image (DiT, Gemma-3 + Jina CLIP v2 text encoders, FLUX VAE) as ComfyUI's own "
                        "MODEL, CLIP and VAE, in fp16 by default.",
            inputs=[
                io.Combo.Input("diffusion_model", options=_dit_choices(),
                               tooltip="The NewBie DiT from models/diffusion_models, or 'folder: <name>' for the "
                                       "official repository layout under models/diffusers."),
                io.Combo.Input("gemma", options=[model_files.AUTO] + folder_paths.get_filename_list("text_encoders"),
                               default=model_files.AUTO,
                               tooltip="Gemma-3-4B text encoder (models/text_encoders). 'auto': the folder's own, "
                                       "or the one file whose name contains 'gemma'."),
                io.Combo.Input("jina", options=[model_files.AUTO] + folder_paths.get_filename_list("text_encoders"),
                               default=model_files.AUTO,
                               tooltip="Jina CLIP v2 text encoder (models/text_encoders). 'auto': the folder's own, "
                                       "or the one file whose name contains 'jina'."),
                io.Combo.Input("vae", options=[model_files.AUTO] + folder_paths.get_filename_list("vae"),
                               default=model_files.AUTO,
                               tooltip="FLUX.1 VAE (models/vae). 'auto': the folder's own, or ae.safetensors."),
                io.Combo.Input("precision", options=loader.DIT_PRECISIONS, default="fp16",
                               tooltip="DiT weight precision. fp16 runs on every CUDA card (T4, V100, RTX 20xx "
                                       "included); bf16 needs Ampere or newer; fp32 doubles memory. fp8 (scaled "
                                       "e4m3) and int8 hold the blocks' matrices in 1 byte per weight through "
                                       "ComfyUI's quantized format (fp8 matmuls on GPUs that have them); they "
                                       "quantize a 16-bit file at load, or load a file saved quantized as it is "
                                       "(speeds and peaks by card size: the README's VRAM guide)."),
                io.Combo.Input("text_encoder_precision", options=loader.TE_PRECISIONS, default="auto",
                               tooltip="Precision of Gemma-3 and Jina. 'auto' lets ComfyUI choose for this GPU. "
                                       "fp8 (scaled e4m3) and int8 hold Gemma-3's decoder layers in 1 byte per "
                                       "weight through ComfyUI's quantized text-encoder format (about 4.5 GB "
                                       "instead of 7.8 GB); Jina and the rest of Gemma stay as in 'auto'. "
                                       "CPU-tested, not yet GPU-measured."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=1024.0, step=0.5, optional=True,
                               tooltip="At most this many GiB of DiT weights stay on the GPU (for a GPU shared "
                                       "with other apps); the rest is streamed in each step, which is slower. "
                                       "0: no cap, ComfyUI decides."),
                io.Combo.Input("compile", options=list(block_compile.MODES), default="auto", optional=True,
                               tooltip="torch.compile of each transformer block (one compiled graph serves all "
                                       "blocks of a kind; fuses the elementwise work between the matrix "
                                       "multiplies). 'auto': on for CUDA GPUs, off on a CPU. The first sampling "
                                       "run pays the compile (seconds); later runs and restarts reuse it. "
                                       "'off': eager PyTorch."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Clip.Output(display_name="CLIP"),
                io.Vae.Output(display_name="VAE"),
                io.String.Output(display_name="report", tooltip="What was loaded: sizes, precisions, files."),
            ],
        )

    @classmethod
    def execute(cls, diffusion_model, gemma, jina, vae, precision, text_encoder_precision,
                vram_budget_gb=0.0, compile="auto") -> io.NodeOutput:
        require_finite(vram_budget_gb, "vram_budget_gb", "NewBie Loader", "GiB from 0 to 1024 (0: no cap)")
        if diffusion_model.startswith(model_files.FOLDER_PREFIX):
            folder = model_files.resolve_folder(diffusion_model[len(model_files.FOLDER_PREFIX):],
                                                folder_paths.get_folder_paths("diffusers"))
            # Single files picked explicitly replace the folder's own part.
            overrides = {k: _full(k, v) for k, v in (("gemma", gemma), ("jina", jina), ("vae", vae))
                         if v != model_files.AUTO}
            parts = loader.with_single_files(loader.read_folder(folder), overrides)
        else:
            paths = {"dit": folder_paths.get_full_path_or_raise("diffusion_models", diffusion_model)}
            for part, choice, kind in (("gemma", gemma, "text_encoders"), ("jina", jina, "text_encoders"),
                                       ("vae", vae, "vae")):
                if choice == model_files.AUTO:
                    choice = model_files.pick_auto(part, folder_paths.get_filename_list(kind), f"models/{kind}")
                paths[part] = _full(part, choice)
            parts = loader.read_single_files(paths)
        loaded = loader.load_newbie(parts, precision, text_encoder_precision, progress=comfy.utils.ProgressBar(3),
                                    vram_budget_gb=vram_budget_gb, compile=compile)
        return io.NodeOutput(loaded.model, loaded.clip, loaded.vae, loaded.report)


def _full(part: str, name: str) -> str:
    return folder_paths.get_full_path_or_raise("vae" if part == "vae" else "text_encoders", name)


NODES = [NewBieLoader]
