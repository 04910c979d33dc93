"""The development kit: what tests, bench/ and scripts/ share and the product never imports.

- tiny_models: deterministic NewBie-format models (tiny for tests and the quick start, full-size random for GPU runs)
- stress: the fp16 stress set (weights rescaled so that plain fp16 overflows)
- harness: a real ComfyUI server on loopback with this pack loaded, driven through /prompt
- dit_calls: one DiT call made the way a sampler makes it
- graphs: API-format graphs of the pack's nodes for /prompt (with devkit's fault node: with_faults)
- faults: out-of-memory errors injected inside the OOM Guard, for its tests and bench/oom_recovery.py
- fault_nodes: a test-only custom-node folder holding the fault node (harness.FAULT_NODES), loaded on request
"""
