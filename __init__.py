"""comfyui-newbie-lowvram: NewBie-image on ordinary GPUs, as a ComfyUI node pack (entry point only).

Imports of ComfyUI happen inside the entry point, so the package can be imported outside ComfyUI
(pytest collects the repository root as a package).
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import NewBieExtension

    return NewBieExtension()
