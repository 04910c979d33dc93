"""One DiT call on the tiny model, made the way a sampler makes it (for the in-process tests)."""
from __future__ import annotations

import torch


def dit_call(patcher, cfg: dict) -> torch.Tensor:
    """One DiT call through BaseModel.apply_model, with conditioning like CFG's batch of 2."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 8, 8, generator=g)
    context = torch.randn(2, 12, cfg["cap_feat_dim"], generator=g)
    pooled = torch.randn(2, cfg["clip_text_dim"], generator=g)
    sigma = torch.tensor([0.7, 0.7])
    topts = dict(patcher.model_options.get("transformer_options", {}))
    topts["wrappers"] = patcher.wrappers
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context, num_tokens=12, clip_text_pooled=pooled,
                                         transformer_options=topts).float()
