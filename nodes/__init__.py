"""Thin ComfyUI nodes over `pipeline/`; one module per family."""
from comfy_api.latest import ComfyExtension, io

from . import guard, loader, lora, prompt, quantize, sampling, warmup

NODE_CLASSES = [*loader.NODES, *quantize.NODES, *lora.NODES, *prompt.NODES, *warmup.NODES, *sampling.NODES, *guard.NODES]


class NewBieExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODE_CLASSES
