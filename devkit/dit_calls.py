"""One DiT call made the way a sampler makes it: for the in-process tests and bench/profile_dit.py."""
from __future__ import annotations

import torch


def dit_inputs(cfg: dict, device="cpu", latent_hw=(8, 8), tokens=12) -> dict:
    """Seeded inputs of one CFG-batched (2) DiT call: latent, caption features, Jina pooled vector, sigma."""
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(2, 16, *latent_hw, generator=g).to(device),
            "c_crossattn": torch.randn(2, tokens, cfg["cap_feat_dim"], generator=g).to(device),
            "clip_text_pooled": torch.randn(2, cfg["clip_text_dim"], generator=g).to(device),
            "t": torch.tensor([0.7, 0.7], device=device), "num_tokens": tokens}


def dit_call(patcher, cfg: dict, inputs: dict | None = None) -> torch.Tensor:
    """One DiT call through BaseModel.apply_model with the patcher's wrappers (the tiny inputs by default)."""
    inputs = dict(inputs or dit_inputs(cfg))
    topts = dict(patcher.model_options.get("transformer_options", {}))
    topts["wrappers"] = patcher.wrappers
    x, t = inputs.pop("x"), inputs.pop("t")
    with torch.no_grad():
        return patcher.model.apply_model(x, t, transformer_options=topts, **inputs).float()
