"""API-format graphs for the host tests, built like ComfyUI's own tests build them (node id -> class + inputs)."""
from __future__ import annotations

import json

TINY_DIT = "newbie-tiny.safetensors"
TINY_GEMMA = "newbie-tiny-gemma3.safetensors"
TINY_JINA = "newbie-tiny-jina-clip-v2.safetensors"
TINY_VAE = "newbie-tiny-flux-ae.safetensors"
TINY_FOLDER = "folder: newbie-tiny"

XML_PROMPT = ("<character_1><n>$character_1$</n><gender>1girl</gender><appearance>blue_hair, long_twintails, "
              "teal_eyes</appearance><expression>smile</expression></character_1>\n<general_tags><count>1girl"
              "</count><style>anime_style</style><quality>masterpiece</quality></general_tags>")
NEGATIVE = "lowres, bad_anatomy, worst_quality"


def loader(diffusion_model=TINY_DIT, gemma="auto", jina="auto", vae="auto", precision="fp16",
           text_encoder_precision="auto", vram_budget_gb=None, compile=None) -> dict:
    inputs = {"diffusion_model": diffusion_model, "gemma": gemma, "jina": jina, "vae": vae, "precision": precision,
              "text_encoder_precision": text_encoder_precision}
    if vram_budget_gb is not None:  # optional input: graphs saved before it existed leave it out
        inputs["vram_budget_gb"] = vram_budget_gb
    if compile is not None:
        inputs["compile"] = compile
    return {"class_type": "NewBieLoader", "inputs": inputs}


def txt2img(seed=1, width=64, height=64, steps=3, cfg=4.0, sampler="euler_ancestral", scheduler="simple",
            positive=XML_PROMPT, negative=NEGATIVE, prefix="newbie", **loader_args) -> dict:
    """NewBieLoader -> CLIPTextEncode x2 -> EmptySD3LatentImage -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "1": loader(**loader_args),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def with_faults(graph: dict, plan: dict) -> dict:
    """The graph with devkit's fault node (devkit/fault_nodes; only servers started with harness.FAULT_NODES
    know it) where the plan has faults and where they belong: on the model right before each sampler, so the
    fault wrapper is the model's innermost one; on the VAE each VAEDecode uses, under the OOM Guard's VAE proxy
    when the VAE comes from a guard."""
    graph = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in graph.items()}
    text = json.dumps(plan)
    model_faults = any(key in plan for key in ("model_calls", "steps", "pause_at_call"))

    def insert(node_id: str, name: str, source: list, output: int) -> list:
        graph[node_id] = {"class_type": "NewBieDevkitFaults", "inputs": {"plan": text, name: source}}
        return [node_id, output]

    for node_id, node in list(graph.items()):
        inputs = node["inputs"]
        if model_faults and node["class_type"] in ("KSampler", "KSamplerAdvanced", "SamplerCustom"):
            inputs["model"] = insert(f"{node_id}-model-faults", "model", inputs["model"], 0)
        elif plan.get("vae_decode") and node["class_type"] == "VAEDecode":
            source = graph[inputs["vae"][0]]
            owner = source["inputs"] if source["class_type"] == "NewBieOOMGuard" else inputs
            owner["vae"] = insert(f"{node_id}-vae-faults", "vae", owner["vae"], 1)
    return graph
