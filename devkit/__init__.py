"""The development kit: what tests, bench/ and scripts/ share and the product never imports.

- tiny_models: deterministic NewBie-format models (tiny for tests and the quick start, full-size random for GPU runs)
- stress: the fp16 stress set (weights rescaled so that plain fp16 overflows)
- harness: a real ComfyUI server on loopback with this pack loaded, driven through /prompt
- dit_calls: one DiT call made the way a sampler makes it
- graphs: API-format graphs of the pack's nodes for /prompt
"""
